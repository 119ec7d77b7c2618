"""End-to-end: the smoke pipeline (world → facets → ablation → INT4 export → live
gRPC serving check → report) in a subprocess, exactly as the README runs it."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow
_REPO = pathlib.Path(__file__).resolve().parents[1]


def test_smoke_pipeline_end_to_end(tmp_path):
    wd = tmp_path / "pipe"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    cmd = [sys.executable, "-m", "launch.run_pipeline", "--config=configs/pipeline.py:smoke",
           f"--workdir={wd}"]
    proc = subprocess.run(cmd, cwd=_REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    abl = json.loads((wd / "ablation" / "ablation.json").read_text())
    assert {"no_large_tables", "cl_kg", "cl_kg_int4"} <= set(abl["variants"])
    for name in abl["order"]:
        auc = abl["variants"][name]["ctr_auc_mean"]
        assert 0.5 < auc < 1.0, (name, auc)

    export = json.loads((wd / "export_report.json").read_text())
    assert export["gate"]["passed"] is True
    assert export["bits"] == 4
    assert 0.10 < export["sizes"]["total"]["ratio_vs_fp32"] < 0.20
    assert (wd / "artifact" / "manifest.json").exists()

    serving = json.loads((wd / "serving_check.json").read_text())
    assert serving["ok"] is True
    assert serving["failed_requests"] == 0
    assert serving["scores_match_offline_int4"] is True
    assert max(serving["max_abs_diff_ctr"], serving["max_abs_diff_cvr"]) <= 1e-5
    # Requests merged into batches under concurrent load score like single ones.
    assert max(serving["concurrent_max_abs_diff_ctr"],
               serving["concurrent_max_abs_diff_cvr"]) <= 1e-5
    assert serving["server_exit_codes"] == [0] * (serving["num_shards"] + 1)

    report = (wd / "report.md").read_text()
    assert "| variant |" in report and "INT4" in report and "serving" in report.lower()
    for png in ("auc_per_variant.png", "training_curves.png"):
        assert (wd / "plots" / png).stat().st_size > 1000
    lines = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in lines] == ["world", "ablation", "export", "serving"]

    # A second run finds every stage up to date and only rewrites the report.
    proc2 = subprocess.run(cmd, cwd=_REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc2.returncode == 0, proc2.stderr[-3000:]
    assert proc2.stdout.count("up to date, skipped") == 4
