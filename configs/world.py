"""Synthetic ads world (the mechanism is in jax_recsys/data/world.py's docstring).

Command:
  python -m launch.generate_data --config=configs/world.py[:smoke|:large] --workdir=DIR
  Overrides: --config.world.num_users=200000 --config.world.seed=3 ... (every
  WorldConfig field is under `world`); --config.num_days=N rescales the day
  windows proportionally (0 = keep the scale's days).

DIR becomes the dataset folder (dataset.json, tables, kg/, world_summary.json)
and gets DIR/metrics.json (= the summary).

Run time on a 2-core box (quiet; wall time roughly doubles when the box is shared):
smoke ~1 s; default ~12 s (80k users, 100k pins, 1.5k advertisers, 28 days,
8.4M engagements, 0.61M conversions, 0.84M impressions of which 0.6M in the
ranker train window; ~1.1M events per CPU-second, ~1.6M events/s with the two
default worker threads; ~360 MB peak; ~300 MB on disk); large (10M users, 10M
pins, 28 days, ~300M events) roughly 10 minutes, ~3 GB peak memory and ~9 GB of
disk; --config.num_days=5 gives a quick large run (peak memory does not depend
on the number of days). --config.workers=N sets the threads that generate event
chunks (0 = min(2, CPUs)); the files are the same for any N.

Expected result (default, seed 0; world_summary.json): engagement/impression
ratio 10; the least popular 80% of pins get 18% of engagements; half of the
users with ad impressions have fewer than 5; click rate 12.8%, conversion rate
given click 47%; oracle click AUC 0.78 with the true logit against 0.64 from
the coarse features' true effects alone; oracle CVR AUC on clicks 0.75 against
0.57; KG (all splits) 1.42M engaged, 0.15M converted, 0.40M follows edges plus
metadata.
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
    c.workers = 0  # event-chunk threads; 0 = min(2, CPUs); output does not depend on it
    c.world = ml_collections.ConfigDict(dataclasses.asdict(world.scale_config(scale)))
    return c
