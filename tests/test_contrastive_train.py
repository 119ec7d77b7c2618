"""Contrastive pretraining: data loading, sparse updates, sharded == unsharded, planted world."""

import functools
import gzip
import math

import jax
import numpy as np
import pytest

from jax_recsys import checkpoint
from jax_recsys.data.folder import DataError, write_dataset_json, write_table
from jax_recsys.distributed import global_mesh
from jax_recsys.embedding import specs
from jax_recsys.pretrain import contrastive_data as cd, contrastive_train as ct


def planted_world(path, *, users=300, pins=100, clusters=10, days=4, per_user_day=5, seed=0):
    """Users and pins in `clusters` clusters; every user engages only pins of its cluster.

    A perfect model ranks the user's 10 cluster pins first, so Recall@10 can reach
    ~1 while random ranking gets 10 / pins = 0.1 and popularity about the same.
    """
    rng = np.random.default_rng(seed)
    ucl = rng.integers(0, clusters, users)
    pcl = np.arange(pins) % clusters
    by_cl = [np.flatnonzero(pcl == c) for c in range(clusters)]
    u = np.repeat(np.arange(users), days * per_user_day)
    d = np.tile(np.repeat(np.arange(days), per_user_day), users)
    p = np.array([rng.choice(by_cl[ucl[x]]) for x in u])
    order = np.argsort(d, kind="stable")
    write_table(path, "engagements", {
        "user_id": u[order] + 1000, "item_id": p[order] + 5000, "day": d[order],
        "timestamp": d[order] * 86400 + 5, "engagement_type": rng.integers(0, 3, u.size)})
    write_table(path, "items", {"item_id": np.arange(pins) + 5000, "advertiser_id": pcl + 90,
                                "topic": pcl})
    cu = rng.integers(0, users, 200)
    write_table(path, "conversions", {"user_id": cu + 1000, "advertiser_id": ucl[cu] + 90,
                                      "day": rng.integers(0, days, 200)})


# ------------------------------------------------------------------------------ data


def test_load_pairs_window_weights_conversions(tmp_path):
    write_table(tmp_path, "engagements", {
        "user_id": np.array([7, 7, 8, 9, 8, 7, 8]),
        "item_id": np.array([50, 51, 50, 52, 51, 53, 50]),
        "day": np.array([0, 1, 1, 2, 3, 3, 3]),
        "engagement_type": np.array([0, 1, 2, 0, 1, 1, 0]),
    })
    write_table(tmp_path, "items", {"item_id": np.array([50, 51, 52, 60]),
                                    "advertiser_id": np.array([4, 5, 5, 6])})
    write_table(tmp_path, "conversions", {"user_id": np.array([9, 8, 8]),
                                          "advertiser_id": np.array([4, 6, 4]),
                                          "day": np.array([1, 2, 5])})
    cfg = cd.ContrastiveDataConfig(path=str(tmp_path), window_start=1, window_end=3,
                                   type_weights=(2.0, 1.0, 0.5), conversion_weight=3.0)
    pairs = cd.load_pairs(cfg)
    # Training days 1, 2: engagements (7,51,w1) (8,50,w.5) (9,52,w2); conversions on
    # day 1 (9 -> advertiser 4 -> pin 50) and day 2 (8 -> advertiser 6 -> pin 60).
    np.testing.assert_array_equal(pairs.user_ids, [7, 8, 9])
    np.testing.assert_array_equal(pairs.pin_ids, [50, 51, 52, 60])
    got = sorted(zip(pairs.user_ids[pairs.train_user].tolist(),
                     pairs.pin_ids[pairs.train_pin].tolist(), pairs.train_weight.tolist(),
                     strict=True))
    assert got == [(7, 51, 1.0), (8, 50, 0.5), (8, 60, 3.0), (9, 50, 3.0), (9, 52, 2.0)]
    np.testing.assert_allclose(pairs.pin_freq, [2 / 5, 1 / 5, 1 / 5, 1 / 5])
    # Held-out day 3: (8,51) and (8,50) are scorable; (7,53) has an unseen pin.
    held = sorted(zip(pairs.user_ids[pairs.eval_user].tolist(),
                      pairs.pin_ids[pairs.eval_pin].tolist(), strict=True))
    assert held == [(8, 50), (8, 51)]
    assert pairs.stats["eval_pairs_unseen_dropped"] == 1
    assert pairs.stats["conversion_pairs"] == 2


