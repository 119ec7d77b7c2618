"""Resuming the pretraining trainers: data positions, restores onto other meshes, SIGKILL.

The batch schedules are pure functions of (seed, step), so a resumed run reads the
batches an uninterrupted run reads; `restore_train_state` puts a checkpoint onto a
mesh of another size (8 -> 4 -> 1 devices, 2 processes -> 1); and a real 2-process
`launch.pretrain_contrastive` killed with SIGKILL after its first checkpoints resumes
in 1 process and ends with the metrics of an uninterrupted 1-process run.
"""

import dataclasses
import os
import shutil
import signal
import types

import jax
import mp_util
import numpy as np
import pytest

from jax_recsys import checkpoint
from jax_recsys.data.kg import KnowledgeGraph
from jax_recsys.data.vocab import Vocab
from jax_recsys.embedding import specs
from jax_recsys.pretrain import contrastive_data as cd, contrastive_train as ct, kg_train


def _mesh(n):
    return jax.sharding.Mesh(np.array(jax.devices()[:n]), ("data",))


# ----------------------------------------------------------------------------- data positions


def test_pair_schedule_is_a_function_of_seed_and_step():
    s = cd.PairSchedule(num_pairs=10, batch_size=4, seed=3)
    assert s.steps_per_epoch == 2  # the last 10 mod 4 = 2 pairs of each epoch are skipped
    assert s.position(0) == {"epoch": 0, "step_in_epoch": 0}
    assert s.position(5) == {"epoch": 2, "step_in_epoch": 1}
    perm2 = np.random.default_rng([3, 2]).permutation(10)
    np.testing.assert_array_equal(s.indices(5), perm2[4:8])
    # Process slices are contiguous quarters / halves of the global batch.
    np.testing.assert_array_equal(s.indices(5, process_index=1, process_count=2), perm2[6:8])
    halves = [s.indices(3, process_index=i, process_count=2) for i in range(2)]
    np.testing.assert_array_equal(np.concatenate(halves), s.indices(3))
    # One epoch visits distinct pairs; epochs are shuffled differently.
    ep = np.concatenate([s.indices(2), s.indices(3)])
    assert len(set(ep.tolist())) == 8
    assert not np.array_equal(s.permutation(0), s.permutation(1))
    # Fewer pairs than a batch: one padded batch per epoch.
    small = cd.PairSchedule(num_pairs=3, batch_size=4, seed=0)
    idx = small.indices(7)
    assert sorted(idx.tolist()) == [-1, 0, 1, 2]
    with pytest.raises(ValueError, match="must divide by the 3 processes"):
        s.indices(0, process_count=3)


def test_contrastive_step_batches_are_reproducible():
    """A step's batch, uniform negatives included, depends on (seed, step) only: a
    restarted trainer (another instance) builds the same one."""
    rng = np.random.default_rng(0)
    pairs = types.SimpleNamespace(train_user=rng.integers(0, 30, 50),
                                  train_pin=rng.integers(0, 20, 50),
                                  train_weight=rng.uniform(0.5, 2.0, 50))
    schedule = cd.PairSchedule(num_pairs=50, batch_size=16, seed=4)

    def trainer():
        cfg = ct.ContrastiveConfig(dim=4, batch_size=16, uniform_negatives=3, seed=4)
        return ct.ContrastiveTrainer(config=cfg, num_users=30, num_pins=20, mesh=_mesh(1))

    a, b = trainer(), trainer()
    x, y = a.step_batch(pairs, schedule, 4), b.step_batch(pairs, schedule, 4)
    idx = schedule.indices(4)
    np.testing.assert_array_equal(x.ids["user_id"], pairs.train_user[idx])
    np.testing.assert_array_equal(x.ids["pin_id"], pairs.train_pin[idx])
    np.testing.assert_allclose(x.labels["weight"], pairs.train_weight[idx])
    for k in x.ids:
        np.testing.assert_array_equal(x.ids[k], y.ids[k], err_msg=k)
    assert x.ids["neg_pin_id"].shape == (16, 3) and x.ids["neg_pin_id"].max() < 20
    z = a.step_batch(pairs, schedule, 5)
    assert not np.array_equal(z.ids["neg_pin_id"], x.ids["neg_pin_id"])
    np.testing.assert_array_equal(x.dense["neg_log_q"], a.pin_log_q[x.ids["neg_pin_id"]])


