"""The end-to-end report: `report.md` plus PNG plots, from the pipeline's stage outputs.

Inputs are plain dicts read from the stages' JSON files (ablation.json, the export
report, the serving check) and training curves from `history.jsonl` files (see
jax_recsys/history.py). Nothing here trains or evaluates: it only writes down what
the stages measured.
"""

from __future__ import annotations

import math
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

from jax_recsys.quant import export_rules

TASKS = ("ctr", "cvr", "ctcvr")
# Pretraining metrics shown in the report (the rest stay in each run's metrics.json):
# ranking metrics at every K the run evaluated (its eval_ks; 10 and 100 by default).
_PRETRAIN_KEY = re.compile(
    r"(pop_)?(recall|ndcg)@\d+|test_hits@\d+|heldout_loss|test_mrr|final_loss")
# Curves of pretraining evaluation: these metrics at K = 10 (at the smallest K a run
# has when it has no 10), and MRR.
_CURVE_KEY = re.compile(r"(.*_)?(recall|ndcg|hits)@(\d+)")


def _served_width(bits) -> str:
    """`export_rules.served_width` of the export report's ``bits``, which a report never
    fails over: INT4 (the export's default) for a report that does not say, "<bits>-bit"
    for a width the rules do not name."""
    try:
        return export_rules.served_width(4 if bits is None else bits)
    except ValueError:
        return f"{bits}-bit"


def _num(x) -> float | int | None:
    """`x` if it is a finite number, else None (JSON null, NaN, inf, strings, bools)."""
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    return x if math.isfinite(x) else None


def _cell(x, spec: str, scale: float = 1.0, suffix: str = "") -> str:
    """`format(x * scale, spec) + suffix`, or "n/a" for a missing / non-finite value."""
    x = _num(x)
    return "n/a" if x is None else format(x * scale if scale != 1.0 else x, spec) + suffix


def _fmt(mean: float | None, std: float | None, pct: bool = False) -> str:
    mean = _num(mean)
    if mean is None:
        return "n/a"
    std = _num(std) or 0.0
    if pct:
        return f"{100 * mean:+.1f}% ± {100 * std:.1f}"
    return f"{mean:.4f} ± {std:.4f}"


FEWER_SEEDS_NOTE = (
    "(n=K of N): mean ± std over the K of the N seeds that have a value; the other seeds' "
    "are undefined (an AUC on a test set of one class; a gain whose same-seed baseline AUC "
    "is below 0.51, or that has no baseline run).")


def seeds_note(n, total) -> str:
    """" (n=K of N)" for a mean over K of the N seeds run, K < N; else ""."""
    if _num(n) is None or _num(total) is None or not 0 < n < total:
        return ""
    return f" (n={n} of {total})"