def test_conversion_ids_longer_than_the_engagement_ids_keep_their_identity(tmp_path):
    """String ids of the conversions table wider than the engagements' ("u1000" next
    to "u1") were cut to the engagements' width and given to the wrong user."""
    (tmp_path / "engagements.csv").write_text(
        "user_id,item_id,day\nu1,p1,0\nu2,p2,0\nu3,p1,1\n")
    (tmp_path / "items.csv").write_text("item_id,advertiser_id\np1,a1\np2,a2\np345,a3\n")
    (tmp_path / "conversions.csv").write_text(
        "user_id,advertiser_id,day\nu1000,a1,0\nu2999,a3,1\n")
    pairs = cd.load_pairs(cd.ContrastiveDataConfig(
        path=str(tmp_path), window_start=0, window_end=2, eval_start=2, eval_end=3,
        conversion_weight=2.0))
    got = sorted(zip(pairs.user_ids[pairs.train_user].tolist(),
                     pairs.pin_ids[pairs.train_pin].tolist(), pairs.train_weight.tolist(),
                     strict=True))
    assert got == [("u1", "p1", 1.0), ("u1000", "p1", 2.0), ("u2", "p2", 1.0),
                   ("u2999", "p345", 2.0), ("u3", "p1", 1.0)]
    assert cd._join_ids(np.array([1, 2], np.int32), np.array([2**40])).tolist() == [1, 2, 2**40]
    assert cd._join_ids(np.array([7]), np.array(["007"])).tolist() == ["7", "007"]


def test_load_pairs_user_folder_strings_and_timestamps(tmp_path):
    # A user-brought CSV: string ids, no day column, no type column, no conversions.
    (tmp_path / "interactions.csv").write_text(
        "user_id,item_id,timestamp\n"
        "alice,pinA,10\nbob,pinB,86410\nalice,pinB,86420\nbob,pinA,172810\n")
    pairs = cd.load_pairs(cd.ContrastiveDataConfig(path=str(tmp_path), table="interactions"))
    assert pairs.stats["window_start"] == 0 and pairs.stats["window_end"] == 2
    assert list(pairs.user_ids) == ["alice", "bob"] and list(pairs.pin_ids) == ["pinA", "pinB"]
    np.testing.assert_array_equal(pairs.train_weight, [1.0, 1.0, 1.0])
    assert (pairs.user_ids[pairs.eval_user].tolist(), pairs.pin_ids[pairs.eval_pin].tolist()) \
        == (["bob"], ["pinA"])


def test_a_named_window_and_explicit_days_are_not_combined(tmp_path):
    # Were silently combined: window "stale" [0, 2) with window_end=4 trained on days
    # [0, 4) reported as "stale"; the default "auto" with window_start=1 trained on
    # [1, 4), fresh_pretrain's end, not the documented "eval_days before the last day".
    ent = write_table(tmp_path, "engagements", {"user_id": np.array([7, 7, 8, 9, 8, 7, 8, 9]),
                                                "item_id": np.array([50, 51, 50, 52, 51, 53, 50, 52]),
                                                "day": np.array([0, 1, 1, 2, 3, 3, 4, 5])})
    write_dataset_json(tmp_path, name="t", tables={"engagements": ent},
                       splits={"stale_pretrain": [0, 2], "fresh_pretrain": [2, 4]})
    with pytest.raises(ValueError, match=r"^give a named window or window_start/window_end, "
                       r"not both: window 'stale' with window_end=4 \(set window to '' to use "
                       r"the days\)$"):
        cd.ContrastiveDataConfig(path=str(tmp_path), window="stale", window_end=4)

    def days(**kw):
        s = cd.load_pairs(cd.ContrastiveDataConfig(path=str(tmp_path), **kw)).stats
        return s["window"], s["window_start"], s["window_end"]

    assert days() == ("fresh_pretrain", 2, 4)
    assert days(window="stale") == ("stale", 0, 2)
    assert days(window_start=1) == ("", 1, 5)
    assert days(window_start=0, window_end=3) == ("", 0, 3)


