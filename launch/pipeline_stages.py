"""The stages of `launch.run_pipeline`, in order, as commands over one workdir,
and how they run (keys, skipping, forcing, timeouts; see `launch.run_pipeline`).

  world     launch.generate_data   → WORKDIR/world (dataset folder)
  ablation  launch.run_ablation    → WORKDIR/ablation (pretraining facets, 7 variants × seeds)
  export    launch.export_int4     → WORKDIR/artifact (+ INT4 row in the ablation table)
  serving   live shard servers + ranker service on loopback → WORKDIR/serving_check.json
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import math
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import time

from absl import logging

from jax_recsys import fsutil

_REPO = pathlib.Path(__file__).resolve().parents[1]


def config_file(spec: str) -> pathlib.Path:
    """The file of config ``FILE[:ARG]``, absolute: ``FILE`` as given when absolute; a
    relative one in the current folder (the one the pipeline or ablation was started
    from, where its children run too), or, when it is not there, in the checkout (the
    configs' defaults, ``configs/...``, name the project's own files from any folder).
    A file found in both that differs gets a warning naming the one read.

    Raises:
      FileNotFoundError: no such file, one line naming where it was looked for.
    """
    path = pathlib.Path(spec.partition(":")[0])
    if path.is_absolute():
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} not found")
        return path
    here, repo = pathlib.Path.cwd() / path, _REPO / path
    if here.is_file():
        if repo.is_file() and here.resolve() != repo.resolve():
            _warn_shadowed(str(here), str(repo))
        return here
    if repo.is_file():
        return repo
    raise FileNotFoundError(f"config file {path} not found in the current folder "
                            f"({pathlib.Path.cwd()}) nor in the checkout ({_REPO})")


@functools.cache
def _warn_shadowed(here: str, repo: str) -> None:
    """Once per file: a relative config name found in the current folder (read) and
    in the checkout (not read), with other content."""
    if pathlib.Path(here).read_bytes() != pathlib.Path(repo).read_bytes():
        logging.warning("config file %s is read, not the checkout's %s (a relative config "
                        "path is read against the current folder first)", here, repo)


def resolved_spec(spec: str) -> str:
    """Config ``FILE[:ARG]`` with ``FILE`` made absolute by `config_file`, for a child
    process (whatever folder it runs in)."""
    _, colon, arg = spec.partition(":")
    return f"{config_file(spec)}{colon}{arg}"


def load_config(spec: str):
    """Evaluates config ``FILE[:ARG]`` (``FILE`` found by `config_file`) the way
    ``--config=FILE[:ARG]`` does: ``FILE``'s ``get_config(ARG)``."""
    _, _, arg = spec.partition(":")
    fpath = config_file(spec)
    module_spec = importlib.util.spec_from_file_location("_pipeline_config", fpath)
    if module_spec is None:
        raise FileNotFoundError(f"config file {fpath} is not a Python file")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


class Stage:
    """A pipeline stage: a command plus how to summarise its outputs.

    Args:
      name: the stage's name (``--force`` takes it).
      cmd: the command, or None with ``fn``. It runs in the current folder (the one
        the pipeline was started from, so a relative path in ``ablation_flags`` means
        what it means there); its ``--config=FILE[:ARG]`` arguments are given to it
        with ``FILE`` absolute (`resolved_spec`), and the key holds them as given.
      done_file: the file the stage writes last; present = finished.
      summarize: ``workdir -> one-line summary``.
      fn: in-process work instead of ``cmd``.
      forced_args: extra arguments when the user forces this stage (not in the key).
      configs: extra ``FILE[:ARG]`` configs whose resolved content is in the key.
    """

    def __init__(self, name: str, cmd: list[str] | None, done_file: pathlib.Path, summarize,
                 fn=None, *, forced_args: tuple[str, ...] = (), configs: tuple[str, ...] = ()):
        self.name, self.cmd, self.done_file, self.summarize, self.fn = name, cmd, done_file, summarize, fn
        self.forced_args, self.configs = tuple(forced_args), tuple(configs)

    def keys(self, upstream: tuple[str, str] = ("", ""),
             wd: pathlib.Path | None = None) -> tuple[str, str]:
        """This stage's key, then its form until 2026-11-27, still accepted from a marker
        made then in the same place (and replaced by the key); ``upstream``: the
        previous stage's pair.

        The key hashes the command, the configs it names (resolved) and the upstream
        key, with the command's paths as `_portable_arg` writes them (inside workdir
        ``wd``: relative to it; inside the repository: relative to it) and without the
        interpreter: a workdir moved or copied, alone or with the checkout, keeps its
        keys. The old form hashed the command as given (absolute paths and
        `sys.executable`)."""
        named = [a.split("=", 1)[1] for a in self.cmd or () if a.startswith("--config=")]
        specs = [*named, *self.configs]
        prints = {spec: config_fingerprint(spec) for spec in specs}  # each evaluated once
        cmd = None if self.cmd is None else [_portable_arg(a, wd) for a in self.cmd]
        return (self._hash(cmd, [(_portable_arg(s, wd), prints[s]) for s in specs], upstream[0]),
                self._hash(self.cmd, [(s, prints[s]) for s in specs], upstream[1]))

    def _hash(self, cmd: list[str] | None, configs: list[tuple[str, str]], upstream: str) -> str:
        """``configs``: (the spec as the key holds it, its `config_fingerprint`)."""
        h = hashlib.sha256(json.dumps(cmd or self.name).encode())
        for spec, fingerprint in configs:
            h.update(f"\0{spec}\0{fingerprint}".encode())
        h.update(f"\0upstream\0{upstream}".encode())
        return h.hexdigest()[:16]


