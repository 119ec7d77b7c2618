r"""Ranker ablation over variants and seeds: writes WORKDIR/ablation.md, ablation.json, metrics.json.

  python -m launch.run_ablation --config=configs/ablation.py[:smoke] --workdir=DIR \
      [--config.ranker.data.path=DATASET_DIR] [--config.facet_dirs.cl_fresh=DIR ...]

Pretraining runs once per (facet, window) through the pretraining entry points
(`launch.pretrain_contrastive`, `launch.pretrain_kg`) in subprocesses, then every
ranker variant reuses them (see jax_recsys/ranking/ablation.py).

Rerunning resumes: a finished ranker run, pretrained facet or stale-window KG world
in WORKDIR is reused only when it was made with the same settings and data (the
run's config, the pretraining command and resolved configs, the data folder's
dataset.json and its files' sizes and mtimes); anything else is redone and logged. `--fresh` redoes everything.
The data folder counts by that content, not by its path, so WORKDIR or the data
moved or copied elsewhere (mtimes kept: mv, cp -a) keeps its runs and facets; those
made until 2026-11-27, whose keys held the path, are recognized through the path
then given or recorded in the report of the last finished ablation (WORKDIR/ablation.json
or metrics.json), and their keys rewritten.

Relative paths mean the folder the ablation is started from, for every one of them:
the pretrainers run there. A config file (``pretrain.cl_config`` / ``kg_config``,
``FILE[:ARG]``) is read from there, or, when it is not there, from the checkout (the
defaults, ``configs/...``, work from any folder; a file of that name in both that
differs gets a warning), and given to the pretrainer absolute; a path in
``pretrain.cl_flags`` / ``kg_flags`` (e.g. ``--config.data.path=DIR``) reaches it as
given. A missing config file or facet dir (``facet_dirs``) ends the run with one line
naming it before anything runs. The keys hold a config as given (and its resolved
content), so a moved folder keeps its facets.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence

from absl import flags, logging
from ml_collections import config_flags

from jax_recsys import fsutil
from launch import common, train_ranker

_CONFIG = _WORKDIR = _FRESH = None


def _define_flags():
    """Defines the flags, only when run as the entry point: the tests import this module
    (`pretrain_keys`) beside others that define --workdir too (one absl registry)."""
    global _CONFIG, _WORKDIR, _FRESH
    with common.flagfile_errors():
        _CONFIG = config_flags.DEFINE_config_file("config", lock_config=True)
    _WORKDIR = flags.DEFINE_string("workdir", None, "Output folder.", required=True)
    _FRESH = flags.DEFINE_bool(
        "fresh", False,
        "Retrain every run and pretrain every facet instead of reusing finished ones.")


def _run(module: str, config: str, out: pathlib.Path, extra: list[str], timeout_s: int) -> None:
    """Runs pretrainer ``module`` with config ``config`` into ``out``.

    It runs in this process's folder, so a relative path in ``extra`` (``cl_flags``,
    ``kg_flags``) means the folder the ablation was started from, and gets ``config``
    with its file absolute (`pipeline_stages.resolved_spec`: from that folder, else
    from the checkout, where the defaults are). It ran in the checkout, which read a
    relative path and a relative config there."""
    from launch import pipeline_stages

    cmd = [sys.executable, "-m", module, f"--config={pipeline_stages.resolved_spec(config)}",
           f"--workdir={os.path.abspath(out)}", *extra]
    logging.info("running %s", " ".join(shlex.quote(c) for c in cmd))
    subprocess.run(cmd, check=True, timeout=timeout_s)


def _config_file_digest(spec: str) -> str | None:
    """Digest of a ``FILE[:ARG]`` config's file (`pipeline_stages.config_file`), None
    when it is not there."""
    from launch import pipeline_stages

    try:
        return fsutil.file_digest(pipeline_stages.config_file(spec))
    except FileNotFoundError:
        return None


def _cl_args(p, window: str) -> list[str]:
    """The contrastive pretraining's arguments after its --config.data.path (``p``:
    the ablation config's ``pretrain``)."""
    return [f"--config.data.window={window}", *shlex.split(p.cl_flags)]


def _pretrain_key(module: str, config: str, args: list[str], data: str, *, suffix: str = "",
                  old_args: Sequence[list[str]] = ()) -> list[str]:
    """What a pretraining run depends on: its command, resolved config and data.

    ``args``: the command's arguments but the data folder's path, which the key holds
    as its content (`ablation.folder_digest`) alone, so a moved or copied data or
    ablation folder keeps its facets. Returns the key, then its older forms, still
    accepted for facets made under them (and replaced by the key): the arguments as
    given (``old_args``, each: the data path included) until 2026-11-27,
    with the resolved config or, before that, the config file's bytes (an edit of a
    docstring redid the pretraining).
    """
    from jax_recsys.ranking import ablation
    from launch import pipeline_stages

    digest = ablation.folder_digest(data)
    resolved = {"resolved_config": pipeline_stages.config_fingerprint(config)}
    forms = [json.dumps([module, config, args, resolved, digest]) + suffix]
    for given in old_args:
        forms += [json.dumps([module, config, given, resolved, digest]) + suffix,
                  json.dumps([module, config, given, _config_file_digest(config), digest]) + suffix]
    return list(dict.fromkeys(forms))


