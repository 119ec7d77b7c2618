"""Entry points end user mistakes with one `NAME: error: ...` line and exit status 1.

Each case runs a real `python -m launch.X` with input that fails before any heavy work
(see `launch/common.py: run`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import ml_collections
import mp_util
import pytest


def _run(module: str, args: list[str], extra_env: dict[str, str] | None = None):
    env = mp_util.child_env(1, {"JAX_RECSYS_TRACEBACK": "", **(extra_env or {})})
    return subprocess.run([sys.executable, "-m", f"launch.{module}", *args], cwd=mp_util.REPO,
                          env=env, capture_output=True, text=True, timeout=120)


def _assert_one_line(proc, prefix: str, *needles: str) -> str:
    """Exit status 1, no traceback, and a last stderr line starting with `prefix`."""
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith(prefix)]
    assert len(lines) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_generate_data_workdir_that_is_a_file(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    proc = _run("generate_data", ["--config=configs/world.py:smoke", f"--workdir={afile}"])
    _assert_one_line(proc, "generate_data: error:", str(afile))


def test_a_trainers_workdir_that_is_a_file_is_named_as_such(tmp_path):
    """Was "pretrain_contrastive: error: [Errno 17] File exists: '.../afile'" (and
    "[Errno 20] Not a directory" for a folder under a file)."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    for wd in (afile, afile / "run"):
        proc = _run("pretrain_contrastive", ["--config=configs/contrastive.py:smoke",
                                             f"--workdir={wd}"])
        line = _assert_one_line(proc, "pretrain_contrastive: error:")
        assert line == (f"pretrain_contrastive: error: --workdir {wd}: it or a folder above "
                        "it exists and is not a folder: give a folder (new or existing)")


def test_generate_data_refuses_a_folder_that_holds_no_world(tmp_path):
    mine = tmp_path / "mine"
    (mine / "src").mkdir(parents=True)
    (mine / "notes.txt").write_text("my notes")
    (mine / "src" / "a.py").write_text("print(1)")
    proc = _run("generate_data", ["--config=configs/world.py:smoke", f"--workdir={mine}"])
    _assert_one_line(proc, "generate_data: error:", str(mine), "holds no generated world",
                     "notes.txt, src/")
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt", "src"]
    assert (mine / "src" / "a.py").read_text() == "print(1)"


def test_generate_data_refuses_a_world_with_other_files_beside_it(tmp_path):
    """A previous world's folder used to be replaced whole, deleting a user's files in it."""
    w = tmp_path / "w"
    (w / "drafts").mkdir(parents=True)
    (w / "dataset.json").write_text(json.dumps({"generator": "jax_recsys.data.world",
                                                "tables": {}, "kg": "kg"}))
    (w / "world_summary.json").write_text("{}")
    (w / "notes.txt").write_text("my notes")
    (w / "drafts" / "a.py").write_text("print(1)")
    proc = _run("generate_data", ["--config=configs/world.py:smoke", f"--workdir={w}"])
    _assert_one_line(proc, "generate_data: error:", f"{w} holds a generated world but also "
                     "drafts/, notes.txt, which replacing it would delete")
    assert sorted(p.name for p in w.iterdir()) == [
        "dataset.json", "drafts", "notes.txt", "world_summary.json"]
    assert (w / "drafts" / "a.py").read_text() == "print(1)"
    assert (w / "notes.txt").read_text() == "my notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]  # nothing staged


def test_a_workdir_that_cannot_be_written_is_refused_before_any_work(read_only_dir):
    """A read-only workdir (and checkpoint_every=0) was found out only when the trained
    facet was written, at the end of the run."""
    from absl import flags

    from launch import common

    parsed = flags.FLAGS.is_parsed()
    flags.FLAGS.mark_as_parsed()  # setup reads the multi-process flags' defaults
    try:
        with pytest.raises(PermissionError, match=r"/read_only: cannot write there \(a "
                           r"read-only file system or no write permission\): give a "
                           r"writable --workdir"):
            common.setup(str(read_only_dir))
    finally:
        if not parsed:
            flags.FLAGS.unparse_flags()


def test_config_override_of_the_wrong_type_is_one_line_naming_the_key(tmp_path):
    # Was absl's "FATAL Flags parsing error: flag --config.train.num_epochs=1.5: ..." and
    # "Pass --helpshort or --helpfull to see help on flags.".
    proc = _run("pretrain_kg", ["--config=configs/kg.py:smoke", "--config.train.num_epochs=1.5",
                                f"--workdir={tmp_path / 'w'}"])
    line = _assert_one_line(proc, "pretrain_kg: error:")
    assert line == ("pretrain_kg: error: bad value '1.5' for config key 'train.num_epochs' in a "
                    "--config.KEY=VALUE override: invalid literal for int() with base 10: '1.5'")
    assert "FATAL" not in proc.stderr
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("config, message", [
    # Was 4 lines: "Configuration is not available because of an earlier failure to load:
    # Failed loading config file config_config", the attempted paths, the errno.
    (["configs/no_such.py"], "generate_data: error: cannot load --config: [Errno 2] No such "
     "file or directory: 'configs/no_such.py'"),
    # Was absl's "FATAL Flags parsing error:" with ml_collections' traceback in it.
    (["configs/world.py:smok"], "generate_data: error: --config=configs/world.py:smok: "
     "ValueError: unknown config arg 'smok'; use nothing, 'smoke' or 'large'"),
    (["configs/world.py:smoke", "no_such_key=1"], "generate_data: error: unknown config key "
     "'no_such_key' in a --config.KEY=VALUE override (AttributeError)"),
    # Was "unknown config key '\\\'batch_sise\\\'\\nDid you mean ...": the repr of a
    # KeyError inside an AttributeError, escapes and all.
    (["configs/world.py:smoke", "world.num_user=1"], "generate_data: error: unknown config key "
     "'num_user' in a --config.KEY=VALUE override; did you mean \"num_users\" instead of "
     "\"num_user\"? (AttributeError)"),
])
def test_a_config_that_does_not_load_is_one_line(tmp_path, config, message):
    """config: the --config file, then --config.KEY=VALUE overrides."""
    file, *overrides = config
    proc = _run("generate_data", [f"--config={file}", *(f"--config.{o}" for o in overrides),
                                  f"--workdir={tmp_path / 'w'}"])
    assert _assert_one_line(proc, "generate_data: error:") == message
    assert "FATAL" not in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "w").exists()


def test_a_bad_flag_value_keeps_absls_message(tmp_path):
    """An ordinary flag's bad value keeps absl's own two lines (a --config.KEY override's
    is one line naming the key: test_config_override_of_the_wrong_type_...)."""
    proc = _run("generate_data", ["--config=configs/world.py:smoke", "--verbosity=abc",
                                  f"--workdir={tmp_path / 'w'}"])
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[-2:] == [
        "FATAL Flags parsing error: flag --verbosity=abc: invalid literal for int() "
        "with base 10: 'abc'", "Pass --helpshort or --helpfull to see help on flags."]
    proc = _run("generate_data", ["--config=configs/world.py:smoke", "--config.world.seed=abc",
                                  f"--workdir={tmp_path / 'w'}"])
    assert _assert_one_line(proc, "generate_data: error:") == (
        "generate_data: error: bad value 'abc' for config key 'world.seed' in a "
        "--config.KEY=VALUE override: invalid literal for int() with base 10: 'abc'")


def test_train_ranker_facets_without_a_folder_is_one_line(tmp_path):
    # Was an absl UsageError: the whole usage text (~20 lines), then the message.
    proc = _run("train_ranker", ["--config=configs/ranker.py:smoke", "--config.facets=cl,kg",
                                 f"--config.facet_paths.kg={tmp_path}", f"--workdir={tmp_path / 'w'}"])
    assert _assert_one_line(proc, "train_ranker: error:") == (
        "train_ranker: error: --config.facets=cl,kg needs a facet folder for each facet: give "
        "--config.facet_paths.cl=DIR")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.parametrize("entities, message", [
    # Were Python's "not enough values to unpack (expected 2, got 1)" / "too many values to
    # unpack (expected 2)", and for a repeated entity a list of its table names.
    ("user:user_id,pin", "config.entities must list name:column pairs such as user:user_id, "
     "got 'pin'"),
    ("user:user_id:x", "config.entities must list name:column pairs such as user:user_id, "
     "got 'user:user_id:x'"),
    ("user:user_id,user:item_id", "config.entities lists the entity user more than once: "
     "'user:user_id,user:item_id'"),
])
def test_train_ranker_bad_entities_are_one_line(tmp_path, entities, message):
    proc = _run("train_ranker", ["--config=configs/ranker.py:smoke", f"--config.entities={entities}",
                                 f"--config.data.path={tmp_path}", f"--workdir={tmp_path / 'w'}"])
    assert _assert_one_line(proc, "train_ranker: error:") == f"train_ranker: error: {message}"


