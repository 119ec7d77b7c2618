r"""Embedding engine benchmark: sparse row-wise Adagrad step vs a dense take + optax Adam step.

  python -m launch.bench_embedding                                  # full: 1e5..16e6 rows, 1 and 8 devices
  python -m launch.bench_embedding --rows=1e5,1e6 --devices=1,8 --steps=5   # quick check (~1-2 min)
  python -m launch.bench_embedding --max_rows=40e6                  # largest table: one device, one step

Every measurement runs in its own subprocess (XLA_FLAGS with the simulated
device count set before JAX is imported; an out-of-memory run is reported,
not fatal). Batch ``--batch`` (4096) single ids drawn Zipf(``--zipf``) over the
table, dim ``--dim`` (64), fp32, tables row-wise over a 1-D ``data`` mesh.

* ``sparse``: ``make_train_step`` with a RowAdagrad table (lookup in
  shard_map, gradient w.r.t. the gathered rows, duplicate ids combined, rows
  scattered into the donated table) plus a tiny dense head on optax Adam.
* ``dense``: the same model as one pytree -- ``jnp.take`` on the table and
  ``optax.adam`` over table + head (a table-sized gradient and two moments).

Prints one JSON line per measurement
``{"bench": "embedding", "kind": "sparse"|"dense", "devices", "rows", "step_ms", ...}``,
then the ratios per device count:
``sparse_4m_over_100k`` (target <= 1.3: cost flat in the table size),
``dense_over_sparse_4m`` (target >= 100), and optimizer-state bytes per row.
``--max_rows`` mode prints ``{"kind": "max_rows", "rows", "table_gib", "step_ms"}``
(target: >= 40M x 64 fp32 on a 24 GiB box).

Known numbers on a 2-core box, 1 device: sparse 1.7 ms -> 2.7 ms per step from
1e5 to 4e6 rows; dense Adam 7 -> 533 ms. Full run: ~15-30 min (dense 16e6 dominates).
"""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
import time

from absl import flags

from jax_recsys import sysmem
from launch import common

_ROWS = flags.DEFINE_list("rows", ["1e5", "1e6", "4e6", "16e6"], "Table sizes (rows).")
_DEVICES = flags.DEFINE_list("devices", ["1", "8"], "Simulated device counts.")
_KINDS = flags.DEFINE_list("kinds", ["sparse", "dense"], "Which steps to measure.")
_BATCH = flags.DEFINE_integer("batch", 4096, "Global batch size.")
_DIM = flags.DEFINE_integer("dim", 64, "Embedding dim.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps per measurement.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps first (compile).")
_ZIPF = flags.DEFINE_float("zipf", 1.1, "Zipf exponent of the ids.")
_DENSE_MAX_ROWS = flags.DEFINE_float(
    "dense_max_rows", 16e6, "Skip the dense reference above this many rows (memory).")
_MAX_ROWS = flags.DEFINE_float("max_rows", 0, "If > 0: only train one table of this many rows on 1 device.")
_TIMEOUT = flags.DEFINE_integer("timeout_s", 1800, "Per-subprocess time limit.")
# internal: set by the parent for the worker subprocess
_WORKER = flags.DEFINE_string("worker", "", "Internal: run one measurement ('sparse'|'dense').")
_NDEV = flags.DEFINE_integer("n_devices", 1, "Internal: devices of this worker.")


def _zipf_ids(rng, rows: int, n: int, a: float):
    import numpy as np

    ids = (rng.zipf(a, n) - 1) % rows
    # spread the popular ids over the table instead of clustering them at row 0
    return ((ids * 2654435761) % rows).astype(np.int32)


