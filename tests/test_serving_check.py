"""serving_check's report file (the pipeline's serving stage's done file)."""

from __future__ import annotations

import json
import pathlib
import types

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


def test_the_offline_scores_leave_the_accelerator_to_the_ranker(monkeypatch):
    # serving_check scored the offline reference on JAX's default device and then
    # started serve_ranker on the same one: on GPU hosts where one process holds the
    # GPU a second JAX process finds no device, so the check's own ranker could not
    # start. It must pin this process to the CPU before anything touches a device.
    import jax

    from jax_recsys.quant import artifact as artifact_lib

    updates = []

    class Stop(Exception):
        pass

    def first_device_use(path, **kw):  # the first thing main() does with the artifact
        raise Stop(list(updates))

    monkeypatch.setattr(serving_check, "check_flags", lambda: None)
    monkeypatch.setattr(serving_check, "_ARTIFACT", types.SimpleNamespace(value="art"))
    monkeypatch.setattr(jax.config, "update", lambda name, value: updates.append((name, value)))
    monkeypatch.setattr(artifact_lib, "load_artifact", first_device_use)
    with pytest.raises(Stop) as stopped:
        serving_check.main([])
    assert stopped.value.args[0] == [("jax_platforms", "cpu")]
