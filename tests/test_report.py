"""The pipeline report and the training-curve history files."""

from __future__ import annotations

import json
import logging
import os

from jax_recsys import history, report


def _ablation():
    v = {
        "no_large_tables": {"label": "no large tables", "ctr_auc_mean": 0.70, "ctr_auc_std": 0.01,
                            "cvr_auc_mean": 0.55, "cvr_auc_std": 0.02},
        "cl_kg": {"label": "+ both facets", "ctr_auc_mean": 0.74, "ctr_auc_std": 0.005,
                  "ctr_relaimpr_mean": 0.2, "ctr_relaimpr_std": 0.01,
                  "cvr_auc_mean": 0.56, "cvr_auc_std": 0.01},
    }
    return {"order": ["no_large_tables", "cl_kg"], "variants": v, "seeds": [0, 1]}


def test_history_roundtrip_and_metrics_extraction(tmp_path, caplog):
    w = history.MetricWriter(tmp_path / "a", tensorboard=False)
    w.write(1, {"loss": 2.0, "acc": float("nan")})
    w.write(2, {"loss": 1.5})
    w.close()
    assert history.read_history(tmp_path / "a") == [
        {"step": 1, "loss": 2.0, "acc": None}, {"step": 2, "loss": 1.5}]
    # A damaged line (a killed trainer's half-written last one) raised, and with it
    # the pipeline's report step: it is skipped with a warning naming file and line.
    (tmp_path / "a" / "history.jsonl").write_bytes(b'{"step": 1}\n\xff\xfe\n{"step": 3}\n{"st')
    with caplog.at_level(logging.WARNING):
        assert history.read_history(tmp_path / "a") == [{"step": 1}, {"step": 3}]
    assert [r.getMessage().split(": not")[0] for r in caplog.records] == [
        f"{tmp_path / 'a' / 'history.jsonl'}:{i}" for i in (2, 4)]

    m = {"history": [{"step": 20, "loss": 1.0, "recall@10": 0.3, "name": "x"}],
         "train": {"loss_curve": [[10, 0.7], [5, 0.9]]}}
    assert history.records_from_metrics(m) == [
        {"step": 5, "loss_ema": 0.9}, {"step": 10, "loss_ema": 0.7},
        {"step": 20, "loss": 1.0, "recall@10": 0.3}]
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps(m))
    recs = history.export_run_history(run, tensorboard=False)
    assert len(recs) == 3 and history.read_history(run) == recs