def test_run_ablation_bad_entities_name_its_key(tmp_path):
    # Was "config.entities ..." (train_ranker's key), and before that Python's unpacking error.
    proc = _run("run_ablation", ["--config=configs/ablation.py:smoke",
                                 "--config.ranker.entities=user", f"--workdir={tmp_path / 'w'}"])
    assert _assert_one_line(proc, "run_ablation: error:") == (
        "run_ablation: error: config.ranker.entities must list name:column pairs such as "
        "user:user_id, got 'user'")
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == []  # no world generated


def test_run_ablation_refuses_the_rankers_facet_settings_it_does_not_use(tmp_path):
    # Were ignored without a word: the variants choose the facets and their mode.
    proc = _run("run_ablation", ["--config=configs/ablation.py:smoke", "--config.ranker.facets=cl",
                                 "--config.ranker.facet_mode=freeze", f"--workdir={tmp_path / 'w'}"])
    assert _assert_one_line(proc, "run_ablation: error:") == (
        "run_ablation: error: config.ranker.facets, config.ranker.facet_mode: not used by the "
        "ablation, whose variants choose the pretrained facets and their mode (cl_kg_frozen "
        "freezes them); give finished facets with --config.facet_dirs.cl_fresh=DIR etc.")
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == []  # no world generated


def test_train_ranker_refuses_an_unknown_facet_mode_first(tmp_path):
    # Without --config.facets the mode went unused: a misspelt one trained silently.
    proc = _run("train_ranker", ["--config=configs/ranker.py:smoke", "--config.facet_mode=frozn",
                                 f"--workdir={tmp_path / 'w'}"])
    assert _assert_one_line(proc, "train_ranker: error:") == (
        "train_ranker: error: config.facet_mode must be one of finetune, freeze, got 'frozn'")
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == []  # no world generated


def test_pretrain_contrastive_missing_data_path(tmp_path):
    missing = tmp_path / "no_such_data"
    proc = _run("pretrain_contrastive", ["--config=configs/contrastive.py",
                                         f"--config.data.path={missing}",
                                         f"--workdir={tmp_path / 'w'}"])
    _assert_one_line(proc, "pretrain_contrastive: error:", str(missing))


def test_traceback_env_var_shows_the_traceback(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    proc = _run("generate_data", ["--config=configs/world.py:smoke", f"--workdir={afile}"],
                {"JAX_RECSYS_TRACEBACK": "1"})
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("generate_data: error:")


def test_run_ablation_empty_seeds(tmp_path):
    proc = _run("run_ablation", ["--config=configs/ablation.py", "--config.seeds=",
                                 f"--workdir={tmp_path / 'w'}"])
    _assert_one_line(proc, "run_ablation: error:", "seeds")
    assert not (tmp_path / "w" / "world").exists()  # failed before generating data


def test_run_ablation_repeated_seeds(tmp_path):
    proc = _run("run_ablation", ["--config=configs/ablation.py", "--config.seeds=3,1,3",
                                 f"--workdir={tmp_path / 'w'}"])
    _assert_one_line(proc, "run_ablation: error:", "config.seeds lists 3 more than once")
    assert not (tmp_path / "w" / "world").exists()  # failed before generating data


def test_export_int4_negative_noise_z(tmp_path):
    proc = _run("export_int4", [f"--ranker={tmp_path / 'no_ranker'}", f"--out={tmp_path / 'a'}",
                                "--auc_noise_z=-1"])
    _assert_one_line(proc, "export_int4: error:", "auc_noise_z")


def test_export_int4_checks_the_workdir_before_any_work(tmp_path):
    """A --workdir that is a file used to fail only after the artifact was written."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    proc = _run("export_int4", [f"--ranker={tmp_path / 'no_ranker'}", f"--out={tmp_path / 'a'}",
                                f"--workdir={afile}"])
    _assert_one_line(proc, "export_int4: error:", "--workdir's report",
                     f"{afile} exists and is not a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
    # A --workdir in the artifact folder: its metrics.json would block the next export.
    for wd in ("a", "a/run"):
        proc = _run("export_int4", [f"--ranker={tmp_path / 'no_ranker'}",
                                    f"--out={tmp_path / 'a'}", f"--workdir={tmp_path / wd}"])
        _assert_one_line(proc, "export_int4: error:", f"--workdir={tmp_path / wd} is inside "
                         f"--out={tmp_path / 'a'}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_export_int4_keeps_a_training_runs_metrics_in_the_workdir(tmp_path):
    """--workdir=RUN (the training run of --ranker=RUN/ranker) replaced the trainer's
    RUN/metrics.json (its train/valid/test metrics and the dataset it records, which the
    export reads) with the export report: the next export of that ranker found no data."""
    run = tmp_path / "run"
    run.mkdir()
    trainer = json.dumps({"config": {"data": {"path": "d"}}, "test": {"ctr_auc": 0.7}})
    (run / "metrics.json").write_text(trainer)
    proc = _run("export_int4", [f"--ranker={run / 'ranker'}", f"--out={tmp_path / 'a'}",
                                f"--workdir={run}"])
    _assert_one_line(proc, "export_int4: error:", f"--workdir={run} holds a metrics.json that is "
                     "not an export report")
    assert (run / "metrics.json").read_text() == trainer
    # An earlier export's report there is replaced: the export goes on (to the ranker check).
    (run / "metrics.json").write_text(json.dumps({"artifact": "a", "gate": {"passed": True}}))
    proc = _run("export_int4", [f"--ranker={run / 'ranker'}", f"--out={tmp_path / 'a'}",
                                f"--workdir={run}"])
    _assert_one_line(proc, "export_int4: error:", f"{run / 'ranker'} is not a saved ranker")


def test_export_int4_refuses_a_symlink_out_before_any_work(tmp_path):
    """--overwrite used to replace a symlink --out (the README's ART, rolled out with
    `ln -sfn NEW ART`) with a real folder, leaving the old target as it was."""
    (tmp_path / "v1").mkdir()
    (tmp_path / "ART").symlink_to(tmp_path / "v1")
    for extra in (["--overwrite"], [], [f"--ablation={tmp_path / 'no_ablation'}"]):
        proc = _run("export_int4", [f"--ranker={tmp_path / 'no_ranker'}",
                                    f"--out={tmp_path / 'ART'}", *extra])
        _assert_one_line(proc, "export_int4: error:",
                         f"{tmp_path / 'ART'} is a symlink to {tmp_path / 'v1'}",
                         f"write to a new folder, then point the link at it: ln -sfn NEW "
                         f"{tmp_path / 'ART'}")
    assert (tmp_path / "ART").readlink() == tmp_path / "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ART", "v1"]


def test_export_int4_checks_the_export_before_the_ablation_row(tmp_path):
    """With --ablation, a bad --ranker or --out used to be found only after the
    ablation row's evaluation: now before it (the row's missing ablation.json would
    have been the error)."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("x")
    abl = [f"--ablation={tmp_path / 'no_ablation'}"]
    proc = _run("export_int4", [f"--ranker={tmp_path / 'no_ranker'}",
                                f"--out={tmp_path / 'art'}", *abl])
    _assert_one_line(proc, "export_int4: error:", f"{tmp_path / 'no_ranker'} is not a saved "
                     "ranker")
    proc = _run("export_int4", [f"--out={mine}", *abl])  # --ranker missing: usage error
    assert proc.returncode == 1 and "--ranker (or --checkpoint) and --out are required" in (
        proc.stderr), proc.stderr[-2000:]
    assert "ablation.json" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


@pytest.mark.parametrize("port", ["-5", "70000"])
def test_serve_embeddings_rejects_out_of_range_ports(tmp_path, port):
    proc = _run("serve_embeddings", [f"--artifact={tmp_path}", f"--port={port}"])
    _assert_one_line(proc, "serve_embeddings: cannot start:", "port", port)


def test_serve_ranker_rejects_a_negative_port(tmp_path):
    proc = _run("serve_ranker", [f"--artifact={tmp_path}", "--port=-1"])
    _assert_one_line(proc, "serve_ranker: cannot start:", "port", "-1")


