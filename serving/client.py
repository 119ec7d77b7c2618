"""Client of the embedding shard servers: routing, fan-out, retries, version pinning.

``EmbeddingClient`` turns ``lookup_many({table: rows})`` into one request per
shard that owns any of the rows (contiguous row ranges, see
``serving.codec.shard_range``), sends them in parallel with a deadline,
retries a shard's request on its next replica when one is unreachable, too
slow or shedding load (``RETRYABLE``), or with ``hedge_after_s`` also sends it
to the next replica once the first is late and takes the first answer (hedged
requests; late: after a fixed delay, or with ``"auto"`` a high quantile of the
shard's recent answer times, ``serving.hedge_delay``), and reassembles the
float32 rows in the caller's order (or, with ``lookup_many(..., dequantize=False)``
on the quantized wire, their codes, scale and bias, for ``serving.row_cache``). A
table whose rows repeat a lot (a quarter or more, ``codec.worth_deduplicating``) is
sent once per distinct row and expanded on arrival. Responses from a version other
than the pinned one are refused (``VersionMismatch``); with no pinned version, all
shards of one call must agree. With ``wire="quantized"`` the shards answer INT4/INT8
rows as stored (about a fifth of the bytes) and the client dequantizes them with
the shards' own function (``jax_recsys.quant.rowwise.dequantize_rows``), so the
rows are bit-identical to ``wire="float32"``: once per table, after the parts
from several shards are put together as codes, scale and bias (with 2 shards
and a rank fetch of 1 + 500 + 500 rows after 3 ms idle, 0.09-0.11 ms less than
dequantizing each shard's part in the thread that fetched it).

By default each lookup to a shard is one round trip on a long-lived
``LookupStream`` call (``transport="stream"``, ``serving.streaming``: one
stream per concurrent caller and shard, deadlines kept by a watchdog thread,
a stream broken while idle replaced unnoticed, a shard that refuses streams
asked with unary calls); ``transport="unary"`` makes one ``Lookup`` call each
time. Errors, retries and results are the same either way.

Imports NumPy and gRPC only (never JAX; the lookup messages are written and
read by ``serving.codec``, without copying the rows), so the ranker service and
tools can use it anywhere.

Dimension legend: n rows asked for, D embedding dim, S shards.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import os
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from concurrent import futures

import grpc
import numpy as np

from jax_recsys.quant import rowwise
from serving import codec, grpc_util, hedge_delay, streaming

WIRE_FORMATS = ("float32", "quantized")
TRANSPORTS = ("stream", "unary")
HEDGE_AUTO = "auto"  # hedge_after_s: the delay follows each shard's answer times
# The longest time budget a lookup may have (one day, as every duration the servers
# take): a longer one is refused, as are 0, negatives, NaN and infinity (no lookup
# waits without a deadline).
MAX_DEADLINE_S = grpc_util.MAX_SECONDS

# Worth another replica: down, too slow, shedding load (max_concurrent_rpcs), or
# stopping (grpcio cancels a call that races its server's graceful stop). Lookups
# are reads: asking another replica is always safe.
RETRYABLE = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.CANCELLED,
)


class ServingError(RuntimeError):
    """A lookup that could not be answered.

    Attributes:
      code: the gRPC status code of the (last) failure, or None.
      shard: index of the failing shard, or None.
    """

    def __init__(
        self, message: str, *, code: grpc.StatusCode | None = None, shard: int | None = None
    ):
        super().__init__(message)
        self.code = code
        self.shard = shard


class VersionMismatch(ServingError):
    """A shard answered (or could only answer) another artifact version."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ShardSpec:
    """Where one shard lives and which rows it holds.

    Attributes:
      addresses: ``host:port`` of the primary first, then its replicas.
      ranges: table -> ``(lo, hi)``, the rows ``[lo, hi)`` this shard holds.
    """

    addresses: tuple[str, ...]
    ranges: Mapping[str, tuple[int, int]]


def routing_from_manifest(
    manifest: Mapping | str, addresses: Sequence[Sequence[str] | str]
) -> list[ShardSpec]:
    """Routing table for an artifact split over ``len(addresses)`` shards.

    Args:
      manifest: the artifact's manifest dict, or the artifact folder.
      addresses: per shard, its address or [primary, replicas...].

    Returns:
      One ``ShardSpec`` per shard.
    """
    if not isinstance(manifest, Mapping):
        manifest = codec.read_manifest(manifest)
    table_rows = {name: int(t["rows"]) for name, t in manifest["tables"].items()}
    ranges = codec.table_ranges(table_rows, len(addresses))
    return [
        ShardSpec(addresses=(a,) if isinstance(a, str) else tuple(a), ranges=r)
        for a, r in zip(addresses, ranges, strict=True)
    ]


def _as_spec(shard: ShardSpec | Mapping) -> ShardSpec:
    if isinstance(shard, ShardSpec):
        spec = shard
    else:  # {"addresses": [...], "lo": lo, "hi": hi, "tables": [...]} or {"ranges": {...}}
        if "ranges" in shard:
            ranges = {t: (int(lo), int(hi)) for t, (lo, hi) in shard["ranges"].items()}
        else:
            tables = shard.get("tables")
            if tables is None:
                raise ValueError(f"shard {dict(shard)} needs 'ranges' or 'tables' with 'lo'/'hi'")
            ranges = {t: (int(shard["lo"]), int(shard["hi"])) for t in tables}
        addrs = shard["addresses"]
        spec = ShardSpec(
            addresses=(addrs,) if isinstance(addrs, str) else tuple(addrs), ranges=ranges
        )
    if not spec.addresses:
        raise ValueError("a shard needs at least one address")
    return spec


@dataclasses.dataclass(frozen=True)
class _Route:
    """Per table: shard boundaries for a searchsorted, and each shard's index."""

    starts: np.ndarray  # int64 [k], sorted lo of each shard holding rows (for searchsorted)
    start_list: list[int]  # the same, as Python ints (bisect beats NumPy on a few values)
    end_list: list[int]  # hi of each of those shards
    shard_list: list[int]  # and its index


