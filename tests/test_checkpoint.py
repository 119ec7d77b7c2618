"""Tests for jax_recsys.checkpoint: Orbax save/restore, cross-mesh restore, facets."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jax_recsys import checkpoint


def _mesh(n):
    return jax.make_mesh(
        (n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:n]
    )


def _state(mesh):
    rows = jax.device_put(
        jnp.arange(16 * 4, dtype=jnp.float32).reshape(16, 4) / 7, NamedSharding(mesh, P("data"))
    )
    slot = jax.device_put(jnp.linspace(0, 1, 16, dtype=jnp.float32), NamedSharding(mesh, P("data")))
    params = {"w": jnp.full((3, 2), 0.5, jnp.float32), "b": jnp.array([1.0, -2.0])}
    opt_state = optax.adam(1e-3).init(params)
    return {
        "emb": {"tables": {"user": rows}, "slots": {"user": {"acc": slot}}},
        "params": params,
        "opt_state": opt_state,
        "step": jnp.array(7, jnp.int32),
    }


def _assert_tree_equal(a, b):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_save_restore_exact_with_meta_and_vocabs(tmp_path, devices):
    mesh = _mesh(8)
    state = _state(mesh)
    meta = {"data": {"epoch": 1, "position": 96, "seed": 3}, "config": {"lr": 0.1}}
    vocabs = {"user": np.array([10, 3, 99], np.int64), "pin": np.array(["a", "", "ünï", "pin/7"])}
    ck = checkpoint.Checkpointer(tmp_path / "ck", keep=2, async_save=True)
    assert ck.latest_step() is None
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        ck.restore()
    assert ck.save(7, state, meta, vocabs=vocabs)
    ck.wait()
    assert ck.latest_step() == 7
    got, got_meta = ck.restore(target=checkpoint.abstract_like(state))
    _assert_tree_equal(got, state)
    # The optax state keeps its namedtuple structure when a target is given.
    assert isinstance(got["opt_state"][0], optax.ScaleByAdamState)
    assert got["emb"]["tables"]["user"].sharding.spec == P("data")
    assert got_meta == meta
    v = ck.restore_vocabs(7)
    np.testing.assert_array_equal(v["user"], vocabs["user"])
    np.testing.assert_array_equal(v["pin"], vocabs["pin"])
    assert v["pin"].dtype.kind == "U"
    ck.close()


def test_keep_and_interval(tmp_path):
    ck = checkpoint.Checkpointer(tmp_path, keep=2, save_interval_steps=2, async_save=False)
    tree = {"x": np.arange(3.0)}
    saved = [ck.save(s, {"x": tree["x"] + s}, {"s": s}) for s in range(1, 7)]
    # Orbax always writes the first checkpoint, then every 2nd step.
    assert saved == [True, True, False, True, False, True]
    assert ck.save(7, tree, {}, force=True)
    assert ck.all_steps() == [6, 7]
    state, meta = ck.restore(6)
    np.testing.assert_array_equal(state["x"], np.arange(3.0) + 6)
    assert meta == {"s": 6}
    with pytest.raises(FileNotFoundError, match="step 2"):
        ck.restore(2)
    assert ck.restore_vocabs() == {}
    with pytest.raises(ValueError, match="JSON"):
        ck.save(8, tree, {"bad": object()})
    ck.close()


@pytest.mark.parametrize("kw, needle", [
    ({"keep": 0}, "keep must be an int >= 1 or None, got 0"),
    ({"save_interval_steps": 0}, "save_interval_steps must be an int >= 1, got 0"),
    ({"save_interval_steps": -2}, "save_interval_steps must be an int >= 1, got -2"),
])
def test_keep_and_interval_below_one_are_refused(tmp_path, kw, needle):
    """keep=0 deleted every checkpoint once written (save returned True, all_steps() was
    []), save_interval_steps=0 was a ZeroDivisionError, -2 saved every other step."""
    with pytest.raises(ValueError, match=needle):
        checkpoint.Checkpointer(tmp_path / "c", async_save=False, **kw)
    assert not (tmp_path / "c").exists()


def test_interrupted_save_is_ignored_and_cleaned(tmp_path):
    ck = checkpoint.Checkpointer(tmp_path, async_save=False)
    ck.save(3, {"x": np.arange(4)}, {"data": {"position": 12}})
    ck.close()
    # What a process killed in the middle of saving step 5 leaves behind.
    partial = tmp_path / "5.orbax-checkpoint-tmp-1234567"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "junk").write_bytes(b"x" * 10)
    ck = checkpoint.Checkpointer(tmp_path, async_save=False)
    assert ck.latest_step() == 3
    state, meta = ck.restore()
    np.testing.assert_array_equal(state["x"], np.arange(4))
    assert meta == {"data": {"position": 12}}
    # The resumed run's next save waits for the background clean-up of the partial folder.
    ck.save(5, {"x": np.arange(4) + 1}, {"data": {"position": 20}})
    assert not partial.exists()
    assert ck.all_steps() == [3, 5]
    ck.close()


def test_leaving_a_with_block_by_an_error(tmp_path, slow_checkpoint_finalize, caplog):
    """An error in the block waits for the save being written (then re-raises it, not an
    error of the save, which is logged); Ctrl-C does not wait (launch.common.run does,
    at most 30 s)."""
    import time

    with pytest.raises(RuntimeError, match="in the block"):
        with checkpoint.Checkpointer(tmp_path / "a") as ck:
            ck.save(1, {"x": np.arange(3)})
            raise RuntimeError("in the block")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["1"]
    with pytest.raises(RuntimeError, match="in the block"):
        with checkpoint.Checkpointer(tmp_path / "b") as ck:
            ck.save(1, {"x": np.arange(3)})
            slow_checkpoint_finalize.setattr(ck._mgr, "wait_until_finished",
                                             lambda: 1 / 0)
            raise RuntimeError("in the block")
    assert "closing the checkpoints after an error failed too" in caplog.text
    assert "ZeroDivisionError" in caplog.text
    with pytest.raises(KeyboardInterrupt):
        with checkpoint.Checkpointer(tmp_path / "c") as ck:
            ck.save(1, {"x": np.arange(3)})
            t0 = time.monotonic()
            raise KeyboardInterrupt
    assert time.monotonic() - t0 < 0.9  # the 1 s finalisation still runs
    slow_checkpoint_finalize.undo()
    ck.close()
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["1"]


def test_a_folder_that_cannot_be_written_is_refused_before_any_save(read_only_dir):
    """A read-only checkpoint folder used to fail only at the first save, inside Orbax's
    background threads: tracebacks, and the process hung for 5 minutes after its error
    line (threads waiting for the signal of the one that failed)."""
    with pytest.raises(PermissionError, match=r"/read_only: cannot write checkpoints there "
                       r"\(a read-only file system or no write permission\)"):
        checkpoint.Checkpointer(read_only_dir)


def test_a_save_that_fails_to_write_ends_in_one_line(tmp_path, monkeypatch, caplog):
    """A full disk failed an async save in Orbax's writer threads: the next save raised
    tensorstore's 'RESOURCE_EXHAUSTED: Error writing "emb.tables.user/0.0" in OCDBT
    database at local file ...' (and Orbax logged four tracebacks). Now: one OSError
    naming the folder, the step, the free space and the step a rerun resumes from."""
    import logging

    ck = checkpoint.Checkpointer(tmp_path / "ck", keep=2)
    ck.save(1, {"w": np.ones(3)})
    ck.wait()
    started = []
    ts_error = ValueError(
        'RESOURCE_EXHAUSTED: Error writing "w/0.0" in OCDBT database at local file '
        f'"{tmp_path}/ck/2.orbax-checkpoint-tmp/state/": Failed to write 33515 bytes to '
        "file 14: No space left on device [os_error_code='28']")

    def wait_until_finished():  # as Orbax's, once the writer threads of step 2 failed
        if started:
            raise ts_error

    monkeypatch.setattr(ck._mgr, "save", lambda step, **kw: started.append(step) or True)
    monkeypatch.setattr(ck._mgr, "wait_until_finished", wait_until_finished)
    assert ck.save(2, {"w": np.ones(3)})
    with pytest.raises(OSError, match=r"/ck: writing the checkpoint of step 2 failed: no space "
                       r"left on the device \([\d.]+ MiB free\); free some space \(or keep "
                       r"fewer checkpoints\), then rerun to resume from step 1$"):
        ck.save(3, {"w": np.ones(3)})
    ck.close()  # the failure was raised already: closing does not raise it again
    # Orbax's own error logs keep their line but lose the traceback.
    with caplog.at_level(logging.ERROR, logger="absl"):
        from absl import logging as absl_logging
        record = logging.LogRecord("absl", logging.ERROR, "/x/orbax/checkpoint/f.py", 1,
                                   "save failed", (), (ValueError, ts_error, None))
        absl_logging.get_absl_logger().handle(record)
    assert record.exc_info is None and caplog.records[-1].getMessage() == "save failed"


def test_ctrl_c_during_the_blocking_part_of_a_save_keeps_that_save(tmp_path, monkeypatch):
    """Ctrl-C while Orbax's save was still in the caller's thread lost that step (its
    folder stayed *.orbax-checkpoint-tmp): a rerun resumed one interval earlier."""
    import os
    import signal

    ck = checkpoint.Checkpointer(tmp_path / "ck")
    save = ck._mgr.save

    def interrupted_save(*args, **kwargs):  # Ctrl-C arrives while Orbax prepares the save
        os.kill(os.getpid(), signal.SIGINT)
        return save(*args, **kwargs)

    monkeypatch.setattr(ck._mgr, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        ck.save(5, {"w": np.arange(4.0)}, {"step": 5})
    ck.close()
    assert ck.all_steps() == [5]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_restore_onto_other_meshes(tmp_path, devices):
    """Saved row-sharded over 8 devices; restored on 4, on 1, and replicated."""
    state = _state(_mesh(8))
    ck = checkpoint.Checkpointer(tmp_path, async_save=False)
    ck.save(1, state, {})
    for n, spec in [(4, P("data")), (1, P("data")), (4, P())]:
        mesh = _mesh(n)
        target = checkpoint.abstract_like(state, NamedSharding(mesh, spec))
        got, _ = ck.restore(1, target=target)
        _assert_tree_equal(got, state)
        user = got["emb"]["tables"]["user"]
        assert user.sharding.mesh.devices.size == n
        assert user.sharding.spec == spec
        if spec == P("data"):
            assert user.addressable_shards[0].data.shape == (16 // n, 4)
        else:
            assert all(s.data.shape == (16, 4) for s in user.addressable_shards)
    ck.close()


@pytest.mark.parametrize("damage", ["no state", "cut data", "empty meta"])
def test_a_damaged_step_folder_is_named_with_the_step_to_resume_from(tmp_path, damage):
    """A step folder damaged after Orbax committed it (a copy of the workdir that did not
    finish) ended the resume with Orbax's traceback (KeyError 'Item "state" was not
    found', 'Encountered error while reading array index', a JSONDecodeError)."""
    # Large enough for files of its own (a few bytes go into the index).
    state = {"w": jnp.asarray(np.random.default_rng(0).random((256, 64)), jnp.float32)}
    with checkpoint.Checkpointer(tmp_path / "ck", keep=3) as ck:
        ck.save(1, state, {"step": 1})
        ck.save(2, state, {"step": 2})
    folder = tmp_path / "ck" / "2"
    if damage == "no state":
        shutil.rmtree(folder / "state")
    elif damage == "cut data":
        for f in (folder / "state").glob("ocdbt.process_*/d/*"):
            f.write_bytes(f.read_bytes()[:5])
    else:
        (folder / "meta" / "metadata").write_text("")
    with checkpoint.Checkpointer(tmp_path / "ck", keep=3) as ck:
        with pytest.raises(ValueError, match=r"/ck/2: this checkpoint cannot be read, it is "
                           r"damaged or incomplete \(.+\); delete that folder to resume from "
                           r"step 1$"):
            ck.restore_meta()
            ck.restore(target=checkpoint.abstract_like(state))
        got, meta = ck.restore(1, target=checkpoint.abstract_like(state))
    assert meta == {"step": 1}
    np.testing.assert_array_equal(np.asarray(got["w"]), np.asarray(state["w"]))