def _worker(kind: str, rows: int, n_dev: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import NamedSharding, PartitionSpec as P

    from jax_recsys.data.batching import Batch
    from jax_recsys.embedding import collection, specs, train_step as ts

    assert len(jax.devices()) == n_dev, (jax.devices(), n_dev)
    mesh = jax.make_mesh((n_dev,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    b, d = _BATCH.value, _DIM.value
    rng = np.random.default_rng(0)
    host = [
        Batch(ids={"f": _zipf_ids(rng, rows, b, _ZIPF.value)}, dense={},
              labels={"y": rng.normal(size=b).astype(np.float32)}, mask=np.ones(b, np.float32))
        for _ in range(4)
    ]
    batches = [ts.shard_batch(x, mesh=mesh) for x in host]
    w0 = jnp.full((d,), 0.1, jnp.float32)

    def head_loss(x, w, batch):
        return jnp.mean((x.astype(jnp.float32) @ w - batch.labels["y"]) ** 2)

    t0 = time.perf_counter()
    if kind == "sparse":
        ec = collection.EmbeddingCollection(
            tables=[specs.TableSpec(name="t", rows=rows, dim=d, sharding="row_wise",
                                    optimizer=specs.RowAdagrad(learning_rate=0.05))],
            features=[specs.FeatureSpec(name="f", table="t")], mesh=mesh)
        tx = optax.adam(1e-3)
        state = ts.init_train_state(collection=ec, key=jax.random.key(0), params={"w": w0}, dense_tx=tx)

        def loss_fn(*, rows, params, batch):
            return head_loss(rows["f"], params["w"], batch), {}

        step = ts.make_train_step(collection=ec, loss_fn=loss_fn, dense_tx=tx)
        run = step
        state_bytes = sum(x.nbytes for x in jax.tree.leaves(state.emb.slots))
    else:
        tx = optax.adam(1e-3)
        table_sharding = NamedSharding(mesh, P("data", None))

        def init(key):
            return {"t": (jax.random.normal(key, (rows, d)) / np.sqrt(d)), "w": w0}

        params = jax.jit(init, out_shardings={"t": table_sharding, "w": NamedSharding(mesh, P())})(
            jax.random.key(0))
        # Adam's step count comes out of tx.init on one device, but out of the step
        # replicated over the mesh: put it there now, or the second step compiles
        # again (inside the timed steps with --warmup=1).
        replicated = NamedSharding(mesh, P())
        opt0 = jax.tree.map(
            lambda x: jax.device_put(x, replicated) if np.ndim(x) == 0 else x, tx.init(params))
        state = (params, opt0)

        @jax.jit
        def dense_step(state, batch):
            params, opt = state

            def loss(p):
                return head_loss(jnp.take(p["t"], batch.ids["f"], axis=0), p["w"], batch)

            value, g = jax.value_and_grad(loss)(params)
            upd, opt = tx.update(g, opt, params)
            return (optax.apply_updates(params, upd), opt), {"loss": value}

        run = jax.jit(dense_step, donate_argnums=0)
        state_bytes = sum(x.nbytes for x in jax.tree.leaves(state[1]))
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t0
    for i in range(_WARMUP.value):
        state, m = run(state, batches[i % 4])
        jax.block_until_ready(m)
    times = []
    for i in range(_STEPS.value):
        t = time.perf_counter()
        state, m = run(state, batches[i % 4])
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    return {
        "bench": "embedding", "kind": kind, "devices": n_dev, "rows": rows, "dim": d, "batch": b,
        "step_ms": round(1e3 * float(np.median(times)), 3),
        "step_ms_mean": round(1e3 * float(np.mean(times)), 3),
        "init_s": round(init_s, 2), "opt_state_bytes_per_row": round(state_bytes / rows, 2),
        "loss": float(m["loss"]),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }


def _spawn(kind: str, rows: int, n_dev: int, steps: int | None = None) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n_dev}").strip()
    env.setdefault("JAX_PLATFORMS", "cpu")
    cmd = [sys.executable, "-m", "launch.bench_embedding", f"--worker={kind}", f"--n_devices={n_dev}",
           f"--rows={rows}", f"--batch={_BATCH.value}", f"--dim={_DIM.value}",
           f"--steps={steps if steps is not None else _STEPS.value}", f"--warmup={_WARMUP.value}",
           f"--zipf={_ZIPF.value}"]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=_TIMEOUT.value)
    except subprocess.TimeoutExpired:
        return {"bench": "embedding", "kind": kind, "devices": n_dev, "rows": rows, "error": "timeout"}
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("{"):
            return json.loads(line)
    err = (proc.stderr or "").strip().splitlines()[-3:]
    return {"bench": "embedding", "kind": kind, "devices": n_dev, "rows": rows,
            "error": f"exit {proc.returncode}: {' | '.join(err)}"}


def _mem_available_bytes() -> int | None:
    """MemAvailable, capped by this process's cgroup memory limit (which /proc/meminfo
    does not show: a table past it was killed by the OOM killer instead of skipped)."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    limit = sysmem.cgroup_limit()
    if limit is not None:
        avail = limit[0] if avail is None else min(avail, limit[0])
    return avail


def _needed_bytes(kind: str, rows: int) -> int:
    # dense Adam: table + gradient + two moments + one update temporary; sparse: table + acc
    per_row = 5 * 4 * _DIM.value if kind == "dense" else 4 * _DIM.value + 4
    return rows * per_row


def _emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def _checked_flags() -> tuple[list[int], list[int]]:
    """The flags, checked before any measurement (ValueError naming every bad one).

    Returns:
      (table sizes of --rows, device counts of --devices).
    """
    try:
        sizes = [float(r) for r in _ROWS.value]
    except ValueError:
        sizes = []
    if not sizes or not all(math.isfinite(r) and r >= 1 and r == int(r) for r in sizes):
        raise ValueError(f"--rows must list whole numbers of rows >= 1 (1e5 or 100000), "
                         f"got {','.join(_ROWS.value)}")
    devices = common.int_list(_DEVICES)
    kinds = set(_KINDS.value)
    rules = [(f, f.value >= 1, ">= 1") for f in (_BATCH, _DIM, _STEPS, _TIMEOUT)]
    rules += [
        (_WARMUP, _WARMUP.value >= 0, ">= 0"),
        (_KINDS, bool(kinds) and kinds <= {"sparse", "dense"}, "sparse and/or dense"),
        (_ZIPF, math.isfinite(_ZIPF.value) and _ZIPF.value > 1, "finite and > 1"),
        (_DENSE_MAX_ROWS, _DENSE_MAX_ROWS.value >= 0, ">= 0"),
        (_MAX_ROWS, _MAX_ROWS.value == 0 or (math.isfinite(_MAX_ROWS.value) and _MAX_ROWS.value >= 1),
         "0 (off) or a finite number of rows >= 1"),
    ]
    if _MAX_ROWS.value <= 0:  # --max_rows runs on one device
        rules.append((_BATCH, all(_BATCH.value % n == 0 for n in devices),
                      f"a multiple of every --devices count {','.join(_DEVICES.value)}"))
    bad = [f"--{f.name}={f.value if not isinstance(f.value, list) else ','.join(f.value)} "
           f"(must be {rule})" for f, ok, rule in rules if not ok]
    if bad:
        raise ValueError("bad flags: " + ", ".join(bad))
    return [int(r) for r in sizes], devices


def main(argv):
    del argv
    if _WORKER.value:
        _emit(_worker(_WORKER.value, int(float(_ROWS.value[0])), _NDEV.value))
        return
    rows_list, devices = _checked_flags()
    if _MAX_ROWS.value > 0:
        rows = int(_MAX_ROWS.value)
        r = _spawn("sparse", rows, 1, steps=min(_STEPS.value, 5))
        r["kind"] = "max_rows"
        r["table_gib"] = round(rows * _DIM.value * 4 / 2**30, 2)
        r["target_rows"] = 40_000_000
        _emit(r)
        return
    results = {}
    for n_dev in devices:
        for kind in _KINDS.value:
            for rows in rows_list:
                if kind == "dense" and rows > _DENSE_MAX_ROWS.value:
                    continue
                need, avail = _needed_bytes(kind, rows), _mem_available_bytes()
                if avail is not None and need > 0.9 * avail:
                    r = {"bench": "embedding", "kind": kind, "devices": n_dev, "rows": rows,
                         "skipped": f"needs ~{need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB available"}
                    _emit(r)
                    continue
                r = _spawn(kind, rows, n_dev)
                results[(kind, n_dev, rows)] = r
                _emit(r)
    small, mid = min(rows_list), (4_000_000 if 4_000_000 in rows_list else max(rows_list))
    for n_dev in devices:
        s_small = results.get(("sparse", n_dev, small), {}).get("step_ms")
        s_mid = results.get(("sparse", n_dev, mid), {}).get("step_ms")
        d_mid = results.get(("dense", n_dev, mid), {}).get("step_ms")
        ratio = {"bench": "embedding", "kind": "ratios", "devices": n_dev,
                 "small_rows": small, "large_rows": mid}
        # The targets are for 1e5 and 4e6 rows; other sizes get neutral names.
        named = (small, mid) == (100_000, 4_000_000)
        if s_small and s_mid and small != mid:
            key = "sparse_4m_over_100k" if named else "sparse_large_over_small"
            ratio[key] = round(s_mid / s_small, 3)
            if named:
                ratio[f"{key}_target"] = 1.3
        if s_mid and d_mid:
            key = "dense_over_sparse_4m" if mid == 4_000_000 else "dense_over_sparse_large"
            ratio[key] = round(d_mid / s_mid, 1)
            if mid == 4_000_000:
                ratio[f"{key}_target"] = 100
        _emit(ratio)
    d = _DIM.value
    _emit({"bench": "embedding", "kind": "opt_state_bytes_per_row", "dim": d, "table_row_bytes": 4 * d,
           "sgd": 0, "row_adagrad": 4, "lazy_adam": 8 * d + 4, "dense_adam": 8 * d,
           "frequency_adaptive_extra": 4})


if __name__ == "__main__":
    common.run(main)
