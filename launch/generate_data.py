"""Writes the synthetic ads world as a dataset folder.

  python -m launch.generate_data --config=configs/world.py[:smoke|:large] --workdir=DIR

DIR is the dataset folder itself (dataset.json, tables, kg/, world_summary.json);
DIR/metrics.json repeats the summary. DIR must be new, empty, or a world generated
before, which the new one replaces whole once complete; any other folder (your files,
`--workdir=.`), or a world with other files put beside its own (notes, a subfolder:
replacing it would delete them), is refused before any work and left as it is; so is a
symlink (replacing it would put a folder in the link's place).
"""

from __future__ import annotations

import json

from absl import flags
from ml_collections import config_flags

from launch import common

with common.flagfile_errors():
    _CONFIG = config_flags.DEFINE_config_file("config", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None,
    "Output dataset folder: new, empty, or a world generated before (replaced); any other "
    "folder, a world with other files beside its own, or a symlink, is refused.",
    required=True)


def main(argv):
    del argv
    from jax_recsys.data import world

    cfg = _CONFIG.value
    fields = {k: tuple(v) if isinstance(v, list | tuple) else v for k, v in cfg.world.items()}
    wcfg = world.WorldConfig(**fields)
    # `scale` records the config's argument (configs/world.py:SCALE); setting it by hand
    # would change nothing but the check below.
    known = {world.scale_config(x).name: x for x in ("smoke", "default", "large")}
    made = known.get(wcfg.name)
    if made is not None and made != cfg.scale:
        raise ValueError(
            f"--config.scale={cfg.scale} does not resize the world (its fields are the "
            f"{made} scale's); choose the scale with --config=configs/world.py:{cfg.scale}"
        )
    if cfg.num_days:
        # days_override rewrites every day window: refuse windows set by hand beside it
        # rather than silently replacing them.
        base = world.scale_config(cfg.scale)
        changed = [f for f in world.DAY_FIELDS if getattr(wcfg, f) != getattr(base, f)]
        if changed:
            raise ValueError(
                f"--config.num_days={cfg.num_days} rescales every day window, but "
                f"{', '.join('world.' + f for f in changed)} "
                f"{'was' if len(changed) == 1 else 'were'} also set; set either num_days "
                "or the windows (all of them, consistently)"
            )
        wcfg = world.days_override(wcfg, cfg.num_days)
    summary = world.generate_world(wcfg, _WORKDIR.value, progress=cfg.progress,
                                   workers=cfg.workers or None)
    text = json.dumps(summary, indent=1)
    print(text)
    with open(f"{_WORKDIR.value}/metrics.json", "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    common.run(main)
