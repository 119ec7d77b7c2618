r"""Serving benchmark: embedding lookups over gRPC against a raw-bytes echo floor.

  python -m launch.bench_serving                       # 1M x 64 INT4, 1/2/4 shards, 1-16 clients
  python -m launch.bench_serving --rows=20000 --shards=1,2 --clients=1,2 --duration_s=1  # smoke

Writes a synthetic INT4 artifact (``--rows`` x ``--dim``, via
``jax_recsys.quant.artifact.write_artifact``), starts the shard servers as
separate processes (``launch.serve_embeddings``) and a raw-bytes echo server
(``serving.echo_server``) with the same payload sizes, then drives them with
1..16 closed-loop client processes (``--clients``), each asking ``--ids``
uniformly random rows per request (``EmbeddingClient.lookup``: route, fan out,
dequantize on the server, reassemble), over each of ``--transports``:
``stream`` (the client's default: round trips on long-lived ``LookupStream``
calls) and ``unary`` (one ``Lookup`` call each). Each transport is compared to
the echo floor of the same transport (``EchoStream`` through the client's own
``serving.streaming.StreamPool``, or unary ``Echo``).

How the floor is measured: first the echo server alone (``"setting":
"alone"``); then, for every shard count and client count, echo and lookup in
the same run, interleaved: time is cut into ``--slice_s`` slices and all
clients send echo requests and lookups of each transport in turn, one kind
per slice, each kind getting ``--duration_s / 2`` of the time
(``"setting": "sliced"``). The sliced floor shares the processes, the load
and the state of the machine with the lookups it is compared to
(``p50_vs_echo``); on this project's shared 2-core box the echo alone was
0.5-0.7 ms and interleaved with lookups 0.7-1.1 ms, so both ratios are
printed (``p50_vs_echo_alone`` too). A lookup on S > 1 shards also fans out:
its floor is S round trips in parallel, which on the 2-core box cost 1.2-1.6x (2)
and 2.4-2.8x (4) one echo. So with S > 1 a third kind joins the slices, the
fan-out echo (``"setting": "fanout"``): the client sends S echo requests at
once to S echo server processes, each of a shard's share of the ids and rows
(``ceil(ids / S)``), then reads the answers in turn (streams; unary: the first
call inline, the others on a thread pool), as ``EmbeddingClient`` does. The
lookup is compared to it as ``p50_vs_fanout_echo`` (with one shard, the same
number as ``p50_vs_echo``). One JSON line per measurement:

  {"bench": "serving", "kind": "echo", "setting": "alone"|"sliced"|"fanout", "shards",
   "transport", "clients", "p50_ms", "p99_ms", "qps", ...}
  {"bench": "serving", "kind": "lookup", "shards", "transport", "clients", "p50_ms", "p99_ms",
   "qps", "ids_per_s", "p50_vs_echo", "p99_vs_echo", "p50_vs_fanout_echo",
   "p99_vs_fanout_echo", "p50_vs_echo_alone", ...}
  {"bench": "serving", "kind": "server_compute", "p50_ms", "p99_ms"}

``qps`` of a sliced kind counts its own ``duration_s / 2`` of the time.
Targets on loopback (quiet machine, 1 client): lookup p50 <= 1.0 ms, p99 <=
2.0 ms, lookup within 1.5x of the echo floor (``p50_vs_echo``). Run time
(T transports, S shard counts of which S1 > 1, C client counts, d =
``duration_s``): about ``C * (T * (d + 1.5) + S * (T * d + 1.5) + S1 * T * d / 2)``
s, plus writing the artifact (~10 s for 1M rows).

End-to-end ranking (``--parts=rank``): a ranking artifact (user and pin tables
of ``--rank_rows`` x ``--dim``, an advertiser table, a DCN-v2 ranker) served
by ``launch.serve_ranker`` processes side by side: one monolithic (tables in
the ranker process) and one hybrid per entry of ``--rank_shards`` (that many
embedding shard processes each) and of ``--rank_wires`` (``quantized``: the
shards send INT4 rows as stored and the ranker dequantizes, the default;
``float32``: the shards dequantize) and of ``--rank_transports`` (how the
ranker's fetches travel: ``stream``, the default, or ``unary``) and of
``--rank_cache_rows`` (``serve_ranker --cache_rows``: a row cache in the
ranker, 0 = none, the default); closed-loop clients each send one user x
``--rank_candidates`` candidates per Rank call, alternating between the
services in time slices as above (each gets ``duration_s / 2`` of time).
Every call has a fresh random user and candidates (made before the call is
timed): uniform over the ``--rank_rows`` pins by default, or, with
``--rank_ad_pool=N``, distinct pins of an ads inventory of N (the candidates
of ads ranking come from the ads, a small part of all pins; a row cache that
holds the inventory then fetches only the user row). ``--rank_cache_tables``
picks the cached tables (``serve_ranker --cache_tables``). With
``--rank_prefetch`` each client sends the ranker a ``Prefetch`` of the call's
user before the (timed) Rank call, untimed, as an ads server can when the ad
request arrives, while retrieval runs: a ranker whose row cache holds the
users and the inventory then answers the Rank call with no round trip (the
monolithic ranker gets the Prefetch too, a no-op; hybrids without a cache of
users get none). The clients warm up (``--warmup`` calls each, however long
that takes: a cold cache of a 50k inventory needs ~1,500 calls) before all
start measuring at once.
``--rank_fetch_ahead=1,3`` runs every ranker once per setting of the
service's ``fetch_ahead`` (how far its fetch thread may run ahead of the
scorer; each hybrid is compared to the monolithic ranker of its own setting).
The rankers share one persistent XLA compilation cache in the work folder
(``serve_ranker --compilation_cache_dir``): on a GPU the first compiles its
buckets (42 s on an H200), the others load them (about 1 s); each start is
reported on stderr, and each server's stderr goes to a log file in the work
folder (a server that fails to start ends the run with one ``bench_serving:
error: ...`` line that repeats the server's own error line).
Side by side, the rankers share the accelerator, each preallocating a share of
its memory (``XLA_PYTHON_CLIENT_MEM_FRACTION``, unless set). Two lent H200
hosts took one process only (a second ranker failed: "no supported devices
found for platform CUDA"; earlier hosts ran five): there
``--rank_one_at_a_time`` gives each ranker a turn alone (the serial floor
beside the first monolithic one), so the ratios span time. A second ranker
that fails so makes the benchmark switch to that by itself (said on stderr; the
lines then say ``"one_at_a_time": true``). One JSON line per
mode and client count, and one per mode with the service's own counters (how
many requests the batcher merged):

  {"bench": "serving", "kind": "rank", "mode": "monolithic"|"hybrid", "shards", "wire",
   "transport", "fetch_ahead", "cache_rows", "ad_pool", "clients", "candidates", "p50_ms",
   "p99_ms", "qps", "device",
   "one_at_a_time", "p50_vs_monolithic", "p99_vs_monolithic", "serial_floor_vs_monolithic",
   ...}
  {"bench": "serving", "kind": "rank_service", "mode", "requests_per_batch",
   "candidates_per_batch", "server_p50_ms", "fetch_p50_ms", "score_p50_ms", "by_code",
   "cache_hit_rate" (rows, with a row cache, since the ranker started: every client
   count and the warmup; else null), "cache_bytes" (the row cache's arrays, or
   null), ...}

(``server_p50_ms``: a Rank call inside the service, received to answered;
``fetch_p50_ms`` and ``score_p50_ms``: one batch's embedding fetch and its
scoring there, ``RankerService.stats``: a hybrid's fetch minus the monolithic
one's is what the shards add.)

The floor of the hybrid: a ranker that fetches a request's rows from a shard
and then scores them does the monolithic ranker's work (the dequantization
stays in the ranker with the quantized wire and moves to the shard with
float32) plus one gRPC round trip of the fetched bytes, to a
server that sat idle while the previous request was scored (on this box an
idle gap of 3 ms added 0.3-0.65 ms to an echo, ``--parts=idle`` below). The ``serial_floor`` kind
measures exactly that, time-sliced with the rankers: a monolithic Rank call,
then one echo round trip of the request and response sizes of one request's
one-shard fetch (a user row, ``--rank_candidates`` pin and advertiser rows) in
the first of ``--rank_wires``, over the first of ``--rank_transports``.
No serial fetch-then-score design beats its ratio on the machine at hand;
it is repeated in every hybrid line as ``serial_floor_vs_monolithic``:

  {"bench": "serving", "kind": "rank_serial_floor", "clients", "wire", "transport",
   "fetch_request_bytes", "fetch_response_bytes", "p50_ms", "p99_ms",
   "p50_vs_monolithic", ...}

Target: hybrid p50 and p99 within 1.15x of monolithic (the paper's "neutral
end-to-end latency"). Smoke (~1 min on a busy 2-core box): ``--parts=rank
--rank_rows=20000 --rank_clients=1,2 --duration_s=1 --warmup=5``.

Hedged lookups (``--parts=hedge``): two shard server processes serve the same
single shard (a primary and its replica). One client process per
``--hedge_clients`` entry runs ``EmbeddingClient`` s over them, time-sliced
as above: one that fails over (the default) and one per ``--hedge_after_ms``
value with that ``hedge_after_s`` (and ``--hedge_budget``; ``auto``: the adaptive
delay, with ``--hedge_quantile``). First with both
replicas healthy (the cost of hedging),
then while a thread of the benchmark stops one replica at random for
``--hedge_stall_ms`` (SIGSTOP, then SIGCONT) about every
``--hedge_stall_every_ms`` (a GC pause, a noisy neighbour). Each mode gets
``duration_s`` of the time. One line per mode, client count and stall setting:

  {"bench": "serving", "kind": "hedge", "mode": "failover"|"hedged", "clients",
   "stalls" (stalls while the clients ran, their warmup included), "stall_ms", "stall_every_ms", "hedge_after_ms",
   "hedge_budget", "p50_ms", "p99_ms", "p999_ms", "max_ms", "hedges_per_request",
   "throttled_per_request" (late tries not hedged: budget spent),
   "hedge_quantile", "final_hedge_delay_ms" (``auto`` only: per client, its
   delay per shard in ms when the run ended; each client starts cold, so the
   first 100 lookups of a run, half of them in its warmup, are not hedged),
   "p50_vs_failover", "p99_vs_failover", "p999_vs_failover", ...}

Round trips after idle (``--parts=idle``, ~30 s plus writing a ``--rows``
artifact): a shard of a hybrid ranker sits idle while the ranker scores, then
gets the next fetch. This part times one client's round trips to the gRPC echo
server and to the same echo over a bare TCP socket
(``echo_server.serve_tcp_forever``), each call preceded by ``--idle_gaps_ms``
of sleep, with a fetch's sizes (``--idle_request_bytes``,
``--idle_response_bytes``: the quantized one-shard fetch of 1 user x 500
candidates); and, as a third "transport" with no I/O and no thread hand-off at
all, one lookup's server work in the benchmark's own thread (the shard
server's request handler on ``--ids`` rows of the ``--rows`` table, as
``server_compute``). Gaps and transports are interleaved in blocks of 10 calls
(the first call of a block is not counted: its server sat idle for the whole
previous block). One line per transport and gap:

  {"bench": "serving", "kind": "idle_rtt", "transport": "grpc"|"tcp", "gap_ms",
   "p50_ms", "p99_ms", "p50_added_ms" (over the same transport with no gap),
   "p50_vs_no_gap", ...}
  {"bench": "serving", "kind": "idle_compute", "ids", "rows", "gap_ms", "p50_ms", ...}

On this project's 2-core VM (2026-11-26) a gRPC round trip of those sizes
took 0.5-0.8 ms back to back and 1.3-1.8 ms after 5 ms idle, where bare TCP
went from 0.03-0.06 to 0.15-0.25 ms: each of the several thread wake-ups in a
gRPC call pays the wake-up of an idle virtual CPU. The lookup's NumPy work
alone (512 ids, 1M rows) took 0.25 ms back to back, 0.34 ms after 1 ms of
sleep and 0.69 ms after 5 ms (2.8x): on this box, work that follows idle time
is slow whatever it is, so a request that crosses processes and threads pays
it at every step.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import queue
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

import numpy as np
from absl import flags

from launch import common

_ROWS = flags.DEFINE_integer("rows", 1_000_000, "Rows of the synthetic table.")
_DIM = flags.DEFINE_integer("dim", 64, "Embedding dim.")
_BITS = flags.DEFINE_integer("bits", 4, "Quantization bits (4 or 8).")
_IDS = flags.DEFINE_integer("ids", 512, "Ids per lookup.")
_SHARDS = flags.DEFINE_list("shards", ["1", "2", "4"], "Shard counts to measure.")
_CLIENTS = flags.DEFINE_list("clients", ["1", "2", "4", "8", "16"], "Concurrent clients.")
_DURATION = flags.DEFINE_float(
    "duration_s", 4.0, "Measured seconds per point (shared by the kinds measured in it)."
)
_SLICE = flags.DEFINE_float(
    "slice_s", 0.1, "Time slice of each kind when two are measured interleaved."
)
_TRANSPORTS = flags.DEFINE_list(
    "transports",
    ["stream", "unary"],
    "Lookup transports to measure (EmbeddingClient transport=), each against the echo "
    "floor of the same transport (EchoStream / Echo).",
)
_WARMUP = flags.DEFINE_integer("warmup", 50, "Unmeasured requests per client first.")
_SERVER_WORKERS = flags.DEFINE_integer("server_workers", 8, "Handler threads per server.")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Where the artifacts go and stay (default: a temp dir, removed at the end)."
)
_PARTS = flags.DEFINE_list(
    "parts",
    ["lookup", "rank"],
    "What to measure: lookup, rank, idle (round trips after idle), hedge (failover against "
    "hedged lookups with a stalling replica).",
)
_RANK_ROWS = flags.DEFINE_integer(
    "rank_rows", 1_000_000, "User and pin rows of the ranking artifact."
)
_RANK_CANDIDATES = flags.DEFINE_integer("rank_candidates", 500, "Candidates per Rank call.")
_RANK_SHARDS = flags.DEFINE_list(
    "rank_shards", ["1", "2"], "Embedding shard counts of the hybrid rankers (one ranker each)."
)
_RANK_WIRES = flags.DEFINE_list(
    "rank_wires",
    ["quantized", "float32"],
    "Wire formats of the hybrid rankers (one ranker per shard count and wire); the serial "
    "floor uses the first.",
)
_RANK_TRANSPORTS = flags.DEFINE_list(
    "rank_transports",
    ["stream"],
    "Fetch transports of the hybrid rankers (serve_ranker --transport; one ranker per shard "
    "count, wire and transport); the serial floor's echo uses the first.",
)
_RANK_FETCH_AHEAD = flags.DEFINE_list(
    "rank_fetch_ahead",
    ["1"],
    "Rankers' fetch_ahead settings to run side by side (e.g. 1,3); each hybrid is compared "
    "to the monolithic ranker of its own setting; the serial floor uses the first.",
)
_RANK_CLIENTS = flags.DEFINE_list("rank_clients", ["1", "4"], "Concurrent Rank clients.")
_RANK_CACHE_ROWS = flags.DEFINE_list(
    "rank_cache_rows",
    ["0"],
    "Hybrid rankers' serve_ranker --cache_rows settings (one ranker per shard count, "
    "wire, transport and setting; 0: no row cache).",
)
_RANK_CACHE_TABLES = flags.DEFINE_list(
    "rank_cache_tables",
    [],
    "Hybrid rankers with a row cache: serve_ranker --cache_tables (default: all the "
    "ranker's tables; e.g. pin,advertiser leaves the users, all fresh here, out).",
)
_RANK_PREFETCH = flags.DEFINE_bool(
    "rank_prefetch",
    False,
    "Before each Rank call (untimed), send the ranker a Prefetch of the call's user, as an "
    "ads server can when the ad request arrives, while retrieval runs (RankerService."
    "prefetch): the Rank call then finds the user's row in the row cache. Sent to the "
    "monolithic ranker (a no-op) and to the hybrids whose row cache holds the user table.",
)
_RANK_AD_POOL = flags.DEFINE_integer(
    "rank_ad_pool",
    0,
    "Candidates: 0 (default): uniform over all --rank_rows pins; N: the ads inventory is "
    "N pins (the first N rows), each request's candidates are distinct pins drawn from it.",
    lower_bound=0,
)
_RANK_ONE_AT_A_TIME = flags.DEFINE_bool(
    "rank_one_at_a_time",
    False,
    "Run the rankers one after another instead of side by side (for an accelerator that "
    "takes one process at a time, as two lent H200 hosts did); ratios then span time. "
    "Side by side falls back to this by itself when a second ranker finds no device.",
)

_HEDGE_AFTER = flags.DEFINE_list(
    "hedge_after_ms",
    ["2", "5"],
    "--parts=hedge: hedge_after_s of the hedged clients, in ms (one client each); 'auto': "
    "the adaptive delay (EmbeddingClient(hedge_after_s='auto')).",
)
_HEDGE_QUANTILE = flags.DEFINE_float(
    "hedge_quantile", 0.99, "--parts=hedge: the 'auto' client's hedge_quantile."
)
_HEDGE_BUDGET = flags.DEFINE_float(
    "hedge_budget", 0.05, "--parts=hedge: the hedged clients' hedge_budget."
)
_HEDGE_STALL = flags.DEFINE_float(
    "hedge_stall_ms", 20.0, "--parts=hedge: how long a stalled replica stays stopped."
)
_HEDGE_STALL_EVERY = flags.DEFINE_float(
    "hedge_stall_every_ms",
    200.0,
    "--parts=hedge: a stall starts this often (on one of the two replicas, at random).",
)
_HEDGE_CLIENTS = flags.DEFINE_list("hedge_clients", ["1", "4"], "--parts=hedge: clients.")

_TABLE = "item"


_IDLE_GAPS = flags.DEFINE_list(
    "idle_gaps_ms", ["0", "1", "2", "3", "5", "10"], "--parts=idle: idle time before each call."
)
_IDLE_CALLS = flags.DEFINE_integer(
    "idle_calls", 300, "--parts=idle: counted calls per transport and gap."
)
_IDLE_REQUEST = flags.DEFINE_integer(
    "idle_request_bytes", 8085, "--parts=idle: request size (a one-shard rank fetch)."
)
_IDLE_RESPONSE = flags.DEFINE_integer(
    "idle_response_bytes", 32144, "--parts=idle: response size (its quantized rows)."
)

# ---- client processes (closed loop) ----


def _caller(task: dict, rng):
    """``(one(i), close())`` for one kind of request: echo, rank, serial_floor or lookup."""
    if task["kind"] == "serial_floor":
        # A monolithic Rank call, then one echo round trip of a hybrid fetch's bytes
        # to a server that sat idle during the call (as a shard does between fetches).
        rank, close_rank = _caller(dict(task, kind="rank"), rng)
        echo, close_echo = _caller(dict(task, kind="echo", address=task["echo_address"]), rng)

        def rank_then_echo(i):
            return rank(i), echo(i)

        rank_then_echo.prepare = rank.prepare
        return rank_then_echo, (lambda: (close_rank(), close_echo()))
    if task["kind"] == "echo":
        # One echo server (``address``), or a fan-out to several (``addresses``):
        # every request goes out first, then the answers are read in turn, as
        # EmbeddingClient fans a lookup out to its shards.
        import grpc

        from serving import echo_server, streaming

        addresses = task.get("addresses") or [task["address"]]
        channels = [grpc.insecure_channel(a) for a in addresses]
        payload = echo_server.echo_request(
            request_bytes=task["request_bytes"], response_bytes=task["response_bytes"]
        )
        if task.get("transport", "unary") == "stream":  # the client's own stream machinery
            watchdog = streaming.DeadlineWatchdog()
            pools = [
                streaming.StreamPool(ch, echo_server.ECHO_STREAM_METHOD, watchdog=watchdog)
                for ch in channels
            ]

            def close():
                for streams in pools:
                    streams.close()
                watchdog.close()
                for ch in channels:
                    ch.close()

            if len(pools) == 1:
                return (lambda i: pools[0].call(payload, time.monotonic() + 5)), close

            def fan_out(i):
                deadline = time.monotonic() + 5
                return [wait() for wait in [p.send(payload, deadline) for p in pools]]

            return fan_out, close
        calls = [ch.unary_unary(echo_server.ECHO_METHOD) for ch in channels]
        if len(calls) == 1:
            return (lambda i: calls[0](payload, timeout=5)), channels[0].close
        # Unary: the first call inline, the others on a persistent pool (as the client).
        from concurrent import futures

        executor = futures.ThreadPoolExecutor(len(calls) - 1)

        def fan_out_unary(i):
            futs = [executor.submit(c, payload, timeout=5) for c in calls[1:]]
            return [calls[0](payload, timeout=5)] + [f.result() for f in futs]

        def close_unary():
            executor.shutdown()
            for ch in channels:
                ch.close()

        return fan_out_unary, close_unary
    if task["kind"] == "rank":
        import grpc

        channel = grpc.insecure_channel(task["address"])
        call = channel.unary_unary(task["method"])
        # A fresh user and candidates every call (a ranker's row cache must not see
        # the same requests again), made outside the timed call (``prepare``).
        state = {}
        prefetch = None
        if task.get("prefetch"):  # the user's row fetched ahead of the (timed) call
            from serving.protos import embedding_pb2 as pb

            prefetch = channel.unary_unary(task["prefetch_method"])

        def rank(i):
            return call(state.pop("next"), timeout=10)

        def prepare(i):
            req = _rank_request(rng, task)
            state["next"] = req.SerializeToString()
            if prefetch is not None:
                prefetch(pb.PrefetchRequest(user_row=req.user_row).SerializeToString(),
                         timeout=10)

        rank.prepare = prepare
        return rank, channel.close
    from serving import client as client_lib

    batches = [rng.integers(0, task["rows"], task["ids"]) for _ in range(64)]
    client = client_lib.EmbeddingClient.from_artifact(
        task["manifest"], task["addresses"], deadline_s=5, transport=task["transport"],
        hedge_after_s=task.get("hedge_after_s"), hedge_budget=task.get("hedge_budget", 0.05),
        **({"hedge_quantile": task["hedge_quantile"]}  # the adaptive delay's only
           if task.get("hedge_after_s") == "auto" else {}),
    )

    def lookup(i):
        return client.lookup(_TABLE, batches[i % len(batches)])

    lookup.counters = lambda: {  # see _client_loop
        "hedges_sent": client.hedges_sent, "hedges_throttled": client.hedges_throttled}
    lookup.final = lambda: {"hedge_delays_s": client.hedge_delays_s}
    return lookup, client.close


def _client_loop(task: dict, ready) -> dict:
    """Closed loop for ``duration_s`` from a common start; returns latencies per kind.

    After its warm-up the client calls ``ready()``, which returns the start
    (``time.time()``, the same for every client of the run: see ``_ClientPool.run``),
    so a long warm-up never eats into the measured time.

    With several kinds (``task["kinds"]``), time is cut into slices of
    ``slice_s`` and every client sends kind ``k`` in slices ``k, k + K, ...``:
    the kinds are measured under the same processes, load and machine state,
    interleaved, each getting ``duration_s / K`` of the time.
    """
    rng = np.random.default_rng(task["seed"])
    kinds = task.get("kinds") or [task]
    callers = [_caller(dict(task, **k), rng) for k in kinds]
    # A kind whose call needs a fresh request made first has ``one.prepare(i)``:
    # called before the timer starts.
    prepares = [getattr(one, "prepare", None) for one, _ in callers]
    for (one, _), prepare in zip(callers, prepares, strict=True):
        for i in range(task["warmup"]):
            if prepare is not None:
                prepare(i)
            one(i)
    start = ready()
    while time.time() < start:
        time.sleep(0.001)

    def counters() -> list[dict]:  # a kind's counters (``one.counters``), if it has any
        return [getattr(one, "counters", dict)() for one, _ in callers]

    before = counters()
    slice_s = task.get("slice_s", 0.1)
    end = start + task["duration_s"]
    lat: list[list[float]] = [[] for _ in kinds]
    i = 0
    while (now := time.time()) < end:
        k = int((now - start) / slice_s) % len(kinds)
        if prepares[k] is not None:
            prepares[k](i)
        t0 = time.perf_counter()
        callers[k][0](i)
        lat[k].append(time.perf_counter() - t0)
        i += 1
    extras = [{k: v - b[k] for k, v in a.items()} for a, b in zip(counters(), before, strict=True)]
    finals = [getattr(one, "final", dict)() for one, _ in callers]  # state at the end
    for _, close in callers:
        close()
    return {"latencies": lat, "extras": extras, "finals": finals}


def _worker(task_q, result_q, start_q) -> None:
    while True:
        task = task_q.get()
        if task is None:
            return

        def ready():  # warmed up: say so, then wait for the run's common start
            result_q.put({"ready": True})
            return start_q.get(timeout=_WARMUP_TIMEOUT_S + 60)

        try:
            result_q.put(_client_loop(task, ready))
        except Exception as e:  # report, don't hang the parent (before ready: instead of it)
            result_q.put({"error": repr(e)})


_WARMUP_TIMEOUT_S = 900  # a client's --warmup requests, at most (then the run fails)


class _ClientPool:
    def __init__(self, n: int):
        ctx = mp.get_context("spawn")
        self.task_q, self.result_q, self.start_q = ctx.Queue(), ctx.Queue(), ctx.Queue()
        self._runs = 0
        self._broken = ""  # why run() may not be called again
        self.procs = [
            ctx.Process(target=_worker, args=(self.task_q, self.result_q, self.start_q),
                        daemon=True)
            for _ in range(n)
        ]
        for p in self.procs:
            p.start()

    def run(self, task: dict, clients: int) -> list[np.ndarray]:
        """Latencies of every client, one array per kind of ``task["kinds"]`` (or one).

        The clients warm up (``--warmup`` requests each, as long as that takes), then
        all start measuring at one time, set once the last is ready.
        """
        if self._broken:
            raise RuntimeError(f"the client pool is unusable: {self._broken}")
        for c in range(clients):
            # A new seed for every run: the rankers (and their row caches) live across
            # the client counts, and must not see the same requests again.
            self.task_q.put(dict(task, seed=[self._runs, c]))
        self._runs += 1
        errors = []
        t_end = time.monotonic() + _WARMUP_TIMEOUT_S
        for _ in range(clients):  # each client: ready, or failed before it was
            try:
                msg = self.result_q.get(timeout=max(t_end - time.monotonic(), 0.001))
            except queue.Empty:  # clients still in their warm-up would answer a later run
                self._broken = f"clients did not warm up in {_WARMUP_TIMEOUT_S} s"
                raise RuntimeError(f"{self._broken} (lower --warmup)") from None
            if "error" in msg:
                errors.append(msg["error"])
        start_at = time.time() + 0.1 + 0.01 * clients
        for _ in range(clients - len(errors)):
            self.start_q.put(start_at)
        results = [self.result_q.get(timeout=task["duration_s"] + 120)
                   for _ in range(clients - len(errors))]
        errors += [res["error"] for res in results if "error" in res]
        if errors:
            raise RuntimeError(f"client failed: {errors[0]}")
        out = [[] for _ in task.get("kinds") or [task]]
        self.extras = [{} for _ in out]  # per kind: counters summed over the clients
        self.finals = [[] for _ in out]  # per kind: each client's final state
        for res in results:
            for k, lat in enumerate(res["latencies"]):
                out[k].extend(lat)
            for k, extra in enumerate(res["extras"]):
                for name, v in extra.items():
                    self.extras[k][name] = self.extras[k].get(name, 0) + v
            for k, final in enumerate(res["finals"]):
                self.finals[k].append(final)
        return [np.array(x) for x in out]

    def close(self) -> None:
        for _ in self.procs:
            self.task_q.put(None)
        for p in self.procs:
            p.join(10)


def _rank_payload(rng, task) -> bytes:
    """One serialized RankRequest: a random user x ``candidates`` random pins."""
    return _rank_request(rng, task).SerializeToString()


def _rank_request(rng, task):
    """``_rank_payload``'s RankRequest, unserialized."""
    from serving import codec
    from serving.protos import embedding_pb2 as pb

    c = task["candidates"]
    if task.get("ad_pool"):  # distinct pins of the ads inventory (its first rows)
        cands = rng.choice(task["ad_pool"], c, replace=False)
    else:
        cands = rng.integers(0, task["rows"], c)
    req = pb.RankRequest(
        user_row=int(rng.integers(0, task["rows"])),
        candidate_ids=codec.encode_ids(cands),
    )
    req.context["advertiser"] = codec.encode_ids(rng.integers(0, task["advertisers"], c))
    req.context["hour"] = codec.encode_ids(rng.integers(0, 24, c))
    return req