def test_restore_refuses_a_target_of_another_shape(tmp_path):
    """NumPy and unsharded targets would come back in the saved shape: refused by name."""
    ck = checkpoint.Checkpointer(tmp_path / "ck", async_save=False)
    ck.save(1, {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(2, np.float32)})
    targets = [
        {"w": np.zeros((3, 2), np.float32), "b": np.zeros(2, np.float32)},
        {"w": jax.ShapeDtypeStruct((5, 4), np.float32),
         "b": jax.ShapeDtypeStruct((2,), np.float32)},
    ]
    for target, want in zip(targets, ["(3, 2)", "(5, 4)"], strict=True):
        with pytest.raises(ValueError) as e:
            ck.restore(1, target=target)
        msg = str(e.value)
        assert f"{tmp_path / 'ck'}/1" in msg and "['w']" in msg
        assert f"saved shape (3, 4) but this run expects {want}" in msg
        assert "fresh workdir" in msg
    got, _ = ck.restore(1, target={"w": np.zeros((3, 4), np.float32), "b": np.zeros(2, np.float32)})
    np.testing.assert_array_equal(got["w"], np.arange(12, dtype=np.float32).reshape(3, 4))
    ck.close()


def test_a_checkpoint_of_another_trainer_is_refused_naming_both(tmp_path):
    """The trainer that saved a checkpoint is recorded in its meta: one of another
    trainer (a workdir shared by two launchers) is refused by restore_meta and restore,
    whatever keys its meta has."""
    state = {"x": np.arange(3, dtype=np.float32)}
    with checkpoint.Checkpointer(tmp_path / "ck", async_save=False,
                                 trainer="pretrain_kg") as ck:
        ck.save(4, state, {"step": 4, "num_pairs": 9})  # (a key of the contrastive trainer's)
    with checkpoint.Checkpointer(tmp_path / "ck", trainer="pretrain_kg") as ck:
        assert ck.restore_meta() == {"step": 4, "num_pairs": 9, "trainer": "pretrain_kg"}
        got, meta = ck.restore(target=state)
        np.testing.assert_array_equal(got["x"], [0.0, 1.0, 2.0])
        assert meta["trainer"] == "pretrain_kg"
    want = (f"{tmp_path / 'ck'}/4: a pretrain_kg checkpoint, not a train_ranker one (the "
            "workdir holds another trainer's checkpoints): give train_ranker its own workdir")
    with checkpoint.Checkpointer(tmp_path / "ck", trainer="train_ranker") as ck:
        for read in (ck.restore_meta, lambda: ck.restore(target=state)):
            with pytest.raises(ValueError) as e:
                read()
            assert str(e.value) == want
    with checkpoint.Checkpointer(tmp_path / "ck") as ck:  # no trainer: not checked
        assert ck.restore_meta()["step"] == 4
    with pytest.raises(ValueError, match=r"trainer must be one of \('pretrain_kg', "
                       r"'pretrain_contrastive', 'train_ranker'\) or None, got 'kg'"):
        checkpoint.Checkpointer(tmp_path / "ck", trainer="kg")


