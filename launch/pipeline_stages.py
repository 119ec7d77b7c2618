"""The stages of `launch.run_pipeline`, in order, as commands over one workdir.

  world     launch.generate_data   → WORKDIR/world (dataset folder)
  ablation  launch.run_ablation    → WORKDIR/ablation (pretraining facets, 7 variants × seeds)
  export    launch.export_int4     → WORKDIR/artifact (+ INT4 row in the ablation table)
  serving   live shard servers + ranker service on loopback → WORKDIR/serving_check.json
"""

from __future__ import annotations

import pathlib
import shlex


def build(cfg, wd: pathlib.Path, *, Stage, py, summaries) -> list:
    """Returns the pipeline's stages for config `cfg` in workdir `wd`."""
    world = wd / "world"
    abl = wd / "ablation"
    stages = [
        Stage("world", py("launch.generate_data", f"--config={cfg.world_config}", f"--workdir={world}"),
              world / "world_summary.json", summaries["world"]),
        Stage("ablation", py("launch.run_ablation", f"--config={cfg.ablation_config}", f"--workdir={abl}",
                             f"--config.ranker.data.path={world}", *shlex.split(cfg.ablation_flags)),
              abl / "ablation.json", summaries["ablation"]),
    ]
    return stages
