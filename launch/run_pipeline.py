"""End-to-end pipeline: world → pretraining facets → ranker ablation → INT4 export →
live hybrid serving check → report.md.

  python -m launch.run_pipeline --config=configs/pipeline.py[:smoke] --workdir=DIR

Each stage runs its own entry point in a subprocess, in the folder the pipeline was
started from (so its flags, relative paths included, and outputs are exactly what a
user would get running it by hand there; a config file of a relative path is read
from there, else from the checkout: `pipeline_stages.config_file`) and leaves a marker
`DIR/stages/<stage>.json` with its key, written only once the stage has succeeded
(a stage about to run first removes its marker and its output file, so a killed
stage is never taken for a finished one). The key hashes the command, the resolved
content of every config it names (`--config=FILE[:ARG]`, and the pretraining
configs the ablation config names) and the previous stage's key. A stage whose
marker holds the current key is skipped, so an interrupted pipeline resumes; once
a stage runs, every later stage runs too (its inputs may have changed). The key
holds a path inside DIR relative to DIR and one inside the checkout relative to
it, and not the interpreter's path, so a pipeline folder moved or copied (alone,
or with the checkout) keeps its finished stages; a path outside both (a user's
dataset) is an input as given. Markers written until 2026-11-27 hold the
absolute form: accepted where the folder was made, and rewritten on that run.
`--force=STAGE` reruns that stage and everything after it; `--force=ablation`
also retrains finished ablation runs and pretraining (`run_ablation --fresh`)
instead of reusing them. Code changes are not part of the key (an edit anywhere
would redo the ablation): a skipped stage whose marker was written by other code
(``pipeline_stages.code_digest``: the project's .py and .proto files) says so,
and report.md marks it; use `--force`.
One summary line per stage; the stages print their own progress. report.md holds
only this run's stages: a stage that fails (or is interrupted) leaves it with the
stages before it and that one marked FAILED.
"""

from __future__ import annotations

import json
import pathlib
import time

from absl import flags, logging
from ml_collections import config_flags

from jax_recsys import history, report
from launch import common, pipeline_stages