@pytest.mark.parametrize("meta, saved_by", [
    ({"step": 2, "num_train_triples": 40}, "pretrain_kg"),
    ({"step": 2, "num_pairs": 40}, "pretrain_contrastive"),
    ({"step": 2, "loss_curve": []}, "train_ranker"),
    ({"step": 2}, None)])
def test_a_checkpoint_saved_without_its_trainer_is_told_by_its_keys(tmp_path, meta, saved_by):
    """Checkpoints saved before the trainer was recorded: the key only one trainer saves
    says whose it is; a meta with none of them resumes in any trainer."""
    with checkpoint.Checkpointer(tmp_path / "ck", async_save=False) as ck:
        ck.save(2, {"x": np.zeros(2, np.float32)}, meta)
    for trainer in checkpoint.TRAINERS:
        with checkpoint.Checkpointer(tmp_path / "ck", trainer=trainer) as ck:
            if saved_by in (None, trainer):
                assert ck.restore_meta() == meta
            else:
                with pytest.raises(ValueError) as e:
                    ck.restore_meta()
                assert str(e.value) == (
                    f"{tmp_path / 'ck'}/2: a {saved_by} checkpoint, not a {trainer} one (the "
                    f"workdir holds another trainer's checkpoints): give {trainer} its own "
                    "workdir")


