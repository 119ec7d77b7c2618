"""End-to-end pipeline: world → pretraining facets → ranker ablation → INT4 export →
live hybrid serving check → report.md.

  python -m launch.run_pipeline --config=configs/pipeline.py[:smoke] --workdir=DIR

Each stage runs its own entry point in a subprocess (so its flags and outputs are
exactly what a user would get running it by hand) and leaves a marker
`DIR/stages/<stage>.json` with its key, written only once the stage has succeeded
(a stage about to run first removes its marker and its output file, so a killed
stage is never taken for a finished one). The key hashes the command, the resolved
content of every config it names (`--config=FILE[:ARG]`, and the pretraining
configs the ablation config names) and the previous stage's key. A stage whose
marker holds the current key is skipped, so an interrupted pipeline resumes; once
a stage runs, every later stage runs too (its inputs may have changed).
`--force=STAGE` reruns that stage and everything after it; `--force=ablation`
also retrains finished ablation runs and pretraining (`run_ablation --fresh`)
instead of reusing them. Code changes are not part of the key: use `--force`.
One summary line per stage; the stages print their own progress.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

from jax_recsys import history, report
from launch import common

_CONFIG = config_flags.DEFINE_config_file("config", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Pipeline folder.", required=True)
_FORCE = flags.DEFINE_list("force", [], "Stages to rerun even if up to date (or 'all').")
_REPO = pathlib.Path(__file__).resolve().parents[1]


class Stage:
    """A pipeline stage: a command plus how to summarise its outputs.

    Args:
      name: the stage's name (``--force`` takes it).
      cmd: the command (run from the repository root), or None with ``fn``.
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

    def key(self, upstream: str = "") -> str:
        """Hash of the command, the configs it names (resolved) and ``upstream``."""
        h = hashlib.sha256(json.dumps(self.cmd or self.name).encode())
        named = [a.split("=", 1)[1] for a in self.cmd or () if a.startswith("--config=")]
        for spec in [*named, *self.configs]:
            h.update(f"\0{spec}\0{_config_fingerprint(spec)}".encode())
        h.update(f"\0upstream\0{upstream}".encode())
        return h.hexdigest()[:16]


def _config_fingerprint(spec: str) -> str:
    """The resolved content of config ``FILE[:ARG]`` (its ``get_config(ARG)`` as JSON),
    or of the file's bytes when it cannot be evaluated here (the stage reports that)."""
    from launch import pipeline_stages

    try:
        cfg = pipeline_stages.load_config(spec)
        text = cfg.to_json_best_effort(sort_keys=True) if hasattr(cfg, "to_json_best_effort") \
            else json.dumps(cfg, sort_keys=True, default=str)
    except Exception:  # a broken or missing config: its bytes (the stage reports the error)
        path = pathlib.Path(spec.partition(":")[0])
        try:
            text = (path if path.is_absolute() else _REPO / path).read_bytes().hex()
        except OSError:
            text = "missing"
    return hashlib.sha256(text.encode()).hexdigest()