def _graph(seed=0, users=40, pins=48, boards=4, per_user=5):
    """Users like pins of their board; pins sit on boards (two entity-type pairs)."""
    rng = np.random.default_rng(seed)
    pin_board = np.arange(pins) % boards
    user_board = rng.integers(0, boards, users)
    likes = np.array([(u, 0, p) for u in range(users)
                      for p in rng.choice(np.flatnonzero(pin_board == user_board[u]),
                                          per_user, replace=False)])
    on_board = np.stack([np.arange(pins), np.ones(pins, int), pin_board], 1)
    n_test = len(likes) // 8
    perm = rng.permutation(len(likes))
    num_rows = {"user": users, "pin": pins, "board": boards}
    return KnowledgeGraph(
        entity_types=tuple(sorted(num_rows)),
        vocabs={t: Vocab(np.arange(n)) for t, n in num_rows.items()},
        relations=("likes", "on_board"), rel_head_type=("user", "pin"),
        rel_tail_type=("pin", "board"),
        splits={"train": np.concatenate([likes[perm[n_test:]], on_board]),
                "test": likes[perm[:n_test]]})


def _likes_graph():
    """`_graph`'s likes only: one type pair, so one compiled step."""
    g = _graph()
    likes = g.splits["train"][g.splits["train"][:, 1] == 0]
    return KnowledgeGraph(entity_types=("pin", "user"),
                          vocabs={t: g.vocabs[t] for t in ("pin", "user")},
                          relations=("likes",), rel_head_type=("user",), rel_tail_type=("pin",),
                          splits={"train": likes})


def test_chunk_sampler_resumes_mid_epoch_and_slices_processes():
    g = _graph()
    cfg = kg_train.KGTrainConfig(chunk_size=4, uniform_negatives=3, chunks_per_batch=4, seed=5)
    s = kg_train.ChunkSampler(g.splits["train"], rel_head_type=g.rel_head_type,
                              rel_tail_type=g.rel_tail_type, num_rows=g.num_rows, config=cfg)
    full = list(s.epoch(1))
    assert len(full) == len(s) > 4
    # Skipping the first 3 batches (their random draws are still made) gives the rest.
    rest = list(s.epoch(1, start=3))
    assert len(rest) == len(full) - 3
    for a, b in zip(rest, full[3:], strict=True):
        assert a.ids.keys() == b.ids.keys()
        for k in a.ids:
            np.testing.assert_array_equal(a.ids[k], b.ids[k])
        np.testing.assert_array_equal(a.mask, b.mask)
    # Process p of 2 gets chunks [2p, 2p + 2) of every batch (chunk-major layout).
    parts = [list(s.epoch(1, start=2, process_index=p, process_count=2)) for p in range(2)]
    for i, whole in enumerate(full[2:]):
        for k, v in whole.ids.items():
            per_chunk = v.reshape(4, -1)
            for p in range(2):
                np.testing.assert_array_equal(parts[p][i].ids[k].reshape(2, -1),
                                              per_chunk[2 * p:2 * p + 2], err_msg=k)
        np.testing.assert_array_equal(
            np.concatenate([parts[0][i].mask, parts[1][i].mask]), whole.mask)
    with pytest.raises(ValueError, match="chunks_per_batch=4 must divide by the 3 processes"):
        next(s.epoch(0, process_count=3))


# ----------------------------------------------------------------------------- restores


def _cl_trainer(n):
    cfg = ct.ContrastiveConfig(dim=8, batch_size=16, temperature=0.2, project=False,
                               table_optimizer=specs.RowAdagrad(learning_rate=0.1), seed=1)
    # 42 users / 26 pins: the row padding differs on 8, 4 and 1 devices.
    return ct.ContrastiveTrainer(config=cfg, num_users=42, num_pins=26, mesh=_mesh(n),
                                 pin_freq=np.linspace(1, 2, 26) / np.linspace(1, 2, 26).sum())


def _cl_batch(tr, step):
    rng = np.random.default_rng(100 + step)
    return tr.make_batch(rng.integers(0, 42, 14), rng.integers(0, 26, 14), step=step)