# ---- servers ----


def _start_echo(tcp: bool = False):
    """An echo server process (gRPC, or bare TCP); returns ``(process, address)``."""
    from serving import echo_server

    ctx = mp.get_context("spawn")
    port_q = ctx.Queue()
    echo = ctx.Process(
        target=echo_server.serve_tcp_forever if tcp else echo_server.serve_forever,
        args=(port_q,),
        kwargs={} if tcp else {"workers": _SERVER_WORKERS.value},
        daemon=True,
    )
    echo.start()
    return echo, f"127.0.0.1:{port_q.get(timeout=60)}"


def _fetch_sizes(version: str, candidates: int, tables: dict, wire: str) -> tuple[int, int]:
    """Bytes of a hybrid ranker's one-shard fetch for one request: (request, response).

    One user row plus one pin and one advertiser row per candidate, framed
    exactly as ``EmbeddingClient`` and the shard server frame them (``tables``:
    the manifest's table entries, for dim and dtype).
    """
    from jax_recsys.quant import rowwise
    from serving import codec

    counts = {"user": 1, "pin": candidates, "advertiser": candidates}
    quantized = wire == "quantized"
    request = codec.encode_lookup_request(
        [(t, np.zeros(n, np.int64)) for t, n in counts.items()],
        expected_version=version,
        request_id="0" * 16,
        quantized=quantized,
    )
    rows = []
    for t, n in counts.items():
        dim, bits = int(tables[t]["dim"]), {"int4": 4, "int8": 8}.get(tables[t]["dtype"])
        if quantized and bits:
            zeros = np.zeros(n, np.float32)
            codes = np.zeros((n, rowwise.packed_dim(dim, bits)), np.uint8)
            rows.append((t, dim, codec.QuantizedRows(bits, codes, zeros, zeros)))
        else:
            rows.append((t, dim, np.zeros((n, dim), np.float32)))
    response = codec.encode_lookup_response(rows, version=version, request_id="0" * 16)
    return len(request), len(response)