def test_empty_vocabularies_round_trip(tmp_path):
    ck = checkpoint.Checkpointer(tmp_path / "ck", async_save=False)
    vocabs = {"ints": np.array([], np.int64), "uints": np.array([], np.uint32),
              "strs": np.array([], np.str_), "one": np.array([7], np.int64)}
    ck.save(1, {"w": np.zeros(2, np.float32)}, {"k": 1}, vocabs=vocabs)
    got = ck.restore_vocabs(1)
    for name in ("ints", "uints"):
        assert got[name].dtype == np.int64 and got[name].shape == (0,), name
    assert got["strs"].dtype.kind == "U" and got["strs"].shape == (0,)
    np.testing.assert_array_equal(got["one"], [7])
    ck.close()


def test_abstract_like_per_leaf_shardings():
    mesh = _mesh(2)
    tree = {"a": jnp.zeros((4, 2)), "n": np.zeros(3, np.int32), "k": 5}
    sh = {"a": NamedSharding(mesh, P("data")), "n": None, "k": None}
    out = checkpoint.abstract_like(tree, sh)
    assert out["a"].sharding == NamedSharding(mesh, P("data"))
    assert out["n"].shape == (3,) and out["n"].dtype == np.int32
    assert out["k"] == 5
    with pytest.raises(ValueError, match="leaves"):
        checkpoint.abstract_like(tree, {"a": None, "n": None})


