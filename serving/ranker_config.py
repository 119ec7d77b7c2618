"""How the ranker service runs: ``RankerServiceConfig``, checked without JAX.

Kept apart from ``serving.ranker_service`` (which imports JAX, seconds) so that
``launch.serve_ranker`` refuses a bad flag at once, before JAX is loaded.
"""

from __future__ import annotations

import dataclasses
import functools

from serving import client as client_lib, grpc_util, hedge_delay


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@dataclasses.dataclass(frozen=True, kw_only=True)
class RankerServiceConfig:
    """How the ranker service runs.

    Attributes:
      artifact: serving artifact folder (tables, vocabularies, ranker).
      shards: ``host:port`` of each embedding shard, in shard order (shard i of
        S); ``"host:port|host:port|..."`` gives a shard's primary and its
        replicas (a lookup fails over to the next one, or hedges: see
        ``hedge_after_s``); empty = monolithic
        (tables in this process).
      host: interface to bind.
      port: port to bind; 0 picks a free one (``RankerService.port``).
      deadline_s: time budget of one Rank call (embedding fetch included); a
        dead shard is reported UNAVAILABLE within it. Every duration here is
        in seconds, finite and at most a day (``grpc_util.check_seconds``);
        this and ``probe_every_s`` > 0, the others >= 0.
      max_candidates: C above this is INVALID_ARGUMENT.
      max_batch_candidates: candidates of all requests scored in one batch
        (rounded up to a power of two; at least ``max_candidates``).
      min_bucket: smallest padded batch; buckets are powers of two from here.
      batch_wait_s: under concurrent load, how long the batcher waits for more
        requests after draining the queue (an idle service never waits).
      fetch_ahead: batches fetched and waiting for the compute thread, at most.
        The fetch thread forms the next batch only when fewer wait, so under
        load what queued meanwhile is scored as one batch (padding to a larger
        bucket costs far less than another call: 2048 candidates took 1.17x
        the time of 512 on an H200). With 4 closed-loop clients on the
        project's 2-core box, 1 merged 1.16-1.26 requests per batch against
        1.05-1.16 with 3 (the behaviour before this setting existed), and the
        monolithic p50 was 5-11% lower (``bench_serving --rank_fetch_ahead=1,3``).
      workers: gRPC handler threads.
      max_concurrent_rpcs: Rank calls in the service at once (handled or
        waiting for a handler thread); one more is RESOURCE_EXHAUSTED at once,
        so an overloaded ranker sheds load instead of queueing calls that will
        miss their deadline. None: unbounded. Health checks do not count, and
        are answered on threads of their own (``serving.grpc_util.Server``).
      user_entity: the ranker entity of the request's user.
      candidate_entity: the ranker entity of ``candidate_ids``.
      swap_window_s: how long the previous version stays servable after a swap.
      verify: artifact check at load: "sizes", "full" or "none".
      warmup: compile every bucket at load (else on first use).
      check_shards: at load, ask every shard (Info) whether it serves the
        artifact's version; refuse to start (or swap) when one does not.
      wait_for_shards_s: at start, how long to wait for a shard none of whose
        replicas answers Info yet (not started, still loading): asked again every
        0.5 s until one does or the time is up. 0: refuse to start at once. A shard
        that answers with another version or index is refused at once; a swap
        never waits.
      unhealthy_after: consecutive batches whose fetch found the shards
        unavailable before the gRPC health service reports NOT_SERVING, so a
        load balancer can send Rank calls to rankers that can reach their
        shards (0: never). Calls are still answered meanwhile. A probe (a
        one-row fetch from every shard each ``probe_every_s``, through the
        same channels) or the next Rank fetch that succeeds sets SERVING again.
      probe_every_s: period of that probe while NOT_SERVING.
      shard_ca_cert: PEM file of the CA (or the self-signed certificate) the
        shards' TLS certificates are checked against; set: talk TLS to the
        shards (``serve_embeddings --tls_cert``), None: plaintext.
      tls_cert: PEM certificate file; with ``tls_key``, serve Rank over TLS only.
      tls_key: PEM private key file.
      wire: how the shards send INT4/INT8 rows (``serving.client``):
        "quantized" (as stored, dequantized here: ~5x fewer bytes for INT4) or
        "float32" (dequantized on the shard). Scores are identical either way.
      transport: how fetches reach the shards (``serving.client``): "stream"
        (long-lived ``LookupStream`` calls, no per-call gRPC setup) or "unary"
        (one ``Lookup`` call per shard and batch). Scores are identical.
      hedge_after_s: None: a shard's replicas are tried one after another
        (failover). A number: hedged fetches (``serving.client.EmbeddingClient``):
        a shard whose replica has not answered after this long is also asked
        on its next replica, and the first answer is used. Only shards with
        replicas are affected; set it at or a little above the fetch's p99.
        ``"auto"``: the delay is, per shard, the ``hedge_quantile`` of its
        recent answer times, at least ``hedge_min_s`` (``serving.hedge_delay``;
        ``stats()["hedge_delay_ms"]``); a swap continues them (the new
        version's client shares the old one's answer times of the same
        replicas) instead of fetching unhedged until they warm up again.
      hedge_quantile: with ``hedge_after_s="auto"``: the quantile, in (0, 1).
      hedge_min_s: with ``hedge_after_s="auto"``: the shortest delay (s).
      hedge_budget: hedges per shard fetch, at most, over time (the client's
        token bucket): caps the load hedging adds when the shards are slow
        because they are saturated.
      cache_rows: hybrid only: 0 (default) fetches every row from the shards.
        N > 0 keeps recently fetched rows in this process
        (``serving.row_cache.RowCache``: up to N rows of each table the ranker
        uses, a table of at most N rows whole; at most (ceil(D/2) + 16) * N
        bytes per INT4 table on the quantized wire (the codes are kept), D + 16
        per INT8 row, (4 * D + 8) on the float32 wire; two versions' worth
        during a swap window; ``stats()["cache_bytes"]``) and fetches only the
        others, for repeated candidates (popular ads) and context rows.
        One cache per loaded version (a swap starts cold); scores are
        identical. A batch whose rows all hit makes no round trip.
      cache_tables: with ``cache_rows``: the tables to cache (default: every
        table the ranker fetches); a name the ranker does not fetch is refused
        at start, and at a swap to a model without that table only warned
        about. A table whose rows rarely repeat within the cache's reach
        (users, when most requests come from users not seen for a while) costs
        memory and a miss every time; leave it out.
    """

    artifact: str
    shards: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    port: int = 0
    deadline_s: float = 1.0
    max_candidates: int = 2048
    max_batch_candidates: int = 4096
    min_bucket: int = 64
    batch_wait_s: float = 0.001
    fetch_ahead: int = 1
    workers: int = 16
    max_concurrent_rpcs: int | None = None
    user_entity: str = "user"
    candidate_entity: str = "pin"
    swap_window_s: float = 60.0
    verify: str = "sizes"
    warmup: bool = True
    check_shards: bool = True
    wait_for_shards_s: float = 0.0
    unhealthy_after: int = 3
    probe_every_s: float = 0.5
    shard_ca_cert: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    wire: str = "quantized"
    transport: str = "stream"
    hedge_after_s: float | str | None = None
    hedge_quantile: float = hedge_delay.QUANTILE
    hedge_min_s: float = hedge_delay.FLOOR_S
    hedge_budget: float = 0.05
    cache_rows: int = 0
    cache_tables: tuple[str, ...] = ()

    def __post_init__(self):
        grpc_util.check_server_settings(self.artifact, self.host, self.port)
        for entry in self.shards:
            if not isinstance(entry, str) or not all(a.strip() for a in entry.split("|")):
                raise ValueError(
                    f"shards: {entry!r} must be 'host:port' or 'host:port|host:port|...' "
                    "(a shard's primary and replicas)"
                )
            replicas = [a.strip() for a in entry.split("|")]
            if len(set(replicas)) < len(replicas):
                raise ValueError(f"shards: {entry!r} lists an address twice (replicas must "
                                 "be other servers)")

        if self.wire not in client_lib.WIRE_FORMATS:
            raise ValueError(f"wire must be one of {client_lib.WIRE_FORMATS}, got {self.wire!r}")
        if self.transport not in client_lib.TRANSPORTS:
            raise ValueError(
                f"transport must be one of {client_lib.TRANSPORTS}, got {self.transport!r}"
            )
        client_lib.check_hedge_after(self.hedge_after_s)
        hedge_delay.check(self.hedge_quantile, self.hedge_min_s,
                          adaptive=self.hedge_after_s == client_lib.HEDGE_AUTO)
        if not 0 <= self.hedge_budget <= 1:
            raise ValueError(f"hedge_budget must be in [0, 1], got {self.hedge_budget}")
        if self.cache_rows < 0:
            raise ValueError(f"cache_rows must be >= 0, got {self.cache_rows}")
        if self.cache_tables and not self.cache_rows:
            raise ValueError("cache_tables needs cache_rows (the cache's size)")
        if len(set(self.cache_tables)) < len(self.cache_tables):
            raise ValueError(f"cache_tables lists a table twice: {list(self.cache_tables)}")
        if not self.shards and (self.cache_rows or self.hedge_after_s is not None):
            raise ValueError(
                "cache_rows and hedge_after_s need shards (a hybrid ranker); a monolithic "
                "ranker reads its tables in process"
            )
        if self.max_candidates < 1:
            raise ValueError(f"max_candidates must be >= 1, got {self.max_candidates}")
        if self.max_batch_candidates < self.max_candidates:
            raise ValueError(
                f"max_batch_candidates ({self.max_batch_candidates}) must be >= "
                f"max_candidates ({self.max_candidates})"
            )
        if self.fetch_ahead < 1:
            raise ValueError(f"fetch_ahead must be >= 1, got {self.fetch_ahead}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        grpc_util.check_max_concurrent_rpcs(self.max_concurrent_rpcs)
        if self.unhealthy_after < 0:
            raise ValueError(f"unhealthy_after must be >= 0 (0: never), got {self.unhealthy_after}")
        if self.min_bucket < 1:
            raise ValueError(f"min_bucket must be >= 1, got {self.min_bucket}")
        grpc_util.check_seconds("deadline_s", self.deadline_s, positive=True)
        grpc_util.check_seconds("probe_every_s", self.probe_every_s, positive=True)
        grpc_util.check_seconds("batch_wait_s", self.batch_wait_s)
        grpc_util.check_seconds("swap_window_s", self.swap_window_s)
        grpc_util.check_seconds("wait_for_shards_s", self.wait_for_shards_s)
        grpc_util.check_tls_pair(self.tls_cert, self.tls_key)
        if self.verify not in ("sizes", "full", "none"):
            raise ValueError(f"verify must be 'sizes', 'full' or 'none', got {self.verify!r}")

    @property
    def mode(self) -> str:
        """ "hybrid" (embedding shards) or "monolithic" (tables in process)."""
        return "hybrid" if self.shards else "monolithic"

    @functools.cached_property
    def buckets(self) -> tuple[int, ...]:
        """The padded batch sizes P (powers of two, min_bucket .. max batch)."""
        top = next_pow2(self.max_batch_candidates)
        out, p = [], next_pow2(self.min_bucket)
        while p < top:
            out.append(p)
            p *= 2
        out.append(top)
        return tuple(out)