def test_serving_check_validates_counts_before_starting(tmp_path):
    out = tmp_path / "check" / "serving_check.json"
    proc = _run("serving_check", [f"--artifact={tmp_path}", f"--ranker={tmp_path}",
                                  f"--data={tmp_path}", f"--out={out}", "--num_shards=0",
                                  "--num_requests=0", "--candidates=0", "--concurrency=-3",
                                  "--seed=-1", "--deadline_s=inf"])
    _assert_one_line(proc, "serving_check: error:", "--num_shards=0", "--num_requests=0",
                     "--candidates=0", "--concurrency=-3", "--seed=-1 (must be >= 0)",
                     "--deadline_s=inf (must be finite, > 0 and at most 86400 (1 day)")
    assert not out.parent.exists()  # nothing started, nothing written
    # Longer than a day passed the check and failed only when the ranker refused it.
    proc = _run("serving_check", [f"--artifact={tmp_path}", f"--ranker={tmp_path}",
                                  f"--data={tmp_path}", f"--out={out}", "--deadline_s=86401"])
    _assert_one_line(proc, "serving_check: error:", "--deadline_s=86401.0 (must be finite, > 0 "
                     "and at most 86400 (1 day), as the ranker's)")
    assert not out.parent.exists()


def test_serving_check_defaults_data_to_the_recorded_dataset(tmp_path):
    """--data was required though train_ranker records the (absolute) data path next to
    the ranker; without it the recorded one is read, and one that is gone is one line
    naming it, before anything is written."""
    import numpy as np

    from jax_recsys.quant import artifact
    from jax_recsys.ranking import model as M

    cfg = M.RankerConfig(entity_dims=(("user", 4),), mlp_dims=(4,), head_dims=(2,),
                         num_cross_layers=1)
    M.save_ranker(tmp_path / "run" / "ranker", M.TrainedRanker(
        config=cfg, params=M.flatten_params(M.init_dense(cfg)[1]),
        tables={"user": np.zeros((5, 4), np.float32)}, vocabs={"user": np.arange(5)},
        entity_columns={"user": "user_id"}, facet_layout={"user": [("scratch", 4, True)]}))
    artifact.write_artifact(tmp_path / "art", tables={"user": np.ones((5, 4), np.float32)},
                            vocabs={"user": np.arange(5)})
    gone = tmp_path / "moved_away"
    metrics = tmp_path / "run" / "metrics.json"
    metrics.write_text(json.dumps({"config": {"data": {"path": str(gone)}}}))
    out = tmp_path / "check" / "serving_check.json"
    proc = _run("serving_check", [f"--artifact={tmp_path / 'art'}",
                                  f"--ranker={tmp_path / 'run' / 'ranker'}", f"--out={out}"])
    assert _assert_one_line(proc, "serving_check: error:") == (
        f"serving_check: error: {tmp_path / 'run' / 'ranker'}: the dataset the ranker was "
        f"trained on, {gone} (recorded in {metrics}), is gone (moved or deleted?); pass the "
        "dataset folder (--data=DATASET)")
    assert not out.parent.exists()


def test_serving_check_refuses_an_artifact_of_another_ranker_before_starting(tmp_path):
    """It used to end in the model's "entity 'user' embedding has width 16, config says
    8" (from the offline scores), or print "artifact ... lacks tables" without the
    `serving_check: error:` prefix."""
    import numpy as np

    from jax_recsys.quant import artifact
    from jax_recsys.ranking import model as M

    dims = {"user": 8, "pin": 6, "advertiser": 4}
    cfg = M.RankerConfig(entity_dims=tuple(dims.items()), mlp_dims=(4,), head_dims=(2,),
                         num_cross_layers=1)
    M.save_ranker(tmp_path / "ranker", M.TrainedRanker(
        config=cfg, params=M.flatten_params(M.init_dense(cfg)[1]),
        tables={e: np.zeros((5, d), np.float32) for e, d in dims.items()},
        vocabs={e: np.arange(5) for e in dims}, entity_columns={e: f"{e}_id" for e in dims},
        facet_layout={e: [("scratch", d, True)] for e, d in dims.items()}))
    shapes = {"user": (5, 16), "pin": (7, 6)}  # no advertiser table
    artifact.write_artifact(tmp_path / "art",
                            tables={e: np.ones(s, np.float32) for e, s in shapes.items()},
                            vocabs={e: np.arange(s[0]) for e, s in shapes.items()})
    out = tmp_path / "check" / "serving_check.json"
    proc = _run("serving_check", [f"--artifact={tmp_path / 'art'}",
                                  f"--ranker={tmp_path / 'ranker'}", f"--data={tmp_path}",
                                  f"--out={out}"])
    _assert_one_line(proc, "serving_check: error:", "does not match ranker",
                     "it lacks tables ['advertiser'] of the ranker",
                     "its table 'user' is 16 wide, the ranker's 8",
                     "its table 'pin' has 7 rows, the ranker's 5")
    assert not out.parent.exists()


def test_serving_check_reads_empty_label_cells(tmp_path):
    """Labels not known yet (empty click/conversion cells, which the ranker's training
    reads as NaN) used to make serving_check refuse data the ranker trained on."""
    (tmp_path / "dataset.json").write_text(json.dumps({
        "format_version": 1, "tables": {"impressions": {"path": "impressions.csv"}},
        "splits": {"ranker_test": [1, 3]}}))
    (tmp_path / "impressions.csv").write_text(
        "day,user_id,pin_id,click,conversion\n0,1,2,1,0\n1,1,3,,\n2,4,5,0,\n")
    cols = mp_util.child_columns(
        "from launch import serving_check\ncols = serving_check.held_out(sys.argv[1], 'ranker_test')",
        str(tmp_path))
    assert cols["pin_id"] == [3, 5] and cols["click"] == [None, 0]
    assert cols["conversion"] == [None, None]