def _portable_arg(arg: str, wd: pathlib.Path | None) -> str:
    """A command argument as a stage key holds it: the interpreter as ``python``; an
    absolute path (alone or as ``--flag=PATH``) inside workdir ``wd`` as
    ``$WORKDIR/REL``, else inside the repository as REL (the form the configs'
    defaults, ``configs/...``, are given in); any other argument as given (a
    path outside both, e.g. a user's dataset, is part of what the stage reads)."""
    if arg == sys.executable:
        return "python"
    flag, eq, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
    path = pathlib.Path(value)
    if not path.is_absolute():
        return arg
    if wd is not None and path.is_relative_to(wd):
        rel = path.relative_to(wd).as_posix()
        value = "$WORKDIR" if rel == "." else f"$WORKDIR/{rel}"
    elif path.is_relative_to(_REPO):
        value = path.relative_to(_REPO).as_posix()
    else:
        return arg
    return f"{flag}{eq}{value}"


# Config keys added after stage keys were first saved, with the value every config
# before them had: left out of `config_fingerprint` (at any depth) while they hold it,
# so a finished stage of a config that does not set them is not rerun.
_OMITTED_CONFIG_DEFAULTS = {"facet_missing": "random", "conversions_table": "conversions",
                            "items_table": "items", "advertiser_column": "advertiser_id"}
# The same for keys added to one kind of section only, where a key of that name elsewhere
# predates stage keys (configs/contrastive.py's data.day_column): (a key that marks the
# section, the key) -> its default. The ranker's data section holds "click_column".
_OMITTED_SECTION_DEFAULTS = {("click_column", "day_column"): "day",
                             ("click_column", "timestamp_column"): "timestamp"}


def _omit_defaults(cfg) -> None:
    """Deletes, in place, the keys of ConfigDict `cfg` that `_OMITTED_CONFIG_DEFAULTS`
    (or, in their section, `_OMITTED_SECTION_DEFAULTS`) list with their default value."""
    omitted = {**_OMITTED_CONFIG_DEFAULTS,
               **{k: v for (mark, k), v in _OMITTED_SECTION_DEFAULTS.items() if mark in cfg}}
    with cfg.unlocked():
        for k in list(cfg.keys()):
            v = cfg[k]
            if hasattr(v, "unlocked"):
                _omit_defaults(v)
            elif k in omitted and v == omitted[k]:
                del cfg[k]


def config_fingerprint(spec: str) -> str:
    """The resolved content of config ``FILE[:ARG]`` (its ``get_config(ARG)`` as JSON,
    without `_OMITTED_CONFIG_DEFAULTS` at their default), or of the file's bytes when it
    cannot be evaluated here (the stage reports that)."""
    try:
        cfg = load_config(spec)
        if hasattr(cfg, "unlocked"):
            _omit_defaults(cfg)
        text = cfg.to_json_best_effort(sort_keys=True) if hasattr(cfg, "to_json_best_effort") \
            else json.dumps(cfg, sort_keys=True, default=str)
    except Exception:  # a broken or missing config: its bytes (the stage reports the error)
        try:
            text = config_file(spec).read_bytes().hex()
        except OSError:
            text = "missing"
    return hashlib.sha256(text.encode()).hexdigest()


