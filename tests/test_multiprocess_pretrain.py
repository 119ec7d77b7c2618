"""Multi-process KG pretraining: real `launch.pretrain_kg` processes on simulated CPU devices.

2 processes x 4 devices must train like 1 process x 8 devices: each process builds only
its half of every batch's chunks, the global batch is assembled across processes, and
the losses, the filtered MRR (evaluated across processes) and the facet written by
process 0 match. The contrastive trainer's 2-process run (killed, then resumed in one
process) is in test_resume_pretrain.py.
"""

import mp_util
import numpy as np
import pytest

from jax_recsys import checkpoint

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

CONFIG_WRAPPER = '''
"""configs/kg.py:smoke plus the checkpoint keys the tests set."""
from configs import kg


def get_config(arg=None):
    c = kg.get_config("smoke")
    for key, value in (("checkpoint_every", 0), ("keep_checkpoints", 2)):
        if key not in c.train:
            c.train[key] = value
    return c
'''


def _write_triples(root, *, entities=64, clusters=4, seed=0):
    """One entity type, two relations inside clusters; 600 train, 40 valid, 40 test triples."""
    rng = np.random.default_rng(seed)
    cluster = np.arange(entities) % clusters
    lines = []
    for _ in range(680):
        h = int(rng.integers(entities))
        t = int(rng.choice(np.flatnonzero(cluster == cluster[h])))
        lines.append(f"e{h}\tr{int(rng.integers(2))}\te{t}\n")
    root.mkdir(parents=True)
    for name, part in (("train", lines[:600]), ("valid", lines[600:640]),
                       ("test", lines[640:])):
        (root / f"{name}.txt").write_text("".join(part))


def _args(triples, cfg, workdir):
    return [f"--config={cfg}", f"--workdir={workdir}", f"--config.data.path={triples}",
            "--config.train.max_steps=6", "--config.train.log_every=1",
            "--config.train.eval_every_epochs=0", "--config.eval.max_triples=40",
            "--config.train.checkpoint_every=3"]


def test_kg_two_processes_match_one(tmp_path):
    triples, cfg = tmp_path / "triples", tmp_path / "kg_test_config.py"
    _write_triples(triples)
    cfg.write_text(CONFIG_WRAPPER)
    one, two = tmp_path / "one_process", tmp_path / "two_processes"
    with mp_util.start("launch.pretrain_kg", _args(triples, cfg, one), num_processes=1,
                       devices_per_process=8) as ref, \
         mp_util.start("launch.pretrain_kg", _args(triples, cfg, two), num_processes=2,
                       devices_per_process=4) as mp:
        for group in (ref, mp):
            results = group.wait(timeout_s=300)
            assert all(r.returncode == 0 for r in results), group.describe()
        assert "process 1 of 2" in mp.output(1), mp.describe()
    want, got = mp_util.read_metrics(one), mp_util.read_metrics(two)

    def curve(m):
        return [(h["step"], h["loss"]) for h in m["history"] if "loss" in h]

    # 600 triples in chunks of 16, 8 chunks a batch: 5 batches an epoch, so the 6 steps
    # cross an epoch boundary.
    assert [s for s, _ in curve(got)] == list(range(1, 7))
    np.testing.assert_allclose([v for _, v in curve(got)], [v for _, v in curve(want)],
                               rtol=2e-5)
    assert got["positives"] == want["positives"] > 0
    for key in ("test_mrr", "test_hits@10", "test_head_mrr", "test_tail_mrr", "final_loss"):
        assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key
    assert sorted(int(p.name) for p in (two / "checkpoints").iterdir()) == [3, 6]
    a, b = checkpoint.load_facet(one / "facet_kg"), checkpoint.load_facet(two / "facet_kg")
    np.testing.assert_array_equal(b.vocabs["entity"], a.vocabs["entity"])
    np.testing.assert_allclose(b.tables["entity"], a.tables["entity"], rtol=1e-4, atol=1e-6)