@pytest.mark.slow
def test_contrastive_checkpoint_restores_onto_4_then_1_devices(tmp_path):
    """Tables, row-Adagrad slots, towers and Adam state survive 8 -> 4 -> 1 devices (with
    different row padding): the 1-device run's next two steps give the 8-device losses."""
    tr8 = _cl_trainer(8)
    for step in range(2):
        tr8.train_step(_cl_batch(tr8, step))
    with checkpoint.Checkpointer(tmp_path / "from8") as ck:
        ct.save_train_state(ck, 2, tr8.state, {"step": 2})
    ref = tr8.collection.export_tables(tr8.state.emb)
    ref_acc = {k: np.asarray(v["acc"]) for k, v in tr8.state.emb.slots.items()}
    ref_losses = [tr8.train_step(_cl_batch(tr8, step))["loss"] for step in (2, 3)]
    assert ref_losses[1] != ref_losses[0]

    src = tmp_path / "from8"
    for n, dst in ((4, tmp_path / "from4"), (1, None)):
        tr = _cl_trainer(n)
        with checkpoint.Checkpointer(src) as ck:
            tr.state, meta = ct.restore_train_state(ck, fresh=tr.state)
        assert meta["step"] == 2
        assert tr.state.emb.tables["user"].shape[0] != tr8.state.emb.tables["user"].shape[0] \
            or n == 4  # 42 rows: padded to 48 on 8 devices, 44 on 4, 42 on 1
        got = tr.collection.export_tables(tr.state.emb)
        for name in ("user", "pin"):
            np.testing.assert_array_equal(got[name], ref[name])
            rows = ref[name].shape[0]
            np.testing.assert_array_equal(np.asarray(tr.state.emb.slots[name]["acc"])[:rows],
                                          ref_acc[name][:rows])
        if dst is not None:  # re-save from 4 devices for the 1-device restore
            with checkpoint.Checkpointer(dst) as ck:
                ct.save_train_state(ck, 2, tr.state, {"step": 2})
            src = dst
    losses = [tr.train_step(_cl_batch(tr, step))["loss"] for step in (2, 3)]
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)


@pytest.mark.slow
def test_kg_resume_on_another_mesh_equals_uninterrupted(tmp_path):
    """A run that lost its last checkpoints (crash after step 4) resumes from step 4 on 4
    devices instead of 8 and ends like the uninterrupted run, across an epoch boundary."""
    g = _likes_graph()
    model = kg_train.KGModelConfig(model="distmult", dim=8)
    cfg = kg_train.KGTrainConfig(chunk_size=4, uniform_negatives=3, chunks_per_batch=8,
                                 num_epochs=3, max_steps=9, log_every=1, checkpoint_every=2,
                                 keep_checkpoints=10)
    sampler = kg_train.ChunkSampler(g.splits["train"], rel_head_type=g.rel_head_type,
                                    rel_tail_type=g.rel_tail_type, num_rows=g.num_rows,
                                    config=cfg)
    assert 4 < len(sampler) < 9  # the resumed part crosses into the next epoch

    def run(mesh_size, **kw):
        return kg_train.train(g, model=model, train_config=dataclasses.replace(cfg, **kw),
                              mesh=_mesh(mesh_size), log_fn=lambda d: None,
                              checkpoint_dir=tmp_path / "ck")

    ref = run(8)
    steps = sorted(int(p.name) for p in (tmp_path / "ck").iterdir() if p.name.isdigit())
    assert steps == [2, 4, 6, 8, 9]
    want = kg_train.entity_tables(ref)
    for s in (6, 8, 9):
        shutil.rmtree(tmp_path / "ck" / str(s))
    with pytest.raises(ValueError, match="belongs to another run"):
        run(8, seed=9)
    resumed = run(4)
    assert resumed.metrics["resumed_from_step"] == 4 and resumed.metrics["steps"] == 9
    assert resumed.metrics["positives"] == ref.metrics["positives"]

    def curve(res):
        return [(h["step"], h["loss"]) for h in res.history]

    assert [s for s, _ in curve(resumed)] == list(range(1, 10))
    np.testing.assert_allclose([v for _, v in curve(resumed)], [v for _, v in curve(ref)],
                               rtol=2e-5)
    got = kg_train.entity_tables(resumed)
    for t in want:
        np.testing.assert_allclose(got[t], want[t], rtol=1e-4, atol=1e-6, err_msg=t)