_Quantized = rowwise.QuantizedTable  # rows of one shard's answer on the quantized wire


def _dense(rows: np.ndarray | _Quantized) -> np.ndarray:
    """float32 [n, D]: dequantized with the shards' own function, or as received."""
    return rowwise.dequantize_rows(rows) if isinstance(rows, _Quantized) else rows


def _take(rows: np.ndarray | _Quantized, index_n: np.ndarray) -> np.ndarray | _Quantized:
    """``rows[index_n]``, of float32 rows or of each array of quantized ones."""
    if isinstance(rows, _Quantized):
        return _Quantized(rows.codes.take(index_n, axis=0), rows.scale.take(index_n),
                          rows.bias.take(index_n), dim=rows.dim, bits=rows.bits)
    return rows.take(index_n, axis=0)


def _reassemble(
    table: str, n: int, pieces: list, dequantize: bool = True
) -> np.ndarray | _Quantized:
    """float32 [n, D] of a table whose rows came from several shards, in the order sent.

    ``pieces``: ``(shard, positions, rows)`` per shard. Quantized parts are put
    together as codes, scale and bias and dequantized once (dequantization is row
    by row, so this is bit-identical to dequantizing each part); not ``dequantize``:
    returned put together, as ``_Quantized``.
    """
    first = pieces[0][2]
    if all(isinstance(rows, _Quantized) for _, _, rows in pieces):
        for shard, _, rows in pieces[1:]:
            if (rows.dim, rows.bits) != (first.dim, first.bits):
                raise ServingError(
                    f"table {table!r}: shards disagree on dim/bits ({first.dim}/{first.bits} "
                    f"vs {rows.dim}/{rows.bits})",
                    shard=shard,
                )
        codes = np.empty((n, first.codes.shape[1]), np.uint8)
        scale, bias = np.empty(n, np.float32), np.empty(n, np.float32)
        for _, pos, rows in pieces:
            codes[pos], scale[pos], bias[pos] = rows.codes, rows.scale, rows.bias
        rows = _Quantized(codes, scale, bias, dim=first.dim, bits=first.bits)
        return rowwise.dequantize_rows(rows) if dequantize else rows
    dense = [(shard, pos, _dense(rows)) for shard, pos, rows in pieces]
    out = np.empty((n, dense[0][2].shape[1]), np.float32)
    for shard, pos, rows in dense:
        if rows.shape[1] != out.shape[1]:
            raise ServingError(
                f"table {table!r}: shards disagree on dim ({out.shape[1]} vs {rows.shape[1]})",
                shard=shard,
            )
        out[pos] = rows
    return out


def check_hedge_after(hedge_after_s) -> None:
    """Raises ValueError unless ``hedge_after_s`` is None, ``"auto"`` or a finite number >= 0."""
    if hedge_after_s is None or hedge_after_s == HEDGE_AUTO:
        return
    # A bool is a number to Python: False would be a 0 ms delay, hedging every request.
    if not (hedge_delay.is_number(hedge_after_s) and math.isfinite(hedge_after_s)
            and hedge_after_s >= 0):
        raise ValueError(
            f"hedge_after_s must be None, {HEDGE_AUTO!r} or a finite number >= 0, "
            f"got {hedge_after_s!r}"
        )


def check_deadline(deadline_s, name: str = "deadline_s") -> float:
    """``deadline_s`` as a float; ValueError (naming ``name``) unless it is a number of
    seconds in ``(0, MAX_DEADLINE_S]`` (not a bool, NaN or infinity)."""
    grpc_util.check_seconds(name, deadline_s, positive=True)
    return float(deadline_s)


def _try_deadline(deadline: float, replicas_left: int) -> float:
    """The deadline of one try with ``replicas_left`` replicas not yet tried (this one
    included): ``r / (r + 1)`` of the time left, the whole of it for the last one.

    Two replicas: the first try gets 2/3 of the budget, so a replica that is slow but
    in time still answers, and one that hangs leaves the next a third.
    """
    if replicas_left <= 1:
        return deadline
    now = time.monotonic()
    return now + max(deadline - now, 0.0) * replicas_left / (replicas_left + 1)


def _shard_error(shard: int, addr: str, e: grpc.RpcError) -> ServingError:
    code = e.code()
    return ServingError(f"shard {shard} ({addr}): {code.name}: {e.details()}", code=code, shard=shard)


class _UnaryPending:
    """A unary lookup in flight, shaped like ``streaming.Pending``."""

    __slots__ = ("_future",)

    def __init__(self, future: grpc.Future):
        self._future = future

    def __call__(self) -> bytes:
        try:
            return self._future.result()
        except grpc.FutureCancelledError:
            raise streaming.Abandoned() from None

    def abandon(self) -> None:
        self._future.cancel()


def _drain(waits) -> None:
    """Reads answers nobody needs any more (the lookup failed), returning their streams."""
    for wait in waits:
        try:
            wait()
        except Exception:  # noqa: BLE001 (the lookup has failed already)
            pass


def _discard(pending) -> None:
    """Gives up on a try nobody waits for: abandons it and reads what is left, so its
    stream leaves the pool (and the watchdog) now rather than at ``close``."""
    pending.abandon()
    _drain([pending])