def _variants(ablation: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """(name, results) in ablation["order"] (default: the variants' own order); names
    missing from ablation["variants"] are skipped."""
    variants = ablation.get("variants") or {}
    order = ablation.get("order") or list(variants)
    return [(n, variants[n]) for n in order if isinstance(variants.get(n), Mapping)]


def ablation_table(ablation: Mapping[str, Any], baseline: str = "no_large_tables") -> list[str]:
    """Markdown rows of the ablation table (mean ± std AUC and RelaImpr per task).

    Missing or null values show as "n/a"; variants named in "order" without results
    are left out. A mean over fewer seeds than were run says so, "(n=K of N)", and a
    line under the table (`FEWER_SEEDS_NOTE`) says why.
    """
    lines = [
        "| variant | CTR AUC | CTR gain | CVR AUC | CVR gain | CTCVR AUC | CTCVR gain |",
        "|---|---|---|---|---|---|---|",
    ]
    seeds = ablation.get("seeds")
    total = len(seeds) if isinstance(seeds, list | tuple) else None
    fewer = False
    for name, r in _variants(ablation):
        cells = [r.get("label", name)]
        for t in TASKS:
            notes = [seeds_note(r.get(f"{t}_{m}_n"), total) for m in ("auc", "relaimpr")]
            fewer = fewer or any(notes)
            cells.append(_fmt(r.get(f"{t}_auc_mean"), r.get(f"{t}_auc_std")) + notes[0])
            cells.append(
                "—" if name == baseline
                else _fmt(r.get(f"{t}_relaimpr_mean"), r.get(f"{t}_relaimpr_std"), pct=True) + notes[1]
            )
        lines.append("| " + " | ".join(cells) + " |")
    return lines + (["", FEWER_SEEDS_NOTE] if fewer else [])


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_auc(ablation: Mapping[str, Any], path: pathlib.Path) -> pathlib.Path | None:
    """Bar chart: test AUC per variant with ±std error bars, one panel per task.

    Missing / null AUCs leave an empty slot; returns None (no file) without variants.
    """
    rows = _variants(ablation)
    if not rows:
        return None
    plt = _plt()
    order = [n for n, _ in rows]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, task in zip(axes, ("ctr", "cvr"), strict=True):
        means = [_num(r.get(f"{task}_auc_mean")) for _, r in rows]
        means = [float("nan") if m is None else m for m in means]
        stds = [_num(r.get(f"{task}_auc_std")) or 0.0 for _, r in rows]
        ax.bar(range(len(order)), means, yerr=stds, capsize=4, color="#4C72B0")
        finite = [m for m in means if m == m]
        if finite:
            lo, hi = min(finite), max(finite)
            pad = max(0.005, (hi - lo) * 0.5)
            ax.set_ylim(lo - pad, hi + pad)
        ax.set_xticks(range(len(order)))
        ax.set_xticklabels(order, rotation=35, ha="right", fontsize=8)
        ax.set_title(f"{task.upper()} test AUC (mean ± std over seeds)")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _metric_order(k: str) -> tuple[str, int]:
    """Sort key: by name, then by K as a number (recall@10 before recall@100)."""
    name, _, at = k.partition("@")
    return (name, int(at)) if at.isdigit() else (k, -1)


def _eval_curve(histories: Mapping[str, Sequence[Mapping[str, float]]]):
    """`select` for the pretraining evaluation curves: MRR, and Recall/NDCG/Hits at
    K = 10, or at the smallest K recorded when no metric has K = 10."""
    ks = {int(m.group(3)) for recs in histories.values() for r in recs
          if isinstance(r, Mapping) for k in r if (m := _CURVE_KEY.fullmatch(k))}
    k_shown = 10 if 10 in ks or not ks else min(ks)

    def select(k: str) -> bool:
        m = _CURVE_KEY.fullmatch(k)
        return k.endswith("mrr") or (m is not None and int(m.group(3)) == k_shown)

    return select


def plot_curves(
    histories: Mapping[str, Sequence[Mapping[str, float]]],
    path: pathlib.Path,
    *,
    select,
    title: str,
) -> pathlib.Path | None:
    """One panel per stage: every metric whose name passes `select`, against step."""
    plt = _plt()
    panels = []
    for stage, recs in histories.items():
        recs = [r for r in recs if isinstance(r, Mapping) and _num(r.get("step")) is not None]
        keys = sorted({k for r in recs for k in r
                       if k != "step" and select(k) and _num(r[k]) is not None})
        if keys:
            panels.append((stage, recs, keys))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (stage, recs, keys) in zip(axes[0], panels, strict=True):
        for k in keys:
            pts = [(r["step"], r[k]) for r in recs if _num(r.get(k)) is not None]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, marker="." if len(pts) < 30 else None, label=k)
        ax.set_title(stage, fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(
    workdir: str | pathlib.Path,
    *,
    stages: Sequence[Mapping[str, Any]],
    ablation: Mapping[str, Any] | None = None,
    export: Mapping[str, Any] | None = None,
    serving: Mapping[str, Any] | None = None,
    pretraining: Mapping[str, Mapping[str, Any]] | None = None,
    histories: Mapping[str, Sequence[Mapping[str, float]]] | None = None,
    curves_left_out: Sequence[str] = (),
) -> pathlib.Path:
    """Writes `workdir/report.md` and `workdir/plots/*.png`.

    Args:
      workdir: the pipeline folder.
      stages: one summary per stage: {"stage", "seconds", "summary", "skipped"}, and
        "code_changed" (a skipped stage made by other code) or "failed" (the stage
        that stopped the run; its summary says why).
      ablation: ablation.json contents.
      export: the export report (INT4, or INT8 / float32 as its "bits" say).
      serving: the live serving check's measurements.
      pretraining: final metrics per pretraining run ("cl/fresh", "kg/stale", ...).
      histories: stage name -> history records (training curves).
      curves_left_out: why a run's curves are not drawn (its metrics.json is damaged),
        one line each, listed under the curves.

    Returns:
      The report's path.
    """
    workdir = pathlib.Path(workdir)
    plots = workdir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    histories = dict(histories or {})
    md = ["# jax_recsys pipeline report", ""]
    md += ["## Stages", "", "| stage | seconds | summary |", "|---|---|---|"]
    for s in stages:
        secs = _cell(s.get("seconds"), ".0f")
        if s.get("failed"):
            secs = "FAILED (later stages not run)"
        elif s.get("skipped"):
            secs = ("skipped (up to date; made by other code)" if s.get("code_changed")
                    else "skipped (up to date)")
        md.append(f"| {s.get('stage', 'n/a')} | {secs} | {s.get('summary', '')} |")
    md.append("")
    if ablation:
        md += ["## Ablation (test window, relative AUC gain over no large tables)", ""]
        md += [
            f"Seeds: {ablation.get('seeds')}. Gain is RelaImpr = (AUC − AUC_base)/(AUC_base − 0.5), "
            "per seed against the same seed's baseline, mean ± std. CVR AUC is on clicked "
            "impressions; CTCVR AUC on all impressions.",
            "",
        ]
        md += ablation_table(ablation)
        md.append("")
        if plot_auc(ablation, plots / "auc_per_variant.png"):
            md += ["![AUC per variant](plots/auc_per_variant.png)", ""]
    if pretraining:
        md += ["## Pretraining", "", "| run | metric | value |", "|---|---|---|"]
        for run, m in pretraining.items():
            for k in sorted(m, key=_metric_order):
                v = m[k]
                if _PRETRAIN_KEY.fullmatch(k) and (v is None or isinstance(v, int | float)):
                    md.append(f"| {run} | {k} | {_cell(v, '.4f')} |")
        md.append("")
    if export:
        width = _served_width(export.get("bits"))
        md += [f"## {width} export", ""]
        gate = export.get("gate") or {}
        rows = (
            "float32 rows (not quantized)" if export.get("bits") == 32
            else f"{export.get('bits')}-bit rows with {export.get('scale_dtype', 'float16')} "
            "scale/bias"
        )
        md.append(
            f"- version {export.get('version')}, {rows}; gate "
            f"{'passed' if gate.get('passed') else 'FAILED'} (max AUC drop "
            f"{gate.get('max_auc_drop')}, noise z {gate.get('noise_z', 0)})"
        )
        sizes = export.get("sizes") or {}
        tables = dict(sizes.get("tables") or {})
        if sizes.get("total"):
            tables["total"] = sizes["total"]
        if tables:
            md += ["", "| table | bytes | fp32 bytes | vs fp32 | vs fp16 |", "|---|---|---|---|---|"]
            for name, t in tables.items():
                if isinstance(t, Mapping) and "bytes" in t:
                    md.append(
                        f"| {name} | {_cell(t['bytes'], ',')} | "
                        f"{_cell(t.get('fp32_bytes'), ',')} | "
                        f"{_cell(t.get('ratio_vs_fp32'), '.2f', 100, '%')} | "
                        f"{_cell(t.get('ratio_vs_fp16'), '.2f', 100, '%')} |"
                    )
        quality = export.get("quality") or {}
        if quality:
            md += ["", f"| task | metric | full precision | {width} | delta |",
                   "|---|---|---|---|---|"]
            for task, q in quality.items():
                if not isinstance(q, Mapping):
                    continue
                for m in ("auc", "log_loss", "calibration"):
                    if f"{m}_full" in q:
                        md.append(
                            f"| {task} | {m} | {_cell(q[f'{m}_full'], '.5f')} | "
                            f"{_cell(q.get(f'{m}_quant'), '.5f')} | "
                            f"{_cell(q.get(f'{m}_delta'), '+.5f')} |"
                        )
        md.append("")
    if serving:
        md += ["## Live hybrid serving (loopback)", ""]
        for k in sorted(serving):
            v = serving[k]
            if v is None or isinstance(v, float):
                md.append(f"- {k}: {_cell(v, '.4g')}")
            else:
                md.append(f"- {k}: {v}")
        md.append("")
    md += ["## Training curves", ""]
    loss_png = plot_curves(
        histories, plots / "training_curves.png", select=lambda k: "loss" in k,
        title="training loss per stage",
    )
    retr_png = plot_curves(
        histories, plots / "pretraining_eval.png", select=_eval_curve(histories),
        title="pretraining evaluation during training",
    )
    if loss_png:
        md.append("![training curves](plots/training_curves.png)")
    if retr_png:
        md.append("![Recall@K and MRR during pretraining](plots/pretraining_eval.png)")
    if not (loss_png or retr_png):
        md.append("(no history.jsonl curves were recorded by the stages)")
    md.append("")
    if curves_left_out:
        md += [f"- curves left out: {why}" for why in curves_left_out] + [""]
    path = workdir / "report.md"
    path.write_text("\n".join(md) + "\n")
    return path