def test_facet_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    tables = {
        "user": rng.standard_normal((5, 3)).astype(np.float32),
        "pin": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32),
    }
    vocabs = {"user": np.array([5, 1, 2, 9, 4]), "pin": np.array(["p0", "p1", "x", "y"], object)}
    path = checkpoint.save_facet(
        tmp_path / "cl", facet="cl", tables=tables, vocabs=vocabs, metrics={"recall@10": 0.25}
    )
    f = checkpoint.load_facet(path)
    assert f.facet == "cl" and f.metrics == {"recall@10": 0.25}
    np.testing.assert_array_equal(f.tables["user"], tables["user"])
    np.testing.assert_array_equal(f.tables["pin"], np.asarray(tables["pin"]))
    assert f.vocabs["user"].dtype == np.int64
    np.testing.assert_array_equal(f.vocabs["user"], [5, 1, 2, 9, 4])
    np.testing.assert_array_equal(f.vocabs["pin"], ["p0", "p1", "x", "y"])
    # Saving again replaces it atomically and leaves no temporary folders behind.
    checkpoint.save_facet(path, facet="cl", tables={"user": tables["user"] * 2},
                          vocabs={"user": vocabs["user"]})
    f2 = checkpoint.load_facet(path)
    assert set(f2.tables) == {"user"}
    np.testing.assert_array_equal(f2.tables["user"], tables["user"] * 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cl"]


def test_load_facet_checks_the_expected_facet(tmp_path):
    """A KG facet given where a contrastive one is expected is refused, naming both."""
    path = checkpoint.save_facet(tmp_path / "kg", facet="kg", tables={"user": np.ones((2, 3))},
                                 vocabs={"user": np.array([1, 2])})
    assert checkpoint.load_facet(path, expected="kg").facet == "kg"
    assert checkpoint.load_facet(path).facet == "kg"
    with pytest.raises(ValueError, match=r"/kg is a 'kg' facet checkpoint, but a 'cl' facet "
                       r"was expected"):
        checkpoint.load_facet(path, expected="cl")


def test_facet_bad_input_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="'user'.*5 rows but vocab has 2"):
        checkpoint.save_facet(tmp_path / "kg", facet="kg",
                              tables={"user": np.zeros((5, 2))}, vocabs={"user": np.arange(2)})
    assert list(tmp_path.iterdir()) == []
    # Hashed 64-bit unsigned ids above int64 would wrap negative: refused, not stored.
    big = np.array([2**64 - 1, 12345678901234567890], np.uint64)
    with pytest.raises(ValueError, match="18446744073709551615 does not fit int64"):
        checkpoint.save_facet(tmp_path / "kg", facet="kg",
                              tables={"user": np.zeros((2, 2))}, vocabs={"user": big})
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError, match="facet.json"):
        checkpoint.load_facet(tmp_path / "kg")


