"""Knowledge-graph embedding on any folder of train/valid/test triples (e.g. FB15k-237).

Command:
  python -m launch.pretrain_kg --config=configs/kg_triples.py --workdir=runs/kg_fb \
      --config.data.path=DIR
  DIR holds train.txt, valid.txt, test.txt (head<TAB>relation<TAB>tail) and optionally
  entity_types.tsv; without it the graph has one entity type ("entity").
  `:smoke` shortens training to a few steps (still needs data.path).

Settings follow the usual FB15k-237 recipe at the PyKEEN benchmark's scale:
ComplEx at 64 complex dims (dim 128), 2 x (15 in-chunk + 17 uniform) = 64 negatives per
positive, softmax (cross-entropy) loss.

Run time on a 2-core box: about a minute per epoch of FB15k-237 (272k triples);
a full filtered evaluation of its 20k test triples takes tens of seconds.

Expected result: on FB15k-237, filtered MRR around 0.25-0.30 after ~50 epochs
(published ComplEx/DistMult numbers are 0.24-0.35 depending on tuning).
"""

from configs import kg


def get_config(arg=None):
    """Returns the config; arg None or "smoke"."""
    if arg not in (None, "", "smoke"):
        raise ValueError(f"unknown config arg {arg!r}; use nothing or 'smoke'")
    smoke = arg == "smoke"
    c = kg.get_config(arg)
    c.data.world_config = ""  # a triple folder is required
    c.data.unseen = "skip"
    c.model.model = "complex"
    c.model.dim = 16 if smoke else 128
    c.train.chunk_size = 16
    c.train.uniform_negatives = 17
    c.train.chunks_per_batch = 8 if smoke else 16
    c.train.entity_learning_rate = 0.05
    c.train.num_epochs = 1 if smoke else 50
    c.train.max_steps = 20 if smoke else -1
    c.train.eval_every_epochs = 0 if smoke else 10
    c.eval.max_triples = 500 if smoke else -1
    return c