def _child_env(root: str) -> dict:
    """This environment with the repo first on PYTHONPATH (what was there stays after it)."""
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path)


# How long a server may take to print its line (a ranker compiles first: 47 s on a
# GPU host without the compilation cache).
_START_TIMEOUT_S = 600.0


def _spawn_service(
    module: str, args: list[str], what: str, log_dir: str, env: dict | None = None
):
    """Starts ``python -m module args`` (a server that prints one JSON line when up).

    Its stderr goes to a log file in ``log_dir`` (the work folder); a server that
    exits before its line, or has not printed it after ``_START_TIMEOUT_S`` (it is
    killed then), raises `_StartError`, which repeats the log's error line.

    Returns:
      (process, the JSON line as a dict).
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    fd, log_path = tempfile.mkstemp(
        prefix=f"{module.rsplit('.', 1)[-1]}_", suffix=".log", dir=log_dir
    )
    with os.fdopen(fd, "w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            cwd=root,
            env=dict(_child_env(root), **(env or {})),
            stdout=subprocess.PIPE,
            stderr=log_file,
            text=True,
        )
    ready, _, _ = select.select([proc.stdout], [], [], _START_TIMEOUT_S)
    line = proc.stdout.readline() if ready else ""
    if not line:
        if not ready:
            proc.kill()
        raise _StartError(what, proc.wait(), log_path,
                          None if ready else f"did not start within {_START_TIMEOUT_S:g} s (killed)")
    return proc, json.loads(line)


class _StartError(ChildProcessError):
    """A server that exited before it served: one line with its own error line (an
    OSError: ``common.run`` prints it as ``bench_serving: error: ...``, no traceback).

    Attributes:
      log_text: the end of its log (its stderr), e.g. for `ONE_PROCESS_DEVICE`.
      log_kept: whether the log outlives the run (not in a temporary work folder).
    """

    def __init__(self, what: str, returncode: int, log_path: str, how: str | None = None):
        super().__init__(what)
        self.what, self.returncode, self.log_path = what, returncode, log_path
        self.how = how  # None: it exited (or was killed) on its own
        self.log_kept = True
        with open(log_path, errors="replace") as f:
            self.log_text = "".join(f.readlines()[-15:])
        self.said = common.log_tail(log_path) or "its log says nothing"

    def __str__(self) -> str:
        rc = self.returncode
        how = self.how or ((f"was killed by signal {-rc}" if rc < 0 else f"exited with status {rc}")
                           + " before it served")
        where = f"log: {self.log_path}" if self.log_kept else "--workdir=DIR keeps its log"
        return f"{self.what} {how}: {self.said} ({where})"


def _stop_all(procs) -> None:
    """SIGTERM to every ``(process, ...)`` first, then waits for each (SIGKILL after
    30 s): one that does not stop never keeps the others running."""
    for proc, *_ in procs:
        proc.terminate()
    for proc, *_ in procs:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _spawn_shard(artifact_dir: str, shard: int, num_shards: int) -> tuple[subprocess.Popen, int]:
    args = [
        f"--artifact={artifact_dir}",
        f"--shard={shard}",
        f"--num_shards={num_shards}",
        "--port=0",
        f"--workers={_SERVER_WORKERS.value}",
        "--log_every_s=0",
    ]
    proc, info = _spawn_service(
        "launch.serve_embeddings", args, f"shard {shard}/{num_shards}",
        os.path.dirname(artifact_dir),
    )
    return proc, info["port"]


def _write_artifact(out_dir: str) -> dict:
    """The synthetic ``--rows`` x ``--dim`` table as an artifact in ``out_dir/art``."""
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


def _compute_call(artifact_dir: str):
    """``one(i)``: one lookup's server work in this process, no gRPC (decode, dequantize, encode).

    Calls the shard server's own request handler on 64 prepared requests of
    ``--ids`` distinct random rows, in turn; warmed up before it is returned.
    """
    from serving import codec, embedding_server as es
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
    return lambda i: server._handle_lookup(reqs[i % len(reqs)])


def _server_compute(artifact_dir: str) -> dict:
    """In-process cost of one lookup without gRPC: decode, dedup, dequantize, encode."""
    one = _compute_call(artifact_dir)
    times = []
    for i in range(500):
        t0 = time.perf_counter()
        one(i)
        times.append(time.perf_counter() - t0)
    return {
        "p50_ms": float(np.percentile(times, 50) * 1e3),
        "p99_ms": float(np.percentile(times, 99) * 1e3),
    }


def _spawn_ranker(
    artifact_dir: str,
    shard_ports: list[int],
    wire: str = "quantized",
    fetch_ahead: int = 1,
    transport: str = "stream",
    env: dict | None = None,
    cache_rows: int = 0,
    cache_tables: list[str] | tuple[str, ...] = (),
) -> tuple[subprocess.Popen, dict]:
    shards = ",".join(f"127.0.0.1:{p}" for p in shard_ports)
    t0 = time.perf_counter()
    args = [
        f"--artifact={artifact_dir}",
        f"--shards={shards}",
        "--port=0",
        "--deadline_s=5",
        "--log_every_s=0",
        f"--wire={wire}",
        f"--fetch_ahead={fetch_ahead}",
        f"--transport={transport}",
        f"--cache_rows={cache_rows}",
        *([f"--cache_tables={','.join(cache_tables)}"] if cache_rows and cache_tables else []),
        # One cache for all rankers: same architecture and buckets, compiled once.
        f"--compilation_cache_dir={os.path.join(os.path.dirname(artifact_dir), 'jax_cache')}",
    ]
    proc, info = _spawn_service(
        "launch.serve_ranker", args, f"ranker shards={len(shard_ports)} wire={wire}",
        os.path.dirname(artifact_dir), env,
    )
    print(  # progress: a ranker starts JAX and compiles its buckets first
        f"ranker shards={len(shard_ports)} wire={wire} transport={transport} "
        f"fetch_ahead={fetch_ahead} cache_rows={cache_rows} on {info.get('device')}: up in "
        f"{time.perf_counter() - t0:.1f} s (start_s {info.get('start_s')})",
        file=sys.stderr,
        flush=True,
    )
    return proc, info


def _ranker_env(num_rankers: int) -> dict:
    """Environment for rankers sharing one accelerator: a share of its memory each.

    JAX preallocates 75% of a GPU's memory per process, so a second ranker on the
    same GPU could not get its memory. Each gets ``min(0.75, 0.9 / n)``
    instead, unless ``XLA_PYTHON_CLIENT_MEM_FRACTION`` or
    ``XLA_PYTHON_CLIENT_PREALLOCATE`` is set (turning preallocation off also works,
    but cost 0.35-0.6 ms per scoring call there). Ignored on CPU.
    """
    if {"XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_PREALLOCATE"} & set(os.environ):
        return {}
    return {"XLA_PYTHON_CLIENT_MEM_FRACTION": f"{min(0.75, 0.9 / max(num_rankers, 1)):.3f}"}


def _stop_ranker(proc: subprocess.Popen) -> dict:
    """SIGTERM; returns the service's final stats line."""
    proc.terminate()
    out = proc.communicate(timeout=60)[0]
    for line in out.splitlines():
        if line.startswith("{") and '"stopped"' in line:
            return json.loads(line)["stats"]
    return {}


