"""Ranker ablation over variants and seeds: writes WORKDIR/ablation.md, ablation.json, metrics.json.

  python -m launch.run_ablation --config=configs/ablation.py[:smoke] --workdir=DIR \
      [--config.ranker.data.path=DATASET_DIR] [--config.facet_dirs.cl_fresh=DIR ...]

Pretraining runs once per (facet, window) through the pretraining entry points
(`launch.pretrain_contrastive`, `launch.pretrain_kg`) in subprocesses, then every
ranker variant reuses them (see jax_recsys/ranking/ablation.py).
"""

from __future__ import annotations

import json
import pathlib
import shlex
import subprocess
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from launch import common, train_ranker

_CONFIG = config_flags.DEFINE_config_file("config", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder.", required=True)
_REPO = pathlib.Path(__file__).resolve().parents[1]


def _run(module: str, config: str, out: pathlib.Path, extra: list[str], timeout_s: int) -> None:
    cmd = [sys.executable, "-m", module, f"--config={config}", f"--workdir={out}", *extra]
    logging.info("running %s", " ".join(shlex.quote(c) for c in cmd))
    subprocess.run(cmd, cwd=_REPO, check=True, timeout=timeout_s)


def _stale_kg_world(data_path: str, out: pathlib.Path) -> str:
    """The same world (same seed, same logs) with its KG built from the stale window."""
    from jax_recsys.data import world

    if (out / "dataset.json").exists():
        return str(out)
    meta = json.loads((pathlib.Path(data_path) / "dataset.json").read_text())
    if meta.get("generator") != "jax_recsys.data.world" or "world_config" not in meta:
        raise app.UsageError(
            f"{data_path} is not a generated world: give --config.facet_dirs.kg_stale=DIR "
            "(a KG facet pretrained on the stale window)"
        )
    wc = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["world_config"].items()}
    stale = meta["splits"]["stale_pretrain"]
    cfg = world.WorldConfig(**{**wc, "kg_days": (int(stale[0]), int(stale[1]))})
    logging.info("stale KG: regenerating the world with kg_days=%s into %s", cfg.kg_days, out)
    world.generate_world(cfg, out, progress=False)
    return str(out)


def main(argv):
    del argv
    common.setup(_WORKDIR.value)
    from jax_recsys.ranking import ablation

    cfg, workdir = _CONFIG.value, pathlib.Path(_WORKDIR.value)
    if cfg.compilation_cache:
        # Runs of one variant differ only in the seed: identical programs, compiled once.
        import jax

        jax.config.update("jax_compilation_cache_dir", str(workdir / "jax_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    data_path = train_ranker.dataset_path(cfg.ranker, workdir)
    base = train_ranker.train_config(cfg.ranker, data_path=data_path, pretrained=())
    p = cfg.pretrain

    def pretrain_cl(window: str, out: pathlib.Path) -> pathlib.Path:
        extra = [f"--config.data.path={data_path}", f"--config.data.window={window}",
                 *shlex.split(p.cl_flags)]
        _run("launch.pretrain_contrastive", p.cl_config, out, extra, p.timeout_s)
        return out / "facet_cl"

    def pretrain_kg(window: str, out: pathlib.Path) -> pathlib.Path:
        path = data_path if window == "fresh" else _stale_kg_world(data_path, out.parent / "world_kg_stale")
        extra = [f"--config.data.path={path}", *shlex.split(p.kg_flags)]
        _run("launch.pretrain_kg", p.kg_config, out, extra, p.timeout_s)
        return out / "facet_kg"

    names = train_ranker._names
    config = ablation.AblationConfig(
        base=base,
        entities=tuple(tuple(e.split(":")) for e in names(cfg.ranker.entities)),
        scratch_dim=cfg.ranker.scratch_dim,
        scratch_init_scale=train_ranker._opt(cfg.ranker.scratch_init_scale),
        facet_target_norm=train_ranker._opt(cfg.ranker.facet_target_norm),
        facet_learning_rate=train_ranker._opt(cfg.ranker.facet_learning_rate),
        variants=names(cfg.variants),
        seeds=tuple(int(s) for s in cfg.seeds),
        facet_dirs=tuple((k.replace("_", "/", 1), v) for k, v in cfg.facet_dirs.items() if v),
        save_ranker_variants=names(cfg.save_ranker_variants),
    )
    result = ablation.run_ablation(
        config, workdir, pretrainers={"cl": pretrain_cl, "kg": pretrain_kg}, log=logging.info
    )
    print((workdir / "ablation.md").read_text())
    common.write_json(workdir / "metrics.json", result)


if __name__ == "__main__":
    app.run(main)