def test_serving_check_reads_the_table_and_labels_the_ranker_trained_on(tmp_path):
    """It read the "impressions" table with "click"/"conversion" labels whatever the
    ranker was trained on: a ranker trained on another table (``data.table``) failed
    with "no table", and one with other label names had its empty label cells read as
    ids, which refused the data the ranker trained on."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "dataset.json").write_text(json.dumps({
        "format_version": 1, "tables": {"events": {"path": "events.csv"}},
        "splits": {"ranker_test": [1, 3]}}))
    (data / "events.csv").write_text(
        "day,user_id,pin_id,clk,cv\n0,1,2,1,0\n1,1,3,,\n2,4,5,0,\n")
    (tmp_path / "metrics.json").write_text(json.dumps({"config": {"data": {
        "path": str(data), "table": "events", "click_column": "clk", "conversion_column": "cv",
        "test_window": "ranker_test"}}}))
    cols = mp_util.child_columns(
        "import types\nfrom launch import serving_check\n"
        "ranker = types.SimpleNamespace(config=types.SimpleNamespace(coarse_vocab_sizes=()))\n"
        "cols = serving_check.ranker_held_out(sys.argv[1], ranker, sys.argv[2], 'ranker_test')",
        str(tmp_path / "ranker"), str(data))
    assert cols["pin_id"] == [3, 5] and cols["clk"] == [None, 0] and cols["cv"] == [None, None]


def test_bench_serving_validates_flags_before_any_work(tmp_path):
    wd = tmp_path / "bench"
    proc = _run("bench_serving", ["--shards=0", f"--workdir={wd}"])
    _assert_one_line(proc, "bench_serving: error:", "--shards")
    proc = _run("bench_serving", ["--duration_s=0", f"--workdir={wd}"])
    _assert_one_line(proc, "bench_serving: error:", "--duration_s")
    assert not wd.exists()


def test_bench_quant_rejects_zero_rows():
    proc = _run("bench_quant", ["--rows=0"])
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "--rows" in proc.stderr


@pytest.mark.parametrize("bits", ["32", "5"])
def test_bench_quant_refuses_bits_other_than_4_or_8_before_any_work(bits, tmp_path):
    # --bits=32 ended in KeyError 'scale' and --bits=5 in 'bits must be one of (4, 8, 32)',
    # both after writing the source table (2.56 GB at the default --rows).
    proc = _run("bench_quant", [f"--bits={bits}", "--rows=1000", f"--workdir={tmp_path}"])
    _assert_one_line(proc, "FATAL Flags parsing error", f"--bits={bits}", "one of <4|8>")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, needle", [
    (["--kinds=foo"], "--kinds=foo (must be sparse and/or dense)"),
    (["--kinds=sparse", "--steps=0"], "--steps=0 (must be >= 1)"),
    (["--kinds=sparse", "--devices=3"], "--batch=4096 (must be a multiple of every --devices count 3)"),
    (["--kinds=sparse", "--zipf=1"], "--zipf=1.0 (must be finite and > 1)"),
    (["--rows=1e3,0"], "--rows must list whole numbers of rows >= 1"),
])
def test_bench_embedding_checks_its_flags_before_any_work(args, needle):
    """--kinds=foo timed the dense step and printed it as kind 'foo', --steps=0 printed
    step_ms NaN, and a batch that a device count does not divide (or a Zipf exponent
    <= 1) turned every measurement into an error line, all with exit status 0."""
    proc = _run("bench_embedding", ["--rows=1e3", "--devices=1", "--warmup=1", "--steps=1",
                                    *args])
    _assert_one_line(proc, "bench_embedding: error:", needle)
    assert not proc.stdout, proc.stdout


def test_error_line_names_the_type_unless_value_or_os_error():
    from launch import common

    assert common.error_line("x", ValueError("bad")) == "x: error: bad"
    assert common.error_line("x", FileNotFoundError("gone")) == "x: error: gone"
    assert common.error_line("x", KeyError("k")) == "x: error: KeyError: 'k'"


def test_a_failing_child_process_ends_without_the_parents_traceback():
    # bench_kg runs its measurements in a child process (check=True); the child reports
    # the bad flag, and the parent adds one line naming the child instead of a
    # CalledProcessError traceback.
    proc = _run("bench_kg", ["--devices=1", "--models=nope"])
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("bench_kg: error:")]
    assert len(lines) == 2, proc.stderr[-3000:]
    assert "unknown KG model 'nope'" in lines[0]
    assert lines[1] == ("bench_kg: error: the child process exited with status 1 (its error "
                        "is above): launch.bench_kg --worker=1 --models=nope")


def test_child_error_line_says_how_the_child_ended():
    import subprocess as sp

    from launch import common

    py = sys.executable
    assert common.child_error_line("x", sp.CalledProcessError(-9, [py, "-m", "launch.m", "--a=1"])) \
        == "x: error: the child process was killed by signal 9: launch.m --a=1"
    assert common.child_error_line("x", sp.TimeoutExpired(["prog", "a b"], 2.5)) \
        == "x: error: the child process timed out after 2.5 s: prog 'a b'"


def test_generate_data_refuses_num_days_beside_hand_set_windows(tmp_path):
    # num_days rescales every window; a hand-set kg_days used to be replaced silently.
    proc = _run("generate_data", ["--config=configs/world.py:smoke", "--config.num_days=6",
                                  "--config.world.kg_days=(1,3)",
                                  "--config.world.impression_start_day=3",
                                  f"--workdir={tmp_path / 'w'}"])
    _assert_one_line(proc, "generate_data: error:", "num_days=6",
                     "world.kg_days, world.impression_start_day were also set")
    assert not (tmp_path / "w").exists()


def test_generate_data_refuses_a_hand_set_scale_and_absurd_day_counts(tmp_path):
    proc = _run("generate_data", ["--config=configs/world.py:smoke", "--config.scale=large",
                                  f"--workdir={tmp_path / 'w'}"])
    _assert_one_line(proc, "generate_data: error:", "--config.scale=large does not resize",
                     "configs/world.py:large")
    proc = _run("generate_data", ["--config=configs/world.py:smoke",
                                  "--config.num_days=1000000", f"--workdir={tmp_path / 'w'}"])
    _assert_one_line(proc, "generate_data: error:", "num_days must be <= 3650")
    assert not (tmp_path / "w").exists()


def test_bench_kg_refuses_zero_devices_instead_of_spawning_itself_forever():
    proc = _run("bench_kg", ["--devices=0"])
    _assert_one_line(proc, "bench_kg: error:", "--devices must list integers >= 1")


def test_bench_serving_hedge_flags_are_checked_before_any_work(tmp_path):
    wd = tmp_path / "bench"
    for bad in ("--hedge_after_ms=nan", "--hedge_stall_every_ms=inf", "--transports=bogus",
                "--hedge_quantile=1", "--hedge_after_ms=auto,auto",
                "--hedge_quantile=0.5"):  # the last: no 'auto' delay to use it
        proc = _run("bench_serving", ["--parts=hedge", bad, f"--workdir={wd}"])
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert bad.split("=")[0] in proc.stderr, proc.stderr[-2000:]
    proc = _run("bench_serving", ["--parts=", f"--workdir={wd}"])
    assert proc.returncode == 1 and "--parts: empty" in proc.stderr
    assert not wd.exists()


# Small sizes: before the flags were checked up front, the parts ran until one of them
# used the bad flag (the lookup part alone takes minutes at the default sizes).
_TINY_BENCH = ["--rows=1000", "--rank_rows=1000", "--rank_candidates=10", "--shards=1",
               "--clients=1", "--rank_clients=1", "--rank_shards=1", "--duration_s=0.1",
               "--warmup=1", "--transports=stream", "--idle_calls=1"]


@pytest.mark.parametrize("args, needle", [
    (["--rank_wires=qantized"], "--rank_wires=qantized: must be distinct values of"),
    (["--rank_transports=steam"], "--rank_transports=steam: must be distinct values of"),
    (["--rank_cache_tables=nosuch", "--rank_cache_rows=0,100"],
     "--rank_cache_tables=nosuch: must be distinct tables of the benchmark's ranking artifact"),
    (["--rank_cache_tables=pin"], "--rank_cache_tables needs a --rank_cache_rows setting > 0"),
    (["--parts=idle", "--idle_gaps_ms=abc"], "--idle_gaps_ms=abc: must be finite numbers"),
    (["--parts=lookup", "--hedge_after_ms=garbage"], "--hedge_after_ms=garbage (distinct"),
    (["--parts=lookup", "--rank_fetch_ahead=0"], "--rank_fetch_ahead must list integers >= 1"),
    (["--parts=rank", "--bits=5"], "--bits=5 (must be one of"),
])
def test_bench_serving_checks_every_flag_before_any_work(tmp_path, args, needle):
    """A bad flag of a later part (or of one not run) used to be found after the earlier
    parts had run, or never; --rank_wires and --rank_transports with absl's usage dump,
    an unknown --rank_cache_tables name in a traceback of the ranker that did not start."""
    wd = tmp_path / "bench"
    proc = _run("bench_serving", [*_TINY_BENCH, *args, f"--workdir={wd}"])
    _assert_one_line(proc, "bench_serving: error:", needle)
    assert "Try --helpfull" not in proc.stderr, proc.stderr[-3000:]
    assert not wd.exists()


def test_serve_ranker_refuses_hybrid_only_flags_without_shards(tmp_path):
    proc = _run("serve_ranker", [f"--artifact={tmp_path}", "--cache_rows=10"])
    _assert_one_line(proc, "serve_ranker: cannot start:", "need shards")
    proc = _run("serve_ranker", [f"--artifact={tmp_path}", "--hedge_budget=0.5"])
    _assert_one_line(proc, "serve_ranker: cannot start:", "--hedge_budget needs --hedge_after_ms")
    proc = _run("serve_ranker", [f"--artifact={tmp_path}", "--shards=127.0.0.1:1",
                                 "--cache_tables=pin"])
    _assert_one_line(proc, "serve_ranker: cannot start:", "cache_tables needs cache_rows")


@pytest.mark.parametrize("args, needle", [
    (["--hedge_after_ms=soon"], "--hedge_after_ms must be 'auto' or a finite number of ms"),
    (["--hedge_after_ms=-1"], "--hedge_after_ms must be 'auto' or a finite number of ms"),
    (["--hedge_after_ms=auto", "--hedge_quantile=1"], "--hedge_quantile must be in (0, 1)"),
    (["--hedge_after_ms=2", "--hedge_quantile=0.9"], "--hedge_quantile needs --hedge_after_ms=auto"),
    (["--hedge_after_ms=auto", "--hedge_min_ms=nan"], "--hedge_min_ms must be a finite number"),
])
def test_serve_ranker_refuses_bad_hedge_flags(tmp_path, args, needle):
    proc = _run("serve_ranker", [f"--artifact={tmp_path}", "--shards=127.0.0.1:1", *args])
    _assert_one_line(proc, "serve_ranker: cannot start:", needle)


def test_run_ablation_refuses_a_non_positive_pretraining_timeout(tmp_path):
    proc = _run("run_ablation", ["--config=configs/ablation.py", "--config.pretrain.timeout_s=0",
                                 f"--workdir={tmp_path / 'w'}"])
    _assert_one_line(proc, "run_ablation: error:", "pretrain.timeout_s must be > 0")
    assert not (tmp_path / "w" / "world").exists()


_IMPRESSIONS_CSV = ("user_id,item_id,advertiser_id,timestamp,click,conversion,hour\n"
                    "1,10,3,0,1,0,4\n2,11,3,{ts},{click},0,5\n3,12,4,86400,0,0,6\n"
                    "4,13,4,172800,1,0,7\n")


@pytest.mark.parametrize("args, csv, needles", [
    # Refused before training (it used to train, save the ranker, then end in KeyError).
    (["--config.data.test_window="], {}, ["data.test_window is empty"]),
    (["--config.data.test_window=ranker_train"], {}, ["test window 'ranker_train' = days [0, 1) "
                                                      "overlaps the train window"]),
    (["--config.data.max_train_examples=-5"], {}, ["max_train_examples must be an integer >= 0"]),
    # A NaN click used to end in a FloatingPointError traceback; a NaN time dropped its row.
    ([], {"click": "nan"}, ["impressions.csv:3, column 'click': label nan is not 0 or 1"]),
    # An empty label cell is NaN (fine outside the windows); it was "cannot parse ''".
    ([], {"click": ""}, ["impressions.csv:3, column 'click': label nan is not 0 or 1"]),
    ([], {"ts": "nan"}, ["impressions.csv:3, column 'timestamp': timestamp nan is not a finite"]),
])
def test_train_ranker_refuses_bad_labels_and_windows_before_training(tmp_path, args, csv,
                                                                      needles):
    data = tmp_path / "data"
    data.mkdir()
    (data / "impressions.csv").write_text(
        _IMPRESSIONS_CSV.format(ts=csv.get("ts", 0), click=csv.get("click", 0)))
    (data / "dataset.json").write_text(
        '{"format_version": 1, "name": "tiny", "tables": {"impressions": {"path": '
        '"impressions.csv"}}, "splits": {"ranker_train": [0, 1], "ranker_valid": [1, 2], '
        '"ranker_test": [2, 3]}}')
    proc = _run("train_ranker", ["--config=configs/ranker.py:smoke", f"--config.data.path={data}",
                                 f"--workdir={tmp_path / 'w'}", *args])
    _assert_one_line(proc, "train_ranker: error:", *needles)
    assert not (tmp_path / "w" / "ranker").exists()


def _fake_world(folder, scale: str):
    """A dataset.json recording the `scale` world's settings (no tables: enough for the
    check, which runs before any data is read)."""
    import dataclasses
    import json

    from jax_recsys.data import world

    folder.mkdir(parents=True)
    (folder / "dataset.json").write_text(json.dumps({
        "name": f"fake_{scale}", "generator": "jax_recsys.data.world",
        "world_config": dataclasses.asdict(world.scale_config(scale))}))


@pytest.mark.parametrize("module,config", [("train_ranker", "ranker.py"),
                                           ("pretrain_contrastive", "contrastive.py"),
                                           ("pretrain_kg", "kg.py")])
def test_an_empty_data_path_refuses_another_world_in_the_workdir(tmp_path, module, config):
    wd = tmp_path / "w"
    _fake_world(wd / "world", "smoke")  # an earlier run's world; the config asks for default
    proc = _run(module, [f"--config=configs/{config}", f"--workdir={wd}"])
    _assert_one_line(proc, f"{module}: error:", str(wd / "world"), "'smoke' world",
                     "'default'", "--config.data.path")
    assert not (wd / "metrics.json").exists()


def test_a_config_without_data_path_or_world_is_one_line(tmp_path):
    """The KG triples config has no generated world: an empty data.path used to end
    in absl's usage text (app.UsageError) rather than one error line."""
    proc = _run("pretrain_kg", ["--config=configs/kg_triples.py", f"--workdir={tmp_path / 'w'}"])
    _assert_one_line(proc, "pretrain_kg: error:", "set --config.data.path",
                     "data.world_config is empty")
    from launch import common

    cfg = ml_collections.ConfigDict({"data": {"path": "", "world_config": ""}})
    with pytest.raises(ValueError, match=r"set --config.ranker.data.path.*ranker.data.world_config"):
        common.dataset_path(cfg, tmp_path, key="ranker.data")
    cfg.data.path = "/some/folder"
    assert common.dataset_path(cfg, tmp_path) == "/some/folder"


