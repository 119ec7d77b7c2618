"""Knowledge-graph pretraining (facet `kg`) on the synthetic world's typed graph.

Command:
  python -m launch.pretrain_kg --config=configs/kg.py --workdir=runs/kg \
      --config.data.path=runs/world
  (add `:smoke` for a seconds-long run; with an empty data.path the launcher first
  writes the synthetic world of the matching size into WORKDIR/world and reads
  WORKDIR/world/kg.)

The graph: users, pins, advertisers, boards and keywords (one row-sharded table per
type), relations such as `user engaged pin`, `user converted advertiser`,
`pin on board`; DistMult at dim 64 with PyTorch-BigGraph chunked negatives
(C - 1 in-chunk + U uniform, type-constrained, both sides), softmax loss, row-wise
Adagrad for entities and Adam for relations. Switch models with
`--config.model.model=transr` (or transe, complex, rotate).

Run time on a 2-core box: smoke ~1 min (mostly compilation); default world a few
minutes per epoch (tens of thousands of positive triples/s).

Expected result: filtered test MRR and Hits@10 far above a random ranking (random
MRR is ~ln(n)/n for n candidates of the type, well below 0.01 on the default world);
metrics.json holds test_mrr, test_hits@{1,3,10} (both sides and per side) and the
training throughput. Writes WORKDIR/facet_kg (one table per entity type, vocabularies
as raw ids without the "type:" prefix).
"""

import ml_collections


def get_config(arg=None):
    """Returns the config; arg None (default world) or "smoke"."""
    if arg not in (None, "", "smoke"):
        raise ValueError(f"unknown config arg {arg!r}; use nothing or 'smoke'")
    smoke = arg == "smoke"
    c = ml_collections.ConfigDict()

    c.data = ml_collections.ConfigDict()
    c.data.path = ""  # dataset folder (reads its kg/) or a triple folder; empty: generate
    c.data.world_config = "smoke" if smoke else "default"  # used only when path is empty
    c.data.unseen = "skip"  # valid/test triples with entities unseen in train: skip or error

    c.model = ml_collections.ConfigDict()
    c.model.model = "distmult"  # transe | distmult | complex | rotate | transr
    c.model.dim = 16 if smoke else 64
    c.model.gamma = 6.0  # margin of distance models (transe, rotate, transr)
    c.model.rel_dim = -1  # transr relation dim; -1 = dim
    c.model.init_scale = -1.0  # std of the entity init; -1 = 1/sqrt(dim)

    c.train = ml_collections.ConfigDict()
    c.train.chunk_size = 16 if smoke else 32
    c.train.uniform_negatives = 16 if smoke else 32
    c.train.chunks_per_batch = 8 if smoke else 32  # a multiple of the device count
    c.train.corrupt = "both"
    c.train.loss = "softmax"  # softmax | logistic | margin
    c.train.margin = 1.0
    c.train.adversarial_temperature = 0.0  # > 0: logistic / margin losses only
    c.train.regularization = 0.0
    c.train.entity_learning_rate = 0.05
    c.train.entity_initial_accumulator = 1e-6
    c.train.relation_learning_rate = 0.01
    c.train.num_epochs = 2 if smoke else 10
    c.train.max_steps = -1  # -1 = no limit
    c.train.seed = 0
    c.train.log_every = 20 if smoke else 200  # 0: never
    c.train.eval_every_epochs = 1 if smoke else 2
    # Checkpoints in WORKDIR/checkpoints every N steps (0: off); a rerun with the same
    # WORKDIR resumes from the latest one. Keep the newest `keep_checkpoints`.
    c.train.checkpoint_every = 0
    c.train.keep_checkpoints = 2

    c.eval = ml_collections.ConfigDict()
    c.eval.block_size = 256
    c.eval.max_triples = 2000 if smoke else 20000  # -1 = all test triples
    c.eval.sides = ("head", "tail")
    return c