# The tables of the ranking artifact (`_write_rank_artifact`), in the ranker's order.
_RANK_TABLES = ("user", "pin", "advertiser")


def _write_rank_artifact(out_dir: str) -> tuple[str, int]:
    """A ranking artifact: user/pin/advertiser INT tables and a DCN-v2 ranker."""
    from jax_recsys.quant import artifact
    from jax_recsys.ranking import model as model_lib

    rows, dim = _RANK_ROWS.value, _DIM.value
    advertisers = max(rows // 100, 1)
    shapes = dict(zip(_RANK_TABLES, [(rows, dim), (rows, dim), (advertisers, max(dim // 2, 1))],
                      strict=True))
    rng = np.random.default_rng(1)
    tables = {}
    for name, (r, d) in shapes.items():
        src = np.lib.format.open_memmap(
            os.path.join(out_dir, f"rank_src_{name}.npy"), mode="w+", dtype=np.float32, shape=(r, d)
        )
        for lo in range(0, r, 1 << 16):
            hi = min(lo + (1 << 16), r)
            src[lo:hi] = rng.normal(size=(hi - lo, d)).astype(np.float32)
        src.flush()
        tables[name] = src
    config = model_lib.RankerConfig(
        entity_dims=tuple((n, d) for n, (_, d) in shapes.items()),
        coarse_vocab_sizes=(("hour", 24),),
    )
    _, params = model_lib.init_dense(config, seed=0)
    t0 = time.perf_counter()
    path = os.path.join(out_dir, "rank_art")
    manifest = artifact.write_artifact(
        path,
        tables=tables,
        vocabs={n: np.arange(r, dtype=np.int64) for n, (r, _) in shapes.items()},
        bits=_BITS.value,
        ranker_config=config.to_dict(),
        ranker_params=model_lib.flatten_params(params),
        overwrite=True,
    )
    del tables, src
    for name in shapes:
        os.remove(os.path.join(out_dir, f"rank_src_{name}.npy"))
    print(
        json.dumps(
            {
                "bench": "serving",
                "kind": "rank_artifact",
                "rows": rows,
                "dim": dim,
                "advertisers": advertisers,
                "bits": _BITS.value,
                "version": manifest["version"],
                "write_s": round(time.perf_counter() - t0, 3),
            }
        ),
        flush=True,
    )
    return path, advertisers


class _RankerKey(NamedTuple):
    """One ranker of ``--parts=rank`` (its fields go into its JSON lines as they are)."""

    mode: str  # "monolithic" | "hybrid"
    shards: int
    wire: str  # "" for monolithic
    transport: str  # "" for monolithic
    fetch_ahead: int
    cache_rows: int = 0  # serve_ranker --cache_rows (hybrid)


# What a JAX process says when another one holds the accelerator (lent H200 hosts).
ONE_PROCESS_DEVICE = "no supported devices found for platform"


class _RankSettings(NamedTuple):
    """The ``--parts=rank`` flags, checked (`_rank_settings`)."""

    clients: list[int]
    shard_counts: list[int]
    wires: list[str]
    transports: list[str]
    aheads: list[int]  # fetch_ahead settings
    cache_rows: list[int]
    cache_tables: list[str]  # [] = all (with a cache)


def _rank_settings() -> _RankSettings:
    """The ``--parts=rank`` flags, checked (ValueError naming the flag)."""
    from serving import client as client_lib

    wires = _choices(_RANK_WIRES, client_lib.WIRE_FORMATS)
    cache_rows = common.int_list(_RANK_CACHE_ROWS, minimum=0, distinct=True)
    tables = [t.strip() for t in _RANK_CACHE_TABLES.value]
    if set(tables) - set(_RANK_TABLES) or len(set(tables)) < len(tables):
        raise ValueError(f"--rank_cache_tables={','.join(tables)}: must be distinct tables of "
                         f"the benchmark's ranking artifact, {list(_RANK_TABLES)}")
    if tables and not any(cache_rows):
        raise ValueError("--rank_cache_tables needs a --rank_cache_rows setting > 0 (the "
                         "rankers without a row cache take no --cache_tables)")
    pool_n = _RANK_AD_POOL.value
    if 0 < pool_n < _RANK_CANDIDATES.value or pool_n > _RANK_ROWS.value:
        raise ValueError(f"--rank_ad_pool={pool_n} must be 0 or in "
                         f"[--rank_candidates, --rank_rows]")
    return _RankSettings(
        clients=common.int_list(_RANK_CLIENTS),
        shard_counts=common.int_list(_RANK_SHARDS),
        wires=wires,
        transports=_transports(_RANK_TRANSPORTS),
        aheads=common.int_list(_RANK_FETCH_AHEAD),
        cache_rows=cache_rows,
        cache_tables=tables,
    )


def _rank_bench(workdir: str, pool: _ClientPool, base: dict, rs: _RankSettings) -> None:
    """End-to-end Rank latency: monolithic vs hybrid (shards in other processes)."""
    art_dir, advertisers = _write_rank_artifact(workdir)
    clients = rs.clients
    common = {
        "bench": "serving",
        "kind": "rank",
        "candidates": _RANK_CANDIDATES.value,
        "rows": _RANK_ROWS.value,
        "dim": _DIM.value,
        "bits": _BITS.value,
        "cpus": os.cpu_count(),
    }
    task = dict(
        base,
        kind="rank",
        rows=_RANK_ROWS.value,
        advertisers=advertisers,
        candidates=_RANK_CANDIDATES.value,
        ad_pool=_RANK_AD_POOL.value,
        method="/jax_recsys.serving.RankerService/Rank",
        prefetch_method="/jax_recsys.serving.RankerService/Prefetch",
    )
    common["ad_pool"] = _RANK_AD_POOL.value
    common["cache_tables"] = rs.cache_tables  # [] = all (with a cache)
    common["prefetch"] = _RANK_PREFETCH.value
    shard_counts, aheads, wires, transports = rs.shard_counts, rs.aheads, rs.wires, rs.transports
    from serving import codec

    manifest = codec.read_manifest(art_dir)
    request_bytes, response_bytes = _fetch_sizes(
        manifest["version"], _RANK_CANDIDATES.value, manifest["tables"], wires[0]
    )
    keys = [_RankerKey("monolithic", 0, "", "", ahead) for ahead in aheads]
    caches = rs.cache_rows
    keys += [
        _RankerKey("hybrid", n, wire, transport, ahead, cache)
        for n in shard_counts
        for wire in wires
        for transport in transports
        for ahead in aheads
        for cache in caches
    ]
    # All rankers run side by side and every client alternates between them in
    # time slices: same machine state for all, so the ratios are not the drift of
    # a noisy box between runs. With --rank_one_at_a_time (an accelerator that
    # takes one process) each ranker gets a turn alone, the serial floor beside
    # the first monolithic one.
    one_at_a_time = _RANK_ONE_AT_A_TIME.value
    turns = [[k] for k in keys] if one_at_a_time else [keys]
    shard_procs: dict[int, list] = {}
    results: dict[tuple, dict] = {}  # (key | "floor", clients) -> latency stats
    devices: dict[_RankerKey, str] = {}
    echo = None
    try:
        for n in shard_counts:
            shard_procs[n] = [_spawn_shard(art_dir, i, n) for i in range(n)]
        echo, echo_addr = _start_echo()
        t = 0
        while t < len(turns):
            turn = turns[t]
            rankers = {}
            measured = False
            try:
                env = _ranker_env(len(turn))
                for key in turn:
                    ports = [p for _, p in shard_procs.get(key.shards, [])]
                    rankers[key] = _spawn_ranker(
                        art_dir, ports, key.wire or "quantized", key.fetch_ahead,
                        key.transport or "stream", env, key.cache_rows, rs.cache_tables,
                    )
                    devices[key] = rankers[key][1].get("device")
                kinds = [{"address": f"127.0.0.1:{info['port']}",
                          "prefetch": _RANK_PREFETCH.value and _caches_users(key, rs)}
                         for key, (_, info) in rankers.items()]
                if keys[0] in turn:  # the serial floor (see module docstring), last
                    kinds.append(
                        {
                            "kind": "serial_floor",
                            "address": kinds[0]["address"],
                            "echo_address": echo_addr,
                            "transport": transports[0],
                            "request_bytes": request_bytes,
                            "response_bytes": response_bytes,
                        }
                    )
                # Each kind gets duration_s / 2 of the time, as echo and lookup do.
                duration = _DURATION.value * len(kinds) / 2
                for c in clients:
                    lats = pool.run(
                        dict(task, kinds=kinds, slice_s=_SLICE.value, duration_s=duration), c
                    )
                    per_kind = [_stats(lat, _DURATION.value / 2) for lat in lats]
                    for st in per_kind:
                        st.pop("ids_per_s")
                    for key, st in zip([*turn, "floor"], per_kind, strict=False):
                        results[key, c] = st
                measured = True
            except _StartError as e:
                if len(turn) > 1 and ONE_PROCESS_DEVICE in e.log_text:
                    # An accelerator that takes one process (see the module docstring):
                    # what --rank_one_at_a_time does, without a second run of the user's.
                    print(f"a second ranker could not use the accelerator ({ONE_PROCESS_DEVICE}):"
                          " running the rankers one at a time (--rank_one_at_a_time)",
                          file=sys.stderr, flush=True)
                    one_at_a_time, turns, t = True, [[k] for k in keys], 0
                    results.clear()
                    continue
                raise
            finally:
                for key, (proc, _) in rankers.items():
                    stats = _stop_ranker(proc)
                    if measured:  # a turn that failed has no counters worth a line
                        _print_service_line(common, key, stats)
            t += 1
        for c in clients:
            floor = results["floor", c]
            serial_floor = floor["p50_ms"] / results[keys[0], c]["p50_ms"]
            print(
                json.dumps(
                    {
                        **common,
                        "kind": "rank_serial_floor",
                        "clients": c,
                        "wire": wires[0],
                        "transport": transports[0],
                        "fetch_ahead": aheads[0],
                        "fetch_request_bytes": request_bytes,
                        "fetch_response_bytes": response_bytes,
                        **floor,
                        "p50_vs_monolithic": round(serial_floor, 3),
                    }
                ),
                flush=True,
            )
            for key in keys:
                st = results[key, c]
                line = {**common, **key._asdict(), "clients": c, "device": devices[key], **st}
                line["one_at_a_time"] = one_at_a_time
                if key.mode == "hybrid":
                    # The monolithic ranker of the same fetch_ahead.
                    ref = results[_RankerKey("monolithic", 0, "", "", key.fetch_ahead), c]
                    line.update(
                        p50_vs_monolithic=round(st["p50_ms"] / ref["p50_ms"], 3),
                        p99_vs_monolithic=round(st["p99_ms"] / ref["p99_ms"], 3),
                        serial_floor_vs_monolithic=round(serial_floor, 3),
                        target_vs_monolithic=1.15,
                    )
                print(json.dumps(line), flush=True)
    finally:
        _stop_all([p for procs in shard_procs.values() for p in procs])
        if echo is not None:
            echo.terminate()
            echo.join(10)


def _caches_users(key: _RankerKey, rs: _RankSettings) -> bool:
    """Whether a ranker takes Prefetch calls: monolithic (a no-op) or a row cache of users."""
    tables = rs.cache_tables
    return key.mode == "monolithic" or (key.cache_rows > 0 and (not tables or "user" in tables))


def _ms(value: float | None) -> float | None:
    """A latency of a server's stats, rounded to the microsecond; None (no call) stays."""
    return None if value is None else round(value, 3)


def _print_service_line(common: dict, key: _RankerKey, stats: dict) -> None:
    """One ranker's own counters (``RankerService.stats``) as a rank_service line."""
    print(
        json.dumps(
            {
                **common,
                "kind": "rank_service",
                **key._asdict(),
                "requests_per_batch": round(stats.get("requests_per_batch", 0.0), 3),
                "candidates_per_batch": round(stats.get("candidates_per_batch", 0.0), 1),
                "server_p50_ms": _ms(stats.get("rank_p50_ms")),
                # Per batch, inside the service: lookups + assembly; scoring.
                "fetch_p50_ms": _ms(stats.get("fetch_p50_ms")),
                "score_p50_ms": _ms(stats.get("score_p50_ms")),
                "by_code": stats.get("by_code"),
                "cache_hit_rate": (round(stats["cache_hit_rate"], 4)
                                   if "cache_hit_rate" in stats else None),
                "cache_bytes": stats.get("cache_bytes"),
                "prefetch_rows": stats.get("prefetch_rows"),
            }
        ),
        flush=True,
    )


def _choices(flag, known) -> list[str]:
    """A list flag of distinct values out of ``known`` (ValueError naming the flag)."""
    got = list(flag.value)
    if not got or set(got) - set(known) or len(set(got)) < len(got):
        raise ValueError(f"--{flag.name}={','.join(got)}: must be distinct values of "
                         f"{list(known)}")
    return got


def _transports(flag) -> list[str]:
    """A transports flag, checked against ``serving.client.TRANSPORTS``."""
    from serving import client as client_lib

    return _choices(flag, client_lib.TRANSPORTS)


def _stats(lat_s: np.ndarray, duration_s: float) -> dict:
    if not lat_s.size:
        raise ValueError("a kind of request got no answer in its share of the time: "
                         "raise --duration_s (or lower --slice_s)")
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
    # Bad flags, before any work (the lookup part alone takes minutes): every flag, also
    # those of the parts not run, ends the run here with one line naming it.
    parts = set(_PARTS.value)
    if not parts:
        raise ValueError("--parts: empty; choose from lookup, rank, idle, hedge")
    unknown = parts - {"lookup", "rank", "idle", "hedge"}
    if unknown:
        raise ValueError(f"--parts: unknown {sorted(unknown)}; known: lookup, rank, idle, hedge")
    _check_sizes()
    shard_counts = common.int_list(_SHARDS)
    client_counts = common.int_list(_CLIENTS)
    rank = _rank_settings()
    idle = _idle_settings()
    hedge_clients, hedge_after = _hedge_settings()  # and --transports
    clients = {"lookup": client_counts, "rank": rank.clients, "hedge": hedge_clients}
    workdir = _WORKDIR.value or tempfile.mkdtemp(prefix="bench_serving_")
    os.makedirs(workdir, exist_ok=True)
    base = {
        "warmup": _WARMUP.value,
        "duration_s": _DURATION.value,
        "rows": _ROWS.value,
        "ids": _IDS.value,
    }
    pool = None
    try:
        # One synthetic table for the idle and lookup parts.
        manifest = _write_artifact(workdir) if parts & {"idle", "lookup", "hedge"} else None
        art_dir = os.path.join(workdir, "art")
        if "idle" in parts:
            _idle_bench(art_dir, *idle)
        if parts - {"idle"}:
            pool = _ClientPool(max(c for part in parts - {"idle"} for c in clients[part]))
        if "lookup" in parts:
            _lookup_bench(art_dir, manifest, pool, base, shard_counts, client_counts)
        if "hedge" in parts:
            _hedge_bench(art_dir, manifest, pool, base, hedge_clients, hedge_after)
        if "rank" in parts:
            _rank_bench(workdir, pool, base, rank)
    except _StartError as e:
        e.log_kept = bool(_WORKDIR.value)  # else its log goes with the work folder
        raise
    finally:
        if pool is not None:
            pool.close()
        if not _WORKDIR.value:  # the artifacts are ~85 MB at the default sizes
            shutil.rmtree(workdir, ignore_errors=True)


def _check_sizes() -> None:
    """The numeric flags, checked (ValueError naming every bad one)."""
    from jax_recsys.quant import rowwise  # NumPy only

    rules = [(f, f.value >= 1, ">= 1") for f in
             (_ROWS, _DIM, _IDS, _SERVER_WORKERS, _RANK_ROWS, _RANK_CANDIDATES, _IDLE_CALLS)]
    rules += [(_WARMUP, _WARMUP.value >= 0, ">= 0"),
              (_BITS, _BITS.value in rowwise.SUPPORTED_BITS, f"one of {rowwise.SUPPORTED_BITS}")]
    rules += [(f, math.isfinite(f.value) and f.value > 0, "finite and > 0")
              for f in (_DURATION, _SLICE)]
    bad = [f"--{f.name}={f.value} (must be {rule})" for f, ok, rule in rules if not ok]
    if bad:
        raise ValueError("bad flags: " + ", ".join(bad))


def _idle_settings() -> tuple[list[float], int, int]:
    """``--parts=idle`` flags, checked: (gaps in ms, request bytes, response bytes)."""
    try:
        gaps = [float(g) for g in _IDLE_GAPS.value]
    except ValueError:
        gaps = []
    if not gaps or not all(math.isfinite(g) and g >= 0 for g in gaps) or 0.0 not in gaps:
        raise ValueError(f"--idle_gaps_ms={','.join(_IDLE_GAPS.value)}: must be finite numbers "
                         "of ms >= 0, 0 among them")
    req_b, resp_b = _IDLE_REQUEST.value, _IDLE_RESPONSE.value
    if req_b < 8 or resp_b < 0:
        raise ValueError("--idle_request_bytes must be >= 8, --idle_response_bytes >= 0")
    return gaps, req_b, resp_b


def _hedge_settings() -> tuple[list[int], list[float | str]]:
    """``--parts=hedge`` flags, checked: its client counts and hedge delays (ms, or "auto")."""
    bad = [f"--{f.name}={f.value} (must be finite and > 0)" for f in
           (_HEDGE_STALL, _HEDGE_STALL_EVERY) if not (math.isfinite(f.value) and f.value > 0)]
    try:
        after = [v.strip().lower() if v.strip().lower() == "auto" else float(v)
                 for v in _HEDGE_AFTER.value]
    except ValueError:
        after = []
    if (not after or not all(a == "auto" or (math.isfinite(a) and a >= 0) for a in after)
            or len(set(after)) < len(after)):
        bad.append(f"--hedge_after_ms={','.join(_HEDGE_AFTER.value)} (distinct finite numbers >= 0 "
                   "or 'auto')")
    if not 0 < _HEDGE_QUANTILE.value < 1:
        bad.append(f"--hedge_quantile={_HEDGE_QUANTILE.value} (must be in (0, 1))")
    elif _HEDGE_QUANTILE.present and "auto" not in after:  # fixed delays ignore it
        bad.append(f"--hedge_quantile={_HEDGE_QUANTILE.value} (needs an 'auto' in "
                   "--hedge_after_ms)")
    if not 0 <= _HEDGE_BUDGET.value <= 1:
        bad.append(f"--hedge_budget={_HEDGE_BUDGET.value} (must be in [0, 1])")
    if bad:
        raise ValueError("bad flags: " + ", ".join(bad))
    _transports(_TRANSPORTS)  # the hedge part uses the first
    return common.int_list(_HEDGE_CLIENTS), after


class _Staller:
    """Stops one of ``pids`` (at random) for ``stall_s`` every ``every_s`` (SIGSTOP /
    SIGCONT), from a thread: a replica that stalls now and then (a GC pause, a noisy
    neighbour, a page-cache miss on its mmap'd table)."""

    def __init__(self, pids: list[int], stall_s: float, every_s: float, seed: int = 0):
        import random
        import threading

        self._pids, self._stall_s, self._every_s = pids, stall_s, every_s
        self._rng = random.Random(seed)
        self._stop = threading.Event()
        self.stalls = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(30)
        for pid in self._pids:  # whatever happens: no server is left stopped
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:  # it died: the run's own error says why
                pass

    def _run(self) -> None:
        while not self._stop.wait(self._rng.uniform(0.5, 1.5) * self._every_s):
            pid = self._rng.choice(self._pids)
            os.kill(pid, signal.SIGSTOP)
            self.stalls += 1
            self._stop.wait(self._stall_s)
            os.kill(pid, signal.SIGCONT)


def _hedge_bench(art_dir, manifest, pool, base, client_counts, hedge_after) -> None:
    """Failover against hedged lookups on a shard with two replicas, one of which now
    and then stalls (see module docstring)."""
    common = {"bench": "serving", "kind": "hedge", "ids": _IDS.value, "dim": _DIM.value,
              "bits": _BITS.value, "rows": _ROWS.value, "cpus": os.cpu_count()}
    transport = _transports(_TRANSPORTS)[0]
    procs = []
    try:
        for _ in range(2):  # two replicas of one shard
            procs.append(_spawn_shard(art_dir, 0, 1))
        _hedge_runs(procs, manifest, pool, base, client_counts, hedge_after, transport, common)
    finally:
        _stop_all(procs)


def _hedge_runs(procs, manifest, pool, base, client_counts, hedge_after, transport,
                common) -> None:
    addresses = [[f"127.0.0.1:{port}" for _, port in procs]]
    kinds = [
        {"kind": "lookup", "manifest": manifest, "addresses": addresses, "transport": transport,
         "hedge_after_s": ms if ms is None or ms == "auto" else ms / 1e3,
         "hedge_budget": _HEDGE_BUDGET.value, "hedge_quantile": _HEDGE_QUANTILE.value}
        for ms in [None, *hedge_after]
    ]
    task = dict(base, kinds=kinds, slice_s=_SLICE.value, duration_s=len(kinds) * _DURATION.value)
    for stalls in (False, True):
        for c in client_counts:
            if stalls:
                with _Staller([p.pid for p, _ in procs], _HEDGE_STALL.value / 1e3,
                              _HEDGE_STALL_EVERY.value / 1e3) as staller:
                    lats = pool.run(task, c)
                n_stalls = staller.stalls
            else:
                lats = pool.run(task, c)
                n_stalls = 0
            where = {"transport": transport, "clients": c, "stalls": n_stalls,
                     "stall_ms": _HEDGE_STALL.value if stalls else 0.0,
                     "stall_every_ms": _HEDGE_STALL_EVERY.value if stalls else 0.0}
            got = []
            for kind, lat, extra, finals in zip(kinds, lats, pool.extras, pool.finals,
                                                strict=True):
                x = lat * 1e3
                hedge_s = kind["hedge_after_s"]
                auto = hedge_s == "auto"
                if auto:
                    adaptive = {"hedge_quantile": kind["hedge_quantile"], "final_hedge_delay_ms": [
                        [None if d is None else round(d * 1e3, 3) for d in f["hedge_delays_s"]]
                        for f in finals]}
                else:
                    adaptive = {}
                got.append({
                    "mode": "failover" if hedge_s is None else "hedged",
                    "hedge_after_ms": (None if hedge_s is None else "auto" if auto
                                       else hedge_s * 1e3),
                    "hedge_budget": None if hedge_s is None else kind["hedge_budget"],
                    "requests": int(x.size),
                    "p50_ms": round(float(np.percentile(x, 50)), 4),
                    "p99_ms": round(float(np.percentile(x, 99)), 4),
                    "p999_ms": round(float(np.percentile(x, 99.9)), 4),
                    "max_ms": round(float(x.max()), 4),
                    "hedges_per_request": round(extra.get("hedges_sent", 0) / x.size, 4),
                    "throttled_per_request": round(
                        extra.get("hedges_throttled", 0) / x.size, 4),
                    **adaptive,
                })
            for st in got:
                ratios = {f"{q}_vs_failover": round(st[f"{q}_ms"] / got[0][f"{q}_ms"], 3)
                          for q in ("p50", "p99", "p999")}
                print(json.dumps({**common, **where, **st, **ratios}), flush=True)


def _idle_bench(art_dir: str, gaps: list[float], req_b: int, resp_b: int) -> None:
    """Round trips (gRPC, bare TCP) and compute after idle time (see module docstring)."""
    import random

    import grpc

    from serving import echo_server

    compute = _compute_call(art_dir)
    grpc_echo, grpc_addr = _start_echo()
    tcp_echo, tcp_addr = _start_echo(tcp=True)
    channel = None
    try:
        channel = grpc.insecure_channel(grpc_addr)
        grpc_call = channel.unary_unary(echo_server.ECHO_METHOD)
        payload = echo_server.echo_request(request_bytes=req_b, response_bytes=resp_b)
        tcp = echo_server.TcpEchoClient(tcp_addr, request_bytes=req_b, response_bytes=resp_b)
        calls = {
            "grpc": lambda: grpc_call(payload, timeout=5),
            "tcp": tcp.call,
            "compute": lambda: compute(random.randrange(64)),
        }
        for call in calls.values():
            for _ in range(50):
                call()
        lat = {(t, g): [] for t in calls for g in gaps}
        block, rng = 10, random.Random(0)
        for _ in range(-(-_IDLE_CALLS.value // block)):
            order = list(lat)
            rng.shuffle(order)
            for transport, gap in order:
                for i in range(block + 1):
                    time.sleep(gap / 1e3)
                    t0 = time.perf_counter()
                    calls[transport]()
                    if i:  # the block's first call follows the whole previous block
                        lat[transport, gap].append(time.perf_counter() - t0)
        tcp.close()
        for transport in calls:
            base_p50 = float(np.percentile(lat[transport, 0.0], 50) * 1e3)
            for gap in gaps:
                x = np.array(lat[transport, gap]) * 1e3
                p50 = float(np.percentile(x, 50))
                if transport == "compute":
                    what = {"kind": "idle_compute", "ids": _IDS.value, "rows": _ROWS.value}
                else:
                    what = {"kind": "idle_rtt", "transport": transport,
                            "request_bytes": req_b, "response_bytes": resp_b}
                line = {
                    "bench": "serving",
                    **what,
                    "gap_ms": gap,
                    "cpus": os.cpu_count(),
                    "requests": int(x.size),
                    "p50_ms": round(p50, 4),
                    "p99_ms": round(float(np.percentile(x, 99)), 4),
                    "p50_added_ms": round(p50 - base_p50, 4),
                    "p50_vs_no_gap": round(p50 / base_p50, 3),
                }
                print(json.dumps(line), flush=True)
    finally:
        if channel is not None:
            channel.close()
        for proc in (grpc_echo, tcp_echo):
            proc.terminate()
            proc.join(10)


def _lookup_bench(art_dir, manifest, pool, base, shard_counts, client_counts) -> None:
    """Embedding lookups (artifact ``_write_artifact``) against the raw-bytes echo floor."""
    common = {
        "bench": "serving",
        "ids": _IDS.value,
        "dim": _DIM.value,
        "bits": _BITS.value,
        "rows": _ROWS.value,
        "cpus": os.cpu_count(),
    }
    print(json.dumps({**common, "kind": "server_compute", **_server_compute(art_dir)}), flush=True)

    echoes = [_start_echo()]
    echo_addr = echoes[0][1]
    # Same payloads as a 1-shard lookup: int64 ids in, float32 rows out (+ a little framing).
    echo_task = dict(
        base,
        kind="echo",
        address=echo_addr,
        request_bytes=8 * _IDS.value + 16,
        response_bytes=4 * _IDS.value * _DIM.value + 32,
    )
    transports = _transports(_TRANSPORTS)
    alone = {}
    try:
        # The floor alone: only the echo server is busy.
        for transport in transports:
            for c in client_counts:
                st = _stats(pool.run(dict(echo_task, transport=transport), c)[0], _DURATION.value)
                alone[transport, c] = st
                print(
                    json.dumps({**common, "kind": "echo", "setting": "alone", "shards": 0,
                                "transport": transport, "clients": c, **st}),
                    flush=True,
                )
        for n in shard_counts:
            procs = [_spawn_shard(art_dir, i, n) for i in range(n)]
            # The fan-out floor of n shards: n echo servers, each echoing a shard's
            # share of the ids and rows (the first is the one-server floor's).
            while len(echoes) < n:
                echoes.append(_start_echo())
            per = -(-_IDS.value // n)
            fanout_task = dict(
                echo_task,
                addresses=[addr for _, addr in echoes[:n]],
                request_bytes=8 * per + 16,
                response_bytes=4 * per * _DIM.value + 32,
            )
            try:
                lookup_kind = {
                    "kind": "lookup",
                    "manifest": manifest,
                    "addresses": [f"127.0.0.1:{port}" for _, port in procs],
                }
                # Echo (one server), fan-out echo (n > 1) and lookup of every
                # transport in alternating time slices, each kind getting
                # duration_s / 2 of the time.
                per_transport = [echo_task, lookup_kind] + ([fanout_task] if n > 1 else [])
                kinds = [dict(kind, transport=t) for t in transports for kind in per_transport]
                duration = _DURATION.value * len(kinds) / 2
                task = dict(echo_task, kinds=kinds, slice_s=_SLICE.value, duration_s=duration)
                for c in client_counts:
                    lats = pool.run(task, c)
                    for k, transport in enumerate(transports):
                        got = [
                            _stats(lat, _DURATION.value / 2)
                            for lat in lats[k * len(per_transport) : (k + 1) * len(per_transport)]
                        ]
                        floor, st = got[0], got[1]
                        fanout = got[2] if n > 1 else floor
                        _print_lookup_lines(
                            common, n, transport, c, st, floor, fanout, alone[transport, c]
                        )
            finally:
                _stop_all(procs)
    finally:
        for proc, _ in echoes:
            proc.terminate()
            proc.join(10)


def _print_lookup_lines(common, n, transport, c, st, floor, fanout, echo_alone) -> None:
    """The floors and the lookup of one shard count, transport and client count."""
    where = {"shards": n, "transport": transport, "clients": c}
    print(json.dumps({**common, "kind": "echo", "setting": "sliced", **where, **floor}), flush=True)
    if n > 1:
        print(
            json.dumps({**common, "kind": "echo", "setting": "fanout", **where, **fanout}),
            flush=True,
        )
    line = {**common, "kind": "lookup", **where, **st}
    for name, ref in (("echo", floor), ("fanout_echo", fanout), ("echo_alone", echo_alone)):
        line[f"p50_vs_{name}"] = round(st["p50_ms"] / ref["p50_ms"], 3)
        line[f"p99_vs_{name}"] = round(st["p99_ms"] / ref["p99_ms"], 3)
    line.update(target_p50_ms=1.0, target_p99_ms=2.0, target_vs_echo=1.5)
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
    common.run(main)
