"""The stages of `launch.run_pipeline`, in order, as commands over one workdir.

  world     launch.generate_data   → WORKDIR/world (dataset folder)
  ablation  launch.run_ablation    → WORKDIR/ablation (pretraining facets, 7 variants × seeds)
  export    launch.export_int4     → WORKDIR/artifact (+ INT4 row in the ablation table)
  serving   live shard servers + ranker service on loopback → WORKDIR/serving_check.json
"""

from __future__ import annotations

import importlib.util
import pathlib
import shlex

from absl import app

_REPO = pathlib.Path(__file__).resolve().parents[1]


def load_config(spec: str):
    """Evaluates config ``FILE[:ARG]`` (a path relative to the repository root or
    absolute) the way ``--config=FILE[:ARG]`` does: ``FILE``'s ``get_config(ARG)``."""
    path, _, arg = spec.partition(":")
    fpath = pathlib.Path(path) if pathlib.Path(path).is_absolute() else _REPO / path
    module_spec = importlib.util.spec_from_file_location("_pipeline_config", fpath)
    if module_spec is None or not fpath.is_file():
        raise FileNotFoundError(f"config file {fpath} not found")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def _overrides(flags: str) -> dict[str, str]:
    """``--config.KEY=VALUE`` pairs of a space-separated flag string."""
    out = {}
    for tok in shlex.split(flags):
        if tok.startswith("--config.") and "=" in tok:
            key, value = tok[len("--config."):].split("=", 1)
            out[key] = value
    return out


def _names(value) -> list[str]:
    if isinstance(value, list | tuple):
        return [str(x).strip() for x in value if str(x).strip()]
    return [x.strip() for x in str(value).strip("()[] ").split(",") if x.strip()]


def ablation_plan(cfg) -> dict:
    """What the ablation stage will run: its resolved config's variants, seeds, saved
    ranker variants and pretraining configs, with ``cfg.ablation_flags`` applied."""
    try:
        abl = load_config(cfg.ablation_config)
    except Exception as e:
        raise app.UsageError(f"ablation_config {cfg.ablation_config!r}: {e}") from None
    over = _overrides(cfg.ablation_flags)
    pick = lambda key, default: over.get(key, default)  # noqa: E731
    return {
        "variants": _names(pick("variants", abl.variants)),
        "seeds": [int(s) for s in _names(pick("seeds", abl.seeds))],
        "save_ranker_variants": _names(pick("save_ranker_variants", abl.save_ranker_variants)),
        "configs": [pick("pretrain.cl_config", abl.pretrain.cl_config),
                    pick("pretrain.kg_config", abl.pretrain.kg_config)],
    }


def check(cfg, plan: dict) -> None:
    """Refuses, before anything runs, an export that could only fail after the ablation."""
    e = cfg.export
    problems = []
    if e.variant not in plan["variants"]:
        problems.append(f"export.variant={e.variant!r} is not an ablation variant "
                        f"{plan['variants']}")
    elif e.variant not in plan["save_ranker_variants"]:
        problems.append(f"export.variant={e.variant!r} is not in the ablation's "
                        f"save_ranker_variants {plan['save_ranker_variants']} (its ranker "
                        "would not be saved; add it with --config.ablation_flags)")
    if e.seed not in plan["seeds"]:
        problems.append(f"export.seed={e.seed} is not an ablation seed {plan['seeds']}")
    if e.bits not in (4, 8, 32):
        problems.append(f"export.bits={e.bits} must be 4, 8 or 32")
    if problems:
        raise app.UsageError("pipeline config: " + "; ".join(problems))


def build(cfg, wd: pathlib.Path, *, Stage, py, summaries) -> list:
    """Returns the pipeline's stages for config `cfg` in workdir `wd`.

    Raises:
      app.UsageError: the config asks for an export the ablation cannot feed.
    """
    plan = ablation_plan(cfg)
    check(cfg, plan)
    world = wd / "world"
    abl = wd / "ablation"
    art = wd / "artifact"
    ranker = abl / "runs" / f"{cfg.export.variant}_s{cfg.export.seed}" / "ranker"
    stages = [
        Stage("world", py("launch.generate_data", f"--config={cfg.world_config}", f"--workdir={world}"),
              world / "world_summary.json", summaries["world"]),
        Stage("ablation", py("launch.run_ablation", f"--config={cfg.ablation_config}", f"--workdir={abl}",
                             f"--config.ranker.data.path={world}", *shlex.split(cfg.ablation_flags)),
              abl / "ablation.json", summaries["ablation"],
              forced_args=("--fresh",), configs=tuple(plan["configs"])),
        Stage("export", py("launch.export_int4", f"--ranker={ranker}", f"--out={art}",
                           f"--data={world}", f"--bits={cfg.export.bits}",
                           f"--max_auc_drop={cfg.export.max_auc_drop}",
                           f"--auc_noise_z={cfg.export.auc_noise_z}", "--overwrite",
                           f"--ablation={abl}", f"--int4_source={cfg.export.variant}"),
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
