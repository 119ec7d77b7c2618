"""Synthetic ads world (the mechanism is in jax_recsys/data/world.py's docstring).

Command:
  python -m launch.generate_data --config=configs/world.py[:smoke|:large] --workdir=DIR
  Overrides: --config.world.num_users=200000 --config.world.seed=3 ... (every
  WorldConfig field is under `world`); --config.num_days=N rescales the day
  windows proportionally (0 = keep the scale's days).

DIR becomes the dataset folder (dataset.json, tables, kg/, world_summary.json)
and gets DIR/metrics.json (= the summary).

Run time on a 2-core box (quiet; wall time roughly doubles when the box is shared):
smoke ~1 s; default ~15 s (80k users, 100k pins, 1.5k advertisers, 28 days,
8.4M engagements, 0.56M conversions, 0.84M impressions of which 0.6M in the
ranker train window; ~0.9M events per CPU-second; ~350 MB peak; ~300 MB on
disk); large (10M users, 10M pins, 28 days, ~300M events) roughly 10 minutes,
~3-4 GB peak memory and ~9 GB of disk; --config.num_days=5 gives a quick large
run (peak memory does not depend on the number of days).

Expected result (default, seed 0; world_summary.json): engagement/impression
ratio 10; the least popular 80% of pins get 18% of engagements; half of the
users with ad impressions have fewer than 5; click rate 2.6%, conversion rate
given click 32%; oracle click AUC 0.83 with the true logit against 0.70 from
the coarse features' true effects alone; oracle CVR AUC on clicks 0.76 against
0.57; KG 1.05M engaged, 0.10M converted, 0.28M follows edges plus metadata.
"""

import dataclasses

import ml_collections

from jax_recsys.data import world


def get_config(arg=None):
    """Returns the config; arg None (default scale), "smoke" or "large"."""
    scale = {
        None: "default",
        "": "default",
        "default": "default",
        "smoke": "smoke",
        "large": "large",
    }.get(arg)
    if scale is None:
        raise ValueError(f"unknown config arg {arg!r}; use nothing, 'smoke' or 'large'")
    c = ml_collections.ConfigDict()
    c.scale = scale
    c.num_days = 0  # 0 = the scale's own; N rescales all day windows proportionally
    c.progress = True
    c.world = ml_collections.ConfigDict(dataclasses.asdict(world.scale_config(scale)))
    return c
