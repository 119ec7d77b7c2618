"""CPU embedding shard server: row lookups over gRPC from a mmap'd serving artifact.

One server holds shard i of S of every table of a serving artifact: the
contiguous row range ``[lo, hi)`` given by ``serving.codec.shard_range``. The
INT4/INT8 codes stay memory-mapped; a lookup gathers the requested rows,
dequantizes only those (``jax_recsys.quant.rowwise.dequantize_rows``; each
distinct row once when a quarter or more of the ids are repeats,
``codec.worth_deduplicating``) and answers float32 rows as raw bytes
(``serving/protos/embedding.proto``, written by
``codec.encode_lookup_response`` with a single copy of the rows). A request
marked ``quantized`` gets the rows of INT4/INT8 tables as stored instead
(codes, and scale and bias widened to float32: 40 bytes per INT4 row of dim 64
against 256) and the client dequantizes them with the same function.

Two ways in: unary ``Lookup`` and ``LookupStream``, one long-lived call that
answers each request as ``Lookup`` would, in order, without gRPC's per-call
setup (``EmbeddingClient(transport="stream")``, the default, keeps one per
concurrent caller; ``serving.streaming``). Each open stream holds a thread of
its own, up to ``max_streams`` (one more is refused RESOURCE_EXHAUSTED and the
client goes unary); a stream message being answered counts toward
``max_concurrent_rpcs`` like a unary call.

Robustness: every malformed request (bad protobuf, byte lengths not a
multiple of 8, empty, unknown table, ids outside the shard, too many ids) is
answered INVALID_ARGUMENT with a message, a pinned version the server does
not hold FAILED_PRECONDITION (on a stream, that status ends the stream);
nothing a client sends can crash the server.

Versions: ``swap(path)`` loads a new artifact while serving. Each request
takes one immutable snapshot of the served versions when it starts, so
requests in flight finish on the version they started with; for
``swap_window_s`` after a swap both the old and the new version are served
(chosen by ``expected_version``) so the shards and the ranker can switch
together without a failed request.

This module imports NumPy, gRPC, the stdlib and the NumPy-only parts of
``jax_recsys.quant`` -- never JAX (tests/test_serving_server.py checks).

Dimension legend: n ids in a request, D embedding dim, R table rows.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time

import grpc
import numpy as np
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2

from jax_recsys.quant import artifact as artifact_lib, rowwise
from serving import codec, grpc_util, versions as versions_lib
from serving.protos import embedding_pb2 as pb

log = logging.getLogger(__name__)

_LATENCY_WINDOW = 8192


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """How one embedding shard server runs.

    Attributes:
      artifact: path of the serving artifact folder.
      shard: which shard of ``num_shards`` this server holds.
      num_shards: S, shards every table is split into (contiguous row ranges); at
        most the rows of the largest table (``load_shard``).
      host: interface to bind; loopback unless told otherwise.
      port: port to bind; 0 picks a free one (read ``EmbeddingServer.port``).
      workers: handler threads.
      max_ids_per_request: more ids (summed over tables) is INVALID_ARGUMENT.
      max_message_bytes: gRPC send/receive limit (larger messages are
        RESOURCE_EXHAUSTED by gRPC itself).
      max_concurrent_rpcs: requests in the server at once (handled or waiting
        for a handler thread); one more is RESOURCE_EXHAUSTED at once, which
        the client takes as a reason to try another replica (None: unbounded
        queue). Health checks and Info do not count, and are answered on
        threads of their own (``serving.grpc_util.Server``).
      max_streams: ``LookupStream`` calls open at once (a client keeps one
        per concurrent caller and shard); each holds a thread of its own while
        open, apart from ``workers``, and a lookup it is answering counts
        toward ``max_concurrent_rpcs``; one more stream is RESOURCE_EXHAUSTED at once
        (the client then uses unary ``Lookup``). 0: no streaming.
      tls_cert: PEM server certificate file; with ``tls_key``, serve TLS only.
      tls_key: PEM private key file.
      verify: artifact check at load: "sizes" (stat only, fast start-up),
        "full" (sha256 of every file) or "none".
      swap_window_s: how long the previous version stays servable after a swap.
      log_every_s: period of the request/latency log line (0: never).

    Durations are seconds, finite, >= 0 and at most a day
    (``grpc_util.check_seconds``); a bad field is a ValueError when the config is made.
    """

    artifact: str
    shard: int = 0
    num_shards: int = 1
    host: str = "127.0.0.1"
    port: int = 0
    workers: int = 8
    max_ids_per_request: int = 1 << 16
    max_message_bytes: int = 64 << 20
    max_concurrent_rpcs: int | None = None
    max_streams: int = 64
    tls_cert: str | None = None
    tls_key: str | None = None
    verify: str = "sizes"
    swap_window_s: float = 60.0
    log_every_s: float = 30.0

    def __post_init__(self):
        grpc_util.check_server_settings(self.artifact, self.host, self.port)
        codec.shard_range(0, self.shard, self.num_shards)  # checks shard and num_shards
        for name in ("workers", "max_ids_per_request", "max_message_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        grpc_util.check_max_concurrent_rpcs(self.max_concurrent_rpcs)
        grpc_util.check_max_streams(self.max_streams)
        grpc_util.check_tls_pair(self.tls_cert, self.tls_key)
        grpc_util.check_seconds("swap_window_s", self.swap_window_s)
        grpc_util.check_seconds("log_every_s", self.log_every_s)


class _BadRequest(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclasses.dataclass(frozen=True)
class _ShardTable:
    name: str
    lo: int
    hi: int
    rows: int
    dim: int
    dtype: str
    q: rowwise.QuantizedTable  # rows [lo, hi) only, still mmap'd


@dataclasses.dataclass(frozen=True)
class _Version:
    version: str
    path: str
    tables: dict[str, _ShardTable]


def load_shard(path: str, *, shard: int, num_shards: int, verify: str = "sizes") -> _Version:
    """Loads one shard of every table of an artifact (mmap'd views).

    A table of fewer rows than shards leaves some shards none of its rows (lookups of
    it go to the others): normal for a small table beside large ones, and logged as a
    warning on each shard it leaves empty. More shards than the rows of the largest
    table leave some shards no row of any table, servers that could answer nothing: a
    mistake (an artifact of the wrong size, a shard count for another deployment), so
    every shard of such a deployment refuses, not only the empty ones.

    Args:
      path: artifact folder.
      shard: i.
      num_shards: S.
      verify: "sizes", "full" or "none" (see ``ServerConfig.verify``).

    Returns:
      The loaded version.

    Raises:
      ValueError: ``num_shards`` is more than the rows of the largest table.
    """
    if verify not in ("sizes", "full", "none"):
        raise ValueError(f"verify must be 'sizes', 'full' or 'none', got {verify!r}")
    art = artifact_lib.load_artifact(path, verify=False if verify == "none" else verify)
    meta = art.manifest["tables"] if isinstance(art.manifest, dict) else None
    tables = {}
    for name, q in art.tables.items():
        rows = int(q.codes.shape[0])
        lo, hi = codec.shard_range(rows, shard, num_shards)
        dtype = str(meta[name].get("dtype", "")) if meta else f"int{q.bits}"
        tables[name] = _ShardTable(
            name=name,
            lo=lo,
            hi=hi,
            rows=rows,
            dim=int(q.dim),
            dtype=dtype,
            q=rowwise.slice_rows(q, lo, hi),
        )
    _check_shard_rows(path, tables, shard=shard, num_shards=num_shards)
    return _Version(version=str(art.version), path=str(path), tables=tables)


def _check_shard_rows(path: str, tables: dict[str, _ShardTable], *, shard: int,
                      num_shards: int) -> None:
    """Refuses more shards than the largest table has rows; warns of each table this
    shard holds no rows of (see ``load_shard``)."""
    if not tables:
        return
    largest = max(tables.values(), key=lambda t: t.rows)
    if largest.rows < num_shards:
        raise ValueError(
            f"{path}: num_shards={num_shards} is more than the {largest.rows} rows of its "
            f"largest table ({largest.name!r}): {num_shards - largest.rows} of the shards "
            f"would hold no row of any table; serve it with at most {largest.rows} shards")
    for t in tables.values():
        if t.hi == t.lo:
            log.warning("shard %d/%d holds no rows of table %r (%d rows over %d shards); "
                        "its lookups go to the other shards", shard, num_shards, t.name,
                        t.rows, num_shards)


class _Stats:
    """Request counters and a window of recent lookup latencies."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.codes: collections.Counter[str] = collections.Counter()
        self.ids = 0
        self.latencies_s: collections.deque[float] = collections.deque(maxlen=_LATENCY_WINDOW)

    def record(self, code: grpc.StatusCode, *, ids: int = 0, latency_s: float | None = None):
        with self._lock:
            self.codes[code.name] += 1
            self.ids += ids
            if latency_s is not None:
                self.latencies_s.append(latency_s)

    def summary(self) -> dict:
        """Counters, and p50/p99 of the recent lookups in ms; None before the first."""
        with self._lock:
            p50 = p99 = None  # not 0.0: no lookup was that fast
            if self.latencies_s:
                p50, p99 = (float(v) * 1e3 for v in np.percentile(self.latencies_s, [50, 99]))
            return {
                "requests": int(sum(self.codes.values())),
                "by_code": dict(self.codes),
                "ids": self.ids,
                "lookup_p50_ms": p50,
                "lookup_p99_ms": p99,
            }


class EmbeddingServer:
    """One embedding shard server (see module docstring).

    Usage::

      server = EmbeddingServer(ServerConfig(artifact=path, shard=0, num_shards=2))
      port = server.start()
      ...
      server.swap(new_path)          # serves old + new for swap_window_s
      server.stop(grace=5).wait()
    """

    def __init__(self, config: ServerConfig):
        self.config = config  # checked when made (ServerConfig.__post_init__)
        first = load_shard(
            config.artifact,
            shard=config.shard,
            num_shards=config.num_shards,
            verify=config.verify,
        )
        self._versions: versions_lib.VersionSet[_Version] = versions_lib.VersionSet(
            first.version, first, name=f"shard {config.shard}/{config.num_shards}")
        self._stats = _Stats()
        self._stopping = threading.Event()
        self._rpc: grpc_util.Server | None = None  # set once started
        self._health: health.HealthServicer | None = None
        self._log_thread: threading.Thread | None = None
        self.port: int | None = None

    # ---- lifecycle ----

    def start(self) -> int:
        """Binds and starts serving.

        Returns:
          The bound port.
        """
        cfg = self.config
        rpc = grpc_util.Server(
            workers=cfg.workers,
            max_concurrent_rpcs=cfg.max_concurrent_rpcs,
            thread_name_prefix="emb",
            max_streams=cfg.max_streams,
            options=[
                ("grpc.max_receive_message_length", cfg.max_message_bytes),
                ("grpc.max_send_message_length", cfg.max_message_bytes),
                ("grpc.so_reuseport", 0),
            ],
        )
        server = rpc.grpc_server
        # Raw-bytes handlers: we parse the protobuf ourselves so garbage bytes
        # become INVALID_ARGUMENT with a message rather than gRPC's INTERNAL.
        handlers = {
            "Lookup": rpc.unary_handler(self._lookup),
            # Never shed: a ranker (re)starting must learn the version of a busy shard.
            "Info": grpc.unary_unary_rpc_method_handler(rpc.express(self._info)),
        }
        if cfg.max_streams:
            # Each request answered as Lookup would; a bad one ends its stream.
            handlers["LookupStream"] = rpc.stream_handler(self._lookup)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(codec.SERVICE_NAME, handlers),)
        )
        self._health = rpc.health
        address = grpc_util.host_port(cfg.host, cfg.port)
        port = grpc_util.bind(server, address, tls_cert=cfg.tls_cert, tls_key=cfg.tls_key)
        server.start()
        self._rpc, self.port = rpc, port
        for service in ("", codec.SERVICE_NAME):
            self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        if cfg.log_every_s > 0:
            self._log_thread = threading.Thread(target=self._log_loop, daemon=True)
            self._log_thread.start()
        log.info(
            "shard %d/%d serving version %s on %s",
            cfg.shard,
            cfg.num_shards,
            self.version,
            grpc_util.host_port(cfg.host, port),
        )
        return port

    def stop(self, grace: float | None = 5.0) -> threading.Event:
        """Stops accepting requests; in-flight ones get ``grace`` seconds to finish.

        Args:
          grace: seconds (`grpc_util.check_seconds`: finite, >= 0, at most a day);
            None aborts in-flight requests at once.

        Returns:
          An event set when the server has fully stopped.

        Raises:
          ValueError: a bad ``grace``, before anything is stopped.
        """
        if grace is not None:
            grpc_util.check_seconds("grace", grace)
        self._stopping.set()
        self._versions.close()
        if self._health is not None:
            self._health.enter_graceful_shutdown()
        if self._rpc is None:
            done = threading.Event()
            done.set()
            return done
        stopped = self._rpc.grpc_server.stop(grace)
        self._rpc.end_streams()  # idle ones at once: they would hold the grace period
        return stopped

    def wait(self, timeout: float | None = None) -> bool:
        """Blocks until the server stops (or ``timeout``); True if it stopped."""
        return self._rpc.grpc_server.wait_for_termination(timeout) if self._rpc else True

    def __enter__(self) -> EmbeddingServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop(grace=1.0).wait()

    # ---- versions ----

    @property
    def version(self) -> str:
        """The version served to requests that pin none."""
        return self._versions.current

    @property
    def versions(self) -> list[str]:
        """Every version servable now (two during a swap window)."""
        return self._versions.ids

    def swap(self, path: str, *, window_s: float | None = None) -> str:
        """Loads another artifact and makes it the current version, without a pause.

        The previous version stays servable (to requests pinning it) for
        ``window_s`` seconds, then is retired; requests in flight always finish
        on the version they started with.

        Args:
          path: the new artifact folder.
          window_s: overrides ``config.swap_window_s``.

        Returns:
          The new version id.
        """
        cfg = self.config
        window = cfg.swap_window_s if window_s is None else window_s
        grpc_util.check_seconds("window_s", window)  # before the load
        new = load_shard(path, shard=cfg.shard, num_shards=cfg.num_shards, verify=cfg.verify)
        self._versions.swap(new.version, new, window_s=window)
        return new.version

    def retire(self, version: str) -> bool:
        """Stops serving a non-current version (requests pinning it then fail).

        Args:
          version: the version to drop.

        Returns:
          True if it was dropped.
        """
        return self._versions.retire(version)

    # ---- stats ----

    def stats(self) -> dict:
        """Counters since start: requests by status code, ids, p50/p99 of recent lookups
        (None before the first); calls in flight now."""
        out = self._stats.summary()
        out.update(version=self.version, versions=self.versions, shard=self.config.shard)
        out["in_flight"] = self._rpc.in_flight if self._rpc else 0
        out["streams_open"] = self._rpc.streams_open if self._rpc else 0
        return out

    def _log_loop(self) -> None:
        stats_due = grpc_util.Cadence(self.config.log_every_s)  # no drift by the line's cost
        while not self._stopping.wait(stats_due.left_s()):
            if stats_due.due():
                log.info("stats %s", grpc_util.stats_line(self.stats()))

    # ---- handlers ----

    def _info(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        snap = self._versions.snapshot
        cur = snap.versions[snap.current]
        resp = pb.InfoResponse(
            version=snap.current,
            versions=list(snap.versions),
            shard=self.config.shard,
            num_shards=self.config.num_shards,
            max_ids_per_request=self.config.max_ids_per_request,
        )
        for t in cur.tables.values():
            resp.tables.add(table=t.name, lo=t.lo, hi=t.hi, rows=t.rows, dim=t.dim, dtype=t.dtype)
        return resp.SerializeToString()

    def _lookup(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        t0 = time.perf_counter()
        try:
            payload, n_ids = self._handle_lookup(request)
        except _BadRequest as e:
            self._stats.record(e.code)
            context.abort(e.code, e.message)
        except Exception as e:  # never let a request take the server down
            log.exception("lookup failed")
            self._stats.record(grpc.StatusCode.INTERNAL)
            context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}: {e}")
        self._stats.record(grpc.StatusCode.OK, ids=n_ids, latency_s=time.perf_counter() - t0)
        return payload

    def _handle_lookup(self, request: bytes) -> tuple[bytes, int]:
        bad = grpc.StatusCode.INVALID_ARGUMENT
        try:
            req = pb.LookupRequest.FromString(request)
        except DecodeError as e:
            raise _BadRequest(bad, f"request is not a LookupRequest protobuf: {e}") from None
        snap = self._versions.snapshot  # one snapshot for the whole request
        if req.expected_version:
            ver = snap.versions.get(req.expected_version)
            if ver is None:
                raise _BadRequest(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"version {req.expected_version!r} not served here; "
                    f"shard {self.config.shard} serves {sorted(snap.versions)}",
                )
        else:
            ver = snap.versions[snap.current]
        if not req.tables:
            raise _BadRequest(bad, "empty request: no tables")
        total = 0
        decoded = []
        for entry in req.tables:
            table = ver.tables.get(entry.table)
            if table is None:
                raise _BadRequest(
                    bad, f"unknown table {entry.table!r}; tables: {sorted(ver.tables)}"
                )
            try:
                ids_n = codec.decode_ids(entry.ids, what=f"ids of table {entry.table!r}")
            except codec.CodecError as e:
                raise _BadRequest(bad, str(e)) from None
            total += ids_n.size
            if total > self.config.max_ids_per_request:
                raise _BadRequest(
                    bad, f"too many ids: more than {self.config.max_ids_per_request} per request"
                )
            decoded.append((table, ids_n))
        if total == 0:
            raise _BadRequest(bad, "empty request: no ids")
        rows = [
            (table.name, table.dim, self._rows(table, ids_n, quantized=req.quantized))
            for table, ids_n in decoded
        ]
        return codec.encode_lookup_response(
            rows, version=ver.version, request_id=req.request_id), total

    @staticmethod
    def _rows(
        table: _ShardTable, ids_n: np.ndarray, *, quantized: bool = False
    ) -> np.ndarray | codec.QuantizedRows:
        """float32 [n, D] rows of ``ids_n`` (global rows), in their order.

        Each distinct row is dequantized once when repeats are a quarter of the
        ids or more (``codec.worth_deduplicating``); below that, a repeated row
        is simply dequantized again. With ``quantized`` (and an INT4/INT8
        table): the rows as stored, ``codec.QuantizedRows``, nothing dequantized.
        """
        q = table.q
        quantized = quantized and q.bits in (4, 8)
        if ids_n.size == 0:
            if quantized:
                empty = np.zeros(0, np.float32)
                codes = np.zeros((0, rowwise.packed_dim(table.dim, q.bits)), np.uint8)
                return codec.QuantizedRows(q.bits, codes, empty, empty)
            return np.zeros((0, table.dim), np.float32)
        # Every NumPy call costs ~5-20 us in a handler thread that wakes up
        # cold, so this path makes as few as it can: one sort gives both the
        # range check and the number of repeats.
        local_n = ids_n - table.lo  # cannot wrap into [0, hi - lo) (int64, lo >= 0)
        sorted_n = np.sort(local_n)
        if sorted_n[0] < 0 or sorted_n[-1] >= table.hi - table.lo:
            bad_n = ids_n[(ids_n < table.lo) | (ids_n >= table.hi)]
            raise _BadRequest(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"table {table.name!r}: id {int(bad_n[0])} outside this shard's rows "
                f"[{table.lo}, {table.hi}) (table has {table.rows} rows)",
            )
        if quantized:  # a gather of the stored bytes: nothing worth deduplicating
            return codec.QuantizedRows(
                q.bits,
                q.codes.take(local_n, axis=0, mode="clip"),
                q.scale.take(local_n, mode="clip").astype(np.float32),
                q.bias.take(local_n, mode="clip").astype(np.float32),
            )
        repeats = int(np.count_nonzero(sorted_n[1:] == sorted_n[:-1]))
        if not codec.worth_deduplicating(local_n.size, repeats):
            # Dequantize in the request's order (a repeated row is simply read twice).
            return rowwise.dequantize_rows(q, local_n, checked=False)
        uniq_u, inverse_n = np.unique(local_n, return_inverse=True)
        return rowwise.dequantize_rows(q, uniq_u, checked=False).take(inverse_n, axis=0)


def serve(config: ServerConfig) -> EmbeddingServer:
    """Builds and starts a server (convenience for launch scripts and tests).

    Args:
      config: the server configuration.

    Returns:
      The started server; its bound port is ``server.port``.
    """
    server = EmbeddingServer(config)
    server.start()
    return server
