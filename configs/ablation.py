"""Ranker ablation: no large tables / scratch / +contrastive / +KG / +both (fine-tuned,
frozen, stale pretraining window), over seeds, on the same data and budget.

Command:
  python -m launch.run_ablation --config=configs/ablation.py --workdir=runs/ablation \
      --config.ranker.data.path=runs/world
  (`:smoke` for a minutes-long run on the smoke world; with an empty data path the
  launcher first writes the synthetic world of the matching size into WORKDIR/world; a
  world of another size already there is refused.)

Pretraining: the contrastive (`cl`) and knowledge-graph (`kg`) facets are pretrained
once per window (fresh and stale) by running `launch.pretrain_contrastive` and
`launch.pretrain_kg` with `pretrain.cl_config` / `pretrain.kg_config` (plus any extra
`--config.*` flags in `pretrain.cl_flags` / `pretrain.kg_flags`) into
WORKDIR/pretrain/<facet>_<window>; existing facet checkpoints can be given instead
with `--config.facet_dirs.cl_fresh=DIR` etc. The stale KG comes from the same world
regenerated with its KG window set to the stale pretraining window (same seed, so the
same logs; only kg/ differs).
A relative path (a config file, a path in the flags, a facet dir) means the folder
the ablation is started from, where the pretrainers run too; a config file not there is
read from the checkout, as the defaults below are.

Run time on a 2-core box: smoke ~5-10 min (21 tiny ranker runs, mostly compilation);
default world: target under 30 min including pretraining (~1 min per ranker run).

Expected result: WORKDIR/ablation.md and ablation.json: mean ± std test AUC for CTR,
CVR (clicked impressions) and CTCVR per variant, and the relative AUC gain
RelaImpr = (AUC - AUC_base) / (AUC_base - 0.5) over the no-large-tables baseline.
"""

import importlib.util
import pathlib

import ml_collections

ALL_VARIANTS = "no_large_tables,scratch,cl,kg,cl_kg,cl_kg_frozen,cl_kg_stale"


def _ranker_config(arg):
    path = pathlib.Path(__file__).with_name("ranker.py")
    spec = importlib.util.spec_from_file_location("_ranker_config_for_ablation", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def get_config(arg=None):
    """Returns the config; arg None (default world) or "smoke"."""
    if arg not in (None, "", "smoke"):
        raise ValueError(f"unknown config arg {arg!r}; use nothing or 'smoke'")
    smoke = arg == "smoke"
    c = ml_collections.ConfigDict()
    c.ranker = _ranker_config(arg)  # data, model and optimisation shared by all runs
    c.ranker.train.log_every = 10 if smoke else 50
    c.variants = ALL_VARIANTS
    c.seeds = (0, 1, 2)
    c.facet_dirs = ml_collections.ConfigDict(
        {"cl_fresh": "", "cl_stale": "", "kg_fresh": "", "kg_stale": ""}
    )
    c.save_ranker_variants = "cl_kg"
    c.compilation_cache = True  # persistent XLA cache in WORKDIR/jax_cache

    c.pretrain = ml_collections.ConfigDict()
    c.pretrain.cl_config = "configs/contrastive.py" + (":smoke" if smoke else "")
    c.pretrain.kg_config = "configs/kg.py" + (":smoke" if smoke else "")
    # Extra space-separated --config.* flags. The default world's budget (the whole
    # ablation in ~30 min on 2 cores) allows ~3 min per pretraining run.
    # Smoke: evaluate Recall/NDCG every 100 steps (the report draws the curve).
    c.pretrain.cl_flags = (
        "--config.train.eval_every=100" if smoke
        else "--config.train.max_steps=400 --config.train.eval_every=0"
    )
    # TransE: DistMult (configs/kg.py's default) did not move off the uniform-softmax
    # loss on the default world in a one-epoch run (filtered MRR 0.004 vs 0.016 for TransE).
    c.pretrain.kg_flags = "--config.model.model=transe --config.train.num_epochs=1" + (
        " --config.train.eval_every_epochs=0" if smoke
        else " --config.train.eval_every_epochs=0 --config.eval.max_triples=5000"
    )
    c.pretrain.timeout_s = 1800
    return c