def test_window_as_start_end_days_as_the_ranker_takes_them(tmp_path):
    """``window="0,2"`` (days, as the ranker's --config.data.train_window) was looked up
    as a window name: "no day window '0,2' (the folder has no dataset.json to name
    windows)", a folder without dataset.json could name no window at all."""
    (tmp_path / "engagements.csv").write_text(
        "uid,pin_id,ts\nu_a,p_1,10\nu_b,p_2,86410\nu_a,p_2,172810\nu_b,p_2,259210\n")
    cfg = functools.partial(cd.ContrastiveDataConfig, path=str(tmp_path), user_column="uid",
                            item_column="pin_id", timestamp_column="ts")
    pairs = cd.load_pairs(cfg(window=" 1 , 3 "))
    s = pairs.stats
    assert (s["window"], s["window_start"], s["window_end"], s["eval_start"], s["eval_end"]) \
        == (" 1 , 3 ", 1, 3, 3, 4)
    assert (pairs.user_ids[pairs.train_user].tolist(), pairs.pin_ids[pairs.train_pin].tolist()) \
        == (["u_b", "u_a"], ["p_2", "p_2"])
    assert (pairs.user_ids[pairs.eval_user].tolist(), pairs.pin_ids[pairs.eval_pin].tolist()) \
        == (["u_b"], ["p_2"])
    # The ranker's messages (DatasetFolder.window_days); days given twice are refused.
    with pytest.raises(DataError) as e:
        cd.load_pairs(cfg(window="3,3"))
    assert str(e.value) == ("empty day window '3,3': [3, 3) (START,END: END is exclusive and "
                            "must be above START)")
    with pytest.raises(DataError) as e:
        cd.load_pairs(cfg(window="fresh"))
    assert str(e.value) == (f"{tmp_path}: no day window 'fresh' (the folder has no "
                            "dataset.json to name windows); or give days as START,END (END "
                            "exclusive)")
    with pytest.raises(ValueError, match="^give a named window or window_start/window_end, "
                       "not both: window '1,3' with window_end=4"):
        cfg(window="1,3", window_end=4)


def test_load_pairs_errors_name_the_problem(tmp_path):
    write_table(tmp_path, "engagements", {"user_id": np.array([1]), "pin": np.array([2]),
                                          "day": np.array([0])})
    with pytest.raises(ValueError, match=r"'engagements' lacks column\(s\) \['item_id'\]"):
        cd.load_pairs(cd.ContrastiveDataConfig(path=str(tmp_path)))
    with pytest.raises(ValueError, match="no table 'clicks'"):
        cd.load_pairs(cd.ContrastiveDataConfig(path=str(tmp_path), table="clicks"))
    # A compressed table beside it is named, as the folder's own reader names it (was
    # "dataset folder has no table 'clicks'").
    with gzip.open(tmp_path / "clicks.csv.gz", "wt") as f:
        f.write("user_id,item_id,day\n1,2,0\n")
    hint = ("clicks.csv.gz is not read: a table is a .csv or .tsv file (uncompressed) or a "
            "folder of .npy columns")
    with pytest.raises(DataError) as e:
        cd.load_pairs(cd.ContrastiveDataConfig(path=str(tmp_path), table="clicks"))
    assert str(e.value) == f"{tmp_path}: no table 'clicks' (have ['engagements']); {hint}"
    with pytest.raises(ValueError, match=r"no training pairs .* days \[5, 6\)"):
        cd.load_pairs(cd.ContrastiveDataConfig(path=str(tmp_path), item_column="pin",
                                               window_start=5, window_end=6))
    # A used id column with a list per row (the reader keeps it): one error naming it,
    # not a NumPy broadcast error or a traceback.
    write_table(tmp_path / "two_d", "engagements", {"user_id": np.array([[1, 2]]),
                                                    "item_id": np.array([2]),
                                                    "day": np.array([0])})
    with pytest.raises(ValueError, match=r"engagements/user_id\.npy, column 'user_id': column "
                       r"must be 1-D \(one value per row\), got shape \(1, 2\)"):
        cd.load_pairs(cd.ContrastiveDataConfig(path=str(tmp_path / "two_d")))