def _py(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def _read(path: pathlib.Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _world_summary(wd: pathlib.Path) -> str:
    s = _read(wd / "world" / "world_summary.json")
    rows = s.get("rows", {})
    parts = [f"{k}={v:,}" for k, v in rows.items() if isinstance(v, int)][:6]
    return ", ".join(parts) or "world written"


def _ablation_summary(wd: pathlib.Path) -> str:
    a = _read(wd / "ablation" / "ablation.json")
    if not a:
        return "no ablation.json"
    v = a["variants"]
    best = max((n for n in a["order"] if n != "no_large_tables"),
               key=lambda n: v[n].get("ctr_auc_mean", 0), default=None)
    base = v.get("no_large_tables", {})
    if best is None:
        return f"{len(a['order'])} variants"
    return (f"{len(a['order'])} variants × {len(a['seeds'])} seeds; baseline CTR AUC "
            f"{base.get('ctr_auc_mean', float('nan')):.4f}, best {best} "
            f"{v[best]['ctr_auc_mean']:.4f} ({100 * v[best].get('ctr_relaimpr_mean', 0):+.1f}%)")


def _export_summary(wd: pathlib.Path) -> str:
    e = _read(wd / "export_report.json")
    if not e:
        return "no export_report.json"
    q = e.get("quality") or {}
    deltas = ", ".join(f"{t} AUC {v.get('auc_delta', float('nan')):+.5f}"
                       for t, v in q.items() if isinstance(v, dict) and "auc_delta" in v)
    sizes = (e.get("sizes") or {}).get("total") or {}
    ratio = sizes.get("ratio_vs_fp32")
    ratio_s = f"{100 * ratio:.1f}% of fp32" if isinstance(ratio, float) else "size n/a"
    return f"version {e.get('version')}, tables {ratio_s}; {deltas}"


def _serving_summary(wd: pathlib.Path) -> str:
    s = _read(wd / "serving_check.json")
    if not s:
        return "no serving_check.json"
    return (f"{s.get('num_requests')} requests × {s.get('candidates')} candidates over "
            f"{s.get('num_shards')} shards: p50 {s.get('latency_ms_p50', 0):.1f} ms, p99 "
            f"{s.get('latency_ms_p99', 0):.1f} ms; max |served - offline| "
            f"{max(s.get('max_abs_diff_ctr') or 0, s.get('max_abs_diff_cvr') or 0):.2e}; "
            f"ok={s.get('ok')}")


def _run_stage(stage: Stage, wd: pathlib.Path, force: bool, timeout_s: int,
               *, upstream: str = "", user_forced: bool = False) -> dict:
    """Runs ``stage`` unless its marker holds its current key (and ``force`` is off).

    Args:
      force: run even if up to date (forced by the user, or an earlier stage ran).
      upstream: the previous stage's key (part of this stage's key).
      user_forced: the user named this stage in ``--force`` (adds its forced_args).
    """
    marker = wd / "stages" / f"{stage.name}.json"
    m = _read(marker)
    key = stage.key(upstream)
    if not force and m.get("key") == key and stage.done_file.exists():
        print(f"[{stage.name}] up to date, skipped ({m.get('summary', '')})", flush=True)
        return {**m, "skipped": True}
    # Neither the old marker nor the old output may outlive a run that is stopped
    # half-way: the next pipeline run would take the stage for finished.
    marker.unlink(missing_ok=True)
    stage.done_file.unlink(missing_ok=True)
    print(f"[{stage.name}] running ...", flush=True)
    t0 = time.time()
    if stage.cmd is not None:
        cmd = [*stage.cmd, *(stage.forced_args if user_forced else ())]
        logging.info("%s", " ".join(shlex.quote(c) for c in cmd))
        code = _run_command(stage.name, cmd, timeout_s)
        if code != 0:
            raise SystemExit(f"[{stage.name}] failed with exit code {code}: "
                             f"{' '.join(shlex.quote(c) for c in cmd)}")
    else:
        stage.fn()
    if not stage.done_file.exists():
        raise SystemExit(f"[{stage.name}] finished but {stage.done_file} is missing")
    out = {"stage": stage.name, "key": key, "seconds": time.time() - t0,
           "summary": stage.summarize(wd)}
    common.write_json(marker, out)
    print(f"[{stage.name}] done in {out['seconds']:.0f} s: {out['summary']}", flush=True)
    return {**out, "skipped": False}


def _run_command(name: str, cmd: list[str], timeout_s: int) -> int:
    """Runs ``cmd`` in its own process group; on timeout or interrupt the whole group
    (the stage and every process it started) is stopped, never left running."""
    proc = subprocess.Popen(cmd, cwd=_REPO, start_new_session=True)
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
      app.UsageError: ``force`` names a stage that does not exist.
    """
    names = [st.name for st in stages]
    unknown = sorted(set(force) - set(names) - {"all"})
    if unknown:
        raise app.UsageError(f"--force names unknown stage(s) {unknown}; stages: {names} or 'all'")
    results, upstream, ran = [], "", False
    for st in stages:
        user_forced = "all" in force or st.name in force
        r = _run_stage(st, wd, force=user_forced or ran, timeout_s=timeout_s,
                       upstream=upstream, user_forced=user_forced)
        upstream, ran = r["key"], ran or not r["skipped"]
        results.append(r)
        if on_result is not None:
            on_result(r)
    return results


def main(argv):
    del argv
    cfg = _CONFIG.value
    wd = pathlib.Path(_WORKDIR.value).resolve()
    common.setup(str(wd))
    stages = build_stages(cfg, wd)  # checks the config before anything runs
    common.write_json(wd / "config.json", cfg.to_dict())
    t0 = time.time()
    metrics_path = wd / "metrics.jsonl"

    def record(r):
        with open(metrics_path, "a") as f:
            f.write(json.dumps({"time": time.time(), **r}) + "\n")

    results = run_stages(stages, wd, set(_FORCE.value), cfg.stage_timeout_s, on_result=record)
    path = write_pipeline_report(cfg, wd, results)
    print(f"pipeline done in {time.time() - t0:.0f} s; report: {path}", flush=True)


def build_stages(cfg, wd: pathlib.Path) -> list[Stage]:
    from launch import pipeline_stages

    return pipeline_stages.build(cfg, wd, Stage=Stage, py=_py, summaries={
        "world": _world_summary, "ablation": _ablation_summary, "export": _export_summary,
        "serving": _serving_summary})


def write_pipeline_report(cfg, wd: pathlib.Path, results: list[dict]) -> pathlib.Path:
    abl = _read(wd / "ablation" / "ablation.json") or None
    pre = {}
    hist = {}
    for k, p in ((abl or {}).get("pretraining") or {}).items():
        pre[k] = {kk: vv for kk, vv in (p.get("metrics") or {}).items() if not isinstance(vv, dict | list)}
    pdir = wd / "ablation" / "pretrain"
    if pdir.exists():
        for d in sorted(pdir.iterdir()):
            recs = history.export_run_history(d) if (d / "metrics.json").exists() else []
            if recs:
                hist[f"pretrain {d.name}"] = recs
    runs = wd / "ablation" / "runs"
    if runs.exists():
        for d in sorted(runs.iterdir()):
            recs = history.export_run_history(d)
            if recs and d.name.endswith("_s0"):
                hist[f"ranker {d.name[:-3]}"] = recs
    path = report.write_report(
        wd, stages=results, ablation=abl, export=_read(wd / "export_report.json") or None,
        serving=_read(wd / "serving_check.json") or None, pretraining=pre, histories=hist)
    return path


if __name__ == "__main__":
    app.run(main)