def test_kg_error_during_training_leaves_a_complete_checkpoint(tmp_path,
                                                               slow_checkpoint_finalize):
    """An error while a checkpoint is still being written reaches the caller only once
    the checkpoint is finished (no *.orbax-checkpoint-tmp-* folder left)."""
    g = _likes_graph()  # no compilation after the first step: the error comes at once
    cfg = kg_train.KGTrainConfig(chunk_size=4, uniform_negatives=3, chunks_per_batch=8,
                                 num_epochs=3, max_steps=9, log_every=1, checkpoint_every=2)

    def log(rec):
        if rec.get("step") == 3:
            raise RuntimeError("injected")

    with pytest.raises(RuntimeError, match="injected"):
        kg_train.train(g, model=kg_train.KGModelConfig(model="distmult", dim=8),
                       train_config=cfg, mesh=_mesh(2), log_fn=log,
                       checkpoint_dir=tmp_path / "ck")
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["2"]
    with checkpoint.Checkpointer(tmp_path / "ck") as ckpt:
        assert ckpt.restore_meta()["step"] == 2


def test_a_finished_kg_run_is_not_resumed_with_other_settings(tmp_path):
    """A rerun in the same workdir with another loss or learning rate was "resumed" at
    its last step: no training, and the old tables written as the new run's facet."""
    g = _likes_graph()
    model = kg_train.KGModelConfig(model="distmult", dim=8)
    cfg = kg_train.KGTrainConfig(chunk_size=4, uniform_negatives=3, chunks_per_batch=8,
                                 num_epochs=1, max_steps=2, log_every=0, checkpoint_every=2)

    def run(**kw):
        return kg_train.train(g, model=model, train_config=dataclasses.replace(cfg, **kw),
                              mesh=_mesh(2), log_fn=lambda d: None, checkpoint_dir=tmp_path / "ck")

    run()
    assert run().metrics["resumed_from_step"] == 2  # the same settings resume
    with pytest.raises(ValueError, match=r"belongs to another run \(saved vs now: \{'loss': "
                       r"\('softmax', 'logistic'\), 'relation_learning_rate': \(0.01, 0.5\)\}"):
        run(loss="logistic", relation_learning_rate=0.5)


def test_a_contrastive_checkpoint_of_other_settings_is_refused(tmp_path):
    pairs = types.SimpleNamespace(train_user=np.arange(4, dtype=np.int32),
                                  train_pin=np.arange(4, dtype=np.int32),
                                  train_weight=np.ones(4, np.float32))
    cfg = ct.ContrastiveConfig(dim=8, temperature=0.2)
    saved = {"seed": 0, **ct.training_settings(cfg, pairs)}
    ct.check_resume_meta(saved, {"seed": 0, **ct.training_settings(cfg, pairs)}, "ck/4")
    with pytest.raises(ValueError, match=r"ck/4: the checkpoint belongs to another run \(saved "
                       r"vs now: \{'temperature': \(0.2, 0.05\)\}\)"):
        ct.check_resume_meta(saved, {"seed": 0, **ct.training_settings(
            dataclasses.replace(cfg, temperature=0.05), pairs)}, "ck/4")
    pairs.train_weight = np.full(4, 2.0, np.float32)  # e.g. another conversion_weight
    with pytest.raises(ValueError, match="'train_pairs_digest'"):
        ct.check_resume_meta(saved, {"seed": 0, **ct.training_settings(cfg, pairs)}, "ck/4")
    # A checkpoint saved before these settings were recorded still resumes.
    ct.check_resume_meta({"seed": 0}, {"seed": 0, **ct.training_settings(cfg, pairs)}, "ck/4")
    with pytest.raises(ValueError, match=r"\{'seed': \(0, 1\)\}"):
        ct.check_resume_meta({"seed": 0}, {"seed": 1, **ct.training_settings(cfg, pairs)}, "ck/4")


