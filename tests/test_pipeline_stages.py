"""run_pipeline's staging: keys over configs and upstream stages, forcing, killed
stages never taken for finished, timeouts that stop every process, config checks."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

import pytest

from launch import pipeline_stages as rp

pytestmark = pytest.mark.filterwarnings("ignore")


def _stage(tmp_path, name, *, code="pass", config=None, forced_args=()):
    """A stage whose command appends its name (and args) to runs.txt and writes its done file."""
    done = tmp_path / f"{name}.done"
    script = (
        "import pathlib, sys; "
        f"open({str(tmp_path / 'runs.txt')!r}, 'a').write(' '.join([{name!r}, *sys.argv[1:]]) + '\\n'); "
        f"{code}; pathlib.Path({str(done)!r}).write_text('ok')"
    )
    cmd = [sys.executable, "-c", script]
    if config:
        cmd.append(f"--config={config}")
    return rp.Stage(name, cmd, done, lambda wd: name, forced_args=forced_args)


def _runs(tmp_path):
    p = tmp_path / "runs.txt"
    return p.read_text().splitlines() if p.exists() else []


def _write_config(path, value):
    path.write_text(
        "import ml_collections\n\n"
        "def get_config(arg=None):\n"
        f"    return ml_collections.ConfigDict({{'value': {value!r}, 'arg': arg}})\n"
    )


def _run_child(code: str) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh Python in the checkout (launch's absl flags stay out of
    this process); asserts it exits 0."""
    proc = subprocess.run([sys.executable, "-c", code], cwd=rp._REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_keys_follow_config_content_and_upstream_stages(tmp_path):
    cfg = tmp_path / "world_cfg.py"
    _write_config(cfg, 1)
    stages = lambda: [_stage(tmp_path, "a", config=f"{cfg}:smoke"),  # noqa: E731
                      _stage(tmp_path, "b"), _stage(tmp_path, "c")]
    wd = tmp_path / "wd"
    rp.run_stages(stages(), wd, set(), 60)
    assert [r.split()[0] for r in _runs(tmp_path)] == ["a", "b", "c"]
    res = rp.run_stages(stages(), wd, set(), 60)
    assert [r["skipped"] for r in res] == [True, True, True]
    assert len(_runs(tmp_path)) == 3
    # Editing the config file in place reruns its stage and every later one.
    _write_config(cfg, 2)
    res = rp.run_stages(stages(), wd, set(), 60)
    assert [r["skipped"] for r in res] == [False, False, False]
    # The same command with another config argument is another key, too.
    assert _stage(tmp_path, "a", config=f"{cfg}:smoke").keys()[0] != \
        _stage(tmp_path, "a", config=f"{cfg}").keys()[0]
    # Forcing a middle stage reruns it and what follows, not what precedes; its
    # forced_args reach the command but not the key.
    stages2 = [_stage(tmp_path, "a", config=f"{cfg}:smoke"),
               _stage(tmp_path, "b", forced_args=("--fresh",)), _stage(tmp_path, "c")]
    before = len(_runs(tmp_path))
    res = rp.run_stages(stages2, wd, {"b"}, 60)
    assert [r["skipped"] for r in res] == [True, False, False]
    assert _runs(tmp_path)[before:] == ["b --fresh", "c"]
    res = rp.run_stages(stages(), wd, set(), 60)
    assert [r["skipped"] for r in res] == [True, True, True]
    with pytest.raises(ValueError, match=r"unknown stage\(s\) \['bb'\]"):
        rp.run_stages(stages(), wd, {"bb"}, 60)


def test_a_stage_stopped_half_way_is_not_taken_for_finished(tmp_path):
    wd = tmp_path / "wd"
    rp.run_stages([_stage(tmp_path, "a")], wd, set(), 60)
    # A forced rerun that dies after rewriting part of its output (as a killed
    # run leaves it): the next plain run must run the stage again, not skip it.
    done = tmp_path / "a.done"
    failing = _stage(tmp_path, "a", code=f"pathlib.Path({str(done)!r}).write_text('half'); sys.exit(3)")
    with pytest.raises(SystemExit, match=r"\[a\] failed with exit code 3"):
        rp.run_stages([failing], wd, {"a"}, 60)
    assert not (wd / "stages" / "a.json").exists() and done.read_text() == "half"
    res = rp.run_stages([_stage(tmp_path, "a")], wd, set(), 60)
    assert res[0]["skipped"] is False and done.read_text() == "ok"


def test_the_report_leaves_out_outputs_of_stages_the_run_does_not_have(tmp_path):
    # Serving disabled after a run that had it: report.md showed the old serving check
    # (of an INT4 artifact) under this run's INT8 export.
    wd = tmp_path / "wd"
    wd.mkdir()
    (wd / "export_report.json").write_text(json.dumps({"version": "new", "bits": 8}))
    (wd / "serving_check.json").write_text(json.dumps({"version": "old", "ok": True}))
    code = ("import pathlib, sys; sys.argv = ['run_pipeline']\n"
            "from launch import run_pipeline\n"
            f"wd = pathlib.Path({str(wd)!r})\n"
            "for stages in (['world', 'export'], ['world', 'export', 'serving']):\n"
            "    results = [{'stage': s, 'seconds': 1.0, 'summary': s} for s in stages]\n"
            "    text = run_pipeline.write_pipeline_report(None, wd, results).read_text()\n"
            "    print('INT8 export' in text, 'Live hybrid serving' in text, '- version: old' in text)\n")
    proc = _run_child(code)
    assert proc.stdout.splitlines() == ["True False False", "True True True"]


def test_a_failed_stage_rewrites_the_report(tmp_path):
    # The report of the last finished run stayed, describing an ablation whose output
    # the failed rerun had removed (and its export, serving check and curves).
    wd = tmp_path / "wd"
    (wd / "ablation" / "runs" / "cl_s0").mkdir(parents=True)
    (wd / "report.md").write_text("old report\n")
    (wd / "ablation" / "ablation.json").write_text(json.dumps(
        {"order": ["cl"], "seeds": [0], "variants": {"cl": {"label": "old cl", "ctr_auc_mean": 0.6}}}))
    (wd / "ablation" / "runs" / "cl_s0" / "metrics.json").write_text(
        json.dumps({"train": {"loss_curve": [[10, 0.9], [20, 0.8]]}}))
    (wd / "export_report.json").write_text(json.dumps({"version": "old", "bits": 4}))
    code = (
        "import pathlib, sys, types; sys.argv = ['run_pipeline']\n"
        "from launch import pipeline_stages as rp, run_pipeline\n"
        f"wd = pathlib.Path({str(wd)!r})\n"
        "py = lambda code, *args: [sys.executable, '-c', code, *args]\n"
        "touch = py('import pathlib, sys; pathlib.Path(sys.argv[1]).touch()', str(wd / 'w.done'))\n"
        "stages = [rp.Stage('world', touch, wd / 'w.done', lambda wd: 'world made'),\n"
        "          rp.Stage('ablation', py('import sys; sys.exit(3)'),\n"
        "                   wd / 'ablation' / 'ablation.json', lambda wd: ''),\n"
        "          rp.Stage('export', py('pass'), wd / 'export_report.json', lambda wd: '')]\n"
        "try:\n"
        "    run_pipeline.run_and_report(types.SimpleNamespace(stage_timeout_s=60), wd, stages, set())\n"
        "except SystemExit as e:\n"
        "    print('exit:', e.code)\n")
    proc = _run_child(code)
    error = proc.stdout.splitlines()[-1].removeprefix("exit: ")
    assert error.startswith("[ablation] failed with exit code 3: ")
    lines = (wd / "report.md").read_text().splitlines()
    assert lines[5:8] == ["|---|---|---|", "| world | 0 | world made |",
                          f"| ablation | FAILED (later stages not run) | {error} |"]
    assert [ln for ln in lines if ln.startswith("## ")] == ["## Stages", "## Training curves"]
    assert "(no history.jsonl curves were recorded by the stages)" in lines


def test_the_report_draws_the_ranker_curves_of_the_ablations_first_seed(tmp_path):
    # Only runs named *_s0 were drawn: an ablation with seeds 1,2 had no ranker curves,
    # and a stale cl_s0 (or a variant no longer in the ablation) was drawn instead.
    wd = tmp_path / "wd"
    for name, loss in (("cl_s0", 0.1), ("cl_s1", 0.8), ("cl_s2", 0.7), ("old_s1", 0.6)):
        (wd / "ablation" / "runs" / name).mkdir(parents=True)
        (wd / "ablation" / "runs" / name / "metrics.json").write_text(
            json.dumps({"train": {"loss_curve": [[10, loss]]}}))
    (wd / "ablation" / "ablation.json").write_text(json.dumps(
        {"order": ["cl"], "seeds": [1, 2], "variants": {"cl": {"label": "cl"}}}))
    code = ("import pathlib, sys; sys.argv = ['run_pipeline']\n"
            "from launch import run_pipeline\n"
            "from jax_recsys import report\n"
            "report.write_report = lambda wd, **kw: print(kw['histories'])\n"
            f"run_pipeline.write_pipeline_report(None, pathlib.Path({str(wd)!r}),\n"
            "    [{'stage': 'ablation', 'seconds': 1.0, 'summary': ''}])\n")
    proc = _run_child(code)
    assert proc.stdout.splitlines() == ["{'ranker cl': [{'step': 10, 'loss_ema': 0.8}]}"]


def test_the_report_says_which_served_row_is_this_runs_artifact(tmp_path):
    # An export adds its width's row and keeps the others: after an INT4 run, a rerun
    # with export.bits=8 showed "INT4 served" and "INT8 served" alike beside the INT8
    # export, and a row of an export that failed its gate beside no artifact.
    wd = tmp_path / "wd"
    (wd / "ablation").mkdir(parents=True)
    rows = {"no_large_tables": {"label": "baseline"}, "cl_kg": {"label": "+ both facets"},
            "cl_kg_int4": {"label": "+ both facets, INT4 served", "bits": 4},
            "cl_kg_int8": {"label": "+ both facets, INT8 served", "bits": 8}}
    (wd / "ablation" / "ablation.json").write_text(json.dumps(
        {"order": list(rows), "seeds": [0], "variants": rows}))
    (wd / "export_report.json").write_text(json.dumps({"version": "v8", "bits": 8}))
    code = ("import pathlib, sys, types; sys.argv = ['run_pipeline']\n"
            "from launch import run_pipeline\n"
            f"wd = pathlib.Path({str(wd)!r})\n"
            "cfg = types.SimpleNamespace(export=types.SimpleNamespace(variant='cl_kg', bits=8))\n"
            "for export in ({'stage': 'export'}, {'stage': 'export', 'failed': True}):\n"
            "    results = [{'stage': 'ablation', 'seconds': 1.0, 'summary': ''}, export]\n"
            "    text = run_pipeline.write_pipeline_report(cfg, wd, results).read_text()\n"
            "    print([ln.split(' |')[0] for ln in text.splitlines() if 'served' in ln])\n")
    proc = _run_child(code)
    assert proc.stdout.splitlines() == [
        str(["| + both facets, INT4 served (not this run's artifact)",
             "| + both facets, INT8 served (this run's artifact)"]),
        str(["| + both facets, INT4 served (not this run's artifact)",
             "| + both facets, INT8 served (not this run's artifact)"])]
    # ablation.json itself keeps the labels the export gave.
    assert json.loads((wd / "ablation" / "ablation.json").read_text())["variants"] == rows


def test_a_damaged_run_metrics_json_leaves_its_curves_out_of_the_report(tmp_path):
    # report.md was not written: run_pipeline ended with "run_pipeline: error: Expecting
    # ',' delimiter: ..." (no file named) for a cut-short metrics.json, and a traceback
    # for one that is a list or holds a [step] without a loss.
    wd = tmp_path / "wd"
    runs = {"runs/cl_s0": '{"train": {"loss_curve": [[10, 0.9], [20',
            "runs/kg_s0": '{"train": {"loss_curve": [[10]]}}',
            "runs/scratch_s0": json.dumps({"train": {"loss_curve": [[10, 0.5], [20, "NaN"]]}}),
            "pretrain/cl_fresh": "[1, 2]",
            "pretrain/kg_fresh": json.dumps({"history": [{"step": 5, "loss": 2.0}]})}
    for name, text in runs.items():
        (wd / "ablation" / name).mkdir(parents=True)
        (wd / "ablation" / name / "metrics.json").write_text(text)
    (wd / "ablation" / "ablation.json").write_text(json.dumps(
        {"order": ["scratch", "cl", "kg"], "seeds": [0],
         "variants": {n: {"label": n, "ctr_auc_mean": 0.6} for n in ("scratch", "cl", "kg")}}))
    code = ("import pathlib, sys; sys.argv = ['run_pipeline']\n"
            "from launch import run_pipeline\n"
            "from jax_recsys import report\n"
            "write = report.write_report\n"
            "report.write_report = lambda wd, **kw: print(kw['histories']) or write(wd, **kw)\n"
            f"run_pipeline.write_pipeline_report(None, pathlib.Path({str(wd)!r}),\n"
            "    [{'stage': 'ablation', 'seconds': 1.0, 'summary': ''}])\n")
    proc = _run_child(code)
    # The undamaged runs are drawn (a "NaN" loss dropped, as other non-numeric values).
    assert proc.stdout.splitlines() == [
        "{'pretrain kg_fresh': [{'step': 5, 'loss': 2.0}], "
        "'ranker scratch': [{'step': 10, 'loss_ema': 0.5}, {'step': 20}]}"]
    damaged = [f"{wd / 'ablation' / 'pretrain' / 'cl_fresh' / 'metrics.json'} is damaged: "
               "not a JSON object but list",
               f"{wd / 'ablation' / 'runs' / 'cl_s0' / 'metrics.json'} is damaged: "
               "Expecting ',' delimiter: line 1 column 41 (char 40)",
               f"{wd / 'ablation' / 'runs' / 'kg_s0' / 'metrics.json'} is damaged: "
               "train.loss_curve[0] is not a [step, loss] pair: [10]"]
    lines = (wd / "report.md").read_text().splitlines()
    assert [ln for ln in lines if ln.startswith("- curves left out: ")] == [
        f"- curves left out: {d}" for d in damaged]
    assert "![training curves](plots/training_curves.png)" in lines
    warned = [ln.split("report: ", 1)[1] for ln in proc.stderr.splitlines() if "report: " in ln]
    assert warned == [f"{d}; its curves are left out" for d in damaged]


def test_timeout_stops_the_stage_and_its_children(tmp_path):
    pid_file = tmp_path / "child.pid"
    code = (
        "import subprocess, time; "
        "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
        f"open({str(pid_file)!r}, 'w').write(str(c.pid)); time.sleep(120)"
    )
    st = _stage(tmp_path, "slow", code=code)
    t0 = time.time()
    with pytest.raises(SystemExit, match=r"\[slow\] timed out after 3 s"):
        rp.run_stages([st], tmp_path / "wd", set(), 3)
    assert time.time() - t0 < 60
    child = int(pid_file.read_text())
    for _ in range(100):  # the SIGKILL'd child is reaped by init
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        if pathlib.Path(f"/proc/{child}/stat").exists() and \
                pathlib.Path(f"/proc/{child}/stat").read_text().split()[2] == "Z":
            break
        time.sleep(0.1)
    else:
        subprocess.run(["kill", "-9", str(child)])
        pytest.fail("the stage's child process outlived the timeout")


def _pipeline_cfg(**export):
    cfg = rp.load_config("configs/pipeline.py:smoke")
    cfg.unlock() if hasattr(cfg, "unlock") else None
    for k, v in export.items():
        cfg.export[k] = v
    return cfg


def test_export_settings_are_checked_before_any_stage_runs(tmp_path):
    summaries = dict.fromkeys(("world", "ablation", "export", "serving"), lambda wd: "")
    build = lambda cfg: rp.build(cfg, tmp_path, summaries=summaries)  # noqa: E731
    stages = build(_pipeline_cfg())
    export = next(s for s in stages if s.name == "export")
    assert "--int4_source=cl_kg" in export.cmd
    abl = next(s for s in stages if s.name == "ablation")
    assert abl.forced_args == ("--fresh",)
    assert abl.configs == ("configs/contrastive.py:smoke", "configs/kg.py:smoke")
    with pytest.raises(ValueError, match="not in the ablation's save_ranker_variants"):
        build(_pipeline_cfg(variant="cl_kg_frozen"))  # a smoke variant whose ranker is not saved
    with pytest.raises(ValueError, match="export.variant='magic' is not an ablation variant"):
        build(_pipeline_cfg(variant="magic"))
    with pytest.raises(ValueError, match=r"export.seed=3 is not an ablation seed \[0\]"):
        build(_pipeline_cfg(seed=3))
    with pytest.raises(ValueError, match="export.bits=3 must be 4, 8 or 32"):
        build(_pipeline_cfg(bits=3))
    cfg = _pipeline_cfg(seed=3)
    cfg.ablation_flags = "--config.seeds 3"  # absl's space-separated form
    build(cfg)
    cfg = _pipeline_cfg(variant="scratch")
    cfg.ablation_flags = "--config.seeds=0 --config.save_ranker_variants=scratch,cl_kg"
    export = next(s for s in build(cfg) if s.name == "export")
    assert "--int4_source=scratch" in export.cmd


def test_serving_and_timeout_settings_are_checked_before_any_stage_runs(tmp_path):
    # Refused only by their stage, after the ablation (serving_check's "bad flags:
    # --num_shards=0", export_int4's auc_noise_z), or by a stage timing out at once.
    summaries = dict.fromkeys(("world", "ablation", "export", "serving"), lambda wd: "")
    for key, value, message in [
        ("serving.num_shards", 0, "serving.num_shards=0 must be >= 1"),
        ("serving.concurrency", -1, "serving.concurrency=-1 must be >= 0"),
        ("serving.deadline_s", 1e9, "serving.deadline_s=1000000000.0 must be finite, > 0 and "
                                    "at most 86400 (1 day), as the ranker's"),
        ("export.auc_noise_z", -1.0, "export.auc_noise_z=-1.0 must be >= 0 (0: strict)"),
        # Passed to export_int4, which refused it only after the ablation.
        ("export.max_auc_drop", float("nan"), "export.max_auc_drop=nan must be finite"),
        ("stage_timeout_s", 0, "stage_timeout_s=0 must be > 0 (seconds per stage)"),
    ]:
        cfg = _pipeline_cfg()
        section, _, name = key.rpartition(".")
        (cfg[section] if section else cfg)[name] = value
        with pytest.raises(ValueError, match=f"^pipeline config: {re.escape(message)}$"):
            rp.build(cfg, tmp_path, summaries=summaries)
    cfg = _pipeline_cfg()
    cfg.serving.enabled, cfg.serving.num_shards = False, 0  # no serving stage: unused
    assert [s.name for s in rp.build(cfg, tmp_path, summaries=summaries)] == [
        "world", "ablation", "export"]


@pytest.mark.parametrize("args, message", [
    (["--force=ablaton"], "--force names unknown stage(s) ['ablaton']; stages: ['world', "
                          "'ablation', 'export', 'serving'] or 'all'"),
    (["--config.export.bits=3"], "pipeline config: export.bits=3 must be 4, 8 or 32"),
    (["--config.ablation_flags=--config.seeds=0,x"],
     "the ablation's config.seeds must be integers, got '0,x'"),
    # run_ablation's own rules (they were checked only after the world stage ran).
    (["--config.ablation_flags=--config.seeds=0,0"],
     "the ablation's config.seeds lists 0 more than once, got '0,0' (a repeated seed "
     "repeats the same run)"),
    (["--config.ablation_flags=--config.seeds=1,-2"],
     "the ablation's config.seeds must be >= 0, got '1,-2'"),
])
def test_bad_pipeline_arguments_are_one_line(tmp_path, args, message):
    # Were absl usage errors: the whole usage text (39 lines) before the message; a bad
    # seed was "invalid literal for int() with base 10: 'x'".
    proc = subprocess.run(
        [sys.executable, "-m", "launch.run_pipeline", "--config=configs/pipeline.py:smoke",
         f"--workdir={tmp_path / 'wd'}", *args],
        cwd=rp._REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [f"run_pipeline: error: {message}"]
    assert not (tmp_path / "wd" / "stages").exists()  # no stage ran


def test_int4_row_name():
    from jax_recsys.quant import export

    assert export.int4_row_name("cl_kg") == (export.INT4_ROW, export.INT4_LABEL)
    assert export.int4_row_name("scratch") == ("scratch_int4", "scratch, INT4 served")
    assert export.int4_row_name("cl_kg", bits=4) == (export.INT4_ROW, export.INT4_LABEL)
    assert export.int4_row_name("cl_kg", bits=8) == ("cl_kg_int8", "+ both facets, INT8 served")
    assert export.int4_row_name("scratch", bits=32) == ("scratch_fp32", "scratch, float32 served")


def test_config_fingerprint_is_stable_and_resolved(tmp_path):
    a = rp.config_fingerprint("configs/world.py:smoke")
    assert a == rp.config_fingerprint("configs/world.py:smoke")
    assert a != rp.config_fingerprint("configs/world.py")
    missing = rp.config_fingerprint(str(tmp_path / "none.py"))  # the stage reports it
    assert len(missing) == 64 and missing != a


def _where_config(path, where):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("def get_config(arg=None):\n"
                    f"    return {{'where': {where!r}, 'arg': arg}}\n")


def test_a_relative_config_is_read_from_the_current_folder_then_the_checkout(
        tmp_path, monkeypatch, caplog):
    # It was read against the checkout only: --config.world_config=my_world.py:smoke given
    # in another folder was not found, and configs/world.py there (a changed copy) was
    # silently taken for the checkout's.
    monkeypatch.chdir(tmp_path)
    _where_config(tmp_path / "my_world.py", "here")
    _where_config(tmp_path / "configs" / "world.py", "here too")
    assert rp.load_config("my_world.py:smoke") == {"where": "here", "arg": "smoke"}
    with caplog.at_level("WARNING"):
        assert rp.load_config("configs/world.py") == {"where": "here too", "arg": None}
        rp.load_config("configs/world.py:smoke")
    assert [r.getMessage() for r in caplog.records if "checkout's" in r.getMessage()] == [
        f"config file {tmp_path}/configs/world.py is read, not the checkout's "
        f"{rp._REPO}/configs/world.py (a relative config path is read against the current "
        "folder first)"]  # once
    assert rp.resolved_spec("my_world.py:smoke") == f"{tmp_path}/my_world.py:smoke"
    assert rp.resolved_spec("configs/kg.py:smoke") == f"{rp._REPO}/configs/kg.py:smoke"
    assert rp.config_fingerprint("configs/world.py:smoke") != \
        rp.config_fingerprint(f"{rp._REPO}/configs/world.py:smoke")
    with pytest.raises(FileNotFoundError) as e:
        rp.config_file("nope.py:smoke")
    assert str(e.value) == (f"config file nope.py not found in the current folder ({tmp_path}) "
                            f"nor in the checkout ({rp._REPO})")


def test_a_stage_runs_in_the_current_folder_with_its_config_absolute_keyed_as_given(
        tmp_path, monkeypatch):
    # Stages ran in the checkout with --config as given: a relative config or a relative
    # path in ablation_flags, given in another folder, was read against the checkout.
    log, wd = tmp_path / "log.json", tmp_path / "wd"
    script = ("import json, os, pathlib, sys; "
              f"open({str(log)!r}, 'w').write(json.dumps([os.getcwd(), *sys.argv[1:]])); "
              f"pathlib.Path({str(wd / 'done')!r}).write_text('ok')")

    def stage():
        return rp.Stage("world", [sys.executable, "-c", script, "--config=c.py:smoke",
                                  "--data=mydata"], wd / "done", lambda wd: "")

    wd.mkdir()
    for d in ("a", "b"):
        _where_config(tmp_path / d / "c.py", "a")
    monkeypatch.chdir(tmp_path / "a")
    rp.run_stages([stage()], wd, set(), 60)
    assert json.loads(log.read_text()) == [
        str(tmp_path / "a"), f"--config={tmp_path}/a/c.py:smoke", "--data=mydata"]
    key = rp.read_json(wd / "stages" / "world.json")["key"]
    assert key == stage().keys(wd=wd)[0]
    monkeypatch.chdir(tmp_path / "b")  # the same config elsewhere: the same key
    assert stage().keys(wd=wd)[0] == key
    _where_config(tmp_path / "b" / "c.py", "b")  # its content counts
    assert stage().keys(wd=wd)[0] != key


def test_a_missing_config_file_is_refused_before_any_stage_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    summaries = dict.fromkeys(("world", "ablation", "export", "serving"), lambda wd: "")
    cfg = rp.load_config("configs/pipeline.py:smoke")
    cfg.world_config = "my_world.py:smoke"
    cfg.ablation_flags += " --config.pretrain.kg_config=my_kg.py"
    with pytest.raises(ValueError) as e:
        rp.build(cfg, tmp_path / "wd", summaries=summaries)
    where = f"not found in the current folder ({tmp_path}) nor in the checkout ({rp._REPO})"
    assert str(e.value) == (
        f"pipeline config: world_config='my_world.py:smoke': config file my_world.py {where}; "
        f"the ablation's pretrain.kg_config='my_kg.py': config file my_kg.py {where}")
    _where_config(tmp_path / "my_world.py", "here")
    _where_config(tmp_path / "my_kg.py", "here")
    world = rp.build(cfg, tmp_path / "wd", summaries=summaries)[0]
    assert "--config=my_world.py:smoke" in world.cmd  # as given; absolute when it runs


def test_a_stage_made_by_other_code_is_skipped_but_says_so(tmp_path, monkeypatch, capsys):
    wd = tmp_path / "wd"
    monkeypatch.setattr(rp, "code_digest", lambda: "aaaa")
    rp.run_stages([_stage(tmp_path, "a"), _stage(tmp_path, "b")], wd, set(), 60)
    assert rp.read_json(wd / "stages" / "a.json")["code"] == "aaaa"
    capsys.readouterr()
    res = rp.run_stages([_stage(tmp_path, "a"), _stage(tmp_path, "b")], wd, set(), 60)
    assert [(r["skipped"], r.get("code_changed")) for r in res] == [(True, None), (True, None)]
    assert "other code" not in capsys.readouterr().out
    # The code changed: still skipped (code is not in the key), but flagged.
    monkeypatch.setattr(rp, "code_digest", lambda: "bbbb")
    res = rp.run_stages([_stage(tmp_path, "a"), _stage(tmp_path, "b")], wd, set(), 60)
    assert [(r["skipped"], r.get("code_changed")) for r in res] == [(True, True), (True, True)]
    out = capsys.readouterr().out
    assert "[a] note: made by other code (aaaa; now bbbb)" in out and "--force=b" in out
    assert len(_runs(tmp_path)) == 2
    from jax_recsys import report
    md = report.write_report(wd, stages=res).read_text()
    assert "| a | skipped (up to date; made by other code) | a |" in md
    # A marker written before markers recorded the code: the code is unknown, so noted.
    marker = wd / "stages" / "a.json"
    m = rp.read_json(marker)
    del m["code"]
    marker.write_text(json.dumps(m))
    res = rp.run_stages([_stage(tmp_path, "a"), _stage(tmp_path, "b")], wd, set(), 60)
    assert [(r["skipped"], r.get("code_changed")) for r in res] == [(True, True), (True, True)]
    assert "[a] note: made by other code (unknown: recorded since 2026-11-27; now bbbb)" in \
        capsys.readouterr().out
    # A forced rerun records the new code: no note afterwards.
    rp.run_stages([_stage(tmp_path, "a"), _stage(tmp_path, "b")], wd, {"a"}, 60)
    res = rp.run_stages([_stage(tmp_path, "a"), _stage(tmp_path, "b")], wd, set(), 60)
    assert [r.get("code_changed") for r in res] == [None, None]


def test_code_digest_follows_source_files_only(tmp_path, monkeypatch):
    for d in rp._CODE_DIRS:
        (tmp_path / d).mkdir()
    (tmp_path / "serving" / "x.py").write_text("a = 1\n")
    (tmp_path / "serving" / "x.proto").write_text("syntax = 'proto3';\n")
    monkeypatch.setattr(rp, "_REPO", tmp_path)
    digest = rp.code_digest.__wrapped__
    d0 = digest()
    assert len(d0) == 16 and digest() == d0
    (tmp_path / "launch" / "notes.md").write_text("not code")  # not a source file
    (tmp_path / "launch" / "__pycache__").mkdir()
    (tmp_path / "launch" / "__pycache__" / "y.py").write_text("b = 2\n")
    (tmp_path / "runs.py").write_text("outside the code folders\n")
    assert digest() == d0
    (tmp_path / "serving" / "x.proto").write_text("syntax = 'proto3'; // edited\n")
    d1 = digest()
    assert d1 != d0
    (tmp_path / "serving" / "x.py").rename(tmp_path / "launch" / "x.py")  # a move is a change
    assert digest() not in (d0, d1)
    # The real project: a stable digest of its files.
    monkeypatch.undo()
    assert rp.code_digest() == digest() and len(rp.code_digest()) == 16


def _fingerprint_of_variant(tmp_path, config, name, body):
    """config_fingerprint of repo config ``config``:smoke with the statement ``body``
    run on it (``c``) in a config file of its own."""
    path = tmp_path / f"{name}.py"
    path.write_text(
        "import importlib.util\n\n"
        "def get_config(arg=None):\n"
        f"    spec = importlib.util.spec_from_file_location('c', {str(rp._REPO / config)!r})\n"
        "    module = importlib.util.module_from_spec(spec)\n"
        "    spec.loader.exec_module(module)\n"
        "    c = module.get_config(arg)\n"
        f"    {body}\n"
        "    return c\n")
    return rp.config_fingerprint(f"{path}:smoke")


def test_config_fingerprint_leaves_out_facet_missing_at_its_default(tmp_path):
    """A stage's key is what it was before `facet_missing` was added to configs/ranker.py
    (so the pipeline's finished ablation stage is not rerun), unless it is set to another value."""
    def variant(config, name, body):
        return _fingerprint_of_variant(tmp_path, config, name, body)

    ranker = rp.config_fingerprint("configs/ranker.py:smoke")
    assert ranker == variant("configs/ranker.py", "r0", "del c['facet_missing']")  # as before it
    assert ranker != variant("configs/ranker.py", "r1", "c.facet_missing = 'zeros'")
    ablation = rp.config_fingerprint("configs/ablation.py:smoke")  # the pipeline's stage config
    assert ablation == variant("configs/ablation.py", "a0", "del c.ranker['facet_missing']")
    assert ablation != variant("configs/ablation.py", "a1", "c.ranker.facet_missing = 'zeros'")


def test_config_fingerprint_leaves_out_the_contrastive_table_and_column_keys_at_their_defaults(
        tmp_path):
    """conversions_table, items_table and advertiser_column (added so a user's own column
    names can be given) leave the contrastive pretraining's key as it was before them."""
    def variant(name, body):
        return _fingerprint_of_variant(tmp_path, "configs/contrastive.py", name, body)

    cl = rp.config_fingerprint("configs/contrastive.py:smoke")
    before = "; ".join(f"del c.data[{k!r}]" for k in
                       ("conversions_table", "items_table", "advertiser_column"))
    assert cl == variant("c0", before)
    assert cl != variant("c1", "c.data.advertiser_column = 'adv'")


def test_config_fingerprint_leaves_out_the_rankers_time_columns_at_their_defaults(tmp_path):
    """data.day_column / timestamp_column of configs/ranker.py (and so of the ablation)
    leave their stage keys as they were before them; the contrastive config's own
    data.day_column, older than stage keys, still counts."""
    def variant(config, name, body):
        return _fingerprint_of_variant(tmp_path, config, name, body)

    ranker = rp.config_fingerprint("configs/ranker.py:smoke")
    assert ranker == variant("configs/ranker.py", "r0",
                             "del c.data['day_column']; del c.data['timestamp_column']")
    assert ranker != variant("configs/ranker.py", "r1", "c.data.day_column = 'date'")
    assert ranker != variant("configs/ranker.py", "r2", "c.data.timestamp_column = 'ts'")
    ablation = rp.config_fingerprint("configs/ablation.py:smoke")
    assert ablation == variant("configs/ablation.py", "a0", "del c.ranker.data['day_column']; "
                               "del c.ranker.data['timestamp_column']")
    assert ablation != variant("configs/ablation.py", "a1", "c.ranker.data.day_column = 'date'")
    cl = rp.config_fingerprint("configs/contrastive.py:smoke")
    assert cl != variant("configs/contrastive.py", "c0", "del c.data['day_column']")


def _stage_in(wd, log, name, *args):
    """A stage as `build` makes them: its paths (its done file in WORKDIR ``wd``, the
    configs) are arguments, and it appends its name and arguments to ``log``."""
    script = ("import pathlib, sys; "
              f"open({str(log)!r}, 'a').write(' '.join([{name!r}, *sys.argv[1:]]) + '\\n'); "
              "pathlib.Path(sys.argv[1].split('=', 1)[1]).write_text('ok')")
    done = wd / f"{name}.done"
    return rp.Stage(name, [sys.executable, "-c", script, f"--done={done}", *args], done,
                    lambda wd: name)


def _checkout(tmp_path, monkeypatch, name):
    """A checkout at tmp_path/NAME (a config and a workdir, runs/main, in it) with its
    own interpreter path (a link to this one), as `pipeline_stages` sees it."""
    repo = tmp_path / name
    if not repo.exists():
        (repo / "configs").mkdir(parents=True)
        _write_config(repo / "configs" / "w.py", 1)
    (repo / "venv").mkdir(exist_ok=True)
    python = repo / "venv" / "python"
    if not python.exists():
        python.symlink_to(sys.executable)
    monkeypatch.setattr(rp, "_REPO", repo)
    monkeypatch.setattr(sys, "executable", str(python))
    return repo


def _moved_stages(repo, wd, log, *, data=None):
    return [_stage_in(wd, log, "world", f"--config={repo / 'configs' / 'w.py'}:smoke"),
            _stage_in(wd, log, "train", f"--data={data or wd / 'world.done'}"),
            _stage_in(wd, log, "export", f"--ranker={wd / 'train.done'}")]


def test_a_moved_or_copied_workdir_keeps_its_finished_stages(tmp_path, monkeypatch):
    log = tmp_path / "runs.txt"
    repo = _checkout(tmp_path, monkeypatch, "checkout")
    wd = repo / "runs" / "main"
    wd.mkdir(parents=True)
    skipped = lambda res: [r["skipped"] for r in res]  # noqa: E731
    assert skipped(rp.run_stages(_moved_stages(repo, wd, log), wd, set(), 60)) == [False] * 3
    keys = [rp.read_json(wd / "stages" / f"{n}.json")["key"] for n in ("world", "train", "export")]
    # `mv runs/main runs/old`: every stage is up to date there.
    shutil.move(wd, repo / "runs" / "old")
    wd = repo / "runs" / "old"
    assert skipped(rp.run_stages(_moved_stages(repo, wd, log), wd, set(), 60)) == [True] * 3
    # A copy out of the checkout (its config stays there), then the whole checkout
    # moved, interpreter included.
    shutil.copytree(wd, tmp_path / "elsewhere" / "copy")
    wd = tmp_path / "elsewhere" / "copy"
    assert skipped(rp.run_stages(_moved_stages(repo, wd, log), wd, set(), 60)) == [True] * 3
    shutil.move(repo, tmp_path / "moved")
    repo = _checkout(tmp_path, monkeypatch, "moved")
    wd = repo / "runs" / "old"
    assert skipped(rp.run_stages(_moved_stages(repo, wd, log), wd, set(), 60)) == [True] * 3
    assert [rp.read_json(wd / "stages" / f"{n}.json")["key"]
            for n in ("world", "train", "export")] == keys
    assert len(_runs(tmp_path)) == 3


def test_a_moved_workdir_still_reruns_what_changed(tmp_path, monkeypatch):
    log = tmp_path / "runs.txt"
    repo = _checkout(tmp_path, monkeypatch, "checkout")
    wd = tmp_path / "wd"
    wd.mkdir()
    outside = tmp_path / "dataset"  # a user's dataset: its path is the stage's input
    rp.run_stages(_moved_stages(repo, wd, log, data=outside), wd, set(), 60)
    shutil.move(wd, tmp_path / "wd2")
    wd = tmp_path / "wd2"
    skipped = lambda **kw: [r["skipped"] for r in rp.run_stages(  # noqa: E731
        _moved_stages(repo, wd, log, **kw), wd, set(), 60)]
    assert skipped(data=outside) == [True, True, True]
    # Another dataset (outside the workdir and the checkout): that stage and the next rerun.
    assert skipped(data=tmp_path / "dataset2") == [True, False, False]
    assert _runs(tmp_path)[-2:] == [f"train --done={wd / 'train.done'} --data={tmp_path / 'dataset2'}",
                                    f"export --done={wd / 'export.done'} --ranker={wd / 'train.done'}"]
    # Another file inside the workdir is another input, too.
    assert skipped(data=wd / "other") == [True, False, False]
    assert skipped(data=wd / "other") == [True, True, True]
    # The config edited in the checkout: everything reruns.
    _write_config(repo / "configs" / "w.py", 2)
    assert skipped(data=wd / "other") == [False, False, False]


def _key_until_2026_11_27(stage, upstream=""):
    """`Stage.key` as markers were written until 2026-11-27 (the command as given)."""
    h = hashlib.sha256(json.dumps(stage.cmd or stage.name).encode())
    named = [a.split("=", 1)[1] for a in stage.cmd or () if a.startswith("--config=")]
    for spec in [*named, *stage.configs]:
        h.update(f"\0{spec}\0{rp.config_fingerprint(spec)}".encode())
    h.update(f"\0upstream\0{upstream}".encode())
    return h.hexdigest()[:16]


def test_markers_of_the_absolute_key_form_are_reused_and_rewritten(tmp_path, monkeypatch, capsys):
    log = tmp_path / "runs.txt"
    repo = _checkout(tmp_path, monkeypatch, "checkout")
    wd = repo / "runs" / "main"
    wd.mkdir(parents=True)
    monkeypatch.setattr(rp, "code_digest", lambda: "aaaa")
    rp.run_stages(_moved_stages(repo, wd, log), wd, set(), 60)
    names = ("world", "train", "export")
    keys = [rp.read_json(wd / "stages" / f"{n}.json")["key"] for n in names]
    # The markers a pipeline folder made before keys were portable hold (each covering
    # the stages before it, in that form).
    upstream = ""
    for st in _moved_stages(repo, wd, log):
        upstream = _key_until_2026_11_27(st, upstream)
        marker = wd / "stages" / f"{st.name}.json"
        marker.write_text(json.dumps({**rp.read_json(marker), "key": upstream}))
    assert upstream not in keys
    monkeypatch.setattr(rp, "code_digest", lambda: "bbbb")
    res = rp.run_stages(_moved_stages(repo, wd, log), wd, set(), 60)
    assert [r["skipped"] for r in res] == [True] * 3 and len(_runs(tmp_path)) == 3
    markers = [rp.read_json(wd / "stages" / f"{n}.json") for n in names]
    assert [m["key"] for m in markers] == keys  # rewritten in the portable form
    assert [m["code"] for m in markers] == ["aaaa"] * 3  # and still made by the old code
    assert "[world] note: made by other code (aaaa; now bbbb)" in capsys.readouterr().out
    shutil.move(wd, repo / "runs" / "old")  # so the folder can be moved from now on
    wd = repo / "runs" / "old"
    res = rp.run_stages(_moved_stages(repo, wd, log), wd, set(), 60)
    assert [r["skipped"] for r in res] == [True] * 3 and len(_runs(tmp_path)) == 3
    # An old-form marker of another command is not taken for this one.
    st = _moved_stages(repo, wd, log, data=tmp_path / "dataset")
    marker = wd / "stages" / "world.json"
    marker.write_text(json.dumps({**rp.read_json(marker), "key": _key_until_2026_11_27(st[0])}))
    marker = wd / "stages" / "train.json"
    marker.write_text(json.dumps({**rp.read_json(marker), "key": _key_until_2026_11_27(
        _moved_stages(repo, wd, log)[1], _key_until_2026_11_27(st[0]))}))
    res = rp.run_stages(st, wd, set(), 60)
    assert [r["skipped"] for r in res] == [True, False, False]


def test_pipeline_keys_do_not_hold_the_workdir_the_checkout_or_the_interpreter(tmp_path, monkeypatch):
    summaries = dict.fromkeys(("world", "ablation", "export", "serving"), lambda wd: "")
    cfg = _pipeline_cfg()

    def keys(wd):
        upstream, out = ("", ""), []
        for st in rp.build(cfg, wd, summaries=summaries):
            upstream = st.keys(upstream, wd)
            out.append(upstream[0])
        return out

    before = keys(tmp_path / "a")
    monkeypatch.setattr(sys, "executable", str(tmp_path / "other_venv" / "python"))
    assert keys(tmp_path / "b" / "c") == before
    cfg.export.bits = 8
    assert keys(tmp_path / "b" / "c")[:2] == before[:2] and keys(tmp_path / "b")[2:] != before[2:]
    cfg.ablation_flags = f"--config.facet_dirs.cl_fresh={tmp_path / 'facet'}"
    assert keys(tmp_path / "b")[0] == before[0] and keys(tmp_path / "b")[1] != before[1]
    assert rp._portable_arg(f"--config.facet_dirs.cl_fresh={tmp_path / 'facet'}", tmp_path / "b") == \
        f"--config.facet_dirs.cl_fresh={tmp_path / 'facet'}"  # outside both: as given


def test_portable_arguments(tmp_path, monkeypatch):
    monkeypatch.setattr(rp, "_REPO", tmp_path / "repo")
    wd = tmp_path / "repo" / "runs" / "main"
    assert rp._portable_arg(sys.executable, wd) == "python"
    assert rp._portable_arg(f"--workdir={wd}", wd) == "--workdir=$WORKDIR"
    assert rp._portable_arg(f"--out={wd / 'a' / 'b.json'}", wd) == "--out=$WORKDIR/a/b.json"
    assert rp._portable_arg(str(wd / "x"), wd) == "$WORKDIR/x"
    assert rp._portable_arg(f"--config={tmp_path}/repo/configs/w.py:smoke", wd) == \
        "--config=configs/w.py:smoke"  # the commands run from the repository root
    assert rp._portable_arg(f"--config.data.path={tmp_path}/data", wd) == \
        f"--config.data.path={tmp_path}/data"
    assert rp._portable_arg(f"--x={tmp_path}/repo/runs/mainly", wd) == "--x=runs/mainly"
    for arg in ("--config=configs/w.py", "--bits=4", "-c", "--fresh", "world"):
        assert rp._portable_arg(arg, wd) == arg


def test_a_damaged_stage_marker_reruns_the_stage_and_a_damaged_output_is_named(tmp_path, capsys):
    # A marker cut short (a full disk, a killed copy) failed every later run with a bare
    # JSONDecodeError naming no file; a missing marker reruns the stage, so does this one.
    wd = tmp_path / "wd"
    rp.run_stages([_stage(tmp_path, "a")], wd, set(), 60)
    marker = wd / "stages" / "a.json"
    for damaged in ('{"stage": "a", "key', "[1, 2]"):
        marker.write_text(damaged)
        res = rp.run_stages([_stage(tmp_path, "a")], wd, set(), 60)
        assert res[0]["skipped"] is False
        assert f"[a] marker {marker} is damaged: the stage runs again" in capsys.readouterr().out
        assert rp.read_json(marker)["key"] == res[0]["key"]
    assert len(_runs(tmp_path)) == 3
    # A damaged stage output (ablation.json, export_report.json, serving_check.json):
    # a one-line error that names the file.
    out = wd / "serving_check.json"
    out.write_text('{"ok": tr')
    with pytest.raises(ValueError, match=rf"^{re.escape(str(out))} is damaged \(.*\); rerun "
                       r"the stage that writes it \(--force=serving\)$"):
        rp.read_json(out, stage="serving")
    out.write_text("null")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(out))} is damaged \(not a JSON object\)"):
        rp.read_json(out)
    assert rp.read_json(wd / "none.json") == {}


