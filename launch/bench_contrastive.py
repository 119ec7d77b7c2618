r"""Benchmark: contrastive pretraining throughput and full Recall@K evaluation time.

  python -m launch.bench_contrastive                      # the full benchmark
  python -m launch.bench_contrastive --rows=20000 --batch_size=256 --steps=3 \
      --eval_pins=5000 --eval_queries=1000                # a quick check

Prints one JSON line per measurement:
  * `contrastive_train`: examples/s of the real train step (two towers with a
    Linear(D, D) each, L2-normalised, in-batch softmax at temperature 0.05 with logQ
    and accidental-hit removal, RowAdagrad tables + Adam dense), batch B, user and
    pin tables of R rows each (dim D), on S simulated devices; host batch building
    included. `ratio_vs_torch` is against the PyTorch nn.Embedding(sparse=True)
    two-tower reference (~28k examples/s at batch 4096 on the 2-core box; target
    >= 42k, i.e. ratio >= 1.5).
  * `contrastive_flatness`: examples/s at the largest R over that at the smallest,
    per device count (1.0 = flat in table size; the goal).
  * `contrastive_eval`: seconds of one full Recall@K evaluation (sharded brute-force
    top-K over all pins + popularity baseline) on a world-sized synthetic set, cold
    (with compilation) and warm.
Each configuration runs in its own subprocess with XLA_FLAGS set before JAX loads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import flags

from launch import common

_ROWS = flags.DEFINE_list("rows", ["1000000", "4000000"], "Rows of each table (user and pin).")
_DEVICES = flags.DEFINE_list("devices", ["1", "8"], "Simulated device counts.")
_BATCH = flags.DEFINE_integer("batch_size", 4096, "Global batch size.")
_DIM = flags.DEFINE_integer("dim", 64, "Embedding dim.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps (after 2 warm-up steps).")
_EVAL_PINS = flags.DEFINE_integer("eval_pins", 100_000, "Pins in the eval benchmark "
                                  "(default world: 100k).")
_EVAL_QUERIES = flags.DEFINE_integer("eval_queries", 20_000, "Held-out pairs scored.")
_EVAL_DEVICES = flags.DEFINE_integer("eval_devices", 8, "Devices for the eval benchmark.")
_CHILD = flags.DEFINE_string("child", "", "Internal: 'train' or 'eval' in a subprocess.")
_TORCH_REF = 28_000.0
_TARGET = 42_000.0


def _mesh():
    from jax_recsys.distributed import global_mesh

    return global_mesh()


def _child_train(rows: int) -> dict:
    import jax
    import numpy as np

    from jax_recsys.embedding import specs
    from jax_recsys.pretrain import contrastive_train as ct

    b = _BATCH.value
    cfg = ct.ContrastiveConfig(dim=_DIM.value, batch_size=b, temperature=0.05, project=True,
                               table_optimizer=specs.RowAdagrad(learning_rate=0.05))
    rng = np.random.default_rng(0)
    freq = rng.zipf(1.3, rows).astype(np.float64)
    tr = ct.ContrastiveTrainer(config=cfg, num_users=rows, num_pins=rows, mesh=_mesh(),
                               pin_freq=freq / freq.sum())
    # Zipf-like ids (hot rows repeat within a batch, as in real logs), scattered
    # over the rows by a fixed permutation as a sorted-by-raw-id vocabulary would be.
    perm_u, perm_p = rng.permutation(rows), rng.permutation(rows)

    def batch():
        u = perm_u[np.minimum(rng.zipf(1.2, b) - 1, rows - 1)]
        p = perm_p[np.minimum(rng.zipf(1.2, b) - 1, rows - 1)]
        return tr.make_batch(u, p)

    for _ in range(2):
        tr.train_step(batch())
    t0 = time.perf_counter()
    for _ in range(_STEPS.value):
        m = tr.train_step(batch())  # blocks on the metrics
    dt = time.perf_counter() - t0
    eps = _STEPS.value * b / dt
    return {"bench": "contrastive_train", "devices": jax.device_count(), "rows": rows,
            "batch": b, "dim": _DIM.value, "steps": _STEPS.value,
            "step_ms": 1000 * dt / _STEPS.value, "examples_per_sec": eps,
            "ratio_vs_torch": eps / _TORCH_REF, "target_met": eps >= _TARGET,
            "loss": m["loss"]}


def _child_eval() -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jax_recsys.pretrain import contrastive_model, retrieval_eval

    r, q, d = _EVAL_PINS.value, _EVAL_QUERIES.value, _DIM.value
    mesh = _mesh()
    s = mesh.shape["data"]
    rng = np.random.default_rng(0)
    r_pad = -(-r // s) * s
    pins = contrastive_model.l2_normalize(jnp.asarray(rng.normal(size=(r_pad, d)), jnp.float32))
    users = np.asarray(contrastive_model.l2_normalize(
        jnp.asarray(rng.normal(size=(q, d)), jnp.float32)))
    pos = rng.integers(0, r, q)
    train_pins = rng.integers(0, r, 10 * q)
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        out = retrieval_eval.evaluate_retrieval(
            user_qd=users, pin_rd=pins, pos_rows_q=pos, mesh=mesh, ks=(10, 50, 100),
            valid_rows=r, train_pin_rows=train_pins)
        times.append(time.perf_counter() - t0)
    return {"bench": "contrastive_eval", "devices": jax.device_count(), "pins": r,
            "queries": q, "dim": d, "k": 100, "seconds_cold": times[0],
            "seconds_warm": times[1], "queries_per_sec": q / times[1],
            "recall@10_random": out["recall@10"]}


def _spawn(devices: int, args: list[str]) -> list[dict]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={devices}").strip()
    env.setdefault("JAX_PLATFORMS", "cpu")
    passthrough = [f"--batch_size={_BATCH.value}", f"--dim={_DIM.value}",
                   f"--steps={_STEPS.value}", f"--eval_pins={_EVAL_PINS.value}",
                   f"--eval_queries={_EVAL_QUERIES.value}"]
    proc = subprocess.run([sys.executable, "-m", "launch.bench_contrastive", *passthrough,
                           *args], env=env, capture_output=True, text=True, check=False)
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode or not lines:
        return [{"bench": "error", "devices": devices, "args": args,
                 "stderr_tail": proc.stderr[-2000:]}]
    return lines


def main(argv):
    del argv
    if _CHILD.value == "train":
        print(json.dumps(_child_train(int(_ROWS.value[0]))), flush=True)
        return
    if _CHILD.value == "eval":
        print(json.dumps(_child_eval()), flush=True)
        return
    rows = sorted(int(r) for r in _ROWS.value)
    results = {}
    devices = common.int_list(_DEVICES)
    if _EVAL_DEVICES.value < 1:
        raise ValueError(f"--eval_devices must be >= 1, got {_EVAL_DEVICES.value}")
    for dev in devices:
        for r in rows:
            for line in _spawn(dev, ["--child=train", f"--rows={r}"]):
                print(json.dumps(line), flush=True)
                results[(dev, r)] = line.get("examples_per_sec")
        small, large = results.get((dev, rows[0])), results.get((dev, rows[-1]))
        if small and large and len(rows) > 1:
            print(json.dumps({"bench": "contrastive_flatness", "devices": dev,
                              "rows_small": rows[0], "rows_large": rows[-1],
                              "ratio_large_over_small": large / small}), flush=True)
    for line in _spawn(_EVAL_DEVICES.value, ["--child=eval"]):
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    common.run(main)
