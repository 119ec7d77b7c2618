"""Ranker training end to end on a tiny hand-built dataset folder with planted structure."""

import dataclasses
import json
import re
import warnings

import numpy as np
import pytest

from jax_recsys import checkpoint
from jax_recsys.data import folder
from jax_recsys.ranking import facets as F, model as M, train as T

NUM_USERS, NUM_PINS = 48, 40


def _write_world(path, n=6144, seed=0):
    """Impressions whose click depends on a planted user x pin affinity (two groups)."""
    rng = np.random.default_rng(seed)
    user_raw = 1000 + np.arange(NUM_USERS) * 3  # raw ids are not rows
    pin_raw = 50 + np.arange(NUM_PINS) * 7
    u = rng.integers(0, NUM_USERS, n)
    p = rng.integers(0, NUM_PINS, n)
    same = (u % 2) == (p % 2)
    hour = rng.integers(0, 4, n)
    logit = -2.0 + 3.0 * same + 0.3 * hour
    click = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int8)
    conversion = (click * (rng.random(n) < np.where(u % 3 == 0, 0.7, 0.1))).astype(np.int8)
    day = np.repeat(np.arange(6), n // 6).astype(np.int32)
    t = folder.write_table(path, "impressions", {
        "user_id": user_raw[u].astype(np.int64), "item_id": pin_raw[p].astype(np.int64),
        "advertiser_id": (pin_raw[p] % 5).astype(np.int64), "day": day,
        "timestamp": day.astype(np.int64) * 86400, "click": click, "conversion": conversion,
        "hour": hour.astype(np.int64),
    })
    folder.write_dataset_json(path, name="tiny", tables={"impressions": t}, num_days=6,
                              splits={"ranker_train": [0, 4], "ranker_valid": [4, 5], "ranker_test": [5, 6]})
    return user_raw, pin_raw


def _cfg(path, entities, **kw):
    base = dict(
        data=T.DataConfig(path=str(path)), entities=entities, batch_size=256, num_epochs=2.0,
        log_every=1, dense_learning_rate=3e-3, table_learning_rate=0.1,
        model=M.RankerConfig(mlp_dims=(16,), head_dims=(8,), num_cross_layers=1),
    )
    base.update(kw)
    return T.TrainConfig(**base)


@pytest.mark.parametrize("field, value, message", [
    ("num_epochs", 0.0, "num_epochs must be a finite number > 0, got 0.0"),
    ("num_epochs", -3.0, "num_epochs must be a finite number > 0, got -3.0"),
    ("num_epochs", float("nan"), "num_epochs must be a finite number > 0, got nan"),
    ("batch_size", 0, "batch_size and eval_batch_size must be >= 1, got 0, 16384"),
    ("eval_batch_size", -5, "batch_size and eval_batch_size must be >= 1, got 256, -5"),
    ("log_every", -1, "log_every and warmup_steps must be >= 0 (0: never / no warm-up), got -1, 0"),
    ("checkpoint_every", -2, "checkpoint_every must be >= 0 (0: no checkpoints), got -2"),
    ("keep_checkpoints", 0, "keep_checkpoints must be >= 1, got 0"),
    ("dense_learning_rate", -1e-3, "dense_learning_rate must be a finite number >= 0, got -0.001"),
    ("table_learning_rate", float("inf"), "table_learning_rate must be a finite number >= 0"),
    # Was NumPy's "expected non-negative integer" at the first training step.
    ("seed", -1, "seed must be >= 0, got -1"),
])
def test_train_config_rejects_bad_values(field, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        _cfg("unused", (), **{field: value})
    assert _cfg("unused", (), num_epochs=0.5).num_epochs == 0.5


def test_evaluate_predictions_known_values():
    out = T.evaluate_predictions(
        click=np.array([1, 0, 1, 0]), conversion=np.array([1, 0, 0, 1]),
        p_ctr=np.array([0.9, 0.1, 0.4, 0.6]), p_cvr=np.array([0.8, 0.5, 0.3, 0.9]),
    )
    # CTR: positive/negative pairs (.9,.1) (.9,.6) (.4,.1) won, (.4,.6) lost -> 3/4.
    assert out["ctr_auc"] == pytest.approx(0.75)
    # CVR on clicked rows (0, 2): labels [1, 0], scores [.8, .3] -> 1.0.
    assert out["cvr_auc"] == pytest.approx(1.0)
    # CTCVR: label click*conv = [1, 0, 0, 0] (row 3 converted without a click: negative);
    # scores [.72, .05, .12, .54] -> the positive beats all three.
    assert out["ctcvr_auc"] == pytest.approx(1.0)
    assert out["ctr_calibration"] == pytest.approx(2.0 / 2.0)
    assert out["ctr_log_loss"] == pytest.approx(-np.mean(np.log([0.9, 0.9, 0.4, 0.4])))
    assert (out["num_examples"], out["num_clicks"], out["num_conversions"]) == (4, 2, 1)


@pytest.mark.slow
def test_training_lowers_the_loss_and_beats_the_no_table_baseline(tmp_path):
    _write_world(tmp_path / "data")
    ents = (
        F.EntitySpec(name="user", column="user_id", facets=(F.FacetSpec(source="scratch", dim=8),)),
        F.EntitySpec(name="pin", column="item_id", facets=(F.FacetSpec(source="scratch", dim=8),)),
    )
    res = T.train_and_evaluate(_cfg(tmp_path / "data", ents, num_epochs=4.0), tmp_path / "run", log=lambda s: None)
    curve = [loss for _, loss in res["train"]["loss_curve"]]
    assert curve[-1] < 0.9 * curve[0]
    # The planted user x pin interaction is only visible through the ID tables.
    base = T.train_and_evaluate(_cfg(tmp_path / "data", (), num_epochs=4.0), None, log=lambda s: None)
    assert res["test"]["ctr_auc"] > base["test"]["ctr_auc"] + 0.1
    assert res["test"]["ctr_auc"] > 0.7
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["test"]["ctr_auc"] == pytest.approx(res["test"]["ctr_auc"])
    # The saved ranker reloads and scores identically.
    back = M.load_ranker(tmp_path / "run" / "ranker")
    data = T.prepare_data(T.DataConfig(path=str(tmp_path / "data")), id_columns=("user_id", "item_id"))
    again = T.evaluate_ranker(back, data.splits["test"])
    assert again["ctr_auc"] == pytest.approx(res["test"]["ctr_auc"], abs=1e-6)


def test_facets_land_in_the_right_rows_and_frozen_facets_stay_bit_identical(tmp_path):
    user_raw, pin_raw = _write_world(tmp_path / "data", n=1536)
    rng = np.random.default_rng(1)
    # The pretraining vocabulary differs from the ranker's: another order, some ids
    # missing, some extra ids the ranker never sees.
    pre_users = np.concatenate([user_raw[::-1][: NUM_USERS - 5], [7, 8, 9]])
    cl_user = rng.normal(size=(len(pre_users), 4)).astype(np.float32)
    pre_pins = np.asarray([str(x) for x in pin_raw[::2]])  # string ids in the facet vocab
    cl_pin = rng.normal(size=(len(pre_pins), 3)).astype(np.float32)
    checkpoint.save_facet(tmp_path / "facet_cl", facet="cl", tables={"user": cl_user, "pin": cl_pin},
                          vocabs={"user": pre_users, "pin": pre_pins})
    ents = (
        F.EntitySpec(name="user", column="user_id", facets=(
            F.FacetSpec(source="scratch", dim=2),
            F.FacetSpec(source="cl", mode="freeze", target_norm=None),
        )),
        F.EntitySpec(name="pin", column="item_id", facets=(F.FacetSpec(source="cl", target_norm=None),)),
    )
    cfg = _cfg(tmp_path / "data", ents, facet_paths=(("cl", str(tmp_path / "facet_cl")),), num_epochs=1.0)
    res = T.train_and_evaluate(cfg, tmp_path / "run", log=lambda s: None)
    r = M.load_ranker(tmp_path / "run" / "ranker")
    assert r.facet_layout["user"] == [("scratch", 2, True), ("cl", 4, False)]
    stats = {(s["entity"], s["facet"]): s for s in res["facets"]}
    assert stats[("user", "cl")]["found"] == NUM_USERS - 5 and stats[("user", "cl")]["missing"] == 5
    assert stats[("pin", "cl")]["found"] == NUM_PINS // 2
    # Frozen: every found row equals the facet vector of the same raw id, bit for bit.
    pos = {int(x): i for i, x in enumerate(pre_users)}
    for row, raw in enumerate(r.vocabs["user"]):
        if int(raw) in pos:
            np.testing.assert_array_equal(r.tables["user"][row, 2:], cl_user[pos[int(raw)]])
    # Fine-tuned pretrained pin facet moved, but started from the right vectors: rows of
    # pins that never occur in training would be unchanged; here every pin occurs, so
    # compare the displacement to the pretrained norm instead.
    ppos = {s: i for i, s in enumerate(pre_pins)}
    found = [(row, ppos[str(int(raw))]) for row, raw in enumerate(r.vocabs["pin"]) if str(int(raw)) in ppos]
    delta = np.array([r.tables["pin"][row] - cl_pin[j] for row, j in found])
    assert np.abs(delta).max() > 0  # fine-tuned
    assert np.linalg.norm(delta, axis=1).mean() < 0.5 * np.linalg.norm(cl_pin, axis=1).mean()


def test_substituted_tables_change_the_evaluation(tmp_path):
    _write_world(tmp_path / "data", n=1536)
    ents = (F.EntitySpec(name="user", column="user_id", facets=(F.FacetSpec(source="scratch", dim=4),)),)
    res = T.train_and_evaluate(_cfg(tmp_path / "data", ents, num_epochs=1.0), None, log=lambda s: None)
    ranker = res["ranker"]
    data = T.prepare_data(T.DataConfig(path=str(tmp_path / "data")), id_columns=("user_id",))
    same = T.evaluate_ranker(ranker, data.splits["test"], tables=dict(ranker.tables))
    assert same["ctr_log_loss"] == pytest.approx(res["test"]["ctr_log_loss"], rel=1e-6)
    zero = T.evaluate_ranker(ranker, data.splits["test"], tables={"user": np.zeros_like(ranker.tables["user"])})
    assert zero["ctr_log_loss"] != pytest.approx(same["ctr_log_loss"], rel=1e-6)
    # A table of another row count was scored (rows clipped into it): wrong numbers.
    rows = len(ranker.vocabs["user"])
    for bad in (ranker.tables["user"][:5], ranker.tables["user"][:, :3]):
        with pytest.raises(ValueError, match=re.escape(
                f"predict: the 'user' table has shape {bad.shape}, the ranker's is ({rows}, 4)")):
            T.evaluate_ranker(ranker, data.splits["test"], tables={"user": bad})


def test_bad_data_names_the_column(tmp_path):
    _write_world(tmp_path / "data", n=600)
    with pytest.raises(folder.DataError, match="no_such_col"):
        T.prepare_data(T.DataConfig(path=str(tmp_path / "data")), id_columns=("no_such_col",))
    with pytest.raises(ValueError, match="facet 'kg'"):
        ents = (F.EntitySpec(name="user", column="user_id", facets=(F.FacetSpec(source="kg"),)),)
        T.train_and_evaluate(_cfg(tmp_path / "data", ents), None, log=lambda s: None)


@pytest.mark.slow
def test_sharded_over_8_devices_equals_one_device(tmp_path, devices):
    from jax_recsys import distributed

    _write_world(tmp_path / "data", n=1536)
    ents = (
        F.EntitySpec(name="user", column="user_id", facets=(F.FacetSpec(source="scratch", dim=4),)),
        F.EntitySpec(name="pin", column="item_id", facets=(F.FacetSpec(source="scratch", dim=4),)),
    )
    cfg = _cfg(tmp_path / "data", ents, num_epochs=1.0)
    one = T.train_and_evaluate(cfg, None, log=lambda s: None, mesh=distributed.global_mesh(devices=devices[:1]))
    eight = T.train_and_evaluate(cfg, None, log=lambda s: None, mesh=distributed.global_mesh(devices=devices))
    np.testing.assert_allclose([x for _, x in one["train"]["loss_curve"]],
                               [x for _, x in eight["train"]["loss_curve"]], rtol=1e-4)
    for ent in ("user", "pin"):
        np.testing.assert_allclose(one["ranker"].tables[ent], eight["ranker"].tables[ent], atol=1e-4)
    assert one["test"]["ctr_auc"] == pytest.approx(eight["test"]["ctr_auc"], abs=1e-3)


def test_rerun_with_other_settings_refuses_the_old_checkpoint(tmp_path):
    """The same checkpoint folder with another dense_learning_rate is another run; with
    only logging or checkpointing changed it resumes."""
    _write_world(tmp_path / "data", n=1536)
    cfg = _cfg(tmp_path / "data", (), num_epochs=1.0, checkpoint_every=2)
    ckpts, quiet = tmp_path / "ckpt", lambda s: None
    first = T.train_and_evaluate(cfg, None, log=quiet, checkpoint_dir=ckpts)
    with pytest.raises(ValueError, match=r"belongs to another run: dense_learning_rate was "
                       r"0\.003, now 0\.01; use a fresh workdir"):
        T.train_and_evaluate(dataclasses.replace(cfg, dense_learning_rate=1e-2), None,
                             log=quiet, checkpoint_dir=ckpts)
    logs = []
    again = T.train_and_evaluate(dataclasses.replace(cfg, log_every=0, checkpoint_every=1),
                                 None, log=logs.append, checkpoint_dir=ckpts)
    assert any("resumed from" in s for s in logs), logs
    assert again["train"]["resumed_from_step"] == first["train"]["steps"] > 0


def test_checkpoint_every_0_neither_resumes_nor_creates_checkpoints(tmp_path):
    """checkpoint_every=0 (configs/ranker.py: "0: none") still made an empty checkpoints/
    folder and resumed from checkpoints already there; the pretrainers do neither."""
    _write_world(tmp_path / "data", n=1536)
    cfg = _cfg(tmp_path / "data", (), num_epochs=1.0, checkpoint_every=2)
    ckpts, quiet = tmp_path / "ckpt", lambda s: None
    first = T.train_and_evaluate(cfg, None, log=quiet, checkpoint_dir=ckpts)
    steps = first["train"]["steps"]
    assert steps > 2 and (ckpts / str(steps)).is_dir()
    logs = []
    off = dataclasses.replace(cfg, checkpoint_every=0)
    again = T.train_and_evaluate(off, None, log=logs.append, checkpoint_dir=ckpts)
    assert again["train"]["resumed_from_step"] == 0 and again["train"]["steps"] == steps
    assert not any("resumed from" in s for s in logs), logs
    assert again["test"]["ctr_auc"] == pytest.approx(first["test"]["ctr_auc"], abs=1e-6)
    T.train_and_evaluate(off, None, log=quiet, checkpoint_dir=tmp_path / "none")
    assert not (tmp_path / "none").exists()


def test_an_error_during_training_leaves_a_complete_checkpoint(tmp_path,
                                                               slow_checkpoint_finalize):
    """An exception while a checkpoint is still being written (asynchronously) reaches
    the caller only once the checkpoint is finished: no half-written step folder, and a
    rerun in the same process resumes from it."""
    import threading

    _write_world(tmp_path / "data", n=1536)
    cfg = _cfg(tmp_path / "data", (), num_epochs=1.0, checkpoint_every=2)
    ckpts = tmp_path / "ckpt"

    def log(line):
        if line.lstrip().startswith("step 3/"):  # the step after the first save
            raise RuntimeError("injected")

    with pytest.raises(RuntimeError, match="injected"):
        T.train_and_evaluate(cfg, None, log=log, checkpoint_dir=ckpts)
    assert sorted(p.name for p in ckpts.iterdir()) == ["2"]  # no *.orbax-checkpoint-tmp-*
    assert not [t for t in threading.enumerate() if t.name == "save_finalize"]
    with checkpoint.Checkpointer(ckpts) as ckpt:
        assert ckpt.latest_step() == 2 and ckpt.restore_meta()["step"] == 2
        assert ckpt.restore_meta()["trainer"] == "train_ranker"
    slow_checkpoint_finalize.undo()
    logs = []
    again = T.train_and_evaluate(cfg, None, log=logs.append, checkpoint_dir=ckpts)
    assert any("resumed from" in s for s in logs), logs
    assert again["train"]["resumed_from_step"] == 2


def test_a_facet_path_of_another_facet_is_refused(tmp_path):
    """facet_paths cl -> a KG facet checkpoint must not be trained as the contrastive facet."""
    user_raw, _ = _write_world(tmp_path / "data", n=1536)
    checkpoint.save_facet(tmp_path / "facet_kg", facet="kg", vocabs={"user": user_raw},
                          tables={"user": np.ones((len(user_raw), 4), np.float32)})
    ents = (F.EntitySpec(name="user", column="user_id", facets=(F.FacetSpec(source="cl"),)),)
    cfg = _cfg(tmp_path / "data", ents, facet_paths=(("cl", str(tmp_path / "facet_kg")),))
    with pytest.raises(ValueError, match=r"facet_kg is a 'kg' facet checkpoint, but a 'cl' "
                       r"facet was expected"):
        T.train_and_evaluate(cfg, None, log=lambda s: None)


def test_a_train_window_smaller_than_one_batch_says_what_to_lower(tmp_path):
    """Was "400 examples make no full batch of 512 (drop_remainder=True)" (BatchIterator),
    which names neither the window nor the setting to change."""
    _write_world(tmp_path / "data", n=600)
    with pytest.raises(ValueError) as e:
        T.train_and_evaluate(_cfg(tmp_path / "data", (), batch_size=512), None,
                             log=lambda s: None)
    assert str(e.value) == ("the train window has 400 impressions, fewer than one batch of "
                            "512 (batch_size, batches are full): lower batch_size to 400 or "
                            "less, or widen the train window")


def _data(path, **kw):
    return T.DataConfig(path=str(path), **kw)


def test_labels_must_be_0_or_1(tmp_path):
    """A click of 2, a NaN conversion or a non-label column as labels stop before any
    training with a DataError naming the file, the column and the row (CSV: line)."""
    _write_world(tmp_path / "data", n=600)
    imp = tmp_path / "data" / "impressions"
    ids = ("user_id",)
    click = np.load(imp / "click.npy")
    bad = click.copy()
    bad[37] = 2
    np.save(imp / "click.npy", bad)
    with pytest.raises(folder.DataError) as e:
        T.prepare_data(_data(tmp_path / "data"), id_columns=ids)
    assert (e.value.file, e.value.column) == (str(imp / "click.npy"), "click")
    assert "row 37: label 2 is not 0 or 1" in str(e.value)
    np.save(imp / "click.npy", click)
    conv = np.load(imp / "conversion.npy").astype(np.float32)
    conv[5] = np.nan
    np.save(imp / "conversion.npy", conv)
    with pytest.raises(folder.DataError, match=r"conversion\.npy, column 'conversion': row 5: "
                       r"label nan is not 0 or 1"):
        T.prepare_data(_data(tmp_path / "data"), id_columns=ids)
    conv[5] = 0
    np.save(imp / "conversion.npy", conv)
    hour = np.load(imp / "hour.npy")
    i = int(np.argmax(hour > 1))
    with pytest.raises(folder.DataError, match=rf"column 'hour': row {i}: label {hour[i]} is not"):
        T.prepare_data(_data(tmp_path / "data", click_column="hour"), id_columns=ids)
    # Float 0.0 / 1.0 and bool labels are fine.
    np.save(imp / "click.npy", click.astype(bool))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no conversion without a click here
        T.prepare_data(_data(tmp_path / "data"), id_columns=ids)
    # A conversion without a click (post-view) is counted and warned about: the ESMM
    # labels (click AND conversion) take it for no conversion.
    unclicked = np.flatnonzero((click == 0) & (np.arange(600) >= 400))[:3]  # days 4 and 5
    conv[unclicked] = 1
    np.save(imp / "conversion.npy", conv)
    with pytest.warns(UserWarning, match="3 impressions of the windows have conversion=1 "
                      "with click=0"):
        T.prepare_data(_data(tmp_path / "data"), id_columns=ids)
    # A row in two windows (valid and test may overlap, with a warning) is counted once.
    with pytest.warns(UserWarning, match="valid window .* overlaps the test window"), \
            pytest.warns(UserWarning, match="3 impressions of the windows"):
        T.prepare_data(_data(tmp_path / "data", valid_window=(4, 6), test_window=(4, 6)),
                       id_columns=ids)
    conv[unclicked] = 0
    # Only the rows the windows use are checked: a pending (NaN) label on day 5, outside
    # the windows below, or a bad one past max_train_examples, is not read at all.
    conv[550] = np.nan
    np.save(imp / "conversion.npy", conv)
    with pytest.raises(folder.DataError, match="row 550: label nan"):
        T.prepare_data(_data(tmp_path / "data"), id_columns=ids)
    got = T.prepare_data(_data(tmp_path / "data", valid_window="", test_window=(4, 5)),
                         id_columns=ids)
    assert [len(got.splits[k]["click"]) for k in ("train", "test")] == [400, 100]
    conv[550] = 0
    conv[300] = np.nan  # day 3: train rows 0..399
    np.save(imp / "conversion.npy", conv)
    got = T.prepare_data(_data(tmp_path / "data", max_train_examples=300), id_columns=ids)
    assert len(got.splits["train"]["click"]) == 300
    with pytest.raises(folder.DataError, match="row 300: label nan"):
        T.prepare_data(_data(tmp_path / "data", max_train_examples=301), id_columns=ids)
    conv[300] = 0
    np.save(imp / "conversion.npy", conv)
    # A CSV table: the error names the file line.
    csv = tmp_path / "csv"
    csv.mkdir()
    (csv / "impressions.csv").write_text(
        "user_id,timestamp,click,conversion\n1,0,1,0\n2,0,0,0\n3,86400,2,0\n4,86400,1,1\n")
    with pytest.raises(folder.DataError) as e:
        T.prepare_data(_data(csv, train_window=(0, 1), valid_window="", test_window=(1, 2)),
                       id_columns=ids)
    assert (e.value.file, e.value.column, e.value.line) == (
        str(csv / "impressions.csv"), "click", 4)


def test_an_empty_csv_label_is_a_label_not_known_yet(tmp_path):
    """An empty label cell reads as NaN: fine on a row outside the windows (a pending
    conversion), refused inside one with a DataError naming the file, column and line."""
    csv = tmp_path / "impressions.csv"
    csv.write_text("user_id,timestamp,click,conversion\n1,0,1,0\n2,0,0,0\n3,86400,1,1\n"
                   "4,86400,0,0\n5,172800,1,\n6,172800,,\n")
    ids = ("user_id",)
    with pytest.warns(UserWarning, match="conversion=1 after a click: the CVR head"):
        got = T.prepare_data(_data(tmp_path, train_window=(0, 1), valid_window="",
                                   test_window=(1, 2)), id_columns=ids)
    assert got.splits["train"]["click"].tolist() == [1, 0]
    assert got.splits["test"]["conversion"].tolist() == [1, 0]
    with pytest.raises(folder.DataError) as e:
        T.prepare_data(_data(tmp_path, train_window=(0, 1), valid_window="",
                             test_window=(1, 3)), id_columns=ids)
    assert (e.value.file, e.value.column, e.value.line) == (str(csv), "click", 7)
    assert re.search(r"label nan is not 0 or 1 \(.*an empty or NaN label", str(e.value))


def test_valid_and_test_windows_must_not_overlap_the_train_window(tmp_path):
    _write_world(tmp_path / "data", n=600)
    ids = ("user_id",)
    with pytest.raises(ValueError, match=re.escape(
            "the test window 'ranker_train' = days [0, 4) overlaps the train window "
            "'ranker_train' = days [0, 4): its metrics would be measured on training "
            "impressions")):
        T.prepare_data(_data(tmp_path / "data", test_window="ranker_train"), id_columns=ids)
    with pytest.raises(ValueError, match=re.escape(
            "the valid window (explicit) = days [3, 5) overlaps the train window")):
        T.prepare_data(_data(tmp_path / "data", valid_window=(3, 5)), id_columns=ids)
    with pytest.warns(UserWarning, match="valid window 'ranker_test' = days \\[5, 6\\) overlaps"):
        data = T.prepare_data(_data(tmp_path / "data", valid_window="ranker_test"), id_columns=ids)
    assert data.windows == {"train": (0, 4), "valid": (5, 6), "test": (5, 6)}
    # A dataset.json whose test window is its train window.
    meta = json.loads((tmp_path / "data" / "dataset.json").read_text())
    meta["splits"]["ranker_test"] = meta["splits"]["ranker_train"]
    (tmp_path / "data" / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="test window 'ranker_test' = days \\[0, 4\\) overlaps"):
        T.prepare_data(_data(tmp_path / "data"), id_columns=ids)
    # Adjacent half-open windows do not overlap; an empty train window (export) is fine.
    T.prepare_data(_data(tmp_path / "data", valid_window="", test_window=(4, 6)), id_columns=ids)
    T.prepare_data(_data(tmp_path / "data", train_window="", valid_window=""), id_columns=ids)


def test_train_and_test_windows_are_required_before_training(tmp_path):
    _write_world(tmp_path / "data", n=600)
    for field in ("test_window", "train_window"):
        cfg = _cfg(tmp_path / "data", (), data=_data(tmp_path / "data", **{field: ""}))
        with pytest.raises(ValueError, match=rf"data\.{field} is empty: the ranker needs"):
            T.train_and_evaluate(cfg, None, log=lambda s: None)
    data = T.prepare_data(_data(tmp_path / "data", test_window=""), id_columns=())
    with pytest.raises(ValueError, match=r"data\.test_window is empty"):
        T.train_and_evaluate(_cfg(tmp_path / "data", ()), None, data=data, log=lambda s: None)


@pytest.mark.parametrize("value", [-5, -1, 2.5])
def test_max_train_examples_must_be_a_count(value):
    with pytest.raises(ValueError, match=re.escape(
            f"max_train_examples must be an integer >= 0 (0: all), got {value!r}")):
        T.DataConfig(path="unused", max_train_examples=value)


def test_coarse_features_refuse_labels_ids_and_repeats(tmp_path):
    # A label was refused only by the batch iterator ("a column is listed twice among
    # id/dense/label features"); an entity's id column replaced that table's row indices
    # with its raw ids (item ids up to 323 into a 40-row table) and trained silently.
    for kw, message in [
        (dict(coarse_features=("hour", "click")),
         "coarse_features lists 'click', the click label (click_column): a label cannot be a feature"),
        (dict(coarse_features=("hour",), conversion_column="hour"),
         "coarse_features lists 'hour', the conversion label (conversion_column): a label "
         "cannot be a feature"),
        (dict(coarse_features=("click",), click_column="hour"),
         "coarse_features lists 'click', a name the ranker gives its labels: a label cannot "
         "be a feature"),
        (dict(coarse_features=("hour", "hour")), "coarse_features lists 'hour' more than once"),
    ]:
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            _data(tmp_path, **kw)
    _write_world(tmp_path / "data", n=600)
    with pytest.raises(ValueError, match=re.escape(
            "coarse_features lists 'item_id', the id column of an entity table")):
        T.prepare_data(_data(tmp_path / "data", coarse_features=("item_id",)),
                       id_columns=("user_id", "item_id"))
    got = T.prepare_data(_data(tmp_path / "data", coarse_features=("item_id",)),
                         id_columns=("user_id",))  # no pin table: a coarse feature like any
    assert got.coarse_sizes == (("item_id", 50 + 7 * (NUM_PINS - 1) + 1),)


def test_a_two_dimensional_column_names_the_file(tmp_path):
    _write_world(tmp_path / "data", n=600)
    imp = tmp_path / "data" / "impressions"
    np.save(imp / "hour.npy", np.load(imp / "hour.npy")[:, None])
    with pytest.raises(folder.DataError, match=re.escape(
            f"{imp / 'hour.npy'}, column 'hour': column must be 1-D (one value per "
            "impression), got shape (600, 1)")):
        T.prepare_data(_data(tmp_path / "data", coarse_features=("hour",)), id_columns=())


def _write_csv_impressions(path, extra=None, n=60):
    """A user's own impressions.csv: string ids, renamed labels, days 100..102."""
    path.mkdir(parents=True)
    extra = extra or {}
    head = ["uid", "pin", "day", "clicked", "converted", "device", *extra]
    rows = [[f"u_{i % 7}", f"p_{i % 5}", 100 + i % 3, i % 2, (i % 4 == 1) * 1, i % 3,
             *(v(i) for v in extra.values())] for i in range(n)]
    (path / "impressions.csv").write_text(
        "\n".join(",".join(map(str, r)) for r in [head, *rows]) + "\n")
    (path / "dataset.json").write_text(json.dumps({
        "format_version": 1, "tables": {"impressions": {"path": "impressions.csv"}},
        "splits": {"ranker_train": [100, 101], "ranker_valid": [101, 102],
                   "ranker_test": [102, 103]}}))


def test_no_time_column_names_the_impressions_file(tmp_path):
    """Was "column 'day': no 'day' or 'timestamp' column to select days by", naming no
    table or file."""
    _write_csv_impressions(tmp_path / "data")
    p = tmp_path / "data" / "impressions.csv"
    p.write_text(p.read_text().replace("day", "date", 1))
    with pytest.raises(folder.DataError) as e:
        T.prepare_data(_data(tmp_path / "data", click_column="clicked",
                             conversion_column="converted"), id_columns=("uid",))
    assert str(e.value) == (f"{p}, column 'day': no 'day' or 'timestamp' column to select "
                            "days by")


def test_the_time_column_is_configurable(tmp_path):
    """The ranker's days came from `day` or `timestamp` only (the contrastive trainer
    names its own); a table whose day is `date`, or whose seconds are `seen_at`, was
    "no 'day' or 'timestamp' column". Neither is picked as a coarse feature."""
    _write_csv_impressions(tmp_path / "data")
    p = tmp_path / "data" / "impressions.csv"
    p.write_text(p.read_text().replace("day", "date", 1))
    kw = dict(click_column="clicked", conversion_column="converted")
    got = T.prepare_data(_data(tmp_path / "data", day_column="date", **kw), id_columns=("uid",))
    assert got.coarse_sizes == (("device", 3),)
    assert [len(got.splits[k]["click"]) for k in ("train", "valid", "test")] == [20, 20, 20]
    np.testing.assert_array_equal(got.splits["test"]["click"], [i % 2 for i in range(2, 60, 3)])
    # Seconds: day = seen_at // 86400 (days 100..102 as above).
    lines = p.read_text().splitlines()
    rows = [r.split(",") for r in lines[1:]]
    p.write_text("\n".join([lines[0].replace("date", "seen_at"),
                            *(",".join([*r[:2], str(int(r[2]) * 86400 + 5), *r[3:]]) for r in rows)]) + "\n")
    got2 = T.prepare_data(_data(tmp_path / "data", timestamp_column="seen_at", **kw),
                          id_columns=("uid",))
    assert got2.coarse_sizes == (("device", 3),)
    for k in ("train", "valid", "test"):
        np.testing.assert_array_equal(got2.splits[k]["click"], got.splits[k]["click"])
    with pytest.raises(folder.DataError) as e:
        T.prepare_data(_data(tmp_path / "data", coarse_features=("device",), **kw),
                       id_columns=("uid",))
    assert str(e.value) == (f"{p}, column 'day': no 'day' or 'timestamp' column to select "
                            "days by")


def test_renamed_label_columns_are_never_picked_as_coarse_features(tmp_path):
    # With click_column=clicked, every integer column but ids, day and timestamp was a
    # coarse feature: the labels too, so the ranker saw what it predicts (test CTCVR
    # AUC 0.83 against 0.53 on the same data with device and position only).
    _write_csv_impressions(tmp_path / "data")
    got = T.prepare_data(_data(tmp_path / "data", click_column="clicked",
                               conversion_column="converted"), id_columns=("uid", "pin"))
    assert got.coarse_sizes == (("device", 3),)
    assert sorted(got.splits["train"]) == ["click", "conversion", "device", "pin", "uid"]
    np.testing.assert_array_equal(got.splits["train"]["click"], np.tile([0, 1], 10))


def test_a_coarse_feature_of_ids_or_times_is_refused_not_allocated(tmp_path):
    # An integer column such as a time in milliseconds was picked as a coarse feature
    # and its table of max + 1 rows allocated: "RESOURCE_EXHAUSTED: Out of memory
    # allocating 56589909472256 bytes" with a traceback.
    _write_csv_impressions(tmp_path / "data", {"event_ms": lambda i: 1767225600000 + i})
    message = ("coarse feature 'event_ms' has value 1767225600059: a coarse feature is a small "
               "categorical embedded in a table of max value + 1 rows (below 1048576); list the "
               "coarse features (data.coarse_features) or make an id column an entity (entities)")
    for coarse in (None, ("device", "event_ms")):
        with pytest.raises(folder.DataError, match=re.escape(
                f"impressions.csv:61, column 'event_ms': {message}")):
            T.prepare_data(_data(tmp_path / "data", click_column="clicked",
                                 conversion_column="converted", coarse_features=coarse),
                           id_columns=("uid", "pin"))
    got = T.prepare_data(_data(tmp_path / "data", click_column="clicked",
                               conversion_column="converted", coarse_features=("device",)),
                         id_columns=("uid", "pin"))
    assert got.coarse_sizes == (("device", 3),)


def test_windows_may_be_start_end_days_for_a_folder_without_dataset_json(tmp_path):
    # --config.data.train_window can only hold a string: a folder with no dataset.json
    # (no named window) could not train a ranker ("no day window '20464,20466' (have [])").
    _write_csv_impressions(tmp_path / "data")
    (tmp_path / "data" / "dataset.json").unlink()
    got = T.prepare_data(_data(tmp_path / "data", click_column="clicked",
                               conversion_column="converted", train_window="100,101",
                               valid_window="", test_window=" 101 , 103 "),
                         id_columns=("uid", "pin"))
    assert got.windows == {"train": (100, 101), "test": (101, 103)}
    assert len(got.splits["train"]["click"]) == 20 and len(got.splits["test"]["click"]) == 40
    with pytest.raises(folder.DataError, match=re.escape(
            "empty day window '101,101': [101, 101) (START,END: END is exclusive")):
        T.prepare_data(_data(tmp_path / "data", click_column="clicked",
                             conversion_column="converted", train_window="100,101",
                             valid_window="", test_window="101,101"), id_columns=("uid",))
    with pytest.raises(ValueError, match=re.escape(
            "the test window '100,102' = days [100, 102) overlaps the train window '100,101'")):
        T.prepare_data(_data(tmp_path / "data", click_column="clicked",
                             conversion_column="converted", train_window="100,101",
                             valid_window="", test_window="100,102"), id_columns=("uid",))
    # A typo in the days read as a window name: the message named a dataset.json that is
    # not there ("DIR/dataset.json: no day window '100-101' (have [])") and not the days.
    with pytest.raises(folder.DataError) as e:
        T.prepare_data(_data(tmp_path / "data", click_column="clicked",
                             conversion_column="converted", train_window="100-101",
                             valid_window="", test_window="101,103"), id_columns=("uid",))
    assert str(e.value) == (f"{tmp_path / 'data'}: no day window '100-101' (the folder has no "
                            "dataset.json to name windows); or give days as START,END (END "
                            "exclusive)")


def test_a_train_window_without_conversions_warns(tmp_path):
    # A data set with no conversions trained a CVR head on all-zero labels without a
    # word (test CVR AUC NaN, the export's CVR row "n/a").
    _write_csv_impressions(tmp_path / "data")
    csv = tmp_path / "data" / "impressions.csv"
    lines = csv.read_text().splitlines()
    csv.write_text("\n".join([lines[0], *(ln[:-4] + ",0," + ln[-1] for ln in lines[1:])]) + "\n")
    with pytest.warns(UserWarning, match=re.escape(
            "no impression of the train window (days [100, 101)) has converted=1 after a "
            "click: the CVR head has nothing to learn")) as rec:
        got = T.prepare_data(_data(tmp_path / "data", click_column="clicked",
                                   conversion_column="converted"), id_columns=("uid",))
    assert not any("CTR head" in str(w.message) for w in rec)
    assert got.splits["train"]["conversion"].sum() == 0
    assert got.splits["train"]["click"].sum() == 10
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the usual data: no warning
        _write_csv_impressions(tmp_path / "data2")
        T.prepare_data(_data(tmp_path / "data2", click_column="clicked",
                             conversion_column="converted"), id_columns=("uid",))