def test_load_pairs_reads_days_by_the_folders_rule(tmp_path):
    """`_days` had its own rule: a NaN in a renamed time column became day -1e14 (a
    window from -106751991167301, no error), a text column a bare "invalid literal for
    int()" and no time column a message of its own. It now is `folder.row_days`, the
    ranker's `select_days` rule, errors naming the file."""
    p = tmp_path / "engagements.csv"
    p.write_text("user_id,item_id,seen_at\nu1,p1,1767225600\nu2,p2,nan\n"
                 "u1,p2,1767312000\nu2,p1,1767398400\n")

    def err(**kw):
        with pytest.raises(DataError) as e:
            cd.load_pairs(cd.ContrastiveDataConfig(path=str(tmp_path), **kw))
        return str(e.value)

    nan = ("row 1: seen_at nan is not a finite number within int64 range (rows with such a "
           "time would fall outside every day window)")
    assert err(timestamp_column="seen_at") == f"{p}, column 'seen_at': {nan}"
    assert err(day_column="seen_at") == f"{p}, column 'seen_at': {nan}"
    assert err(timestamp_column="user_id") == (f"{p}, column 'user_id': column must hold "
                                               "numbers, got dtype <U2")
    assert err() == f"{p}, column 'day': no 'day' or 'timestamp' column to select days by"
    p.write_text("user_id,item_id,seen_at\nu1,p1,1767225600.5\nu2,p2,1767312000\n"
                 "u1,p2,1767398400\n")
    s = cd.load_pairs(cd.ContrastiveDataConfig(path=str(tmp_path),
                                               timestamp_column="seen_at")).stats
    assert (s["window_start"], s["window_end"], s["train_pairs"]) == (20454, 20456, 2)


@pytest.mark.parametrize("field, value, message", [
    ("type_weights", (1.0, -2.0, 1.0), r"type_weights\[1\] must be a finite number >= 0 \(a pair's "
     r"weight\), got -2.0"),
    ("type_weights", (math.nan,), r"type_weights\[0\] must be a finite number >= 0"),
    ("conversion_weight", -1.0, "conversion_weight must be a finite number >= 0"),
    ("conversion_weight", math.inf, "conversion_weight must be a finite number >= 0"),
    ("eval_days", 0, r"eval_days and max_eval_pairs must be >= 1, got 0, 20000"),
    ("max_eval_pairs", 0, r"eval_days and max_eval_pairs must be >= 1, got 1, 0"),
    # Was NumPy's "expected non-negative integer" (no name) when the pairs were read.
    ("seed", -1, r"data seed must be >= 0, got -1"),
])
def test_data_config_rejects_negative_weights_and_no_held_out_pairs(field, value, message):
    # Were accepted: a negative weight drove the training loss to -1e11, and no held-out
    # pairs reported Recall@K 0.0 for the model and the popularity baseline alike.
    with pytest.raises(ValueError, match=message):
        cd.ContrastiveDataConfig(path="x", **{field: value})
    assert cd.ContrastiveDataConfig(path="x", type_weights=(0.0, 1, 2.5),
                                    conversion_weight=0.0).conversion_weight == 0.0


# ----------------------------------------------------------------------------- training


def _trainer(mesh, **kw):
    cfg = ct.ContrastiveConfig(dim=8, batch_size=16, temperature=0.2, log_every=1000,
                               table_optimizer=specs.RowAdagrad(learning_rate=0.1), **kw)
    return ct.ContrastiveTrainer(config=cfg, num_users=40, num_pins=24, mesh=mesh,
                                 pin_freq=np.linspace(1, 2, 24) / np.linspace(1, 2, 24).sum())


def test_update_reaches_only_touched_rows(devices):
    tr = _trainer(global_mesh(devices=devices), uniform_negatives=1)
    before = tr.collection.export_tables(tr.state.emb)
    acc0 = {k: np.asarray(v["acc"]) for k, v in tr.state.emb.slots.items()}
    users = np.array([0, 3, 3, 5, 9, 11, 12, 20, 21, 22])
    batch = tr.make_batch(users, users % 7)  # 10 real examples + 6 padding rows
    negs = batch.ids["neg_pin_id"][: users.size].ravel()  # padding rows' negatives are masked
    tr.train_step(batch)
    after = tr.collection.export_tables(tr.state.emb)
    for name, touched in (("user", set(users)), ("pin", set(users % 7) | set(negs))):
        moved = {int(r) for r in np.flatnonzero(np.any(after[name] != before[name], axis=1))}
        assert moved == touched, name
        acc = np.asarray(tr.state.emb.slots[name]["acc"])
        grown = {int(r) for r in np.flatnonzero(acc != acc0[name])}
        assert grown == touched, name