def test_a_checkpoint_of_another_trainer_is_named(tmp_path):
    """pretrain_kg then pretrain_contrastive in one workdir: the KG checkpoint was refused
    as "another run" with a diff of keys the KG trainer never saves. Each trainer records
    its name in the meta; the other's is refused before its settings are compared."""
    g = _likes_graph()
    cfg = kg_train.KGTrainConfig(chunk_size=4, uniform_negatives=3, chunks_per_batch=8,
                                 num_epochs=1, max_steps=2, log_every=0, checkpoint_every=2)
    kg_train.train(g, model=kg_train.KGModelConfig(model="distmult", dim=8), train_config=cfg,
                   mesh=_mesh(2), log_fn=lambda d: None, checkpoint_dir=tmp_path / "ck")
    with checkpoint.Checkpointer(tmp_path / "ck") as ckpt:
        assert ckpt.restore_meta()["trainer"] == "pretrain_kg"
    with checkpoint.Checkpointer(tmp_path / "ck", trainer="pretrain_contrastive") as ckpt:
        with pytest.raises(ValueError) as e:
            ct.restore_train_state(ckpt, fresh=None, expected={"seed": 0})
    assert str(e.value) == (f"{tmp_path / 'ck'}/2: a pretrain_kg checkpoint, not a "
                            "pretrain_contrastive one (the workdir holds another trainer's "
                            "checkpoints): give pretrain_contrastive its own workdir")


# ----------------------------------------------------------------------------- SIGKILL



_STEPS = 24


@pytest.fixture(scope="module")
def cl_world(tmp_path_factory):
    return mp_util.smoke_world(tmp_path_factory), "configs/contrastive.py:smoke"


def _cl_args(world, workdir, checkpoint_every):
    data, cfg = world
    return [f"--config={cfg}", f"--workdir={workdir}", f"--config.data.path={data}",
            f"--config.train.max_steps={_STEPS}", "--config.train.log_every=1",
            f"--config.train.checkpoint_every={checkpoint_every}",
            "--config.data.max_eval_pairs=500", "--config.train.eval_loss_batches=1"]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_sigkilled_two_process_run_resumes_in_one_process(cl_world, tmp_path):
    """2 x 4 devices, SIGKILLed after its first checkpoints, resumes on 1 x 4 devices and
    ends like an uninterrupted 1 x 8 run: every step's loss (the steps before the kill
    come from the 2-process run), retrieval metrics, held-out loss and facet tables."""
    ref_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "killed"
    with mp_util.start("launch.pretrain_contrastive", _cl_args(cl_world, ref_dir, 0),
                       num_processes=1, devices_per_process=8) as ref, \
         mp_util.start("launch.pretrain_contrastive", _cl_args(cl_world, run_dir, 1),
                       num_processes=2, devices_per_process=4) as two:
        # A checkpoint every step (~0.3 s each): after step 2 is committed the run still
        # has > 20 steps to go, so the kill lands mid-training.
        mp_util.wait_for(lambda: (run_dir / "checkpoints" / "2").is_dir(), group=two,
                         timeout_s=300)
        two.kill(signal.SIGKILL)
        assert all(c == -signal.SIGKILL for c in two.poll()), two.describe()
        results = ref.wait(timeout_s=300)
        assert results[0].returncode == 0, ref.describe()
    assert not (run_dir / "metrics.json").exists()

    mp_util.run("launch.pretrain_contrastive", _cl_args(cl_world, run_dir, 8),
                num_processes=1, devices_per_process=4, timeout_s=300)
    want, got = mp_util.read_metrics(ref_dir), mp_util.read_metrics(run_dir)
    assert 2 <= got["resumed_from_step"] < _STEPS, got["resumed_from_step"]
    assert got["steps"] == want["steps"] == _STEPS

    def curve(m):
        return [(h["step"], h["loss"]) for h in m["history"] if "loss" in h]

    assert [s for s, _ in curve(got)] == list(range(1, _STEPS + 1))
    np.testing.assert_allclose([v for _, v in curve(got)], [v for _, v in curve(want)],
                               rtol=2e-5)
    for key in ("train_loss", "train_loss_ema", "heldout_loss"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-4, err_msg=key)
    for key in ("recall@10", "recall@50", "ndcg@10", "ndcg@50"):  # 1/500 = one tied pair
        assert got[key] == pytest.approx(want[key], abs=2.5e-3), key
    a = checkpoint.load_facet(ref_dir / "facet_cl")
    b = checkpoint.load_facet(run_dir / "facet_cl")
    for name in ("user", "pin"):
        np.testing.assert_allclose(b.tables[name], a.tables[name], rtol=1e-4, atol=1e-5)
    assert not [p for p in os.listdir(run_dir / "checkpoints") if "tmp" in p]