@pytest.mark.parametrize("module", ["train_ranker", "run_pipeline"])
def test_a_flagfile_that_cannot_be_opened_is_one_line(tmp_path, module):
    """ml_collections reads the flag files while it defines --config, before
    common.run: a missing --flagfile was absl's CantOpenFlagFileError traceback."""
    missing = tmp_path / "nope.flags"
    proc = _run(module, [f"--flagfile={missing}", f"--workdir={tmp_path / 'w'}"])
    _assert_one_line(proc, f"{module}: error:", "Unable to open flagfile", str(missing))
    good = tmp_path / "good.flags"  # a flag file that opens still works
    good.write_text("--config=configs/nope.py\n")
    proc = _run(module, [f"--flagfile={good}", f"--workdir={tmp_path / 'w'}"])
    _assert_one_line(proc, f"{module}: error:", "cannot load --config", "configs/nope.py")


@pytest.mark.parametrize("module,config,arg,needle", [
    ("pretrain_kg", "kg.py:smoke", "--config.eval.max_triples=0", "max_triples must be >= 1"),
    ("pretrain_contrastive", "contrastive.py:smoke", "--config.data.eval_days=0",
     "eval_days and max_eval_pairs must be >= 1"),
])
def test_pretrainer_settings_are_checked_before_the_world_is_generated(
        tmp_path, module, config, arg, needle):
    """The data path (which may generate WORKDIR/world) was resolved first."""
    wd = tmp_path / "w"
    proc = _run(module, [f"--config=configs/{config}", arg, f"--workdir={wd}"])
    _assert_one_line(proc, f"{module}: error:", needle)
    assert not (wd / "world").exists()


def test_generated_world_reuses_only_the_same_world(tmp_path):
    from launch import common

    _fake_world(tmp_path / "world", "smoke")
    assert common.generated_world("smoke", tmp_path) == str(tmp_path / "world")
    with pytest.raises(ValueError, match="holds the 'smoke' world.*'large'"):
        common.generated_world("large", tmp_path)
    meta = json.loads((tmp_path / "world" / "dataset.json").read_text())
    meta["world_config"]["num_users"] += 1  # e.g. made by other code
    (tmp_path / "world" / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="other settings.*num_users differ"):
        common.generated_world("smoke", tmp_path)
    del meta["world_config"]  # a dataset folder copied in by hand
    (tmp_path / "world" / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="not a generated world"):
        common.generated_world("smoke", tmp_path, key="ranker.data")


