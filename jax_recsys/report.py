"""The end-to-end report: `report.md` plus PNG plots, from the pipeline's stage outputs.

Inputs are plain dicts read from the stages' JSON files (ablation.json, the export
report, the serving check) and training curves from `history.jsonl` files (see
jax_recsys/history.py). Nothing here trains or evaluates: it only writes down what
the stages measured.
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

TASKS = ("ctr", "cvr", "ctcvr")
# Pretraining metrics shown in the report (the rest stay in each run's metrics.json).
_PRETRAIN_KEYS = ("recall@10", "pop_recall@10", "ndcg@10", "pop_ndcg@10", "recall@100",
                  "heldout_loss", "test_mrr", "test_hits@1", "test_hits@10", "final_loss")


def _fmt(mean: float | None, std: float | None, pct: bool = False) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "n/a"
    std = 0.0 if std is None or (isinstance(std, float) and math.isnan(std)) else std
    if pct:
        return f"{100 * mean:+.1f}% ± {100 * std:.1f}"
    return f"{mean:.4f} ± {std:.4f}"


def ablation_table(ablation: Mapping[str, Any], baseline: str = "no_large_tables") -> list[str]:
    """Markdown rows of the ablation table (mean ± std AUC and RelaImpr per task)."""
    lines = [
        "| variant | CTR AUC | CTR gain | CVR AUC | CVR gain | CTCVR AUC | CTCVR gain |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in ablation["order"]:
        r = ablation["variants"][name]
        cells = [r.get("label", name)]
        for t in TASKS:
            cells.append(_fmt(r.get(f"{t}_auc_mean"), r.get(f"{t}_auc_std")))
            cells.append(
                "—" if name == baseline
                else _fmt(r.get(f"{t}_relaimpr_mean"), r.get(f"{t}_relaimpr_std"), pct=True)
            )
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_auc(ablation: Mapping[str, Any], path: pathlib.Path) -> pathlib.Path:
    """Bar chart: test AUC per variant with ±std error bars, one panel per task."""
    plt = _plt()
    order = list(ablation["order"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, task in zip(axes, ("ctr", "cvr"), strict=True):
        means = [ablation["variants"][n].get(f"{task}_auc_mean", float("nan")) for n in order]
        stds = [ablation["variants"][n].get(f"{task}_auc_std", 0.0) or 0.0 for n in order]
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
        keys = sorted({k for r in recs for k in r if k != "step" and select(k)})
        if keys:
            panels.append((stage, recs, keys))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (stage, recs, keys) in zip(axes[0], panels, strict=True):
        for k in keys:
            pts = [(r["step"], r[k]) for r in recs if r.get(k) is not None]
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
) -> pathlib.Path:
    """Writes `workdir/report.md` and `workdir/plots/*.png`.

    Args:
      workdir: the pipeline folder.
      stages: one summary per stage: {"stage", "seconds", "summary", "skipped"}.
      ablation: ablation.json contents.
      export: the INT4 export report.
      serving: the live serving check's measurements.
      pretraining: final metrics per pretraining run ("cl/fresh", "kg/stale", ...).
      histories: stage name -> history records (training curves).

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
        secs = "skipped (up to date)" if s.get("skipped") else f"{s.get('seconds', 0):.0f}"
        md.append(f"| {s['stage']} | {secs} | {s.get('summary', '')} |")
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
        md += ["![AUC per variant](plots/auc_per_variant.png)", ""]
        plot_auc(ablation, plots / "auc_per_variant.png")
    if pretraining:
        md += ["## Pretraining", "", "| run | metric | value |", "|---|---|---|"]
        for run, m in pretraining.items():
            for k in sorted(m):
                v = m[k]
                if isinstance(v, int | float) and k in _PRETRAIN_KEYS:
                    md.append(f"| {run} | {k} | {v:.4f} |")
        md.append("")
    if export:
        md += ["## INT4 export", ""]
        gate = export.get("gate") or {}
        md.append(
            f"- version {export.get('version')}, {export.get('bits')}-bit rows with "
            f"{export.get('scale_dtype', 'float16')} scale/bias; gate "
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
                        f"| {name} | {t['bytes']:,} | {t.get('fp32_bytes', 0):,} | "
                        f"{100 * t.get('ratio_vs_fp32', float('nan')):.2f}% | "
                        f"{100 * t.get('ratio_vs_fp16', float('nan')):.2f}% |"
                    )
        quality = export.get("quality") or {}
        if quality:
            md += ["", "| task | metric | full precision | INT4 | delta |", "|---|---|---|---|---|"]
            for task, q in quality.items():
                if not isinstance(q, Mapping):
                    continue
                for m in ("auc", "log_loss", "calibration"):
                    if f"{m}_full" in q:
                        md.append(
                            f"| {task} | {m} | {q[f'{m}_full']:.5f} | {q[f'{m}_quant']:.5f} | "
                            f"{q[f'{m}_delta']:+.5f} |"
                        )
        md.append("")
    if serving:
        md += ["## Live hybrid serving (loopback)", ""]
        for k in sorted(serving):
            v = serving[k]
            md.append(f"- {k}: {v:.4g}" if isinstance(v, float) else f"- {k}: {v}")
        md.append("")
    md += ["## Training curves", ""]
    loss_png = plot_curves(
        histories, plots / "training_curves.png", select=lambda k: "loss" in k,
        title="training loss per stage",
    )
    retr_png = plot_curves(
        histories, plots / "pretraining_eval.png",
        select=lambda k: k.endswith(("recall@10", "ndcg@10", "mrr", "hits@10")),
        title="pretraining evaluation during training",
    )
    if loss_png:
        md.append("![training curves](plots/training_curves.png)")
    if retr_png:
        md.append("![Recall@K and MRR during pretraining](plots/pretraining_eval.png)")
    if not (loss_png or retr_png):
        md.append("(no history.jsonl curves were recorded by the stages)")
    md.append("")
    path = workdir / "report.md"
    path.write_text("\n".join(md) + "\n")
    return path
