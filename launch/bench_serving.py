r"""Serving benchmark: embedding lookups over gRPC against a raw-bytes echo floor.

  python -m launch.bench_serving                       # 1M x 64 INT4, 1/2/4 shards, 1-16 clients
  python -m launch.bench_serving --rows=20000 --shards=1,2 --clients=1,2 --duration_s=1  # smoke

Writes a synthetic INT4 artifact (``--rows`` x ``--dim``, via
``jax_recsys.quant.artifact.write_artifact``), starts the shard servers as
separate processes (``launch.serve_embeddings``) and a raw-bytes echo server
(``serving.echo_server``) with the same payload sizes, then drives each with
1..16 closed-loop client processes (``--clients``), each asking ``--ids``
uniformly random rows per request (``EmbeddingClient.lookup``: route, fan out,
dequantize on the server, reassemble). Prints one JSON line per measurement:

  {"bench": "serving", "kind": "echo"|"lookup"|"server_compute", "shards", "clients",
   "p50_ms", "p99_ms", "qps", "ids_per_s", "p50_vs_echo", "p99_vs_echo", ...}

Targets on loopback (quiet machine, 1 client): lookup p50 <= 1.0 ms, p99 <=
2.0 ms, lookup within 1.5x of the echo floor (``p50_vs_echo``). On a busy
2-core box expect several times that; the ratios are what carry over.
Run time: about ``(1 + len(shards)) * len(clients) * (duration_s + 1)`` s plus
writing the artifact (~10 s for 1M rows).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

_ROWS = flags.DEFINE_integer("rows", 1_000_000, "Rows of the synthetic table.")
_DIM = flags.DEFINE_integer("dim", 64, "Embedding dim.")
_BITS = flags.DEFINE_integer("bits", 4, "Quantization bits (4 or 8).")
_IDS = flags.DEFINE_integer("ids", 512, "Ids per lookup.")
_SHARDS = flags.DEFINE_list("shards", ["1", "2", "4"], "Shard counts to measure.")
_CLIENTS = flags.DEFINE_list("clients", ["1", "2", "4", "8", "16"], "Concurrent clients.")
_DURATION = flags.DEFINE_float("duration_s", 3.0, "Measured seconds per point.")
_WARMUP = flags.DEFINE_integer("warmup", 50, "Unmeasured requests per client first.")
_SERVER_WORKERS = flags.DEFINE_integer("server_workers", 8, "Handler threads per server.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the artifact goes (default: temp dir).")

_TABLE = "item"


# ---- client processes (closed loop) ----


def _client_loop(task: dict) -> dict:
    """Runs requests back to back from ``start_at`` for ``duration_s``; returns latencies."""
    rng = np.random.default_rng(task["seed"])
    batches = [rng.integers(0, task["rows"], task["ids"]) for _ in range(64)]
    if task["kind"] == "echo":
        import grpc

        from serving import echo_server

        channel = grpc.insecure_channel(task["address"])
        call = channel.unary_unary(echo_server.ECHO_METHOD)
        payload = echo_server.echo_request(
            request_bytes=task["request_bytes"], response_bytes=task["response_bytes"]
        )

        def one(i):
            call(payload, timeout=5)

        close = channel.close
    else:
        from serving import client as client_lib

        client = client_lib.EmbeddingClient.from_artifact(
            task["manifest"], task["addresses"], deadline_s=5
        )

        def one(i):
            client.lookup(_TABLE, batches[i % len(batches)])

        close = client.close
    for i in range(task["warmup"]):
        one(i)
    while time.time() < task["start_at"]:
        time.sleep(0.001)
    end = task["start_at"] + task["duration_s"]
    lat = []
    i = 0
    while time.time() < end:
        t0 = time.perf_counter()
        one(i)
        lat.append(time.perf_counter() - t0)
        i += 1
    close()
    return {"latencies": lat}


def _worker(task_q, result_q) -> None:
    while True:
        task = task_q.get()
        if task is None:
            return
        try:
            result_q.put(_client_loop(task))
        except Exception as e:  # report, don't hang the parent
            result_q.put({"error": repr(e)})


class _ClientPool:
    def __init__(self, n: int):
        ctx = mp.get_context("spawn")
        self.task_q, self.result_q = ctx.Queue(), ctx.Queue()
        self.procs = [
            ctx.Process(target=_worker, args=(self.task_q, self.result_q), daemon=True)
            for _ in range(n)
        ]
        for p in self.procs:
            p.start()

    def run(self, task: dict, clients: int) -> np.ndarray:
        start_at = time.time() + 1.0 + 0.05 * clients
        for c in range(clients):
            self.task_q.put(dict(task, seed=c, start_at=start_at))
        out = []
        for _ in range(clients):
            res = self.result_q.get(timeout=task["duration_s"] + 120)
            if "error" in res:
                raise RuntimeError(f"client failed: {res['error']}")
            out.extend(res["latencies"])
        return np.array(out)

    def close(self) -> None:
        for _ in self.procs:
            self.task_q.put(None)
        for p in self.procs:
            p.join(10)


# ---- servers ----


def _spawn_shard(artifact_dir: str, shard: int, num_shards: int) -> tuple[subprocess.Popen, int]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "launch.serve_embeddings",
            f"--artifact={artifact_dir}",
            f"--shard={shard}",
            f"--num_shards={num_shards}",
            "--port=0",
            f"--workers={_SERVER_WORKERS.value}",
            "--log_every_s=0",
        ],
        cwd=root,
        env=dict(os.environ, PYTHONPATH=root),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"shard {shard}/{num_shards} did not start (rc={proc.wait()})")
    return proc, json.loads(line)["port"]


def _write_artifact(out_dir: str) -> dict:
    from jax_recsys.quant import artifact

    src_path = os.path.join(out_dir, "src.npy")
    src = np.lib.format.open_memmap(
        src_path, mode="w+", dtype=np.float32, shape=(_ROWS.value, _DIM.value)
    )
    rng = np.random.default_rng(0)
    for lo in range(0, _ROWS.value, 1 << 16):
        hi = min(lo + (1 << 16), _ROWS.value)
        src[lo:hi] = rng.normal(size=(hi - lo, _DIM.value)).astype(np.float32)
    src.flush()
    t0 = time.perf_counter()
    manifest = artifact.write_artifact(
        os.path.join(out_dir, "art"),
        tables={_TABLE: src},
        vocabs={_TABLE: np.arange(_ROWS.value, dtype=np.int64)},
        bits=_BITS.value,
    )
    del src
    os.remove(src_path)
    print(
        json.dumps(
            {
                "bench": "serving",
                "kind": "artifact",
                "rows": _ROWS.value,
                "dim": _DIM.value,
                "bits": _BITS.value,
                "version": manifest["version"],
                "write_s": round(time.perf_counter() - t0, 3),
            }
        ),
        flush=True,
    )
    return dict(manifest)


def _server_compute(artifact_dir: str) -> dict:
    """In-process cost of one lookup without gRPC: decode, dedup, dequantize, encode."""
    from serving import codec
    from serving import embedding_server as es
    from serving.protos import embedding_pb2 as pb

    server = es.EmbeddingServer(es.ServerConfig(artifact=artifact_dir, log_every_s=0))
    rng = np.random.default_rng(0)
    reqs = []
    for _ in range(64):
        req = pb.LookupRequest()
        req.tables.add(
            table=_TABLE, ids=codec.encode_ids(np.unique(rng.integers(0, _ROWS.value, _IDS.value)))
        )
        reqs.append(req.SerializeToString())
    for r in reqs:
        server._handle_lookup(r)
    times = []
    for i in range(500):
        t0 = time.perf_counter()
        server._handle_lookup(reqs[i % len(reqs)])
        times.append(time.perf_counter() - t0)
    return {
        "p50_ms": float(np.percentile(times, 50) * 1e3),
        "p99_ms": float(np.percentile(times, 99) * 1e3),
    }


def _stats(lat_s: np.ndarray, duration_s: float) -> dict:
    return {
        "requests": int(lat_s.size),
        "p50_ms": round(float(np.percentile(lat_s, 50) * 1e3), 4),
        "p99_ms": round(float(np.percentile(lat_s, 99) * 1e3), 4),
        "mean_ms": round(float(lat_s.mean() * 1e3), 4),
        "qps": round(lat_s.size / duration_s, 1),
        "ids_per_s": round(lat_s.size * _IDS.value / duration_s, 1),
    }


def main(argv):
    del argv
    shard_counts = [int(s) for s in _SHARDS.value]
    client_counts = [int(c) for c in _CLIENTS.value]
    workdir = _WORKDIR.value or tempfile.mkdtemp(prefix="bench_serving_")
    os.makedirs(workdir, exist_ok=True)
    manifest = _write_artifact(workdir)
    art_dir = os.path.join(workdir, "art")
    common = {
        "bench": "serving",
        "ids": _IDS.value,
        "dim": _DIM.value,
        "bits": _BITS.value,
        "rows": _ROWS.value,
        "cpus": os.cpu_count(),
    }
    print(json.dumps({**common, "kind": "server_compute", **_server_compute(art_dir)}), flush=True)

    from serving import echo_server

    pool = _ClientPool(max(client_counts))
    ctx = mp.get_context("spawn")
    port_q = ctx.Queue()
    echo = ctx.Process(
        target=echo_server.serve_forever,
        args=(port_q,),
        kwargs={"workers": _SERVER_WORKERS.value},
        daemon=True,
    )
    echo.start()
    echo_addr = f"127.0.0.1:{port_q.get(timeout=60)}"
    base = {
        "warmup": _WARMUP.value,
        "duration_s": _DURATION.value,
        "rows": _ROWS.value,
        "ids": _IDS.value,
    }
    # Same payloads as a 1-shard lookup: int64 ids in, float32 rows out (+ a little framing).
    echo_task = dict(
        base,
        kind="echo",
        address=echo_addr,
        request_bytes=8 * _IDS.value + 16,
        response_bytes=4 * _IDS.value * _DIM.value + 32,
    )
    floor = {}
    try:
        for c in client_counts:
            s = _stats(pool.run(echo_task, c), _DURATION.value)
            floor[c] = s
            print(
                json.dumps({**common, "kind": "echo", "shards": 1, "clients": c, **s}), flush=True
            )
        for n in shard_counts:
            procs = [_spawn_shard(art_dir, i, n) for i in range(n)]
            try:
                task = dict(
                    base,
                    kind="lookup",
                    manifest=manifest,
                    addresses=[f"127.0.0.1:{port}" for _, port in procs],
                )
                for c in client_counts:
                    s = _stats(pool.run(task, c), _DURATION.value)
                    print(
                        json.dumps(
                            {
                                **common,
                                "kind": "lookup",
                                "shards": n,
                                "clients": c,
                                **s,
                                "p50_vs_echo": round(s["p50_ms"] / floor[c]["p50_ms"], 3),
                                "p99_vs_echo": round(s["p99_ms"] / floor[c]["p99_ms"], 3),
                                "target_p50_ms": 1.0,
                                "target_p99_ms": 2.0,
                                "target_vs_echo": 1.5,
                            }
                        ),
                        flush=True,
                    )
            finally:
                for proc, _ in procs:
                    proc.terminate()
                    proc.wait(30)
        # End-to-end ranking (ranker service + shards) is measured here once
        # serving/ranker_service.py exists; not implemented in this script yet.
    finally:
        pool.close()
        echo.terminate()
        echo.join(10)


if __name__ == "__main__":
    app.run(main)