@pytest.mark.slow
def test_sharded_equals_unsharded(devices):
    rng = np.random.default_rng(3)
    pairs = [(rng.integers(0, 40, 16), rng.integers(0, 24, 16)) for _ in range(3)]
    losses = {}
    for ndev in (1, 8):
        tr = _trainer(global_mesh(devices=devices[:ndev]), uniform_negatives=1)
        losses[ndev] = [tr.train_step(tr.make_batch(u, p))["loss"] for u, p in pairs]
        tables = tr.collection.export_tables(tr.state.emb)
        if ndev == 1:
            ref = tables
    np.testing.assert_allclose(losses[8], losses[1], rtol=1e-5)
    assert losses[1][2] < losses[1][0]  # the same batches again: it learns
    for name in ("user", "pin"):
        np.testing.assert_allclose(tables[name], ref[name], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_planted_world_recall_and_facet(tmp_path, devices):
    planted_world(tmp_path / "world")
    pairs = cd.load_pairs(cd.ContrastiveDataConfig(path=str(tmp_path / "world"),
                                                   pin_side_features=("topic",)))
    assert pairs.stats["window_end"] == 3 and pairs.stats["eval_pairs"] > 500
    cfg = ct.ContrastiveConfig(dim=16, batch_size=128, temperature=0.1, num_epochs=3,
                               eval_ks=(10,), log_every=1000, uniform_negatives=1)
    m = ct.train_and_evaluate(pairs=pairs, config=cfg, workdir=tmp_path / "run",
                              mesh=global_mesh(devices=devices[:2]))
    # Random ranking: Recall@10 = 10/100; a model that learned the clusters ranks
    # the user's 10 cluster pins first (up to ties among them) -> ~1.
    assert m["recall@10"] > 0.6, m
    assert m["pop_recall@10"] < 0.25, m
    assert m["heldout_loss"] < math.log(128) - 1.0
    facet = checkpoint.load_facet(tmp_path / "run" / "facet_cl")
    assert facet.facet == "cl"
    assert facet.tables["user"].shape == (300, 16) and facet.tables["pin"].shape == (100, 16)
    np.testing.assert_array_equal(facet.vocabs["pin"], np.arange(100) + 5000)
    np.testing.assert_allclose(np.linalg.norm(facet.tables["pin"], axis=1), 1.0, rtol=1e-5)
    # The saved tables reproduce the reported retrieval quality.
    scores = facet.tables["user"][pairs.eval_user] @ facet.tables["pin"].T
    pos = scores[np.arange(pairs.eval_pin.size), pairs.eval_pin]
    # Realistic rank (ties count one half), as retrieval_eval ranks.
    ties = (scores == pos[:, None]).sum(axis=1) - 1
    rank = 1 + (scores > pos[:, None]).sum(axis=1) + 0.5 * ties
    assert np.mean(rank <= 10) == pytest.approx(m["recall@10"], abs=0.02)
    assert facet.metrics["recall@10"] == pytest.approx(m["recall@10"])


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="export"):
        ct.ContrastiveConfig(export="both")
    with pytest.raises(ValueError, match="log_every and eval_every must be >= 0"):
        ct.ContrastiveConfig(log_every=-1)
    with pytest.raises(ValueError, match="log_every and eval_every must be >= 0"):
        ct.ContrastiveConfig(eval_every=-5)
    # Zero steps would write an untrained facet; None (not 0) means "from num_epochs".
    for bad in (0, -3):
        with pytest.raises(ValueError, match=rf"max_steps must be >= 1 or None .*got {bad}"):
            ct.ContrastiveConfig(max_steps=bad)
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="num_epochs must be a finite number > 0"):
            ct.ContrastiveConfig(num_epochs=bad)
    # Were accepted: NaN ended training with a FloatingPointError traceback, a negative
    # dense rate trained the towers up the loss (recall@10 0.005 against 0.21).
    for bad in (0.0, -0.1, math.nan, math.inf):
        with pytest.raises(ValueError, match=rf"temperature must be a finite number > 0, got {bad}"):
            ct.ContrastiveConfig(temperature=bad)
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError,
                           match=rf"dense_learning_rate must be a finite number >= 0, got {bad}"):
            ct.ContrastiveConfig(dense_learning_rate=bad)
    assert ct.ContrastiveConfig(dense_learning_rate=0.0).dense_learning_rate == 0.0
    # Was NumPy's "expected non-negative integer" (no name) at the first training step.
    with pytest.raises(ValueError, match=r"^seed must be >= 0, got -1$"):
        ct.ContrastiveConfig(seed=-1)
    # Was one message for both ('checkpoint_every must be >= 0 and keep_checkpoints >= 1,
    # got 0, 0'); the same words as the ranker's now.
    with pytest.raises(ValueError, match=r"^keep_checkpoints must be >= 1, got 0$"):
        ct.ContrastiveConfig(keep_checkpoints=0)
    with pytest.raises(ValueError,
                       match=r"^checkpoint_every must be >= 0 \(0: no checkpoints\), got -1$"):
        ct.ContrastiveConfig(checkpoint_every=-1)
    for bad in (0, -4):
        with pytest.raises(ValueError, match=rf"dim .*must be >= 1, got {bad}"):
            ct.ContrastiveConfig(dim=bad)
    for bad in ((), (0, 10), (-5,)):
        with pytest.raises(ValueError, match="eval_ks must list cut-offs >= 1"):
            ct.ContrastiveConfig(eval_ks=bad)
    assert ct.ContrastiveConfig(max_steps=None, num_epochs=0.5).max_steps is None
    assert ct.ContrastiveConfig(max_steps=1).max_steps == 1
    with pytest.raises(ValueError, match="batch_size 12 must divide by the 8"):
        ct.ContrastiveTrainer(config=ct.ContrastiveConfig(batch_size=12), num_users=4,
                              num_pins=4, mesh=global_mesh(devices=jax.devices()))