def test_export_run_history_follows_a_retrained_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    mpath = run / "metrics.json"
    mpath.write_text(json.dumps({"train": {"loss_curve": [[10, 0.9], [20, 0.8]]}}))
    first = [{"step": 10, "loss_ema": 0.9}, {"step": 20, "loss_ema": 0.8}]
    assert history.export_run_history(run, tensorboard=False) == first
    assert history.export_run_history(run, tensorboard=False) == first  # unchanged: kept
    # Retrained (metrics.json rewritten): the history is rebuilt from the new run.
    mpath.write_text(json.dumps({"train": {"loss_curve": [[10, 0.5], [20, 0.4], [30, 0.35]]}}))
    second = [{"step": 10, "loss_ema": 0.5}, {"step": 20, "loss_ema": 0.4},
              {"step": 30, "loss_ema": 0.35}]
    assert history.export_run_history(run, tensorboard=False) == second
    assert history.read_history(run) == second
    # A history without a source stamp (written before stamps, or by a trainer) is kept
    # unless metrics.json is newer.
    history.clear_run_history(run)
    (run / "history.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    os.utime(mpath, ns=(1_000_000_000, 1_000_000_000))
    assert history.export_run_history(run, tensorboard=False) == [{"step": 1, "loss": 2.0}]
    os.utime(mpath, ns=(2**62, 2**62))
    assert history.export_run_history(run, tensorboard=False) == second


def test_report_tables_and_plots(tmp_path):
    export = {
        "version": "abc", "bits": 4, "scale_dtype": "float16",
        "gate": {"passed": True, "max_auc_drop": 0.001, "noise_z": 0.0},
        "sizes": {"tables": {"user": {"bytes": 36, "fp32_bytes": 256, "fp16_bytes": 128,
                                      "ratio_vs_fp32": 36 / 256, "ratio_vs_fp16": 36 / 128}},
                  "total": {"bytes": 36, "fp32_bytes": 256, "fp16_bytes": 128,
                            "ratio_vs_fp32": 36 / 256, "ratio_vs_fp16": 36 / 128}},
        "quality": {"ctr": {"auc_full": 0.74, "auc_quant": 0.7399, "auc_delta": -0.0001}},
    }
    hist = {"ranker cl_kg": [{"step": 1, "loss_ema": 1.0}, {"step": 2, "loss_ema": 0.5}],
            "pretrain cl": [{"step": 1, "loss": 3.0, "recall@10": 0.1},
                            {"step": 2, "loss": 2.0, "recall@10": 0.2}]}
    path = report.write_report(
        tmp_path, stages=[{"stage": "world", "seconds": 1.0, "summary": "ok", "skipped": False}],
        ablation=_ablation(), export=export,
        serving={"latency_ms_p50": 3.25, "ok": True}, pretraining={}, histories=hist)
    md = path.read_text()
    assert "| + both facets | 0.7400 ± 0.0050 | +20.0% ± 1.0 |" in md
    assert "| user | 36 | 256 | 14.06% | 28.12% |" in md
    assert "| ctr | auc | 0.74000 | 0.73990 | -0.00010 |" in md
    assert "latency_ms_p50: 3.25" in md
    assert "## INT4 export" in md and "| task | metric | full precision | INT4 | delta |" in md
    for png in ("auc_per_variant.png", "training_curves.png", "pretraining_eval.png"):
        assert (tmp_path / "plots" / png).stat().st_size > 1000


def test_pretraining_metrics_at_every_k_the_run_evaluated(tmp_path):
    """A run evaluated at eval_ks=(5, 20): its Recall/NDCG rows are in the table (only
    @10 and recall@100 were), and its curves are drawn at K=5 (none were drawn)."""
    metrics = {"recall@5": 0.1, "recall@20": 0.3, "pop_ndcg@5": 0.05, "test_hits@3": 0.2,
               "final_loss": 1.5, "steps": 7, "recall@x": 0.9, "recall@100": 0.5}
    md = report.write_report(tmp_path, stages=[], pretraining={"cl/fresh": metrics}).read_text()
    rows = [ln for ln in md.splitlines() if ln.startswith("| cl/fresh |")]
    assert rows == ["| cl/fresh | final_loss | 1.5000 |", "| cl/fresh | pop_ndcg@5 | 0.0500 |",
                    "| cl/fresh | recall@5 | 0.1000 |", "| cl/fresh | recall@20 | 0.3000 |",
                    "| cl/fresh | recall@100 | 0.5000 |", "| cl/fresh | test_hits@3 | 0.2000 |"]
    hist = {"pretrain cl": [{"step": 1, "recall@5": 0.1, "recall@20": 0.2, "test_mrr": 0.3},
                            {"step": 2, "recall@5": 0.2, "recall@20": 0.3, "test_mrr": 0.4}]}
    select = report._eval_curve(hist)
    assert [k for k in ("recall@5", "recall@20", "test_mrr", "step") if select(k)] == [
        "recall@5", "test_mrr"]
    report.write_report(tmp_path, stages=[], histories=hist)
    assert (tmp_path / "plots" / "pretraining_eval.png").stat().st_size > 1000
    # With K = 10 recorded, the curves stay at 10 (as before), whatever else there is.
    select = report._eval_curve({"kg": [{"step": 1, "test_hits@10": 0.5, "test_hits@1": 0.1,
                                         "valid_recall@10": 0.2}]})
    assert [k for k in ("test_hits@10", "test_hits@1", "valid_recall@10", "recall@100")
            if select(k)] == ["test_hits@10", "valid_recall@10"]


def test_report_names_the_exports_real_width(tmp_path):
    """An 8-bit (pipeline --config.export.bits=8) or float32 export used to be reported
    under "## INT4 export" with an "INT4" column over its numbers."""
    quality = {"ctr": {"auc_full": 0.74, "auc_quant": 0.7399, "auc_delta": -0.0001}}
    for bits, width, rows in ((8, "INT8", "8-bit rows with float16 scale/bias"),
                              (32, "float32", "float32 rows (not quantized)")):
        export = {"version": "abc", "bits": bits, "scale_dtype": "float16",
                  "gate": {"passed": True, "max_auc_drop": 0.001}, "quality": quality}
        md = report.write_report(tmp_path, stages=[], export=export).read_text()
        assert f"## {width} export" in md and rows in md
        assert f"| task | metric | full precision | {width} | delta |" in md
        assert "INT4" not in md


def test_ablation_table_marks_a_mean_over_fewer_seeds():
    ablation = _ablation()
    ablation["variants"]["cl_kg"].update(ctr_auc_n=2, ctr_relaimpr_n=1, cvr_auc_n=2)
    lines = report.ablation_table(ablation)
    assert lines[3] == ("| + both facets | 0.7400 ± 0.0050 | +20.0% ± 1.0 (n=1 of 2) | "
                        "0.5600 ± 0.0100 | n/a | n/a | n/a |")
    assert lines[-1] == report.FEWER_SEEDS_NOTE
    ablation["variants"]["cl_kg"].update(ctr_relaimpr_n=2, ctr_auc_n=0)  # all seeds, or none
    assert report.ablation_table(ablation)[-1].startswith("| + both facets | 0.7400 ± 0.0050 | "
                                                         "+20.0% ± 1.0 | ")


def test_report_renders_null_and_missing_values_as_na(tmp_path):
    nan = float("nan")
    ablation = {
        "order": ["no_large_tables", "cl", "gone"],  # "gone" has no results: left out
        "variants": {"no_large_tables": {"ctr_auc_mean": None, "cvr_auc_mean": nan},
                     "cl": {"ctr_auc_mean": 0.7, "ctr_auc_std": None,
                            "ctr_relaimpr_mean": None}},
    }
    export = {"sizes": {"tables": {"u": {"bytes": None, "fp32_bytes": 64,
                                         "ratio_vs_fp32": None}},
                        "total": {"bytes": 10}},
              "quality": {"ctr": {"auc_full": 0.7, "auc_quant": None, "auc_delta": None}}}
    path = report.write_report(
        tmp_path, stages=[{"stage": "x", "seconds": None}, {"stage": "y", "seconds": 2.4}],
        ablation=ablation, export=export, serving={"qps": None, "p50_ms": 1.25},
        pretraining={"cl/fresh": {"recall@10": None, "test_mrr": 0.25}},
        histories={"all null": [{"step": 1, "loss": None}, {"step": 2, "loss": None}],
                   "no step": [{"loss": 1.0}]},
    )
    lines = path.read_text().splitlines()
    for row in ["| x | n/a |  |", "| y | 2 |  |",
                "| no_large_tables | n/a | — | n/a | — | n/a | — |",
                "| cl | 0.7000 ± 0.0000 | n/a | n/a | n/a | n/a | n/a |",
                "| u | n/a | 64 | n/a | n/a |", "| total | 10 | n/a | n/a | n/a |",
                "| ctr | auc | 0.70000 | n/a | n/a |",
                "| cl/fresh | recall@10 | n/a |", "| cl/fresh | test_mrr | 0.2500 |",
                "- qps: n/a", "- p50_ms: 1.25",
                "(no history.jsonl curves were recorded by the stages)"]:
        assert row in lines, row
    assert not any("gone" in line for line in lines)
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["auc_per_variant.png"]