def test_pretrain_contrastive_without_recall_at_10_finishes(tmp_path_factory):
    """eval_ks without 10 used to train, write the facet, then exit 1 (KeyError 'recall@10')."""
    data = mp_util.smoke_world(tmp_path_factory)
    wd = tmp_path_factory.mktemp("cl")
    proc = _run("pretrain_contrastive", [
        "--config=configs/contrastive.py:smoke", f"--config.data.path={data}", f"--workdir={wd}",
        "--config.train.eval_ks=(5,20)", "--config.train.max_steps=2",
        "--config.data.max_eval_pairs=200", "--config.train.eval_loss_batches=1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "recall@5 " in proc.stderr and "recall@20 " in proc.stderr
    assert "recall@10" not in json.loads((wd / "metrics.json").read_text())


def test_serving_check_says_why_a_server_did_not_start(tmp_path):
    """A child server that exits before serving ends serving_check with one line that
    carries the child's own error (it used to be a RuntimeError traceback naming only
    the log)."""
    log = tmp_path / "ranker.log"
    code = (
        "import pathlib, sys\n"
        "from launch import common, serving_check\n"
        "def main(argv):\n"
        "    p = serving_check._Proc('ranker service', ['launch.serve_ranker',\n"
        f"        '--artifact={tmp_path}', '--port=-1'], pathlib.Path({str(log)!r}))\n"
        "    try:\n"
        "        p.wait_event('serving', 120)\n"
        "    finally:\n"
        "        p.stop()\n"
        "sys.argv = ['serving_check', '--artifact=a', '--ranker=r', '--data=d', '--out=o']\n"
        "common.run(main)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=mp_util.REPO, capture_output=True,
                          text=True, timeout=120, env=mp_util.child_env(1, {"JAX_RECSYS_TRACEBACK": ""}))
    _assert_one_line(proc, "serving_check: error:",
                     "ranker service exited with code 1 before 'serving': serve_ranker: cannot "
                     "start: port must be in", str(log))


def test_log_tail_prefers_the_error_line(tmp_path):
    from launch import common

    log = tmp_path / "x.log"
    log.write_text("I1127 14:54:45.947905 1 xla_bridge.py:849] Unable to initialize 'tpu'\n"
                   "x: cannot start: shard 0 takes at most 65536 ids\n"
                   '{"event": "stopped"}\nW1127 14:54:46.000000 1 a.py:1] bye\n')
    assert common.log_tail(log) == "x: cannot start: shard 0 takes at most 65536 ids"
    log.write_text("I1127 14:54:45.947905 1 a.py:1] hi\nTraceback (most recent call last):\n"
                   '  File "a.py", line 1\nKeyError: \'k\'\n')
    assert common.log_tail(log) == "File \"a.py\", line 1 | KeyError: 'k'"
    assert common.log_tail(tmp_path / "missing.log") == ""


def _interrupt(app: str, env: dict[str, str], *args: str) -> tuple[int, str, float]:
    """Runs Python source `app` and sends it SIGINT once it prints "ready".

    Returns:
      (exit status, stderr, seconds from the signal to the end). Its process group (a
      process pool's workers too) is killed afterwards.
    """
    proc = subprocess.Popen([sys.executable, "-c", app, *args], cwd=mp_util.REPO,
                            env=mp_util.child_env(1, env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        return proc.returncode, err, time.monotonic() - t0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


_TINY_APP = '''
import pathlib, sys, threading, time
from concurrent import futures
from launch import common

out = pathlib.Path(sys.argv.pop())
pool = futures.ThreadPoolExecutor(1)
pool.submit(lambda: None).result()  # an idle pool worker, as an async checkpointer keeps


def finish():  # like an async checkpoint's writer: it still uses its pool after Ctrl-C
    time.sleep(1.0)
    out.write_text(pool.submit(lambda: "saved").result())


def main(argv):
    threading.Thread(target=finish).start()
    print("ready", flush=True)
    time.sleep(120)


common.run(main, name="tiny", resume_hint=common.RESUME)
'''


def test_ctrl_c_is_one_line_exit_130_after_background_work(tmp_path):
    """SIGINT used to print a KeyboardInterrupt traceback (and sometimes crash in the
    interpreter's teardown); a background writer is still allowed to finish."""
    out = tmp_path / "saved.txt"
    rc, err, _ = _interrupt(_TINY_APP, {"JAX_RECSYS_TRACEBACK": ""}, str(out))
    assert rc == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == "tiny: interrupted (rerun the same command to resume)"
    assert out.read_text() == "saved"


_SAVING_APP = '''
import os, pathlib, sys, threading, time
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax_recsys import checkpoint
from launch import common

out = pathlib.Path(sys.argv.pop())
finalize = ocp.CheckpointManager._finalize
# An Orbax thread still finishing its work warns after the Ctrl-C was handled.
late_warning = compile("time.sleep(0.5); logging.warning('late orbax warning')",
                       os.path.join(os.sep, "x", "orbax", "late.py"), "exec")


def slow_finalize(self, *args, **kwargs):  # a slow disk: the save is still being written
    time.sleep(1.0)
    threading.Thread(target=exec, args=(late_warning, {"time": time, "logging": logging})).start()
    return finalize(self, *args, **kwargs)


ocp.CheckpointManager._finalize = slow_finalize


def main(argv):
    with checkpoint.Checkpointer(out) as ckpt:
        ckpt.save(1, {"x": np.arange(4.0)}, {"step": 1})
        print("ready", flush=True)
        ckpt.save(2, {"x": np.arange(4.0)}, {"step": 2})  # waits for step 1's save


common.run(main, name="saving", resume_hint=common.RESUME)
'''


def test_ctrl_c_while_a_checkpoint_is_written_ends_with_our_line(tmp_path):
    """Ctrl-C while Orbax waited for a save being written printed "E... Save Finalize
    thread (save_finalize) failed." (the save did not fail: it goes on), and what Orbax
    logged while finishing it came after the "interrupted" line."""
    rc, err, _ = _interrupt(_SAVING_APP, {"JAX_RECSYS_TRACEBACK": "",
                                          "JAX_RECSYS_LIBRARY_LOGS": ""}, str(tmp_path / "ck"))
    assert rc == 130, err[-3000:]
    assert err.strip().splitlines() == ["saving: interrupted (rerun the same command to "
                                        "resume)"], err[-3000:]
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["1"]  # finished


_STUCK_APP = '''
import os, threading, time
from concurrent import futures
from launch import common

common._JOIN_TIMEOUT_S = 3.0
pool = futures.ProcessPoolExecutor(1)  # e.g. a data loader's: its manager thread is not daemon
pool.submit(abs, -1).result()
stuck = threading.Event()


def main(argv):
    if os.environ.get("STUCK"):  # a thread that never ends by itself
        threading.Thread(target=stuck.wait).start()
    print("ready", flush=True)
    time.sleep(120)


common.run(main, name="stuck")
'''


@pytest.mark.parametrize("stuck", [False, True])
def test_ctrl_c_does_not_wait_for_threads_that_end_only_at_exit(stuck):
    """An idle process pool's manager thread ends only at the shutdown: Ctrl-C used to
    wait for it forever. A thread that never ends is given up on after the wait."""
    rc, err, took = _interrupt(_STUCK_APP, {"STUCK": "1" if stuck else ""})
    assert rc == 130, err[-3000:]
    lines = err.strip().splitlines()
    assert "stuck: interrupted" in lines
    if stuck:
        assert lines[-1].startswith("stuck: waiting up to 3 s for background work")
        assert 2.5 < took < 30
    else:
        assert lines[-1] == "stuck: interrupted" and took < 30


_BUSY_APP = '''
import os, pathlib, sys, time
from concurrent import futures
from launch import common

common._JOIN_TIMEOUT_S = 3.0
out = pathlib.Path(sys.argv.pop())
pool = (futures.ProcessPoolExecutor if os.environ["POOL"] == "process"
        else futures.ThreadPoolExecutor)(1)


def task(seconds):
    time.sleep(seconds)
    out.write_text("done")


def main(argv):
    pool.submit(task, float(os.environ["TASK_S"]))
    print("ready", flush=True)
    time.sleep(120)


common.run(main, name="busy")
'''


@pytest.mark.parametrize("pool, task_s", [("thread", 600), ("process", 600), ("thread", 1),
                                          ("process", 1)])
def test_ctrl_c_waits_for_a_running_executor_task_at_most_the_cap(tmp_path, pool, task_s):
    """The executors' exit hook waits for their running tasks: Ctrl-C used to wait for a
    long one forever. A task that ends within the wait still ends."""
    out = tmp_path / "done.txt"
    rc, err, took = _interrupt(_BUSY_APP, {"POOL": pool, "TASK_S": str(task_s),
                                           "JAX_RECSYS_TRACEBACK": ""}, str(out))
    assert rc == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = err.strip().splitlines()
    assert "busy: interrupted" in lines
    if task_s > 3:
        assert lines[-1].startswith("busy: waiting up to 3 s for background work")
        assert 2.5 < took < 30 and not out.exists()
    else:
        assert took < 30 and out.read_text() == "done"


def test_checkpoint_resume_hint_says_whether_a_rerun_resumes():
    import ml_collections

    from launch import common

    class Holder:
        value = ml_collections.ConfigDict({"train": {"checkpoint_every": 5}})

    hint = common.checkpoint_resume_hint(Holder)
    assert hint() == "rerun the same command to resume from the newest checkpoint"
    Holder.value.train.checkpoint_every = 0
    assert "starts over" in hint()


@pytest.mark.parametrize("flag", ["--swap_window_s=nan", "--grace_s=-1", "--log_every_s=inf"])
def test_serve_embeddings_refuses_durations_no_timer_can_wait(tmp_path, flag):
    proc = _run("serve_embeddings", [f"--artifact={tmp_path}", flag])
    name, value = flag[2:].split("=")
    _assert_one_line(proc, "serve_embeddings: cannot start:",
                     f"{name} must be a finite number of seconds >= 0", value)


@pytest.mark.parametrize("flag, sign", [("--deadline_s=inf", ">"), ("--batch_wait_s=nan", ">="),
                                        ("--swap_window_s=-1", ">="), ("--log_every_s=nan", ">=")])
def test_serve_ranker_refuses_durations_no_timer_can_wait(tmp_path, flag, sign):
    proc = _run("serve_ranker", [f"--artifact={tmp_path}", flag])
    name, value = flag[2:].split("=")
    _assert_one_line(proc, "serve_ranker: cannot start:",
                     f"{name} must be a finite number of seconds {sign} 0", value)


_SERVER_APP = '''
import importlib.abc, json, runpy, signal, sys, time

# SIGHUP as a process started without nohup gets it (a run under nohup passes its ignore
# on, and a server keeps an ignored SIGHUP ignored while it starts, by design).
signal.signal(signal.SIGHUP, signal.SIG_DFL)

module, where = sys.argv[1:]
lib = __import__("serving." + ("ranker_service" if module == "serve_ranker" else
                               "embedding_server"), fromlist=["_"])


class Slow(importlib.abc.MetaPathFinder):  # the launcher's own imports take a while
    def find_spec(self, name, path, target=None):
        if where == "import" and name == "serving.client":
            print("ready", flush=True)
            time.sleep(120)


class Service:  # what serve() returns
    port, version = 1, "v1"

    def stats(self):
        return {"requests": 0}

    def swap(self, artifact):
        return "v2"

    def stop(self, grace):
        class Done:
            def wait(self):
                pass
        return Done()


def serve(config):
    if where == "start":  # loading the artifact, compiling the buckets
        print("ready", flush=True)
        time.sleep(120)
    if where == "hangup":  # a start that a SIGHUP interrupts
        print("ready", flush=True)
        time.sleep(3)
    return Service()


if where == "import":  # imported again, through Slow
    del sys.modules["serving.client"], sys.modules["serving"].client
sys.meta_path.insert(0, Slow())
lib.serve = serve
sys.argv = [module, "--artifact=unused", "--port=0", "--log_every_s=0"]
runpy.run_module("launch." + module, run_name="__main__")
'''


@pytest.mark.parametrize("module, where", [("serve_ranker", "import"),
                                           ("serve_ranker", "start"),
                                           ("serve_embeddings", "start")])
def test_ctrl_c_while_a_server_starts_is_one_line_exit_130(module, where):
    """Ctrl-C during a server's start-up (imports, JIT compiles: 40 s on a GPU host) used
    to print a KeyboardInterrupt traceback and end with status -2."""
    rc, err, took = _interrupt(_SERVER_APP, {"JAX_RECSYS_TRACEBACK": ""}, module, where)
    assert rc == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == f"{module}: interrupted" and took < 30


@pytest.mark.parametrize("module", ["serve_ranker", "serve_embeddings"])
def test_ctrl_c_once_a_server_serves_stops_it_gracefully(module):
    proc = subprocess.Popen([sys.executable, "-c", _SERVER_APP, module, "serving"],
                            cwd=mp_util.REPO, env=mp_util.child_env(1), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert json.loads(proc.stdout.readline())["event"] == "serving", proc.stderr.read()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err[-3000:]
        assert json.loads(out.strip().splitlines()[-1])["event"] == "stopped"
        assert "interrupted" not in err
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def _tiny_artifact(path) -> str:
    import numpy as np

    from jax_recsys.quant import artifact

    artifact.write_artifact(path, tables={"user": np.ones((5, 4), np.float32)},
                            vocabs={"user": np.arange(5)})
    return str(path)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")
def test_serve_embeddings_names_a_tls_key_that_is_not_the_certificates(tmp_path):
    """A key of another certificate, or the two files swapped, used to end in 'could not
    bind 127.0.0.1:0 (in use, or no such interface)' after three lines of gRPC's own log,
    which sent the user after the port."""
    art = _tiny_artifact(tmp_path / "art")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    key_a, cert_a = mp_util.self_signed_cert(tmp_path / "a")
    key_b, _ = mp_util.self_signed_cert(tmp_path / "b")
    cases = [(cert_a, key_b, f"tls_key {key_b} is not the private key of the certificate in "
                             f"tls_cert {cert_a}"),
             (key_a, cert_a, f"tls_cert {key_a} holds no certificate"),
             (cert_a, cert_a, f"tls_key {cert_a} holds no private key")]
    for cert, key, message in cases:
        proc = _run("serve_embeddings", [f"--artifact={art}", f"--tls_cert={cert}",
                                         f"--tls_key={key}", "--log_every_s=0"])
        _assert_one_line(proc, "serve_embeddings: cannot start:", message)
        assert "bind" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("module", ["serve_embeddings", "serve_ranker"])
def test_a_server_given_a_file_for_the_artifact_says_it_is_not_a_folder(tmp_path, module):
    """--artifact=FILE (a manifest.json, a tarball) used to be "[Errno 20] Not a directory:
    'FILE/manifest.json'"."""
    afile = tmp_path / "art.tar"
    afile.write_text("not a folder")
    proc = _run(module, [f"--artifact={afile}", "--log_every_s=0"])
    _assert_one_line(proc, f"{module}: cannot start:",
                     f"{afile}: not a folder; a serving artifact is a folder holding "
                     "manifest.json")


def test_serve_embeddings_names_the_tls_flag_of_a_file_it_cannot_read(tmp_path):
    """A missing --tls_cert/--tls_key used to be '[Errno 2] No such file or directory:
    PATH', naming no flag (and the key first when both were missing)."""
    art = _tiny_artifact(tmp_path / "art")
    for cert, key, message in [
        (tmp_path / "no_cert.pem", tmp_path / "no_key.pem",
         f"tls_cert {tmp_path / 'no_cert.pem'}: cannot read it (No such file or directory)"),
        (tmp_path, tmp_path / "no_key.pem", f"tls_cert {tmp_path}: cannot read it (Is a "
                                            "directory)"),
    ]:
        proc = _run("serve_embeddings", [f"--artifact={art}", f"--tls_cert={cert}",
                                         f"--tls_key={key}", "--log_every_s=0"])
        line = _assert_one_line(proc, "serve_embeddings: cannot start:", message)
        assert "Errno" not in line


def test_serve_embeddings_says_a_port_is_in_use(tmp_path):
    """A port another process listens on was 'could not bind 127.0.0.1:P (in use, or no
    such interface): Failed to bind ...; set GRPC_VERBOSITY=debug environment variable to
    see detailed error message.', and then came below a line of gRPC's own log."""
    import socket

    art = _tiny_artifact(tmp_path / "art")
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        proc = _run("serve_embeddings", [f"--artifact={art}", f"--port={port}",
                                         "--log_every_s=0"])
    line = _assert_one_line(proc, "serve_embeddings: cannot start:",
                            f"could not bind 127.0.0.1:{port}: Address already in use "
                            "(another process listens there: choose another --port, or "
                            "--port=0 for a free one)")
    assert "GRPC_VERBOSITY" not in line
    # gRPC's own 'E... add_port.cc:83] Failed to add port ...' line came first.
    assert proc.stderr.splitlines() == [line], proc.stderr


@pytest.mark.parametrize("module", ["serve_ranker", "serve_embeddings"])
def test_sighup_while_a_server_starts_is_a_swap_once_it_serves(module):
    """A SIGHUP (a rollout's swap) before the server had set its handler ended it at once,
    silently, with status 129 (SIGHUP's default)."""
    proc = subprocess.Popen([sys.executable, "-c", _SERVER_APP, module, "hangup"],
                            cwd=mp_util.REPO, env=mp_util.child_env(1), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout.readline() == "ready\n", proc.stderr.read()
        proc.send_signal(signal.SIGHUP)
        serving = proc.stdout.readline()
        assert serving and json.loads(serving)["event"] == "serving", proc.stderr.read()
        assert json.loads(proc.stdout.readline()) == {"event": "swapped", "version": "v2"}
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err[-3000:]
        assert json.loads(out.strip().splitlines()[-1])["event"] == "stopped"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.parametrize("module", ["serve_embeddings", "serve_ranker"])
@pytest.mark.parametrize("flag, message", [
    ("--artifact=", "artifact is empty: give the serving artifact folder"),
    ("--host=", "host is empty: give the interface to bind"),
])
def test_a_server_refuses_an_empty_artifact_or_host(tmp_path, module, flag, message):
    """'--artifact=$ART' with ART unset looked for an artifact in the working folder
    ("manifest.json: missing; . is not a serving artifact"); an empty --host ended in
    "could not bind :0"."""
    args = [f"--artifact={_tiny_artifact(tmp_path / 'art')}", "--log_every_s=0", flag]
    proc = _run(module, args)
    _assert_one_line(proc, f"{module}: cannot start:", message)


@pytest.mark.parametrize("module", ["train_ranker", "pretrain_contrastive"])
def test_a_config_that_does_not_load_with_overrides_is_one_line(tmp_path, module):
    # A relative --config run from another folder, with any --config.KEY=VALUE override,
    # was ml_collections' "Configuration is not available because of an earlier failure
    # to load" with two tracebacks.
    proc = _run(module, ["--config=configs/no_such.py:smoke", "--config.data.path=x",
                         f"--workdir={tmp_path / 'w'}"])
    assert _assert_one_line(proc, f"{module}: error:") == (
        f"{module}: error: cannot load --config: [Errno 2] No such file or directory: "
        "'configs/no_such.py'")
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("module, config, key", [
    ("train_ranker", "configs/kg_triples.py:smoke", "facet_mode"),
    ("pretrain_contrastive", "configs/ranker.py:smoke", "user_column"),
    ("pretrain_kg", "configs/contrastive.py:smoke", "eval"),
])
def test_the_config_of_another_entry_point_is_one_line(tmp_path, module, config, key):
    # Was an AttributeError traceback ("'facet_mode'") at the first key the script read.
    proc = _run(module, [f"--config={config}", f"--config.data.path={tmp_path}",
                         f"--workdir={tmp_path / 'w'}"])
    assert _assert_one_line(proc, f"{module}: error:") == (
        f"{module}: error: the config has no key {key!r}: is --config the config of "
        f"{module}? (README: Entry points)")


def test_an_attribute_error_of_the_code_keeps_its_traceback():
    from launch import common

    assert common._missing_config_key(AttributeError("'NoneType' has no attribute 'x'")) is None
    cfg = ml_collections.ConfigDict({"a": 1})
    with pytest.raises(AttributeError) as e:
        cfg.b  # noqa: B018
    assert common._missing_config_key(e.value) == "b"


def test_serving_check_takes_start_end_days_and_defaults_to_the_rankers_test_window(tmp_path):
    # A folder with no dataset.json has no named window: serving_check's window was
    # "ranker_test" whatever the ranker was tested on ("no day window 'ranker_test'
    # (have [])"), and --window took names only.
    data = tmp_path / "data"
    data.mkdir()
    (data / "events.csv").write_text(
        "day,user_id,pin_id,click,conversion\n20,1,2,1,0\n21,1,3,0,0\n22,4,5,0,0\n")
    (tmp_path / "metrics.json").write_text(json.dumps({"config": {"data": {
        "path": str(data), "table": "events", "test_window": "21,23"}}}))
    code = ("import types\nfrom launch import serving_check\n"
            "ranker = types.SimpleNamespace(config=types.SimpleNamespace(coarse_vocab_sizes=()))\n"
            "cols = serving_check.ranker_held_out(sys.argv[1], ranker, sys.argv[2], sys.argv[3])")
    for window, pins in (("", [3, 5]), ("20, 21", [2])):
        cols = mp_util.child_columns(code, str(tmp_path / "ranker"), str(data), window)
        assert cols["pin_id"] == pins, window
    # The ranker's own time column (data.day_column), as recorded: was "no 'day' or
    # 'timestamp' column".
    (data / "events.csv").write_text((data / "events.csv").read_text().replace("day", "date"))
    (tmp_path / "metrics.json").write_text(json.dumps({"config": {"data": {
        "path": str(data), "table": "events", "test_window": "21,23", "day_column": "date"}}}))
    cols = mp_util.child_columns(code, str(tmp_path / "ranker"), str(data), "")
    assert cols["pin_id"] == [3, 5] and cols["date"] == [21, 22]
    # No data folder given: the recorded one (serving_check --data is optional).
    cols = mp_util.child_columns(code, str(tmp_path / "ranker"), "", "")
    assert cols["pin_id"] == [3, 5]


@pytest.mark.parametrize("with_json", [True, False])
def test_run_ablation_refuses_a_stale_kg_of_own_data_before_any_pretraining(tmp_path, with_json):
    # A user's own folder (not a generated world) with the cl_kg_stale variant pretrained
    # cl_fresh and cl_stale first, then said the stale KG cannot be made; without a
    # dataset.json it was "No such file or directory: .../dataset.json".
    data = tmp_path / "data"
    data.mkdir()
    (data / "impressions.csv").write_text("day,user_id,item_id,click,conversion\n0,1,2,1,0\n")
    if with_json:
        (data / "dataset.json").write_text(json.dumps({
            "format_version": 1, "tables": {"impressions": {"path": "impressions.csv"}}}))
    proc = _run("run_ablation", ["--config=configs/ablation.py:smoke",
                                 f"--config.ranker.data.path={data}", f"--workdir={tmp_path / 'w'}",
                                 "--config.variants=no_large_tables,cl,cl_kg_stale"])
    assert _assert_one_line(proc, "run_ablation: error:") == (
        f"run_ablation: error: {data} is not a generated world: give "
        "--config.facet_dirs.kg_stale=DIR (a KG facet pretrained on the stale window)")
    assert not (tmp_path / "w" / "pretrain").exists()


def test_serving_check_takes_a_relative_artifact_path(tmp_path):
    # Its servers run in the checkout: --artifact=art from the artifact's parent folder
    # ended with "embedding shard 0 exited with code 1 before 'serving': serve_embeddings:
    # cannot start: art/manifest.json: missing; art is not a serving artifact".
    import numpy as np

    from jax_recsys.quant import artifact
    from jax_recsys.ranking import model as M

    dims = {"user": 4, "pin": 3}
    cfg = M.RankerConfig(entity_dims=tuple(dims.items()), mlp_dims=(4,), head_dims=(2,),
                         num_cross_layers=1)
    rng = np.random.default_rng(0)
    ranker = M.TrainedRanker(
        config=cfg, params=M.flatten_params(M.init_dense(cfg)[1]),
        tables={e: rng.normal(size=(3, d)).astype(np.float32) for e, d in dims.items()},
        vocabs={"user": np.array(["u0", "u1", "u2"]), "pin": np.array(["p0", "p1", "p2"])},
        entity_columns={"user": "user_id", "pin": "item_id"},
        facet_layout={e: [("scratch", d, True)] for e, d in dims.items()})
    M.save_ranker(tmp_path / "ranker", ranker)
    artifact.write_artifact(
        tmp_path / "art", tables=dict(ranker.tables), vocabs=dict(ranker.vocabs),
        ranker_config={**cfg.to_dict(), "entity_columns": dict(ranker.entity_columns),
                       "facet_layout": {e: [list(x) for x in v]
                                        for e, v in ranker.facet_layout.items()}},
        ranker_params={k: np.asarray(v) for k, v in ranker.params.items()})
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "impressions.csv").write_text(
        "day,user_id,item_id,click,conversion\n" + "".join(
            f"7,u{i % 3},p{i % 3 if i < 6 else 0},{i % 2},0\n" for i in range(9)))
    env = mp_util.child_env(1, {"JAX_RECSYS_TRACEBACK": ""})
    proc = subprocess.run(
        [sys.executable, "-m", "launch.serving_check", "--artifact=art", "--ranker=ranker",
         "--data=data", "--window=7,8", "--out=check/serving_check.json", "--num_shards=1",
         "--num_requests=2", "--candidates=3", "--concurrency=1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "check" / "serving_check.json").read_text())
    assert report["ok"] and report["num_requests"] == 2 and report["failed_requests"] == 0


@pytest.mark.parametrize("module, config, key", [
    ("train_ranker", "configs/ranker.py:smoke", "train.batch_size"),
    ("run_ablation", "configs/ablation.py:smoke", "ranker.train.batch_size")])
def test_a_bad_ranker_setting_is_refused_before_the_world_is_written(tmp_path, module, config,
                                                                     key):
    # Refused only once WORKDIR/world was generated (minutes at the default scale), as
    # pretrain_kg and pretrain_contrastive were before they checked their settings first.
    proc = _run(module, [f"--config={config}", f"--config.{key}=0", f"--workdir={tmp_path}"])
    _assert_one_line(proc, f"{module}: error:", "batch_size and eval_batch_size must be >= 1")
    assert not (tmp_path / "world").exists()


def test_orbax_info_logs_are_left_out_of_the_console(tmp_path, monkeypatch, caplog):
    """Every Orbax save logged about 55 INFO lines (each thread, each step) through absl
    into the console of the entry points, burying their own progress lines; Orbax's
    WARNING and ERROR lines are kept, and JAX_RECSYS_LIBRARY_LOGS=1 keeps them all."""
    import logging

    import numpy as np
    from absl import logging as absl_logging

    from jax_recsys import checkpoint
    from launch import common

    handler = absl_logging.get_absl_handler()
    monkeypatch.setattr(handler, "filters", [])  # the filters this test adds go with it
    # The "absl" logger's own level too: absl sets it (WARNING) when its --verbosity flag
    # is reset, as a test before this one in the same process may have done.
    with caplog.at_level(logging.INFO, logger="absl"), caplog.at_level(logging.INFO):
        with checkpoint.Checkpointer(tmp_path / "ck") as ck:  # real Orbax records
            ck.save(1, {"w": np.ones(3)})
        absl_logging.info("step 1: loss 0.5")  # ours
        absl_logging.warning("a warning of ours")
    orbax = [r for r in caplog.records if "/orbax/" in r.pathname]
    assert len(orbax) > 20 and {r.levelno for r in orbax} == {logging.INFO}
    warning = logging.LogRecord("absl", logging.WARNING, "/x/orbax/checkpoint/f.py", 1,
                                "slow save", (), None)
    ours = [r for r in caplog.records if r.pathname == __file__]
    records = [*orbax, *ours, warning]

    monkeypatch.setenv(common.LIBRARY_LOGS_ENV, "1")
    common.quiet_library_logs()
    assert all(handler.filter(r) for r in records)
    monkeypatch.setenv(common.LIBRARY_LOGS_ENV, "")
    common.quiet_library_logs()
    common.quiet_library_logs()  # once only
    assert len(handler.filters) == 1
    assert [r.getMessage() for r in records if handler.filter(r)] == [
        "step 1: loss 0.5", "a warning of ours", "slow save"]