def test_a_facet_that_does_not_fit_on_the_disk_is_named(tmp_path, monkeypatch):
    """A full disk ended a finished pretraining run with numpy's bare "24000 requested
    and 4064 written"; now the message names the facet folder and the free space, and
    the facet already there is left as it was."""
    path = tmp_path / "facet_cl"
    checkpoint.save_facet(path, facet="cl", tables={"user": np.ones((4, 2), np.float32)},
                          vocabs={"user": np.arange(4)})
    real_save, calls = np.save, []

    def short_write(file, arr, **kw):  # what np.save raises when the disk fills mid-file
        calls.append(file)
        if len(calls) == 2:
            raise OSError("24000 requested and 4064 written")
        real_save(file, arr, **kw)

    monkeypatch.setattr(np, "save", short_write)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 100))
    with pytest.raises(OSError, match=r"/facet_cl: could not write the 'cl' facet \(24000 "
                       r"requested and 4064 written\): the disk is full \(0\.0 MiB free, the "
                       r"facet needs about 0\.1 MiB\)"):
        checkpoint.save_facet(path, facet="cl", tables={"user": np.zeros((1000, 16), np.float32)},
                              vocabs={"user": np.arange(1000)})
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["facet_cl"]  # no temporary folder left
    np.testing.assert_array_equal(checkpoint.load_facet(path).tables["user"], np.ones((4, 2)))


def test_facet_of_entity_types_that_are_not_file_names(tmp_path):
    """Entity types come from a graph's entity_types.tsv (Freebase spells them
    '/people/person'). '/people/person' and 'a/b' failed to save (FileNotFoundError,
    the first under the root folder); '../../evil' wrote its table outside the facet
    folder, then its vocabulary over that table, and the facet did not load."""
    names = ["/people/person", "a/b", "../../evil", "..", "User", "user", "pin"]
    wd = tmp_path / "wd"
    tables = {n: np.full((2, 3), i, np.float32) for i, n in enumerate(names)}
    vocabs = {n: np.array([10 * i, 10 * i + 1]) for i, n in enumerate(names)}
    path = checkpoint.save_facet(wd / "kg", facet="kg", tables=tables, vocabs=vocabs)
    f = checkpoint.load_facet(path)
    assert sorted(f.tables) == sorted(names)
    for i, n in enumerate(names):
        np.testing.assert_array_equal(f.tables[n], np.full((2, 3), i))
        np.testing.assert_array_equal(f.vocabs[n], [10 * i, 10 * i + 1])
    assert sorted(p.name for p in wd.iterdir()) == ["kg"]
    # _<index in sorted order>; 'User' and 'user' would share a file on macOS
    assert sorted(p.name for p in (path / "tables").iterdir()) == [
        "_0.npy", "_1.npy", "_2.npy", "_3.npy", "_4.npy", "_6.npy", "pin.npy"]