# The project's code: a stage made by other code is still skipped (code is not
# part of the key: an edit anywhere would redo the hour-long ablation), but it
# says so, and the report marks it.
_CODE_DIRS = ("jax_recsys", "launch", "serving", "configs")
_CODE_SUFFIXES = (".py", ".proto")


@functools.cache
def code_digest() -> str:
    """A hash of the project's source files (``.py`` and ``.proto`` under
    jax_recsys/, launch/, serving/, configs/: paths and bytes), 16 hex digits."""
    h = hashlib.sha256()
    for d in _CODE_DIRS:
        files = sorted(p for p in (_REPO / d).rglob("*")
                       if p.suffix in _CODE_SUFFIXES and "__pycache__" not in p.parts)
        for p in files:
            h.update(f"\0{p.relative_to(_REPO).as_posix()}\0".encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _py(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def read_json(path: pathlib.Path, *, stage: str | None = None) -> dict:
    """A JSON file's object, or {} when the file does not exist.

    Args:
      stage: the stage whose output the file is, named in the error.

    Raises:
      ValueError: the file is not a JSON object (damaged, e.g. cut short), naming it
        (and how to rerun ``stage``).
    """
    if not path.exists():
        return {}
    try:
        obj = json.loads(path.read_text())
        why = "" if isinstance(obj, dict) else "not a JSON object"
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        why = str(e)
    if why:
        rerun = f" (--force={stage})" if stage else ""
        raise ValueError(f"{path} is damaged ({why}); rerun the stage that writes it{rerun}")
    return obj


def write_json(path: pathlib.Path, obj: dict) -> None:
    """Writes a pipeline file (a stage marker, config.json) atomically. Not
    `common.write_json`: that asks JAX whether this is process 0, which starts JAX's
    backend (on a GPU, 75% of its memory) in the pipeline's own process for the whole
    run, while its stages, children, need the device."""
    fsutil.write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def _read_marker(marker: pathlib.Path) -> dict:
    """A stage marker, or {} when it is missing or damaged: either way the stage is
    not known to be finished and runs again."""
    try:
        return read_json(marker)
    except ValueError:
        print(f"[{marker.stem}] marker {marker} is damaged: the stage runs again", flush=True)
        return {}


def _run_stage(stage: Stage, wd: pathlib.Path, force: bool, timeout_s: int,
               *, keys: tuple[str, str], user_forced: bool = False) -> dict:
    """Runs ``stage`` unless its marker holds its current key (and ``force`` is off).

    Args:
      force: run even if up to date (forced by the user, or an earlier stage ran).
      keys: the stage's key and its older form (`Stage.keys`); a marker holding the
        older form is rewritten with the key.
      user_forced: the user named this stage in ``--force`` (adds its forced_args).
    """
    marker = wd / "stages" / f"{stage.name}.json"
    m = _read_marker(marker)
    key = keys[0]
    if not force and m.get("key") in keys and stage.done_file.exists():
        if m["key"] != key:  # made before keys were portable: the same stage, now movable
            m = {**m, "key": key}
            write_json(marker, m)
        print(f"[{stage.name}] up to date, skipped ({m.get('summary', '')})", flush=True)
        made_by, code = m.get("code", "unknown: recorded since 2026-11-27"), code_digest()
        if made_by != code:
            print(f"[{stage.name}] note: made by other code ({made_by}; now {code}); code "
                  f"is not part of the key: --force={stage.name} redoes it (and what "
                  "follows) if the change matters", flush=True)
            return {**m, "skipped": True, "code_changed": True}
        return {**m, "skipped": True}
    # Neither the old marker nor the old output may outlive a run that is stopped
    # half-way: the next pipeline run would take the stage for finished.
    marker.unlink(missing_ok=True)
    stage.done_file.unlink(missing_ok=True)
    print(f"[{stage.name}] running ...", flush=True)
    t0 = time.time()
    if stage.cmd is not None:
        cmd = [_resolved_config_arg(a) for a in stage.cmd]
        cmd += stage.forced_args if user_forced else ()
        logging.info("%s", " ".join(shlex.quote(c) for c in cmd))
        code = _run_command(stage.name, cmd, timeout_s)
        if code != 0:
            raise SystemExit(f"[{stage.name}] failed with exit code {code}: "
                             f"{' '.join(shlex.quote(c) for c in cmd)}")
    else:
        stage.fn()
    if not stage.done_file.exists():
        raise SystemExit(f"[{stage.name}] finished but {stage.done_file} is missing")
    out = {"stage": stage.name, "key": key, "code": code_digest(),
           "seconds": time.time() - t0, "summary": stage.summarize(wd)}
    write_json(marker, out)
    print(f"[{stage.name}] done in {out['seconds']:.0f} s: {out['summary']}", flush=True)
    return {**out, "skipped": False}


def _resolved_config_arg(arg: str) -> str:
    """A stage's ``--config=FILE[:ARG]`` argument with ``FILE`` absolute (`resolved_spec`);
    any other argument as it is."""
    if not arg.startswith("--config="):
        return arg
    return "--config=" + resolved_spec(arg.split("=", 1)[1])


def _run_command(name: str, cmd: list[str], timeout_s: int) -> int:
    """Runs ``cmd`` in its own process group; on timeout or interrupt the whole group
    (the stage and every process it started) is stopped, never left running."""
    proc = subprocess.Popen(cmd, start_new_session=True)
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _stop_group(proc)
        raise SystemExit(
            f"[{name}] timed out after {timeout_s} s (stage_timeout_s); stopped it and "
            "every process it started"
        ) from None
    except BaseException:
        _stop_group(proc)
        raise


def _stop_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace_s)
            if sig == signal.SIGTERM:  # the stage is gone; its children may not be
                os.killpg(proc.pid, signal.SIGKILL)
            return
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return


def run_stages(stages: list[Stage], wd: pathlib.Path, force: set[str], timeout_s: int,
               on_result=None) -> list[dict]:
    """Runs the stages in order (see the module docstring for skipping and forcing).

    Raises:
      ValueError: ``force`` names a stage that does not exist.
    """
    names = [st.name for st in stages]
    unknown = sorted(set(force) - set(names) - {"all"})
    if unknown:
        raise ValueError(f"--force names unknown stage(s) {unknown}; stages: {names} or 'all'")
    results, upstream, ran = [], ("", ""), False
    for st in stages:
        user_forced = "all" in force or st.name in force
        upstream = st.keys(upstream, wd)  # each key covers the stages before it
        r = _run_stage(st, wd, force=user_forced or ran, timeout_s=timeout_s,
                       keys=upstream, user_forced=user_forced)
        ran = ran or not r["skipped"]
        results.append(r)
        if on_result is not None:
            on_result(r)
    return results


def _overrides(flags: str) -> dict[str, str]:
    """``--config.KEY=VALUE`` (or ``--config.KEY VALUE``) pairs of a flag string."""
    out = {}
    toks = shlex.split(flags)
    for i, tok in enumerate(toks):
        if not tok.startswith("--config."):
            continue
        if "=" in tok:
            key, value = tok[len("--config."):].split("=", 1)
        elif i + 1 < len(toks) and not toks[i + 1].startswith("--"):
            key, value = tok[len("--config."):], toks[i + 1]
        else:
            continue
        out[key] = value
    return out


def _names(value) -> list[str]:
    if isinstance(value, list | tuple):
        return [str(x).strip() for x in value if str(x).strip()]
    return [x.strip() for x in str(value).strip("()[] ").split(",") if x.strip()]


def _seeds(value) -> list[int]:
    """The ablation's seeds as ints, by run_ablation's own rules (ValueError naming the key)."""
    from launch import run_ablation

    try:
        return list(run_ablation.parse_seeds(value))
    except ValueError as e:
        raise ValueError(f"the ablation's {e}") from None


def ablation_plan(cfg) -> dict:
    """What the ablation stage will run: its resolved config's variants, seeds, saved
    ranker variants and pretraining configs, with ``cfg.ablation_flags`` applied."""
    try:
        abl = load_config(cfg.ablation_config)
    except Exception as e:
        raise ValueError(f"ablation_config {cfg.ablation_config!r}: {e}") from None
    over = _overrides(cfg.ablation_flags)
    pick = lambda key, default: over.get(key, default)  # noqa: E731
    return {
        "variants": _names(pick("variants", abl.variants)),
        "seeds": _seeds(pick("seeds", abl.seeds)),
        "save_ranker_variants": _names(pick("save_ranker_variants", abl.save_ranker_variants)),
        "configs": [pick("pretrain.cl_config", abl.pretrain.cl_config),
                    pick("pretrain.kg_config", abl.pretrain.kg_config)],
    }


# The serving section's settings that are serving_check flags (`serving.check_rules`).
_SERVING_CHECKED = ("num_shards", "num_requests", "candidates", "concurrency", "deadline_s")


def check(cfg, plan: dict) -> None:
    """Refuses, before anything runs, an export, a serving check or a stage timeout that
    could only fail after the ablation (with the rules of export_int4 and serving_check),
    and a config file (the world's, the ablation's pretraining ones) that is not there."""
    e = cfg.export
    problems = []
    if not (math.isfinite(cfg.stage_timeout_s) and cfg.stage_timeout_s > 0):
        problems.append(f"stage_timeout_s={cfg.stage_timeout_s} must be > 0 (seconds per stage)")
    from jax_recsys.quant import export_rules  # the export's own rules, in its words

    problems += [f"export.{key}={value} must be {rule}" for key, value, rule in
                 export_rules.setting_violations(auc_noise_z=e.auc_noise_z,
                                           max_auc_drop=e.max_auc_drop, bits=e.bits)]
    if cfg.serving.enabled:  # by serving_check's own rules, in its words
        from serving import check_rules

        s = cfg.serving
        problems += [f"serving.{key}={value} must be {rule}" for key, value, rule in
                     check_rules.violations(**{k: s[k] for k in _SERVING_CHECKED})]
    if e.variant not in plan["variants"]:
        problems.append(f"export.variant={e.variant!r} is not an ablation variant "
                        f"{plan['variants']}")
    elif e.variant not in plan["save_ranker_variants"]:
        problems.append(f"export.variant={e.variant!r} is not in the ablation's "
                        f"save_ranker_variants {plan['save_ranker_variants']} (its ranker "
                        "would not be saved; add it with --config.ablation_flags)")
    if e.seed not in plan["seeds"]:
        problems.append(f"export.seed={e.seed} is not an ablation seed {plan['seeds']}")
    cl, kg = plan["configs"]  # the ablation's own file is loaded by ablation_plan
    for key, spec in (("world_config", cfg.world_config), ("the ablation's pretrain.cl_config", cl),
                      ("the ablation's pretrain.kg_config", kg)):
        try:
            config_file(spec)
        except FileNotFoundError as err:
            problems.append(f"{key}={spec!r}: {err}")
    if problems:
        raise ValueError("pipeline config: " + "; ".join(problems))


def build(cfg, wd: pathlib.Path, *, summaries) -> list[Stage]:
    """Returns the pipeline's stages for config `cfg` in workdir `wd`.

    Raises:
      ValueError: the config asks for an export the ablation cannot feed.
    """
    plan = ablation_plan(cfg)
    check(cfg, plan)
    world = wd / "world"
    abl = wd / "ablation"
    art = wd / "artifact"
    ranker = abl / "runs" / f"{cfg.export.variant}_s{cfg.export.seed}" / "ranker"
    stages = [
        Stage("world", _py("launch.generate_data", f"--config={cfg.world_config}", f"--workdir={world}"),
              world / "world_summary.json", summaries["world"]),
        Stage("ablation", _py("launch.run_ablation", f"--config={cfg.ablation_config}", f"--workdir={abl}",
                             f"--config.ranker.data.path={world}", *shlex.split(cfg.ablation_flags)),
              abl / "ablation.json", summaries["ablation"],
              forced_args=("--fresh",), configs=tuple(plan["configs"])),
        Stage("export", _py("launch.export_int4", f"--ranker={ranker}", f"--out={art}",
                           f"--data={world}", f"--bits={cfg.export.bits}",
                           f"--max_auc_drop={cfg.export.max_auc_drop}",
                           f"--auc_noise_z={cfg.export.auc_noise_z}", "--overwrite",
                           f"--ablation={abl}", f"--int4_source={cfg.export.variant}"),
              wd / "export_report.json", summaries["export"]),
    ]
    if cfg.serving.enabled:
        s = cfg.serving
        stages.append(
            Stage("serving", _py("launch.serving_check", f"--artifact={art}", f"--ranker={ranker}",
                                f"--data={world}", f"--out={wd / 'serving_check.json'}",
                                f"--num_shards={s.num_shards}", f"--num_requests={s.num_requests}",
                                f"--candidates={s.candidates}", f"--concurrency={s.concurrency}",
                                f"--deadline_s={s.deadline_s}"),
                  wd / "serving_check.json", summaries["serving"]))
    return stages