with common.flagfile_errors():
    _CONFIG = config_flags.DEFINE_config_file("config", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Pipeline folder.", required=True)
_FORCE = flags.DEFINE_list("force", [], "Stages to rerun even if up to date (or 'all').")


def _world_summary(wd: pathlib.Path) -> str:
    s = pipeline_stages.read_json(wd / "world" / "world_summary.json", stage="world")
    rows = s.get("rows", {})
    parts = [f"{k}={v:,}" for k, v in rows.items() if isinstance(v, int)][:6]
    return ", ".join(parts) or "world written"


def _ablation_summary(wd: pathlib.Path) -> str:
    a = pipeline_stages.read_json(wd / "ablation" / "ablation.json", stage="ablation")
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
    e = pipeline_stages.read_json(wd / "export_report.json", stage="export")
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
    s = pipeline_stages.read_json(wd / "serving_check.json", stage="serving")
    if not s:
        return "no serving_check.json"
    return (f"{s.get('num_requests')} requests × {s.get('candidates')} candidates over "
            f"{s.get('num_shards')} shards: p50 {s.get('latency_ms_p50', 0):.1f} ms, p99 "
            f"{s.get('latency_ms_p99', 0):.1f} ms; max |served - offline| "
            f"{max(s.get('max_abs_diff_ctr') or 0, s.get('max_abs_diff_cvr') or 0):.2e}; "
            f"ok={s.get('ok')}")


def main(argv):
    del argv
    cfg = _CONFIG.value
    wd = pathlib.Path(_WORKDIR.value).resolve()
    common.make_workdir(wd)  # not common.setup: no JAX here, the stages use the device
    stages = build_stages(cfg, wd)  # checks the config before anything runs
    pipeline_stages.write_json(wd / "config.json", cfg.to_dict())
    t0 = time.time()
    metrics_path = wd / "metrics.jsonl"

    def record(r):
        with open(metrics_path, "a") as f:
            f.write(json.dumps({"time": time.time(), **r}) + "\n")

    path = run_and_report(cfg, wd, stages, set(_FORCE.value), on_result=record)
    print(f"pipeline done in {time.time() - t0:.0f} s; report: {path}", flush=True)


def run_and_report(cfg, wd: pathlib.Path, stages: list[pipeline_stages.Stage], force: set[str],
                   *, on_result=None) -> pathlib.Path:
    """Runs the stages (`pipeline_stages.run_stages`), then writes report.md.

    A stage that fails or is interrupted has removed its marker and its output: the
    report is then rewritten too, with the stages before it and that stage marked
    failed, and the error goes on; an earlier run's report never stands for this one.
    """
    done = []

    def record(r):
        done.append(r)
        if on_result is not None:
            on_result(r)

    try:
        results = pipeline_stages.run_stages(stages, wd, force, cfg.stage_timeout_s, on_result=record)
    except (SystemExit, KeyboardInterrupt) as e:
        if len(done) < len(stages):
            why = "interrupted" if isinstance(e, KeyboardInterrupt) else str(e.code)
            write_pipeline_report(cfg, wd, [*done, {"stage": stages[len(done)].name,
                                                    "failed": True, "summary": why}])
        raise
    return write_pipeline_report(cfg, wd, results)


def build_stages(cfg, wd: pathlib.Path) -> list[pipeline_stages.Stage]:
    return pipeline_stages.build(cfg, wd, summaries={
        "world": _world_summary, "ablation": _ablation_summary, "export": _export_summary,
        "serving": _serving_summary})


def _mark_served_rows(abl: dict | None, cfg, export: dict | None) -> dict | None:
    """ablation.json with the labels of the rows exports added (`export.add_int4_row`:
    they hold "bits") saying whether they are this run's artifact: an export adds the
    row of its width and keeps the others', so an INT4 row made by an earlier run stays
    beside this run's INT8 export (or a row stays beside an export that failed).
    Unchanged without ``cfg`` (which export this run made is not known)."""
    variants = (abl or {}).get("variants")
    if cfg is None or not isinstance(variants, dict):
        return abl
    from jax_recsys.quant import export_rules

    served = export_rules.int4_row_name(cfg.export.variant, cfg.export.bits)[0] if export else None
    marked = {}
    for name, r in variants.items():
        if isinstance(r, dict) and "bits" in r:
            mine = "this run's artifact" if name == served else "not this run's artifact"
            r = {**r, "label": f"{r.get('label', name)} ({mine})"}
        marked[name] = r
    return {**abl, "variants": marked}


def write_pipeline_report(cfg, wd: pathlib.Path, results: list[dict]) -> pathlib.Path:
    """Writes WORKDIR/report.md from the outputs of the stages in ``results`` (the
    stages of this run's config, up to one marked failed): the output of a stage it
    does not have (serving disabled, or after a failed stage) is an earlier run's,
    perhaps of another artifact, and stays out."""
    stages = {r.get("stage") for r in results if not r.get("failed")}

    def output(stage: str, path: pathlib.Path) -> dict | None:
        return (pipeline_stages.read_json(path, stage=stage) or None) if stage in stages else None

    export = output("export", wd / "export_report.json")
    abl = _mark_served_rows(output("ablation", wd / "ablation" / "ablation.json"), cfg, export)
    pre = {}
    hist = {}
    for k, p in ((abl or {}).get("pretraining") or {}).items():
        pre[k] = {kk: vv for kk, vv in (p.get("metrics") or {}).items() if not isinstance(vv, dict | list)}
    left_out = []

    def curves(d: pathlib.Path) -> list[dict]:
        """The run's curves; none, with a warning and a line in the report, when its
        metrics.json is damaged (the report is still written)."""
        try:
            return history.export_run_history(d)
        except ValueError as e:
            logging.warning("report: %s; its curves are left out", e)
            left_out.append(str(e))
            return []

    pdir = wd / "ablation" / "pretrain"
    if abl is not None and pdir.exists():  # curves of the ablation the report shows
        for d in sorted(pdir.iterdir()):
            recs = curves(d) if (d / "metrics.json").exists() else []
            if recs:
                hist[f"pretrain {d.name}"] = recs
    seeds = (abl or {}).get("seeds")
    if seeds and isinstance(seeds, list):  # ranker curves of the ablation's first seed
        for name in abl.get("order") or []:
            d = wd / "ablation" / "runs" / f"{name}_s{seeds[0]}"
            recs = curves(d) if d.is_dir() else []
            if recs:
                hist[f"ranker {name}"] = recs
    path = report.write_report(
        wd, stages=results, ablation=abl, export=export,
        serving=output("serving", wd / "serving_check.json"), pretraining=pre, histories=hist,
        curves_left_out=left_out)
    return path


if __name__ == "__main__":
    common.run(main, resume_hint=f"{common.RESUME}: finished stages are skipped")