@pytest.mark.parametrize("meta", [
    [1],
    {"format_version": 1, "facet": "cl"},
    {"format_version": 1, "facet": "cl", "tables": {"user": {"rows": 3}}},
    {"format_version": 1, "tables": {}},
])
def test_damaged_facet_json_is_named(tmp_path, meta):
    """A facet.json without its fields was a KeyError/AttributeError traceback
    ('tables', 'table', 'list' object has no attribute 'get') naming no file."""
    (tmp_path / "facet.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"facet\.json: (damaged|not a facet description)"):
        checkpoint.load_facet(tmp_path)


def test_tensorstore_calls_into_a_closed_event_loop_print_nothing(tmp_path, monkeypatch):
    """A full disk printed 'RuntimeError: Event loop is closed' tracebacks around and
    after the one-line error: tensorstore writes still running when Orbax's writer
    thread had failed and closed its event loop call `call_soon_threadsafe` on it as
    they end (an unraisable exception). The same as on a full disk, with a tensorstore
    promise kept open past the loop; other unraisable exceptions still print."""
    import asyncio
    import sys

    import tensorstore as ts

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    monkeypatch.delenv("JAX_RECSYS_TRACEBACK", raising=False)
    checkpoint.Checkpointer(tmp_path / "ck").close()  # installs the hook

    def end_a_write_after_its_loop_closed():
        promise, write = ts.Promise.new()

        async def writer():
            await write

        loop = asyncio.new_event_loop()
        task = loop.create_task(writer())
        task._log_destroy_pending = False  # (asyncio's own note of the pending task)
        loop.run_until_complete(asyncio.sleep(0.01))  # the writer awaits the write
        loop.close()
        promise.set_result(None)  # tensorstore: loop.call_soon_threadsafe(...)

    end_a_write_after_its_loop_closed()
    other = RuntimeError("Event loop is closed")
    sys.unraisablehook(type("U", (), {"exc_type": RuntimeError, "exc_value": other,
                                      "exc_traceback": None, "err_msg": None,
                                      "object": None})())
    assert [u.exc_value for u in seen] == [other]
    monkeypatch.setenv("JAX_RECSYS_TRACEBACK", "1")
    end_a_write_after_its_loop_closed()
    assert [str(u.exc_value) for u in seen] == ["Event loop is closed"] * 2
    assert seen[1].exc_traceback.tb_frame.f_code.co_name == "call_soon_threadsafe"


def test_a_step_folder_that_cannot_be_created_leaves_no_thread_waiting(tmp_path, monkeypatch):
    """When creating a step's folder failed (no space or inode left on the disk, a folder
    made read-only since the start), the save's other threads kept waiting for its
    signal until Orbax's 300 s coordination timeout: the process exited 5 minutes after
    its one-line error. Now they end with the failure, their parts never run (and
    closed: no 'coroutine ... was never awaited' warnings)."""
    import errno
    import gc
    import threading
    import warnings

    from orbax.checkpoint._src.futures import future
    from orbax.checkpoint._src.path import async_path

    mkdir = async_path.mkdir

    async def no_space(path, *args, **kwargs):
        if path.name.endswith(".orbax-checkpoint-tmp"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return await mkdir(path, *args, **kwargs)

    monkeypatch.setattr(async_path, "mkdir", no_space)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ck = checkpoint.Checkpointer(tmp_path / "ck")
        ck.save(1, {"w": np.ones(3), "b": np.zeros(2)}, {"a": 1})
        with pytest.raises(OSError, match=r"/ck: writing the checkpoint of step 1 failed: no "
                           r"space left on the device \([\d.]+ MiB free\); free some space "
                           r"\(or keep fewer checkpoints\), then rerun to start over$"):
            ck.wait()
        waiting = [t.name for t in threading.enumerate()
                   if isinstance(t, future._SignalingThread)]
        ck.close()
        del ck
        gc.collect()
    assert waiting == []
    assert [str(w.message) for w in caught if "never awaited" in str(w.message)] == []
    assert not (tmp_path / "ck" / "1").exists()
