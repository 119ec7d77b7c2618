"""User–pin contrastive pretraining (facet `cl`): two towers, in-batch sampled softmax.

Command:
  python -m launch.pretrain_contrastive --config=configs/contrastive.py \
      --workdir=runs/cl --config.data.path=runs/world
  (add `:smoke` for a seconds-long run; with an empty data.path the launcher first
  writes the synthetic world of the matching size into WORKDIR/world.)

Day window: `--config.data.window=stale` (a named window of the folder's
dataset.json), `--config.data.window=0,20` (days, END exclusive, as the ranker's
windows) or `--config.data.window_start=0 --config.data.window_end=20` (-1 = unset).
Held-out pairs come from the `eval_days` days after the window.

Run time on a 2-core box: smoke ~1 min (mostly compilation); default world a few
minutes per epoch (~10-30k examples/s at batch 4096).

Expected result: Recall@10 on held-out later pairs far above the popularity
baseline (`pop_recall@10` in metrics.json), held-out loss close to the training loss.
Writes WORKDIR/facet_cl (tables `user`, `pin` + vocabularies) and WORKDIR/metrics.json.
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
    c.data.world_config = "smoke" if smoke else "default"  # used only when path is empty
    c.data.table = "engagements"
    c.data.user_column = "user_id"
    c.data.item_column = "item_id"
    c.data.day_column = "day"
    c.data.timestamp_column = "timestamp"
    c.data.type_column = "engagement_type"
    # Weight per engagement type: 0 = save, 1 = click, 2 = closeup.
    c.data.type_weights = (2.0, 1.0, 0.5)
    # Named window ("fresh", "stale", ...) or "START,END" days, not with the days below;
    # "auto" = the folder's fresh_pretrain window if it has one and no day below
    # is set; "" = the days below.
    c.data.window = "auto"
    c.data.window_start = -1  # first training day; -1 = first day of the data
    c.data.window_end = -1  # end (exclusive); -1 = eval_days before the last day
    c.data.eval_days = 1
    c.data.use_conversions = True
    # Conversions (user, advertiser) become pairs with a pin of that advertiser from the
    # items table (item_column, advertiser_column).
    c.data.conversions_table = "conversions"
    c.data.items_table = "items"
    c.data.advertiser_column = "advertiser_id"
    c.data.conversion_weight = 3.0
    c.data.pin_side_features = ()  # e.g. ("topic",) from the items table
    c.data.max_eval_pairs = 2000 if smoke else 10000
    c.data.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.dim = 16 if smoke else 64
    c.model.project = True
    c.model.temperature = 0.05
    c.model.use_logq = True
    c.model.remove_accidental_hits = True
    c.model.uniform_negatives = 0  # M extra uniform pins per example (mixed negatives)
    c.model.export = "tower"  # facet tables: "tower" outputs or "raw" rows

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 256 if smoke else 4096
    c.train.num_epochs = 2.0 if smoke else 3.0
    c.train.max_steps = -1  # -1 = from num_epochs
    c.train.table_optimizer = "row_adagrad"  # or "sgd", "lazy_adam"
    c.train.table_learning_rate = 0.05  # sparse rows: large
    c.train.table_initial_accumulator = 1e-6
    c.train.dense_learning_rate = 1e-3  # towers' dense layers: small
    c.train.eval_every = 0 if smoke else 1000
    c.train.eval_ks = (10, 50, 100)
    c.train.eval_loss_batches = 4
    c.train.log_every = 10 if smoke else 50  # 0: never
    c.train.seed = 0
    # Checkpoints in WORKDIR/checkpoints every N steps (0: off); a rerun with the same
    # WORKDIR resumes from the latest one. Keep the newest `keep_checkpoints`.
    c.train.checkpoint_every = 0
    c.train.keep_checkpoints = 2
    return c
