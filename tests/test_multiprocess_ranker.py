"""Multi-process ranker training: real `launch.train_ranker` processes on simulated CPU devices.

2 processes x 4 devices train 10 steps on the smoke world with row-sharded tables,
checkpointing every 3 steps. Then this process (1 process x 8 devices, from conftest)
resumes from the 2-process checkpoint of step 3 and trains steps 4..10 again: its
losses step by step and its final evaluation must equal the 2-process run's (same
global batches, same tables and optimizer state, up to float reduction order). That
covers both halves of the contract in one 2-process launch: 2 x 4 trains like 1 x 8,
and a checkpoint written by 2 processes restores in 1 (tables gathered from both
processes, optimizer slots, dense Adam state, data position, loss EMA).
"""

import dataclasses
import shutil

import mp_util
import numpy as np
import pytest

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

# Smoke world: 8000 training impressions; 5120 kept -> 10 steps per epoch at batch 512.
BATCH, EXAMPLES, EVERY = 512, 5120, 3
EVAL_KEYS = ("ctr_auc", "cvr_auc", "ctcvr_auc", "ctr_log_loss", "ctr_ne", "cvr_log_loss")



@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return mp_util.smoke_world(tmp_path_factory), "configs/ranker.py:smoke"


def _args(world, workdir, epochs):
    data, cfg = world
    return [f"--config={cfg}", f"--workdir={workdir}", f"--config.data.path={data}",
            f"--config.train.num_epochs={epochs}", f"--config.train.batch_size={BATCH}",
            f"--config.data.max_train_examples={EXAMPLES}", "--config.train.log_every=1",
            "--config.train.table_sharding=row_wise",
            f"--config.train.checkpoint_every={EVERY}"]


def _train_in_process(world, epochs, checkpoint_dir=None):
    """The same run as `_args` describes, in this process (1 process x 8 devices)."""
    from configs import ranker
    from jax_recsys.ranking import train
    from launch import train_ranker

    cfg = ranker.get_config("smoke")
    cfg.data.max_train_examples = EXAMPLES
    cfg.train.batch_size = BATCH
    cfg.train.num_epochs = epochs
    cfg.train.log_every = 1
    tc = train_ranker.train_config(cfg, data_path=str(world[0]))
    tc = dataclasses.replace(tc, checkpoint_every=EVERY, table_sharding="row_wise")
    return train.train_and_evaluate(tc, None, log=lambda s: None, checkpoint_dir=checkpoint_dir)


def _curve(metrics):
    return np.array([loss for _, loss in metrics["train"]["loss_curve"]])


def _assert_same_eval(got, want, rtol=1e-4):
    for split in ("valid", "test"):
        for key in EVAL_KEYS:
            np.testing.assert_allclose(got[split][key], want[split][key], rtol=rtol,
                                       err_msg=f"{split} {key}")


def test_two_processes_train_like_one_and_their_checkpoint_resumes_in_one(world, tmp_path):
    mp_dir = tmp_path / "two_processes"
    args = [*_args(world, mp_dir, 1.0), "--config.train.keep_checkpoints=10"]
    results = mp_util.run("launch.train_ranker", args, num_processes=2, devices_per_process=4,
                          timeout_s=300)
    assert "process 1 of 2" in results[1].output, results[1].output[-3000:]
    mp_m = mp_util.read_metrics(mp_dir)
    assert mp_m["train"]["steps"] == 10 and mp_m["train"]["resumed_from_step"] == 0
    assert (mp_dir / "ranker" / "config.json").exists()  # process 0 saved the ranker
    ckpts = mp_dir / "checkpoints"
    steps = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
    assert steps == [3, 6, 9, 10], steps

    # Roll back to step 3 and finish the run in this one process on 8 devices.
    for s in steps[1:]:
        shutil.rmtree(ckpts / str(s))
    res = _train_in_process(world, 1.0, checkpoint_dir=ckpts)
    assert res["train"]["resumed_from_step"] == 3 and res["train"]["steps"] == 10
    curve, mp_curve = _curve(res), _curve(mp_m)
    np.testing.assert_allclose(curve, mp_curve, rtol=2e-5)
    assert np.ptp(mp_curve[3:]) > 1e-3  # the 7 compared steps do move the loss
    _assert_same_eval(res, mp_m)
    assert max(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) == 10
