"""End-to-end pipeline: world → pretraining facets → ranker ablation → INT4 export →
live hybrid serving check → report.md.

  python -m launch.run_pipeline --config=configs/pipeline.py[:smoke] --workdir=DIR

Each stage runs its own entry point in a subprocess (so its flags and outputs are
exactly what a user would get running it by hand) and leaves a marker
`DIR/stages/<stage>.json` with the command it ran. A stage whose marker matches the
current command is skipped, so an interrupted pipeline resumes. One summary line per
stage; the stages print their own progress.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import shlex
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
    """A pipeline stage: a command plus how to summarise its outputs."""

    def __init__(self, name: str, cmd: list[str] | None, done_file: pathlib.Path, summarize, fn=None):
        self.name, self.cmd, self.done_file, self.summarize, self.fn = name, cmd, done_file, summarize, fn

    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.cmd or self.name).encode()).hexdigest()[:16]


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


def _run_stage(stage: Stage, wd: pathlib.Path, force: bool, timeout_s: int) -> dict:
    marker = wd / "stages" / f"{stage.name}.json"
    m = _read(marker)
    if not force and m.get("key") == stage.key() and stage.done_file.exists():
        print(f"[{stage.name}] up to date, skipped ({m.get('summary', '')})", flush=True)
        return {**m, "skipped": True}
    print(f"[{stage.name}] running ...", flush=True)
    t0 = time.time()
    if stage.cmd is not None:
        logging.info("%s", " ".join(shlex.quote(c) for c in stage.cmd))
        proc = subprocess.run(stage.cmd, cwd=_REPO, timeout=timeout_s)
        if proc.returncode != 0:
            raise SystemExit(f"[{stage.name}] failed with exit code {proc.returncode}: "
                             f"{' '.join(shlex.quote(c) for c in stage.cmd)}")
    else:
        stage.fn()
    if not stage.done_file.exists():
        raise SystemExit(f"[{stage.name}] finished but {stage.done_file} is missing")
    out = {"stage": stage.name, "key": stage.key(), "seconds": time.time() - t0,
           "summary": stage.summarize(wd)}
    common.write_json(marker, out)
    print(f"[{stage.name}] done in {out['seconds']:.0f} s: {out['summary']}", flush=True)
    return {**out, "skipped": False}


def main(argv):
    del argv
    cfg = _CONFIG.value
    wd = pathlib.Path(_WORKDIR.value).resolve()
    common.setup(str(wd))
    common.write_json(wd / "config.json", cfg.to_dict())
    stages = build_stages(cfg, wd)
    force = set(_FORCE.value)
    results = []
    t0 = time.time()
    metrics_path = wd / "metrics.jsonl"
    for st in stages:
        r = _run_stage(st, wd, force=("all" in force or st.name in force), timeout_s=cfg.stage_timeout_s)
        results.append(r)
        with open(metrics_path, "a") as f:
            f.write(json.dumps({"time": time.time(), **r}) + "\n")
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