def test_the_up_front_check_and_the_report_do_not_import_jax(tmp_path):
    # run_pipeline runs every stage in a child process; its own process imported JAX
    # (seconds) only for the export's setting rules (pipeline_stages.check) and the
    # names of the rows an export adds (the report); and gRPC with protobuf (0.35 s) for
    # the serving check's longest deadline (serving.check_rules).
    wd = tmp_path / "wd"
    (wd / "ablation").mkdir(parents=True)
    (wd / "ablation" / "ablation.json").write_text('{"variants": {"cl_kg_int4": {"bits": 4}}}')
    (wd / "export_report.json").write_text('{"bits": 4}')
    code = ("import pathlib, sys; sys.argv = ['run_pipeline']\n"
            "from launch import pipeline_stages as rp, run_pipeline\n"
            f"wd = pathlib.Path({str(wd)!r})\n"
            "cfg = rp.load_config('configs/pipeline.py:smoke')\n"
            "run_pipeline.build_stages(cfg, wd)  # pipeline_stages.check\n"
            "results = [{'stage': s, 'seconds': 1.0, 'summary': ''} for s in ('ablation', 'export')]\n"
            "text = run_pipeline.write_pipeline_report(cfg, wd, results).read_text()\n"
            "print(\"cl_kg_int4 (this run's artifact)\" in text)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'grpc')\n"
            "             or m in ('jax_recsys.quant.export', 'google.protobuf')))\n")
    proc = _run_child(code)
    assert proc.stdout.splitlines() == ["True", "[]"]


