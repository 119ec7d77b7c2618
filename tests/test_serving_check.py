"""serving_check's report file (the pipeline's serving stage's done file)."""

from __future__ import annotations

import json
import pathlib

import pytest

from launch import serving_check


def test_the_report_is_written_atomically(tmp_path, monkeypatch):
    # serving_check.json was written in place (in a `finally`): a check stopped while
    # writing it left a cut-short JSON file, taken for the finished serving stage.
    out = tmp_path / "serving_check.json"
    serving_check.write_report(out, {"ok": True, "num_requests": 3})
    assert json.loads(out.read_text()) == {"ok": True, "num_requests": 3}
    real = pathlib.Path.write_text

    def stopped_half_way(self, text, *a, **k):
        real(self, text[: len(text) // 2], *a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(pathlib.Path, "write_text", stopped_half_way)
    with pytest.raises(KeyboardInterrupt):
        serving_check.write_report(out, {"ok": False, "num_requests": 200, "failures": ["x" * 50]})
    monkeypatch.undo()
    assert json.loads(out.read_text()) == {"ok": True, "num_requests": 3}
    assert [p.name for p in tmp_path.iterdir()] == ["serving_check.json"]