def _tiny_pairs(tmp_path):
    planted_world(tmp_path / "world", users=100, pins=40)
    return cd.load_pairs(cd.ContrastiveDataConfig(path=str(tmp_path / "world")))


def test_log_every_zero_never_logs(tmp_path, devices):
    # Used to raise ZeroDivisionError after the first step.
    cfg = ct.ContrastiveConfig(dim=8, batch_size=64, max_steps=3, eval_ks=(10,), log_every=0,
                               project=False, eval_loss_batches=1)
    m = ct.train_and_evaluate(pairs=_tiny_pairs(tmp_path), config=cfg,
                              workdir=tmp_path / "run", mesh=global_mesh(devices=devices[:2]),
                              save=False)
    assert m["steps"] == 3
    assert m["history"] == []
    assert math.isfinite(m["train_loss"])


def _nan_loss_at(monkeypatch, step: int) -> list:
    """Makes the trainer's `step`-th train step (1-based) report a NaN loss; returns
    the list that gets an item per step."""
    real_step = ct.ContrastiveTrainer.train_step
    calls = []

    def nan_at(self, batch):
        out = real_step(self, batch)
        calls.append(1)
        return {**out, "loss": float("nan")} if len(calls) == step else out

    monkeypatch.setattr(ct.ContrastiveTrainer, "train_step", nan_at)
    return calls


def test_non_finite_loss_stops_training(tmp_path, devices, monkeypatch):
    calls = _nan_loss_at(monkeypatch, 2)
    cfg = ct.ContrastiveConfig(dim=8, batch_size=64, max_steps=4, eval_ks=(10,), log_every=1,
                               project=False, eval_loss_batches=1)
    with pytest.raises(FloatingPointError, match="contrastive loss is nan at step 2"):
        ct.train_and_evaluate(pairs=_tiny_pairs(tmp_path), config=cfg,
                              workdir=tmp_path / "run",
                              mesh=global_mesh(devices=devices[:2]), save=False)
    assert len(calls) == 2