class _Race:
    """One shard's request raced over its replicas (``EmbeddingClient(hedge_after_s=)``).

    The first try runs in the calling thread (``run``); each hedge timer (the
    client's watchdog thread calls ``expire``) and each retryable failure starts
    the next replica's try on the client's hedge pool. The first answer wins and
    abandons the tries still in flight; a non-retryable error ends the race at once.
    A hedge over the budget waits instead until failover would have handed over
    (``_try_deadline``), and then goes out without a token: hedging is never less
    available than failover.
    """

    def __init__(self, client: EmbeddingClient, shard: int, payload: bytes, deadline: float,
                 first: int):
        self._client, self._shard, self._payload = client, shard, payload
        self._deadline = deadline
        self._addresses = client._specs[shard].addresses
        n = len(self._addresses)
        self._order = [(first + k) % n for k in range(n)]
        # From when the caller starts waiting for this shard, not from the send: the
        # caller reads the shards in turn, and a shard read after a slow one has its
        # answer waiting already (a timer from the send would hedge it for nothing).
        # The adaptive delay measures answer times from here too (_end).
        self._t0 = time.monotonic()
        self._delay, self._record = client._hedge_timing(shard)  # inf: no hedge yet
        self._hedge_at = self._t0 + self._delay
        self._failover_at = _try_deadline(deadline, n)  # failover's first hand-over
        client._earn_hedge_token()
        self._cond = threading.Condition()
        self._launched = 0  # replicas of _order whose try has started
        self._inflight: dict[int, object] = {}  # replica -> its pending (None while sending)
        self._errors: list[tuple[int, grpc.RpcError]] = []
        self._answer: tuple[bytes, int] | None = None
        self._done = False

    def run(self, pending=None) -> tuple[bytes, int]:
        """Waits for the first answer: ``(raw response, replica)``; raises
        ``ServingError``/``VersionMismatch`` as ``EmbeddingClient.lookup_many``.

        Args:
          pending: the first replica's request when it is out already (``_send``).
        """
        first = self._reserve()
        self._client._watchdog.arm(self, min(self._hedge_at, self._failover_at))
        try:
            self._attempt(first, pending)
        except BaseException:  # not a gRPC error (a bug, KeyboardInterrupt): stop the race
            self._end(-1)
            raise
        return self._wait()

    def _reserve(self) -> int | None:
        """The next replica to try, marked in flight; None when none is left (or over)."""
        with self._cond:
            if self._done or self._launched >= len(self._order):
                return None
            replica = self._order[self._launched]
            self._launched += 1
            self._inflight[replica] = None
            return replica

    def _launch(self, replica: int, paid: bool = False) -> None:
        try:
            self._client._hedge_pool.submit(self._attempt, replica, None, paid)
        except RuntimeError:  # the client was closed
            self._lost(replica, streaming.StreamError(
                grpc.StatusCode.CANCELLED, "the client was closed"))

    def expire(self) -> None:
        """The timer: the tries so far are late; ask the next replica too (a hedge,
        paid with a token; or, at failover's hand-over point, free)."""
        now = time.monotonic()
        if now >= self._deadline:
            return
        client = self._client
        with self._cond:
            if self._done or self._launched >= len(self._order):
                return
            free = now >= self._failover_at
            # Lock order: race, then client.
            if not free and not client._take_hedge_token():
                replica, rearm = None, self._failover_at  # over budget: hand over later
            else:
                replica = self._order[self._launched]
                self._launched += 1
                self._inflight[replica] = None
                left = len(self._order) - self._launched
                self._failover_at = _try_deadline(self._deadline, left + 1) if left else now
                rearm = min(now + self._delay, self._failover_at) if left else None
        if replica is not None:
            self._launch(replica, paid=not free)
        if rearm is not None:
            client._watchdog.arm(self, rearm)

    def _register(self, replica: int, pending) -> bool:
        """Records ``replica``'s try; False (and the try discarded) when the race is over."""
        with self._cond:
            if not self._done:
                self._inflight[replica] = pending
                return True
        _discard(pending)
        return False

    def _attempt(self, replica: int, pending=None, paid: bool = False) -> None:
        addr = self._addresses[replica]
        try:
            if pending is None:
                with self._cond:
                    if self._done:  # another try answered meanwhile: send nothing
                        if paid:
                            self._client._refund_hedge_token()
                        return
                pending = self._client._start(addr, self._payload, self._deadline)
            if not self._register(replica, pending):
                return
            try:
                raw = pending()
            except streaming.StreamRefused:  # a fresh stream was refused: go unary
                pending = self._client._start(addr, self._payload, self._deadline, unary=True)
                if not self._register(replica, pending):
                    return
                raw = pending()
        except streaming.Abandoned:
            return
        except grpc.RpcError as e:
            self._lost(replica, e)
            return
        except ValueError as e:  # gRPC: "Cannot invoke RPC: Channel closed!"
            self._lost(replica, streaming.StreamError(grpc.StatusCode.CANCELLED, str(e)))
            return
        self._end(replica, answer=raw)

    def _lost(self, replica: int, e: grpc.RpcError) -> None:
        code = e.code()
        nxt = None
        with self._cond:
            if self._done:
                return
            self._errors.append((replica, e))
            self._inflight.pop(replica, None)
            if code not in RETRYABLE and code != grpc.StatusCode.FAILED_PRECONDITION:
                # The request's fault: another replica would say the same (it is the
                # last error: none is recorded once the race is over).
                others = self._finish_locked()
            elif self._launched < len(self._order) and time.monotonic() < self._deadline:
                nxt = self._order[self._launched]
                self._launched += 1
                self._inflight[nxt] = None
            elif self._inflight:
                return  # another try may still answer
            else:
                others = self._finish_locked()  # every replica failed
        if nxt is not None:
            self._launch(nxt)
        else:
            self._abandon(others)

    def _end(self, replica: int, answer: bytes | None = None) -> None:
        """Ends the race: with ``replica``'s answer, or (None) with what failed so far."""
        now = time.monotonic()
        with self._cond:
            if self._done:
                return
            self._inflight.pop(replica, None)
            if answer is not None:
                self._answer = (answer, replica)
            others = self._finish_locked()
        self._abandon(others)
        if answer is not None and self._record is not None:
            # The race's time to its first answer: when a hedge won, a lower bound
            # on the late try's time, never the hedge's own round trip (which
            # would hide the tail; see serving.hedge_delay).
            self._record(now - self._t0)

    def _finish_locked(self) -> list:
        """Marks the race over (lock held): the tries still in flight, to abandon."""
        self._done = True
        others = [p for p in self._inflight.values() if p is not None]
        self._inflight.clear()
        self._cond.notify_all()
        return others

    def _abandon(self, others: list) -> None:
        self._client._watchdog.disarm(self)
        for p in others:
            p.abandon()

    def _wait(self) -> tuple[bytes, int]:
        with self._cond:
            while not self._done:
                left = self._deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)  # at most MAX_DEADLINE_S (lookup_many's budget)
            timed_out = not self._done
            tried = [self._addresses[r] for r in self._order[: self._launched]]
        if timed_out:
            self._end(-1)
        if self._answer is not None:
            return self._answer
        shard = self._shard
        if timed_out or not self._errors:
            raise ServingError(
                f"shard {shard}: DEADLINE_EXCEEDED: no answer from {', '.join(tried)} "
                "within the deadline", code=grpc.StatusCode.DEADLINE_EXCEEDED, shard=shard)
        replica, e = self._errors[-1]
        code = e.code()
        if code == grpc.StatusCode.FAILED_PRECONDITION:
            refused = [f"{self._addresses[r]}: {x.details()}" for r, x in self._errors
                       if x.code() == code]
            raise VersionMismatch(
                f"shard {shard}: no replica tried serves the pinned version: "
                + "; ".join(refused), code=code, shard=shard)
        raise _shard_error(shard, self._addresses[replica], e)