def test_a_damaged_stage_output_names_the_stage_to_rerun(tmp_path):
    # The message said "(--force=STAGE)", leaving the user to find which stage.
    wd = tmp_path / "wd"
    wd.mkdir()
    out = wd / "export_report.json"
    out.write_text('{"version": "v')
    code = ("import pathlib, sys; sys.argv = ['run_pipeline']\n"
            "from launch import run_pipeline\n"
            f"wd = pathlib.Path({str(wd)!r})\n"
            "for read in (lambda: run_pipeline.write_pipeline_report(\n"
            "                 None, wd, [{'stage': 'export', 'seconds': 1.0, 'summary': ''}]),\n"
            "             lambda: run_pipeline._export_summary(wd)):\n"
            "    try:\n"
            "        read()\n"
            "    except ValueError as e:\n"
            "        print(e)\n")
    proc = _run_child(code)
    assert proc.stdout.splitlines() == [
        f"{out} is damaged (Unterminated string starting at: line 1 column 13 (char 12)); "
        "rerun the stage that writes it (--force=export)"] * 2


def test_run_pipeline_itself_never_starts_jax(tmp_path):
    # Its stages run as children; the pipeline's own process started JAX's backend to
    # write config.json and each stage marker (common.write_json asks JAX whether it is
    # process 0), which on a GPU host holds 75% of the GPU's memory for the whole run.
    wd = tmp_path / "wd"
    stage = _stage(tmp_path, "a")
    code = ("import pathlib, sys\n"
            "from absl import flags\n"
            "from launch import pipeline_stages as rp, run_pipeline\n"
            f"stage = rp.Stage('a', {stage.cmd!r}, pathlib.Path({str(stage.done_file)!r}),\n"
            "                 lambda wd: 'a done')\n"
            "run_pipeline.build_stages = lambda cfg, wd: [stage]\n"
            "flags.FLAGS(['run_pipeline', '--config=configs/pipeline.py:smoke',\n"
            f"             '--workdir={wd}'])\n"
            "run_pipeline.main([])\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'jax'))\n")
    proc = _run_child(code)
    assert proc.stdout.splitlines()[-1] == "[]"
    assert rp.read_json(wd / "stages" / "a.json")["summary"] == "a done"
    assert "export" in json.loads((wd / "config.json").read_text())