def test_an_error_during_training_leaves_a_complete_checkpoint(tmp_path, devices,
                                                               slow_checkpoint_finalize):
    """An error while a checkpoint is still being written reaches the caller only once
    the checkpoint is finished (no *.orbax-checkpoint-tmp-* folder left)."""
    from jax_recsys import checkpoint

    _nan_loss_at(slow_checkpoint_finalize, 3)
    cfg = ct.ContrastiveConfig(dim=8, batch_size=64, max_steps=4, eval_ks=(10,), log_every=1,
                               project=False, eval_loss_batches=1, checkpoint_every=2)
    with pytest.raises(FloatingPointError, match="contrastive loss is nan at step 3"):
        ct.train_and_evaluate(pairs=_tiny_pairs(tmp_path), config=cfg,
                              workdir=tmp_path / "run",
                              mesh=global_mesh(devices=devices[:2]), save=False)
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["2"]
    with checkpoint.Checkpointer(ckpts) as ckpt:
        assert ckpt.restore_meta()["step"] == 2
        assert ckpt.restore_meta()["trainer"] == "pretrain_contrastive"


def test_load_pairs_real_dates_start_at_their_first_day_and_unjoinable_conversions_warn(
        tmp_path, caplog):
    # Timestamps of 2026 (days 20454..): the window "from the first day of the data"
    # read window_start 0 (days.min(initial=0)), and the no-pairs message "data has days
    # 0..20456". A conversions table without an items table was left out silently.
    t0 = 20454 * 86400
    (tmp_path / "interactions.csv").write_text(
        "user_id,item_id,timestamp\n"
        f"u_1,p_1,{t0 + 5}\nu_2,p_2,{t0 + 86400}\nu_1,p_2,{t0 + 2 * 86400}\n")
    (tmp_path / "conversions.csv").write_text(f"user_id,advertiser_id,timestamp\nu_1,a_1,{t0}\n")
    with caplog.at_level("WARNING"):
        pairs = cd.load_pairs(cd.ContrastiveDataConfig(path=str(tmp_path), table="interactions"))
    assert (pairs.stats["window_start"], pairs.stats["window_end"]) == (20454, 20456)
    assert pairs.stats["conversion_pairs"] == 0 and pairs.stats["train_pairs"] == 2
    assert "table 'conversions' is not used: conversions become pairs through the 'items' " \
           "table (advertiser_id -> item_id)" in caplog.text
    with pytest.raises(ValueError, match=r"for days \[20457, 20458\) \(data has days "
                                         r"20454\.\.20456\)"):
        cd.load_pairs(cd.ContrastiveDataConfig(path=str(tmp_path), table="interactions",
                                               window="", window_start=20457, window_end=20458))


def test_pretrain_contrastive_takes_the_conversions_own_column_names(tmp_path):
    # configs/contrastive.py had no key for the advertiser column, so a user's own
    # names ("adv") ended with "table 'conversions' lacks column(s) ['advertiser_id']".
    import json
    import subprocess
    import sys

    import mp_util

    (tmp_path / "clicks.csv").write_text("uid,pin,day\n" + "".join(
        f"u{i % 5},p{i % 7},{i % 3}\n" for i in range(60)))
    (tmp_path / "buys.csv").write_text("uid,adv,day\nu1,a1,0\nu2,a2,1\nu3,a9,1\n")
    (tmp_path / "catalog.csv").write_text("pin,adv\n" + "".join(
        f"p{j},a{j % 3}\n" for j in range(7)))
    proc = subprocess.run(
        [sys.executable, "-m", "launch.pretrain_contrastive",
         "--config=configs/contrastive.py:smoke", f"--config.data.path={tmp_path}",
         f"--workdir={tmp_path / 'run'}", "--config.data.table=clicks",
         "--config.data.user_column=uid", "--config.data.item_column=pin",
         "--config.data.conversions_table=buys", "--config.data.items_table=catalog",
         "--config.data.advertiser_column=adv", "--config.train.max_steps=1"],
        cwd=mp_util.REPO, env=mp_util.child_env(1), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "run" / "metrics.json").read_text())["data"]
    assert (data["conversion_pairs"], data["conversions_without_pins"]) == (2, 1)
    assert data["train_pairs"] == data["engagement_pairs"] + 2
