"""CTR + CVR ranker (DCN-v2 + MLP, ESMM) on multi-faceted ID tables.

Command:
  python -m launch.train_ranker --config=configs/ranker.py --workdir=runs/ranker \
      --config.data.path=runs/world \
      [--config.facets=cl,kg --config.facet_paths.cl=runs/cl/facet_cl \
       --config.facet_paths.kg=runs/kg/facet_kg --config.facet_mode=finetune]
  (`:smoke` shrinks everything; with an empty data.path the launcher first writes the
  synthetic world of the matching size into WORKDIR/world, or reuses the one there; a
  world of another size there is refused.)

Variants: `--config.scratch_dim=0 --config.facets=''` is the "no large tables" ranker
(coarse features only); `--config.facets=''` trains large tables from scratch;
`--config.facet_mode=freeze` freezes the pretrained facets;
`--config.facet_missing=zeros` gives ranker ids a pretrained facet lacks an all-zero row
instead of a random one (a frozen facet never trains those rows). In the ablation
(configs/ablation.py) the same keys are `--config.ranker.facet_missing=zeros` etc.

Run time on a 2-core box: smoke ~30 s (mostly compilation); default world ~1-2 min
(600k training impressions, one epoch at batch 4096).

Expected result: WORKDIR/metrics.json with test AUC, log loss, NE and calibration for
CTR (all impressions), CVR (clicked impressions) and CTCVR (all impressions). On the
default world the no-table ranker reaches a CTR AUC well above 0.5 from the coarse
features alone (the world summary's `click_auc_coarse_effects_only` is the
reference); ID tables add to that. The trained ranker is saved to WORKDIR/ranker.
"""

import ml_collections


def get_config(arg=None):
    """Returns the config; arg None (default world) or "smoke"."""
    if arg not in (None, "", "smoke"):
        raise ValueError(f"unknown config arg {arg!r}; use nothing or 'smoke'")
    smoke = arg == "smoke"
    c = ml_collections.ConfigDict()

    c.data = ml_collections.ConfigDict()
    c.data.path = ""  # dataset folder; empty: generate the world into WORKDIR/world
    c.data.world_config = "smoke" if smoke else "default"  # only when path is empty
    c.data.table = "impressions"
    # Day windows: names of dataset.json's "splits", or "START,END" days (END exclusive:
    # --config.data.train_window=20464,20466); valid and test must not share days with train.
    c.data.train_window = "ranker_train"
    c.data.valid_window = "ranker_valid"  # "": no validation
    c.data.test_window = "ranker_test"
    c.data.click_column = "click"  # labels: every value 0 or 1
    c.data.conversion_column = "conversion"
    # An impression's day (the windows' days); without it, timestamp_column (seconds) // 86400.
    # Left out of the pipeline's stage keys and the run fingerprints at these defaults.
    c.data.day_column = "day"
    c.data.timestamp_column = "timestamp"
    # Comma list of small integer columns (values < 2**20); "" = every integer column that
    # is not an entity id, a label (click/conversion_column) or a time (day/timestamp and
    # day_column/timestamp_column).
    c.data.coarse_features = ""
    c.data.max_train_examples = 0  # only the first N training impressions; 0: all

    # Entities as "name:column" pairs; facets as a comma list of pretrained facet names.
    c.entities = "user:user_id,pin:item_id,advertiser:advertiser_id"
    c.scratch_dim = 16 if smoke else 32  # 0: no scratch facet
    c.scratch_init_scale = -1.0  # -1: 1/sqrt(dim)
    c.facets = ""  # e.g. "cl,kg"
    c.facet_mode = "finetune"  # or "freeze"
    # Rows of ranker ids a pretrained facet lacks: "random" (normal, std of the found rows)
    # or "zeros". Left out of the pipeline's stage keys and the run fingerprints while
    # "random", so runs made before this option existed are reused.
    c.facet_missing = "random"
    c.facet_paths = ml_collections.ConfigDict({"cl": "", "kg": ""})
    c.facet_learning_rate = -1.0  # -1: table_learning_rate * finetune_lr_scale
    c.facet_target_norm = 1.0  # rescale each pretrained table to this mean row norm; -1: keep

    c.model = ml_collections.ConfigDict()
    c.model.coarse_dim = 8
    c.model.num_cross_layers = 2
    c.model.cross_rank = 0  # 0: full-rank cross weights
    c.model.mlp_dims = (64, 32) if smoke else (256, 128)
    c.model.head_dims = (16,) if smoke else (64,)
    c.model.entity_norm = "layernorm"

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 512 if smoke else 4096
    c.train.num_epochs = 2.0 if smoke else 1.0
    c.train.dense_learning_rate = 2e-3
    c.train.dense_weight_decay = 0.0
    c.train.warmup_steps = 0
    c.train.table_learning_rate = 0.05
    c.train.table_initial_accumulator = 1e-6
    c.train.finetune_lr_scale = 0.1
    c.train.cvr_weight = 1.0
    c.train.log_every = 10 if smoke else 25
    c.train.eval_batch_size = 16384
    c.train.seed = 0
    # Checkpoints in WORKDIR/checkpoints every N steps and at the end (0: none, and none
    # there is resumed); a rerun with the same WORKDIR resumes from the latest one. Keep the newest `keep_checkpoints`.
    c.train.checkpoint_every = 0 if smoke else 500
    c.train.keep_checkpoints = 2
    # Force one sharding type on every table ("row_wise", "replicated", ...; "": planner).
    c.train.table_sharding = ""
    return c