def _close_transport(pools, stream_pools, watchdog, channels) -> None:
    """``EmbeddingClient.close``; references no client, so it can run as its finalizer."""
    for pool in pools:
        pool.shutdown(wait=False)
    for streams in stream_pools:
        streams.close()
    if watchdog is not None:
        watchdog.close()
    for ch in channels:
        ch.close()


class EmbeddingClient:
    """Looks up rows on a set of embedding shard servers (see module docstring).

    Args:
      shards: one entry per shard: a ``ShardSpec`` or a dict
        ``{"addresses": [primary, replicas...], "ranges": {table: (lo, hi)}}``
        (or ``"lo"``, ``"hi"``, ``"tables"`` when all tables share one range).
      version: the artifact version to pin (requests carry it; answers from
        another version raise ``VersionMismatch``); None accepts whatever the
        shards serve as long as they agree within one call.
      deadline_s: time budget of one ``lookup``/``lookup_many`` call, retries
        included: seconds, > 0 and at most ``MAX_DEADLINE_S`` (one day; anything
        else, NaN and infinity included, is a ValueError). With replicas, a try
        gets ``r / (r + 1)`` of the time left (r replicas not yet tried, this one
        included; 2/3 then the rest for two), so a replica that hangs leaves the
        next time to answer while a slow one still has most of the budget; a
        single address gets the whole budget.
      max_workers: threads that call shards in parallel (the caller's thread
        takes one shard itself).
      dims: table -> D, so that empty lookups have the right shape (learned
        from answers otherwise).
      root_certificates: PEM bytes of the CA for TLS servers; None: plaintext.
      max_message_bytes: gRPC receive/send limit.
      wire: ``"float32"``: the shards dequantize and send float32 rows;
        ``"quantized"``: they send INT4/INT8 rows as stored and this client
        dequantizes them (same results, ~5x fewer bytes for INT4, the
        dequantization moves to the caller's CPU).
      transport: ``"stream"``: lookups go over long-lived ``LookupStream``
        calls, one per concurrent caller and shard (``serving.streaming``:
        no per-call gRPC setup, ~0.14 ms less per lookup on loopback; same
        deadlines, retries and errors; a shard that refuses streams gets unary
        calls); ``"unary"``: one ``Lookup`` call per shard and lookup.
      hedge_after_s: None (default): a shard's replicas are tried one after
        another (failover, budget split as above). A number: hedged requests
        for shards with replicas: when the replica asked first has not answered
        after this long, the same request also goes to the next replica (and
        so on, one more every ``hedge_after_s``), a failed try hands over to
        the next replica at once, and the first answer wins; the others are
        abandoned (their streams closed). Every try may use the whole
        deadline. Set it at or a little above the lookup's p99: a slow or stalled
        replica then costs about that much instead of a failover's share of
        the deadline, for a few more requests (``hedges_sent``; at most about
        ``hedge_budget`` of them, see below). Shards
        without replicas are unaffected; for those with replicas the first try
        still runs in the calling thread, plus a timer on the watchdog thread
        (``launch.bench_serving --parts=hedge``, 1 client on the 2-core box:
        p50 +3% without stalls; with one replica stalled 20 ms every ~200 ms,
        p99.9 0.175x failover's at T = 2 ms). With ``transport="unary"`` the
        first try becomes a gRPC future, which costs more (~0.15 ms a lookup
        there, about +30%): hedge over streams.
        ``"auto"``: the same, with a delay of each shard's own that follows its
        answer times (``serving.hedge_delay``): the ``hedge_quantile`` of the
        shard's last 1,000 answer times as this client measures them (from
        when the caller starts waiting for the shard, as the hedge timer, to
        the first answer; a hedged race counts as the delay plus the hedge's
        round trip, a lower bound on the late try, so hedging does not hide
        the tail it cuts), recomputed every 64 answers, at least
        ``hedge_min_s``; no hedging (failover's hand-over only) until 100
        answers are in. ``hedge_delays_s`` reports the current delays.
        Per request this costs ~1 us. Benchmark as above, two runs: the delay
        settled at 1 ms (the floor) with 1 client, p99.9 with stalls 0.14x
        failover's (2 ms: 0.17x); 2-3.4 ms with 4 clients on the 2-core box,
        p99 with stalls 1.06-1.12x failover's (2 ms: 1.5-1.6x, 5 ms: 1.06x).
      hedge_quantile: with ``"auto"`` (only: another value with a fixed delay,
        which would ignore it, is refused, as is a non-default ``hedge_min_s``):
        the quantile, in (0, 1). 0.99 hedges about 1% of requests when the
        replicas are as fast as usual, well
        under the default budget, which is then left for stalls; a lower one
        hedges more in steady state, which on a saturated box adds the load
        that makes it slower (a fixed delay below the p99 did, see
        ``launch.bench_serving --parts=hedge``).
      hedge_min_s: with ``"auto"``: the delay is never shorter (default 1 ms:
        a shorter one would hedge on the hedge timer's own wake-up jitter on
        a busy box, and an answer read after a slow shard's, waiting already,
        counts as ~0 and would pull the delay towards nothing).
      hedge_budget: hedges sent, at most, per hedged shard request, over time
        (a token bucket, as gRPC's retry throttling: each shard request earns
        ``hedge_budget`` tokens up to ``hedge_burst``, a hedge spends one; with
        none left, the next replica is asked when failover would have asked it,
        ``hedges_throttled``).
        Hedges add load; when the servers are slow because they are
        saturated, hedging every late request would make it worse.
      hedge_burst: tokens the bucket holds (and starts with).
      hedge_workers: threads that wait for hedged tries (only with
        ``hedge_after_s``).
      hedge_history: another client (typically the one this replaces, pinned to
        the previous version) whose adaptive delays this one continues: each
        shard whose replicas are the same addresses shares that client's answer
        times (``hedge_delay.HedgeDelay``) instead of starting cold (no hedging
        for its first ``hedge_delay.WARMUP`` answers). Used only when both
        clients are ``"auto"`` with the same ``hedge_quantile`` and
        ``hedge_min_s``; other shards start cold. The ranker service passes its
        current version's client on a swap.
    """

    def __init__(
        self,
        shards: Sequence[ShardSpec | Mapping],
        *,
        version: str | None = None,
        deadline_s: float = 1.0,
        max_workers: int = 8,
        root_certificates: bytes | None = None,
        max_message_bytes: int = 64 << 20,
        dims: Mapping[str, int] | None = None,
        wire: str = "float32",
        transport: str = "stream",
        hedge_after_s: float | str | None = None,
        hedge_quantile: float = hedge_delay.QUANTILE,
        hedge_min_s: float = hedge_delay.FLOOR_S,
        hedge_budget: float = 0.05,
        hedge_burst: float = 10.0,
        hedge_workers: int = 16,
        hedge_history: EmbeddingClient | None = None,
    ):
        deadline_s = check_deadline(deadline_s)
        check_hedge_after(hedge_after_s)
        hedge_delay.check(hedge_quantile, hedge_min_s, adaptive=hedge_after_s == HEDGE_AUTO)
        if not (0 <= hedge_budget <= 1 and hedge_burst >= 1):
            raise ValueError(
                f"hedge_budget must be in [0, 1] and hedge_burst >= 1, got {hedge_budget} "
                f"and {hedge_burst}"
            )
        if wire not in WIRE_FORMATS:
            raise ValueError(f"wire must be one of {WIRE_FORMATS}, got {wire!r}")
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
        self.wire = wire
        self.transport = transport
        self._pool = futures.ThreadPoolExecutor(
            max_workers=max(1, max_workers), thread_name_prefix="emb-client"
        )
        if hedge_after_s is None or hedge_after_s == HEDGE_AUTO:
            self.hedge_after_s = hedge_after_s
        else:
            self.hedge_after_s = float(hedge_after_s)
        self.hedge_quantile, self.hedge_min_s = float(hedge_quantile), float(hedge_min_s)
        self._hedge_pool = None
        if self.hedge_after_s is not None:
            self._hedge_pool = futures.ThreadPoolExecutor(
                max_workers=max(1, hedge_workers), thread_name_prefix="emb-hedge"
            )
        self._dims = dict(dims or {})
        self._specs = [_as_spec(s) for s in shards]
        if not self._specs:
            raise ValueError("EmbeddingClient needs at least one shard")
        self.version = version
        self.deadline_s = deadline_s
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            # A restarted shard should be found again quickly.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
            ("grpc.enable_retries", 0),
        ]
        self._channels: dict[str, grpc.Channel] = {}
        self._lookup: dict[str, grpc.UnaryUnaryMultiCallable] = {}
        self._streams: dict[str, streaming.StreamPool] = {}
        # Stream deadlines and hedge timers.
        self._watchdog = (
            streaming.DeadlineWatchdog()
            if transport == "stream" or self.hedge_after_s is not None
            else None
        )
        for spec in self._specs:
            for addr in spec.addresses:
                if addr in self._channels:
                    continue
                ch = grpc_util.channel(addr, root_certificates=root_certificates, options=options)
                self._channels[addr] = ch
                self._lookup[addr] = ch.unary_unary(codec.LOOKUP_METHOD)
                if transport == "stream":
                    self._streams[addr] = streaming.StreamPool(
                        ch, codec.LOOKUP_STREAM_METHOD, watchdog=self._watchdog
                    )
        self._finalizer = weakref.finalize(
            self,
            _close_transport,
            [self._pool] + ([self._hedge_pool] if self._hedge_pool else []),
            list(self._streams.values()),
            self._watchdog,
            list(self._channels.values()),
        )
        self._routes = self._build_routes()
        self._preferred = [0] * len(self._specs)  # replica that answered last
        self._lock = threading.Lock()
        self._hedges_sent = 0
        self._hedges_throttled = 0
        self._hedge_budget, self._hedge_burst = float(hedge_budget), float(hedge_burst)
        self._hedge_tokens = self._hedge_burst
        # "auto": per shard with replicas, its answer times and delay (continued
        # from hedge_history's for the same replicas and settings).
        self._delays: list[hedge_delay.HedgeDelay | None] = [
            self._inherited_delay(hedge_history, k)
            or hedge_delay.HedgeDelay(quantile=self.hedge_quantile, floor_s=self.hedge_min_s)
            if self.hedge_after_s == HEDGE_AUTO and len(spec.addresses) > 1 else None
            for k, spec in enumerate(self._specs)
        ]

    def _inherited_delay(self, other: EmbeddingClient | None,
                         shard: int) -> hedge_delay.HedgeDelay | None:
        """``other``'s adaptive delay of ``shard`` when it measures the same replicas
        with the same settings, else None."""
        if not isinstance(other, EmbeddingClient) or shard >= len(other._specs):
            return None
        est = other._delays[shard]
        same = (est is not None
                and tuple(other._specs[shard].addresses) == tuple(self._specs[shard].addresses)
                and (est.quantile, est.floor_s) == (self.hedge_quantile, self.hedge_min_s))
        return est if same else None

    @classmethod
    def from_artifact(
        cls,
        artifact: Mapping | str,
        addresses: Sequence[Sequence[str] | str],
        *,
        pin: bool = True,
        **kwargs,
    ) -> EmbeddingClient:
        """A client for an artifact split over ``len(addresses)`` shards.

        Args:
          artifact: the artifact folder or its manifest dict.
          addresses: per shard, its address or [primary, replicas...].
          pin: pin the artifact's version.
          **kwargs: passed to the constructor.

        Returns:
          The client.
        """
        manifest = artifact if isinstance(artifact, Mapping) else codec.read_manifest(artifact)
        version = manifest["version"] if pin else None
        dims = {name: int(t["dim"]) for name, t in manifest["tables"].items()}
        return cls(routing_from_manifest(manifest, addresses), version=version, dims=dims, **kwargs)

    def _build_routes(self) -> dict[str, _Route]:
        per_table: dict[str, list[tuple[int, int, int]]] = {}
        for i, spec in enumerate(self._specs):
            for table, (lo, hi) in spec.ranges.items():
                if hi > lo:
                    per_table.setdefault(table, []).append((int(lo), int(hi), i))
        routes = {}
        for table, items in per_table.items():
            items.sort()
            for (_, hi_a, a), (lo_b, _, b) in zip(items, items[1:], strict=False):
                if lo_b < hi_a:
                    raise ValueError(f"table {table!r}: shards {a} and {b} overlap")
            arr = np.array(items, dtype=np.int64)
            routes[table] = _Route(
                starts=arr[:, 0],
                start_list=arr[:, 0].tolist(),
                end_list=arr[:, 1].tolist(),
                shard_list=arr[:, 2].tolist(),
            )
        return routes

    @property
    def hedges_sent(self) -> int:
        """Hedged tries sent so far (a replica asked because another was late)."""
        return self._hedges_sent

    @property
    def hedge_delays_s(self) -> list[float | None]:
        """Per shard, the hedge delay now (seconds): ``hedge_after_s`` when it is a
        number, the adaptive one with ``"auto"``; None for a shard that is not
        hedged (no replica, no ``hedge_after_s``, or still warming up)."""
        return [
            None if not self._hedged(shard)
            else self.hedge_after_s if est is None else est.delay_s
            for shard, est in enumerate(self._delays)
        ]

    def _hedge_timing(self, shard: int):
        """``(delay in s, inf while warming up; its recorder, None for a fixed delay)``
        of a hedged shard's race."""
        est = self._delays[shard]
        if est is None:
            return self.hedge_after_s, None
        delay = est.delay_s
        return (math.inf if delay is None else delay), est.record

    @property
    def hedges_throttled(self) -> int:
        """Late tries not hedged because the hedge budget was spent."""
        return self._hedges_throttled

    def _earn_hedge_token(self) -> None:
        with self._lock:
            self._hedge_tokens = min(self._hedge_tokens + self._hedge_budget, self._hedge_burst)

    def _refund_hedge_token(self) -> None:
        """A paid hedge that found its race over before it went out."""
        with self._lock:
            self._hedge_tokens = min(self._hedge_tokens + 1, self._hedge_burst)
            self._hedges_sent -= 1

    def _take_hedge_token(self) -> bool:
        with self._lock:
            if self._hedge_tokens < 1:
                self._hedges_throttled += 1
                return False
            self._hedge_tokens -= 1
            self._hedges_sent += 1
            return True

    @property
    def tables(self) -> list[str]:
        """Tables this client can route."""
        return sorted(self._routes)

    def close(self) -> None:
        """Ends the streams and closes all channels (also done when the client is
        garbage-collected, so a forgotten client does not hold shard threads)."""
        self._finalizer()

    def __enter__(self) -> EmbeddingClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- lookups ----

    def lookup(self, table: str, rows: np.ndarray) -> np.ndarray:
        """Rows of one table.

        Args:
          table: table name.
          rows: int [n] global table rows.

        Returns:
          float32 [n, D] in the order of ``rows``.
        """
        return self.lookup_many({table: rows})[table]

    def lookup_many(
        self,
        rows: Mapping[str, np.ndarray],
        *,
        deadline_s: float | None = None,
        dequantize: bool = True,
    ) -> dict[str, np.ndarray | rowwise.QuantizedTable]:
        """Rows of several tables, one request per shard involved.

        Args:
          rows: table -> int [n_t] global table rows.
          deadline_s: time budget of this call (retries included), in
            ``(0, MAX_DEADLINE_S]`` as the client's; None: the client's ``deadline_s``.
          dequantize: False: the rows the shards sent INT4/INT8 (``wire="quantized"``)
            are returned as they came, a ``rowwise.QuantizedTable`` per table (codes,
            float32 scale and bias of the rows, in the order of the given rows;
            ``rowwise.dequantize_rows`` of it is what True returns, bit for bit);
            a table sent as float32 (the float32 wire, a float32 table, no rows
            asked) is float32 [n_t, D_t] all the same. For ``serving.row_cache``.

        Returns:
          table -> float32 [n_t, D_t] in the order of the given rows (or a
          ``QuantizedTable``, see ``dequantize``). When one shard holds all of a
          table's rows the arrays are read-only views of the response bytes (copy
          them to write into them).

        Raises:
          ValueError: unknown table, rows outside the table, or a bad ``deadline_s``.
          VersionMismatch: a shard serves another version than the pinned one
            (or, unpinned, shards disagree).
          ServingError: a shard failed (``.code`` says how: UNAVAILABLE,
            DEADLINE_EXCEEDED, INVALID_ARGUMENT, ...) on every replica.
        """
        deadline = time.monotonic() + (
            self.deadline_s if deadline_s is None else check_deadline(deadline_s))
        # Route the rows of each table to the shards holding them, in the caller's
        # order; rows asked for many times go once (see codec.worth_deduplicating).
        # plan: shard -> [(table, positions in the rows sent or None = all, rows)].
        # (The int64 -> row -> position bookkeeping is a handful of NumPy calls per
        # table: in a thread that has just woken up, each one costs several us.)
        plan: dict[int, list[tuple[str, np.ndarray | None, np.ndarray]]] = {}
        empty: list[str] = []  # tables asked for no rows
        inverses: dict[str, np.ndarray] = {}  # table -> caller's position -> unique row
        sent: dict[str, int] = {}  # table -> rows sent
        for table, rows_n in rows.items():
            route = self._routes.get(table)
            if route is None:
                raise ValueError(f"unknown table {table!r}; tables: {self.tables}")
            rows_n = codec.row_array(table, rows_n)
            if rows_n.size == 0:
                empty.append(table)
                continue
            rows_n = rows_n.astype(np.int64, copy=False)
            # One sort gives the range (for routing) and the number of repeats.
            sorted_n = np.sort(rows_n)
            lo_row, hi_row = int(sorted_n[0]), int(sorted_n[-1])
            repeats = int(np.count_nonzero(sorted_n[1:] == sorted_n[:-1]))
            if codec.worth_deduplicating(rows_n.size, repeats):
                rows_n, inverses[table] = np.unique(rows_n, return_inverse=True)
            sent[table] = rows_n.size
            k_lo = bisect.bisect_right(route.start_list, lo_row) - 1
            k_hi = bisect.bisect_right(route.start_list, hi_row) - 1
            if k_lo == k_hi:  # one shard holds every row asked for: send them as they are
                if k_lo < 0 or hi_row >= route.end_list[k_lo]:
                    self._out_of_range(table, route, lo_row if k_lo < 0 else hi_row)
                plan.setdefault(route.shard_list[k_lo], []).append((table, None, rows_n))
                continue
            # Rows on several shards: split them in sorted order (each shard gets a
            # contiguous run of the sorted rows) and scatter the answers back.
            if table in inverses:  # the unique rows are sorted already
                sorted_n, order_n = rows_n, np.arange(rows_n.size)
            else:  # sorted_n (above) == rows_n[order_n]
                order_n = rows_n.argsort()
            bounds = np.searchsorted(sorted_n, route.starts).tolist() + [rows_n.size]
            if bounds[0]:
                self._out_of_range(table, route, lo_row)
            for k, shard in enumerate(route.shard_list):
                a, b = bounds[k], bounds[k + 1]
                if b > a:
                    if sorted_n[b - 1] >= route.end_list[k]:  # a gap between shards
                        self._out_of_range(table, route, int(sorted_n[b - 1]))
                    plan.setdefault(shard, []).append((table, order_n[a:b], sorted_n[a:b]))
        result: dict[str, np.ndarray] = {}
        if plan:
            results = self._fan_out(plan, deadline)
            versions = set()
            split: dict[str, list] = {}  # table on several shards -> [(shard, pos, rows)]
            for shard, (version, tables) in results.items():
                versions.add(version)
                for (table, pos, _), got in zip(plan[shard], tables, strict=True):
                    self._dims[table] = got.dim if isinstance(got, _Quantized) else got.shape[1]
                    if pos is None:  # one shard had them all: no copy (float32 wire)
                        result[table] = _dense(got) if dequantize else got
                    else:
                        split.setdefault(table, []).append((shard, pos, got))
            if len(versions) > 1:
                raise VersionMismatch(f"shards answered different versions {sorted(versions)}")
            for table, pieces in split.items():
                result[table] = _reassemble(table, sent[table], pieces, dequantize)
            for table, inverse_n in inverses.items():
                result[table] = _take(result[table], inverse_n)
        for table in empty:
            result[table] = np.zeros((0, self._dims.get(table, 0)), np.float32)
        return result

    @staticmethod
    def _out_of_range(table: str, route: _Route, row: int):
        raise ValueError(
            f"table {table!r}: row {row} is outside every shard's range "
            f"(rows [{route.start_list[0]}, {route.end_list[-1]}))"
        )

    def _request(self, items) -> bytes:
        return codec.encode_lookup_request(
            [(table, rows_n) for table, _, rows_n in items],
            expected_version=self.version or "",
            request_id=os.urandom(8).hex(),
            quantized=self.wire == "quantized",
        )

    def _hedged(self, shard: int) -> bool:
        return self._hedge_pool is not None and len(self._specs[shard].addresses) > 1

    def _fan_out(self, plan, deadline: float) -> dict[int, tuple[str, list[np.ndarray]]]:
        shards = list(plan)
        if self._streams:
            # Streams: every shard's request goes out first, then this thread
            # reads the answers in turn (no thread hand-off per shard).
            payloads = {shard: self._request(plan[shard]) for shard in shards}
            sent = {
                shard: self._send(
                    shard, payloads[shard],
                    deadline if self._hedged(shard)
                    else _try_deadline(deadline, len(self._specs[shard].addresses)),
                )
                for shard in shards
            }
            results = {}
            for k, shard in enumerate(shards):
                try:
                    results[shard] = self._call(
                        shard, plan[shard], deadline, payloads[shard], sent[shard]
                    )
                except BaseException:
                    # The lookup has failed: report it now, and let a pool thread read
                    # the answers already on their way, so those streams go back to
                    # the pool (a hung shard's waits out its deadline there, not here).
                    later = [sent[x][1] for x in shards[k + 1 :] if sent[x] is not None]
                    if later:
                        try:
                            self._pool.submit(_drain, later)
                        except RuntimeError:  # the client was closed
                            pass
                    raise
            return results
        # Blocking calls: gRPC Python's .future() starts a thread per call on an
        # idle channel (~1 ms); a persistent pool plus one call inline is cheaper.
        futs = {
            shard: self._pool.submit(self._call, shard, plan[shard], deadline)
            for shard in shards[1:]
        }
        results = {shards[0]: self._call(shards[0], plan[shards[0]], deadline)}
        for shard, fut in futs.items():
            results[shard] = fut.result()
        return results

    def _send(self, shard: int, payload: bytes, deadline: float):
        """Sends a shard's request on a stream to its preferred replica: ``(replica,
        wait for the answer)``, or None when that replica takes no stream now."""
        replica = self._preferred[shard]
        try:
            wait = self._streams[self._specs[shard].addresses[replica]].send(payload, deadline)
        except streaming.StreamRefused:
            return None
        except grpc.RpcError:  # the client was closed: _call reports it
            return None
        return replica, wait

    def _rpc(self, addr: str, payload: bytes, deadline: float) -> bytes:
        """One lookup round trip to ``addr``: on a stream when there is one, else unary."""
        streams = self._streams.get(addr)
        if streams is not None:
            try:
                return streams.call(payload, deadline)
            except streaming.StreamRefused:
                pass
        return self._lookup[addr](payload, timeout=max(deadline - time.monotonic(), 1e-3))

    def _start(self, addr: str, payload: bytes, deadline: float, *, unary: bool = False):
        """Sends one lookup to ``addr`` without waiting: a ``Pending``-like object
        (call it for the answer, ``abandon()`` it to give up). On a stream when
        there is one (and not ``unary``), else a unary call's future."""
        streams = None if unary else self._streams.get(addr)
        if streams is not None:
            try:
                return streams.send(payload, deadline)
            except streaming.StreamRefused:
                pass
        timeout = max(deadline - time.monotonic(), 1e-3)
        return _UnaryPending(self._lookup[addr].future(payload, timeout=timeout))

    def _failover(self, shard: int, payload: bytes, deadline: float, sent) -> tuple[bytes, int]:
        """Tries a shard's replicas one after another: ``(answer, replica)``."""
        addresses = self._specs[shard].addresses
        replica = self._preferred[shard] if sent is None else sent[0]
        tried = 0
        refused = []  # replicas that do not hold the pinned version (FAILED_PRECONDITION)
        while True:
            addr = addresses[replica]
            try_deadline = _try_deadline(deadline, len(addresses) - tried)
            try:
                if sent is not None:
                    wait, sent = sent[1], None
                    try:
                        return wait(), replica
                    except streaming.StreamRefused:
                        return self._rpc(addr, payload, try_deadline), replica
                return self._rpc(addr, payload, try_deadline), replica
            except grpc.RpcError as e:
                code = e.code()
                tried += 1
                last = tried >= len(addresses) or time.monotonic() >= deadline
                if code == grpc.StatusCode.FAILED_PRECONDITION:
                    # This replica lacks the pinned version (e.g. restarted on the next
                    # artifact mid-rollout); another replica may still hold it.
                    refused.append(f"{addr}: {e.details()}")
                    if last:
                        raise VersionMismatch(
                            f"shard {shard}: no replica tried serves the pinned version: "
                            + "; ".join(refused), code=code, shard=shard,
                        ) from None
                elif code not in RETRYABLE or last:
                    raise _shard_error(shard, addr, e) from None
                replica = (replica + 1) % len(addresses)

    def _call(
        self, shard: int, items, deadline: float, payload: bytes | None = None, sent=None
    ) -> tuple[str, list[np.ndarray]]:
        """One shard's answer, decoded; ``sent``: ``_send``'s, when the request is out."""
        if payload is None:
            payload = self._request(items)
        if self._hedged(shard):
            first = self._preferred[shard] if sent is None else sent[0]
            raw, replica = _Race(self, shard, payload, deadline, first).run(
                None if sent is None else sent[1])
        else:
            raw, replica = self._failover(shard, payload, deadline, sent)
        if self._preferred[shard] != replica:
            with self._lock:
                self._preferred[shard] = replica
        try:
            version, _, tables = codec.decode_lookup_response(raw)
        except codec.CodecError as e:
            raise ServingError(f"shard {shard}: {e}", shard=shard) from None
        if self.version and version != self.version:
            raise VersionMismatch(
                f"shard {shard} answered version {version!r}, pinned {self.version!r}",
                shard=shard,
            )
        if len(tables) != len(items):
            raise ServingError(
                f"shard {shard}: {len(tables)} tables in response, asked {len(items)}",
                shard=shard,
            )
        values = []  # float32 [n, D], or _Quantized (dequantized by lookup_many)
        for (table, _, rows_n), (got_table, dim, payload) in zip(items, tables, strict=True):
            if got_table != table:
                raise ServingError(
                    f"shard {shard}: answered table {got_table!r} for {table!r}", shard=shard
                )
            what = f"shard {shard} table {table!r}"
            try:
                if isinstance(payload, codec.QuantizedRows):
                    codes, scale, bias = codec.decode_quantized(
                        payload, n=rows_n.size, dim=dim, what=what
                    )
                    values.append(_Quantized(codes, scale, bias, dim=dim, bits=payload.bits))
                else:
                    values.append(codec.decode_values(payload, n=rows_n.size, dim=dim, what=what))
            except codec.CodecError as e:
                raise ServingError(str(e), shard=shard) from None
        return version, values