def pretrain_keys(p, data_path: str, workdir: pathlib.Path) -> dict[str, Callable]:
    """facet -> fn(window) -> its pretraining's keys (`_pretrain_key`), for
    `ablation.obtain_facets`. ``p``: the ablation config's ``pretrain``."""
    from jax_recsys.ranking import ablation

    old_paths = ablation.old_key_data_paths(data_path, workdir)  # the forms holding the path

    def cl(window: str) -> list[str]:
        args = _cl_args(p, window)
        return _pretrain_key("launch.pretrain_contrastive", p.cl_config, args, data_path,
                             old_args=[[f"--config.data.path={d}", *args] for d in old_paths])

    def kg(window: str) -> list[str]:
        # Its arguments never held the data path. The stale KG world is derived from
        # the data folder: its digest covers both.
        args = shlex.split(p.kg_flags)
        return _pretrain_key("launch.pretrain_kg", p.kg_config, args, data_path, suffix=window,
                             old_args=[args])

    return {"cl": cl, "kg": kg}


def _world_meta(data_path: str) -> dict:
    """The dataset.json of a generated world (the stale KG regenerates it); ValueError for
    any other folder (a user's own data: no generator, or no dataset.json at all)."""
    try:
        meta = json.loads((pathlib.Path(data_path) / "dataset.json").read_text())
    except (OSError, ValueError):
        meta = None
    if not isinstance(meta, dict) or meta.get("generator") != "jax_recsys.data.world" \
            or "world_config" not in meta:
        raise ValueError(
            f"{data_path} is not a generated world: give --config.facet_dirs.kg_stale=DIR "
            "(a KG facet pretrained on the stale window)"
        )
    return meta


def _stale_kg_world(data_path: str, out: pathlib.Path) -> str:
    """The same world (same seed, same logs) with its KG built from the stale window."""
    from jax_recsys.data import world

    source = fsutil.file_digest(pathlib.Path(data_path) / "dataset.json")
    stamp = out / "source_dataset.json"
    if (out / "dataset.json").exists() and stamp.exists() and \
            json.loads(stamp.read_text()).get("digest") == source:
        return str(out)
    stamp.unlink(missing_ok=True)
    meta = _world_meta(data_path)
    wc = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["world_config"].items()}
    stale = meta["splits"]["stale_pretrain"]
    cfg = world.WorldConfig(**{**wc, "kg_days": (int(stale[0]), int(stale[1]))})
    logging.info("stale KG: regenerating the world with kg_days=%s into %s", cfg.kg_days, out)
    world.generate_world(cfg, out, progress=False)
    # Not common.write_json: its process-0 check starts JAX's backend (on a GPU, most of
    # its memory), here, before the stale KG's pretrain_kg child runs.
    fsutil.write_text_atomic(stamp, json.dumps({"digest": source, "source": str(data_path)}))
    return str(out)


def _facet_dirs(given) -> tuple[tuple[str, str], ...]:
    """config.facet_dirs as ("cl/fresh", absolute dir) pairs (a relative one: from the
    current folder, as recorded in ablation.json); ValueError naming one that is not a
    facet checkpoint, before any pretraining or training."""
    out = []
    for k, v in given.items():
        if not v:
            continue
        path = os.path.abspath(v)
        if not os.path.isfile(os.path.join(path, "facet.json")):
            raise ValueError(f"facet_dirs.{k}={v}: {path} is not a facet checkpoint "
                             "(no facet.json)")
        out.append((k.replace("_", "/", 1), path))
    return tuple(out)


def _check_pretrain_configs(p, config) -> None:
    """FileNotFoundError, one line, for pretrain.cl_config / kg_config of a facet to be
    pretrained whose file is not there (`pipeline_stages.config_file`), before any
    pretraining (the second pretrainer's child found out after the first had run)."""
    from jax_recsys.ranking import ablation
    from launch import pipeline_stages

    given = dict(config.facet_dirs)
    needed = {f for v in config.variants if v in ablation.VARIANTS
              for f in ablation.VARIANTS[v].facets
              if f"{f}/{ablation.VARIANTS[v].window}" not in given}
    for facet in sorted(needed):
        spec = p[f"{facet}_config"]
        try:
            pipeline_stages.config_file(spec)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"pretrain.{facet}_config={spec!r}: {e}") from None


