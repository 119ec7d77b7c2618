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
    art = wd / "artifact"
    ranker = abl / "runs" / f"{cfg.export.variant}_s{cfg.export.seed}" / "ranker"
    stages = [
        Stage("world", py("launch.generate_data", f"--config={cfg.world_config}", f"--workdir={world}"),
              world / "world_summary.json", summaries["world"]),
        Stage("ablation", py("launch.run_ablation", f"--config={cfg.ablation_config}", f"--workdir={abl}",
                             f"--config.ranker.data.path={world}", *shlex.split(cfg.ablation_flags)),
              abl / "ablation.json", summaries["ablation"]),
        Stage("export", py("launch.export_int4", f"--ranker={ranker}", f"--out={art}",
                           f"--data={world}", f"--bits={cfg.export.bits}",
                           f"--max_auc_drop={cfg.export.max_auc_drop}",
                           f"--auc_noise_z={cfg.export.auc_noise_z}", "--overwrite",
                           f"--ablation={abl}"),
              wd / "export_report.json", summaries["export"]),
    ]
    if cfg.serving.enabled:
        s = cfg.serving
        stages.append(
            Stage("serving", py("launch.serving_check", f"--artifact={art}", f"--ranker={ranker}",
                                f"--data={world}", f"--out={wd / 'serving_check.json'}",
                                f"--num_shards={s.num_shards}", f"--num_requests={s.num_requests}",
                                f"--candidates={s.candidates}", f"--concurrency={s.concurrency}",
                                f"--deadline_s={s.deadline_s}"),
                  wd / "serving_check.json", summaries["serving"]))
    return stages