def parse_seeds(value) -> tuple[int, ...]:
    """config.seeds as ints: a non-empty list of distinct seeds >= 0 (`--config.seeds=0,1,2`;
    run_pipeline checks its ablation's seeds with it before any stage runs)."""
    items = [value] if isinstance(value, int | str) else list(value)
    items = [x for s in items for x in (s.split(",") if isinstance(s, str) else [s])]
    try:
        seeds = tuple(int(str(s).strip()) for s in items if str(s).strip())
    except ValueError:
        raise ValueError(f"config.seeds must be integers, got {value!r}") from None
    if not seeds:
        raise ValueError(f"config.seeds must list at least one seed, got {value!r}")
    twice = sorted({s for s in seeds if seeds.count(s) > 1})
    if twice:
        raise ValueError(f"config.seeds lists {', '.join(map(str, twice))} more than once, got "
                         f"{value!r} (a repeated seed repeats the same run)")
    negative = [s for s in seeds if s < 0]
    if negative:
        raise ValueError(f"config.seeds must be >= 0, got {value!r}")
    return seeds


def main(argv):
    del argv
    common.setup(_WORKDIR.value)
    from jax_recsys.ranking import ablation

    cfg, workdir = _CONFIG.value, pathlib.Path(_WORKDIR.value)
    seeds = parse_seeds(cfg.seeds)  # before any data is generated
    entities = train_ranker.entity_pairs(cfg.ranker.entities, key="ranker.entities")
    train_ranker.facet_mode(cfg.ranker, key="ranker.facet_mode")
    unused = [k for k, given in [("facets", train_ranker._names(cfg.ranker.facets)),
                                 ("facet_paths", any(cfg.ranker.facet_paths.values())),
                                 ("facet_mode", cfg.ranker.facet_mode != "finetune")] if given]
    if unused:  # were ignored without a word
        raise ValueError(
            f"config.ranker.{', config.ranker.'.join(unused)}: not used by the ablation, whose "
            "variants choose the pretrained facets and their mode (cl_kg_frozen freezes them); "
            "give finished facets with --config.facet_dirs.cl_fresh=DIR etc.")
    if not cfg.pretrain.timeout_s > 0:
        raise ValueError(f"pretrain.timeout_s must be > 0 (seconds per pretraining run), "
                         f"got {cfg.pretrain.timeout_s}")
    if cfg.compilation_cache:
        # Runs of one variant differ only in the seed: identical programs, compiled once.
        import jax

        jax.config.update("jax_compilation_cache_dir", str(workdir / "jax_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    names = train_ranker._names
    # Every setting is checked before the data path, which may generate WORKDIR/world.
    config = ablation.AblationConfig(
        base=train_ranker.train_config(cfg.ranker, data_path=cfg.ranker.data.path,
                                       pretrained=()),
        entities=entities,
        scratch_dim=cfg.ranker.scratch_dim,
        scratch_init_scale=train_ranker._opt(cfg.ranker.scratch_init_scale),
        facet_target_norm=train_ranker._opt(cfg.ranker.facet_target_norm),
        facet_learning_rate=train_ranker._opt(cfg.ranker.facet_learning_rate),
        facet_missing=cfg.ranker.get("facet_missing", "random"),
        variants=names(cfg.variants),
        seeds=seeds,
        facet_dirs=_facet_dirs(cfg.facet_dirs),
        save_ranker_variants=names(cfg.save_ranker_variants),
    )
    _check_pretrain_configs(cfg.pretrain, config)
    # Absolute: ablation.json records it for export_int4, which may run in another folder.
    data_path = os.path.abspath(common.dataset_path(cfg.ranker, workdir, key="ranker.data"))
    config = dataclasses.replace(config, base=train_ranker.with_data_path(config.base, data_path))
    p = cfg.pretrain

    def kg_path(window: str) -> str:
        stale = workdir / "pretrain" / "world_kg_stale"
        return data_path if window == "fresh" else _stale_kg_world(data_path, stale)

    def pretrain_cl(window: str, out: pathlib.Path) -> pathlib.Path:
        args = [f"--config.data.path={data_path}", *_cl_args(p, window)]
        _run("launch.pretrain_contrastive", p.cl_config, out, args, p.timeout_s)
        return out / "facet_cl"

    def pretrain_kg(window: str, out: pathlib.Path) -> pathlib.Path:
        extra = [f"--config.data.path={os.path.abspath(kg_path(window))}",
                 *shlex.split(p.kg_flags)]
        _run("launch.pretrain_kg", p.kg_config, out, extra, p.timeout_s)
        return out / "facet_kg"

    if "kg/stale" not in dict(config.facet_dirs) and any(
            ablation.VARIANTS[v].window == "stale" and "kg" in ablation.VARIANTS[v].facets
            for v in config.variants if v in ablation.VARIANTS):
        _world_meta(data_path)  # before any pretraining (it found out after the others)
    result = ablation.run_ablation(
        config, workdir, pretrainers={"cl": pretrain_cl, "kg": pretrain_kg}, log=logging.info,
        pretrain_keys=pretrain_keys(p, data_path, workdir), fresh=_FRESH.value,
    )
    print((workdir / "ablation.md").read_text())
    common.write_json(workdir / "metrics.json", result)


if __name__ == "__main__":
    _define_flags()
    common.run(main, resume_hint=f"{common.RESUME}: finished runs and facets are reused")
