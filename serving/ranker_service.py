"""Ranker service: CPU-GPU hybrid serving of the CTR/CVR ranker over gRPC.

The service loads a serving artifact's ranker (``ranker/config.json`` and the
dense parameters), jits its pure score function
(``jax_recsys.ranking.model.make_score_fn``) on the default JAX device (the GPU
when there is one, the CPU otherwise) and answers ``RankerService.Rank``
(``serving/protos/embedding.proto``): one user and C candidate pins in, the
pCTR and pCVR of every candidate out (float32 [C] each, probabilities).

Embeddings come from one of two places, with the same numbers:

- **hybrid** (``shards`` given): the CPU embedding shard servers
  (``serving.embedding_server``) through ``serving.client.EmbeddingClient``,
  pinned to the artifact's version;
- **monolithic** (no shards): the artifact's INT4/INT8 tables in this process,
  dequantized with the same ``jax_recsys.quant.rowwise.dequantize_rows``. The
  two modes give bit-identical scores (tests/test_ranker_service.py).

Request contract (what the proto leaves open):

- the user: ``user_raw_id`` is mapped through the artifact's vocabulary of the
  user table (whitespace around it ignored, as the data readers read ids); **an
  unknown raw id is not an error**: the user is scored as a cold-start user with a
  zero embedding (what offline evaluation does for ids outside the ranker's
  vocabulary, ``ranking.train.predict`` rows of -1).
  ``user_row`` must be a row of the user table (else INVALID_ARGUMENT). A
  request naming no user is INVALID_ARGUMENT when the ranker has a user table.
- ``candidate_ids``: little-endian int64 [C] rows of the candidate table
  (``pin``), 1 <= C <= ``max_candidates``, every row in [0, R).
- ``context``: the ranker's other inputs, every one required, each
  little-endian **int64** [C] (per candidate) or [1] (same for all):
  ``context[entity]`` rows of every other entity table of the ranker (e.g. the
  candidates' ``advertiser`` rows; -1 = unknown, zero embedding) and
  ``context[feature]`` for every coarse categorical feature (values in
  [0, number of values); the model would clip others silently).
  The ranker has no float features, so int64 replaces the proto comment's
  float32 here. Unknown keys are refused (typos must not score silently).

Status codes: malformed bytes, empty or too many candidates, rows out of
range, missing/unknown context -> INVALID_ARGUMENT; ``expected_version`` not
held -> FAILED_PRECONDITION; an embedding shard down, past the deadline or not
serving the ranker's current version -> UNAVAILABLE (within ``deadline_s``);
nothing a client sends stops the service.

``RankerService.Prefetch`` (same proto) takes a user alone, as an ads server
knows it when the ad request arrives, before retrieval has the candidates, and
fetches that user's row into the ranker's row cache (``cache_rows``; the
user table must be cached), so the Rank call that follows needs no round trip
for it (none at all when its candidates' rows are cached too). Monolithic: a
no-op. Its errors are Rank's: a bad user -> INVALID_ARGUMENT, a version not
held (or no cache of users) -> FAILED_PRECONDITION, shards down ->
UNAVAILABLE.

Batching and pipelining: handler threads put requests on a queue. A fetch
thread takes the first waiting request plus every request queued behind it (up
to ``max_batch_candidates`` candidates; under concurrent load it waits up to
``batch_wait_s`` for more, an idle service adds no wait), fetches all their
rows in one ``lookup_many`` (one request per shard), and hands the batch to a
compute thread, which pads it to a power-of-two bucket (compiled once at start,
so serving never recompiles) and runs the jitted scorer. Fetching batch k+1
overlaps scoring batch k. The fetch thread runs at most ``fetch_ahead``
batches ahead of the compute thread, and forms a batch only when it may: under
load, the requests that arrive while a batch is scored wait in the queue and
are merged into one batch, instead of each being fetched alone and queued
behind the compute thread as a batch of its own.

Versions: ``swap(path)`` loads a new artifact while serving (after the shard
servers have swapped, ``EmbeddingServer.swap``); each request takes the
version snapshot current when it arrives (or the one it pins) and finishes on
it, with a client pinned to that version; the previous version stays servable
for ``swap_window_s``. No request fails during a swap.

Dimension legend: C candidates of one request, T candidates of a batch, P
padded batch (bucket), D_e width of entity e, J requests in a batch.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import logging
import numbers
import queue
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent import futures

import grpc
import jax
import jax.numpy as jnp
import numpy as np
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2

from jax_recsys.quant import artifact as artifact_lib, rowwise
from jax_recsys.ranking import model as model_lib
from serving import (
    client as client_lib,
    codec,
    grpc_util,
    row_cache,
    versions as versions_lib,
)
from serving.protos import embedding_pb2 as pb
from serving.ranker_config import RankerServiceConfig  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

SERVICE_NAME = "jax_recsys.serving.RankerService"
RANK_METHOD = f"/{SERVICE_NAME}/Rank"
PREFETCH_METHOD = f"/{SERVICE_NAME}/Prefetch"

_LATENCY_WINDOW = 8192
_BAD = grpc.StatusCode.INVALID_ARGUMENT


class RankError(Exception):
    """A Rank request that cannot be answered; carries its gRPC status code."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def _decode_int64(payload: bytes, what: str) -> np.ndarray:
    try:
        return codec.decode_ids(payload, what=what)
    except codec.CodecError as e:
        raise RankError(_BAD, str(e)) from None


# ----------------------------------------------------------------------------- scorer


SCORER_PRECISION = "highest"


def entity_columns(config: model_lib.RankerConfig) -> dict[str, slice]:
    """Each entity's columns in the scorer's packed rows (``config.entity_dims`` order)."""
    cols, lo = {}, 0
    for ent, dim in config.entity_dims:
        cols[ent], lo = slice(lo, lo + dim), lo + dim
    return cols


@functools.lru_cache(maxsize=8)
def jitted_scorer(config_json: str, precision: str = SCORER_PRECISION):
    """One compiled scorer per architecture, shared across versions (no recompile on swap).

    The scorer takes a batch packed into two arrays and answers with one: every
    entity's rows side by side in one float32 [P, sum of dims] array (columns:
    ``entity_columns``), every coarse id in one int32 [P, K] (``coarse_vocab_sizes``
    order; K may be 0), and pCTR and pCVR stacked as one float32 [2, P]. That is 2
    host-to-device transfers and 1 back per batch where one array per entity and
    coarse feature and one per output made 5 and 2 for a user/pin/advertiser ranker
    with one coarse feature: on an H200 (2026-11-27, ``launch.bench_scorer``) the
    packed call took 0.41 / 0.48 / 0.61 ms at 64 / 512 / 2048 rows against 0.64 /
    0.74 / 0.85 ms unpacked, the scores unchanged to 1.2e-7 relative; on CPU the
    two take the same time.

    The service scores with ``precision`` "highest": float32 matmuls at full float32
    precision on every device. XLA's GPU default (TF32 on Ampere and later) moved
    pCTR on an H200 by up to 1.1e-3 relative (padded batches of 64 to 2048), and a
    ranker's scores should not depend on where it is served; there the full precision
    cost at most 0.035 ms a call (2026-11-26; nothing measurable on 2026-11-27).
    ``launch.bench_scorer`` measures both on the device at hand.

    Args:
      config_json: the ranker config as sorted JSON (the cache key).
      precision: a ``jax.default_matmul_precision`` value ("highest", "default", ...).

    Returns:
      ``scorer(params, rows_pe, coarse_pk) -> [2, P]`` (pCTR, pCVR), a device array.
    """
    config = model_lib.RankerConfig.from_dict(config_json)
    score_fn = model_lib.make_score_fn(config)
    cols = entity_columns(config)
    names = [c for c, _ in config.coarse_vocab_sizes]

    def probs(params, rows_pe, coarse_pk):
        emb = {ent: rows_pe[:, s] for ent, s in cols.items()}
        coarse = {c: coarse_pk[:, k] for k, c in enumerate(names)}
        ctr_logit, cvr_logit = score_fn(params, entity_emb=emb, coarse_ids=coarse)
        return jnp.stack([jax.nn.sigmoid(ctr_logit), jax.nn.sigmoid(cvr_logit)])

    return with_precision(jax.jit(probs), precision)


def with_precision(jitted, precision: str):
    """``jitted`` called under ``jax.default_matmul_precision(precision)``."""

    def scorer(*args):
        with jax.default_matmul_precision(precision):
            return jitted(*args)

    return scorer


def _ranker_config(raw: Mapping | None, path) -> model_lib.RankerConfig:
    if raw is None:
        raise artifact_lib.ArtifactError(f"{path}: the artifact has no ranker config")
    # export may wrap the RankerConfig dict next to other metadata.
    if "entity_dims" not in raw and isinstance(raw.get("ranker"), Mapping):
        raw = raw["ranker"]
    try:
        return model_lib.RankerConfig.from_dict(raw)
    except (TypeError, ValueError, KeyError) as e:
        raise artifact_lib.ArtifactError(
            f"{path}/ranker/config.json: bad ranker config: {e}"
        ) from e


class _VocabIndex:
    """Raw id -> row of one vocabulary (int or str ids) by binary search."""

    def __init__(self, vocab: np.ndarray):
        vocab = np.asarray(vocab)
        self._int = vocab.dtype.kind in "iu"
        if vocab.size > 1 and not bool(np.all(vocab[1:] > vocab[:-1])):
            self._order = np.argsort(vocab, kind="stable")
            self._sorted = vocab[self._order]
        else:
            self._order = None
            self._sorted = vocab

    def row(self, raw_id: str) -> int:
        """The row of ``raw_id``, or -1 when the vocabulary does not hold it.

        Whitespace around the id is not part of it, as when the data folder and the
        knowledge-graph reader read ids (``" 7"`` is the id 7, ``"a "`` the id "a")."""
        raw_id = raw_id.strip()
        if self._int:
            try:
                key = int(raw_id)
            except ValueError:
                return -1
            # Only the canonical spelling: "07", "+7", "7_0" or "٧" are other (unknown)
            # ids, never aliases of 7 (as when the data folder read them).
            if str(key) != raw_id:
                return -1
            if not np.iinfo(np.int64).min <= key <= np.iinfo(np.int64).max:
                return -1
        else:
            key = raw_id
        i = int(np.searchsorted(self._sorted, key))
        if i >= self._sorted.size or self._sorted[i] != key:
            return -1
        return int(self._order[i]) if self._order is not None else i


class _LocalTables:
    """Monolithic fetcher: the artifact's tables in this process."""

    def __init__(self, art: artifact_lib.Artifact):
        # Plain ndarray views of the memmaps, as the shard servers hold them.
        self._tables = {name: rowwise.slice_rows(q, 0, q.num_rows) for name, q in art.tables.items()}

    def lookup_many(
        self, rows: Mapping[str, np.ndarray], *, deadline_s: float | None = None
    ) -> dict[str, np.ndarray]:
        del deadline_s  # in process: nothing to wait for
        out = {}
        for table, rows_n in rows.items():
            # Dequantization is per row: these equal the shard servers' values bit for
            # bit. The rows were range-checked with the request (RankerService._validate).
            out[table] = rowwise.dequantize_rows(
                self._tables[table], np.asarray(rows_n, np.int64), checked=False
            )
        return out

    def close(self) -> None:
        pass


@dataclasses.dataclass
class _Version:
    """Everything one artifact version needs to answer requests."""

    version: str
    path: str
    config: model_lib.RankerConfig
    scorer: object  # jitted (params, rows [P, W], coarse [P, K]) -> [2, P] (pCTR, pCVR)
    columns: dict[str, slice]  # entity -> its columns of rows (``entity_columns``)
    params: dict[str, jax.Array]
    fetcher: object  # EmbeddingClient, RowCache (around one) or _LocalTables
    table_rows: dict[str, int]
    user_index: _VocabIndex | None
    context_entities: tuple[str, ...]
    coarse: dict[str, int]  # coarse feature -> number of values
    has_user: bool
    has_candidate: bool
    candidate_rows: int


@dataclasses.dataclass
class _Job:
    """One validated request waiting for its scores."""

    ver: _Version
    user_row: int  # -1: unknown user, zero embedding
    cand_c: np.ndarray  # int64 [C]
    context: dict[str, np.ndarray]  # name -> int64 [C]
    deadline: float  # time.monotonic()
    future: futures.Future

    @property
    def size(self) -> int:
        return int(self.cand_c.size)


class _Stats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.codes: collections.Counter[str] = collections.Counter()
        # Recent seconds: of each answered Rank call ("rank", in the handler) and,
        # per batch, of the fetch (lookups, local or remote, and assembly into the
        # padded arrays) and of the scoring (transfers and the jitted call).
        self.stage_s: dict[str, collections.deque[float]] = {
            stage: collections.deque(maxlen=_LATENCY_WINDOW)
            for stage in ("rank", "fetch", "score")
        }
        self.batches = 0
        self.batched_requests = 0
        self.batched_candidates = 0

    def record(self, code: grpc.StatusCode, latency_s: float | None = None) -> None:
        with self._lock:
            self.codes[code.name] += 1
            if latency_s is not None:
                self.stage_s["rank"].append(latency_s)

    def batch(self, requests: int, candidates: int, score_s: float) -> None:
        with self._lock:
            self.batches += 1
            self.batched_requests += requests
            self.batched_candidates += candidates
            self.stage_s["score"].append(score_s)

    def fetched(self, seconds: float) -> None:
        with self._lock:
            self.stage_s["fetch"].append(seconds)

    def summary(self) -> dict:
        with self._lock:
            out = {
                "requests": int(sum(self.codes.values())),
                "by_code": dict(self.codes),
                "batches": self.batches,
                "requests_per_batch": self.batched_requests / max(self.batches, 1),
                "candidates_per_batch": self.batched_candidates / max(self.batches, 1),
            }
            for stage, times in self.stage_s.items():  # None, not 0.0, before the first
                ms = np.percentile(times, [50, 99]) * 1e3 if times else (None, None)
                out[f"{stage}_p50_ms"], out[f"{stage}_p99_ms"] = (
                    None if v is None else float(v) for v in ms)
            return out


# ----------------------------------------------------------------------------- service


class RankerService:
    """The ranker service (see module docstring).

    Usage::

      svc = RankerService(RankerServiceConfig(artifact=art, shards=("h:1", "h:2")))
      port = svc.start()            # gRPC; or call svc.rank(request) in process
      ...
      svc.swap(new_art)             # after the shards swapped
      svc.stop()
    """

    def __init__(self, config: RankerServiceConfig):
        self.config = config
        if config.hedge_after_s is not None and not any("|" in e for e in config.shards):
            log.warning("hedge_after_s is set but no shard has a replica: nothing to hedge")
        if config.hedge_after_s is not None and config.transport == "unary":
            log.warning("hedging over unary calls makes every fetch a gRPC future (about "
                        "+30%% a lookup on a 2-core box); hedge over streams")
        first = self._load(config.artifact, starting=True)
        self._versions: versions_lib.VersionSet[_Version] = versions_lib.VersionSet(
            first.version, first, name="ranker", on_drop=self._close_later)
        self._stats = _Stats()
        self._prefetch_lock = threading.Lock()
        self._prefetches = 0  # Prefetch calls that reached the cache, since the start
        self._prefetch_rows = 0  # of which fetched the row (the others found it cached)
        self._prefetch_codes: dict[str, int] = {}  # Prefetch RPCs by status code
        self._stopping = threading.Event()
        self._queue: queue.Queue[_Job] = queue.Queue()
        self._compute_q: queue.Queue = queue.Queue()  # at most fetch_ahead (_ahead)
        self._ahead = threading.Semaphore(config.fetch_ahead)
        self._carry: _Job | None = None
        self._threads = [
            threading.Thread(target=self._fetch_loop, name="rank-fetch", daemon=True),
            threading.Thread(target=self._compute_loop, name="rank-compute", daemon=True),
        ]
        for t in self._threads:
            t.start()
        self._rpc: grpc_util.Server | None = None  # set once started
        self._health: health.HealthServicer | None = None
        self._health_lock = threading.Lock()
        self._shards_down = False  # health NOT_SERVING, a probe thread running
        self._fetch_failures = 0  # consecutive (the fetch thread counts, a recovery resets)
        self._probe: threading.Thread | None = None
        self.port: int | None = None

    # ---- loading ----

    @staticmethod
    def _shard_client(ver: _Version) -> client_lib.EmbeddingClient | None:
        """A version's shard client (inside its row cache, if any); None: monolithic."""
        client = getattr(ver.fetcher, "client", ver.fetcher)
        return client if isinstance(client, client_lib.EmbeddingClient) else None

    def _current_client(self) -> client_lib.EmbeddingClient | None:
        """The current version's shard client (None: monolithic)."""
        snap = self._versions.snapshot
        return self._shard_client(snap.versions[snap.current])

    def _load(self, path: str, starting: bool = False) -> _Version:
        cfg = self.config
        art = artifact_lib.load_artifact(path, verify=False if cfg.verify == "none" else cfg.verify)
        rcfg = _ranker_config(art.ranker_config, art.path)
        tables = art.manifest.tables
        for ent, dim in rcfg.entity_dims:
            if ent not in tables:
                raise artifact_lib.ArtifactError(
                    f"{art.path}: the ranker needs table {ent!r}; artifact has {sorted(tables)}"
                )
            if int(tables[ent]["dim"]) != dim:
                raise artifact_lib.ArtifactError(
                    f"{art.path}: table {ent!r} has dim {tables[ent]['dim']}, ranker expects {dim}"
                )
        ents = [e for e, _ in rcfg.entity_dims]
        has_user = cfg.user_entity in ents
        user_index = None
        if has_user and cfg.user_entity in art.vocabs:
            user_index = _VocabIndex(art.vocabs[cfg.user_entity])
        table_rows = {name: int(t["rows"]) for name, t in tables.items()}
        if cfg.candidate_entity not in table_rows:
            raise artifact_lib.ArtifactError(
                f"{art.path}: no candidate table {cfg.candidate_entity!r}; has {sorted(table_rows)}"
            )
        fetched = [e for e in ents if e in table_rows]  # the tables the shards serve it
        unknown = sorted(set(cfg.cache_tables) - set(fetched))
        if unknown and starting:  # a typo: refuse to start
            raise ValueError(
                f"cache_tables {unknown}: not tables this ranker fetches; it fetches {fetched}"
            )
        cached = [e for e in fetched if not cfg.cache_tables or e in cfg.cache_tables]
        if unknown:  # a new model without a feature must not be held back by a cache setting
            log.warning("version %s does not fetch cache_tables %s; caching %s", art.version,
                        unknown, cached)
        scorer = jitted_scorer(json.dumps(rcfg.to_dict(), sort_keys=True))
        params = model_lib.unflatten_params(rcfg, art.ranker_params)  # validates every leaf
        del params
        dev = jax.devices()[0]
        params = {k: jax.device_put(np.asarray(v), dev) for k, v in art.ranker_params.items()}
        if cfg.shards:
            ca = None  # the shards' CA (PEM), read at every load: a swap picks up a new one
            if cfg.shard_ca_cert is not None:
                ca = grpc_util.read_pem(cfg.shard_ca_cert, "shard_ca_cert")
            if cfg.check_shards:
                # Worst case of one batch on one shard: a user, a candidate and a row
                # of every context entity per candidate.
                n_ctx = sum(e not in (cfg.user_entity, cfg.candidate_entity) for e in ents)
                _check_shards(cfg.shards, art.version, cfg.deadline_s, root_certificates=ca,
                              batch_ids=cfg.max_batch_candidates * (2 + n_ctx),
                              wait_s=cfg.wait_for_shards_s if starting else 0.0)
            fetcher = client_lib.EmbeddingClient.from_artifact(
                art.manifest,
                [entry.split("|") for entry in cfg.shards],
                pin=True,
                deadline_s=cfg.deadline_s,
                wire=cfg.wire,
                transport=cfg.transport,
                hedge_after_s=cfg.hedge_after_s,
                hedge_quantile=cfg.hedge_quantile,
                hedge_min_s=cfg.hedge_min_s,
                hedge_budget=cfg.hedge_budget,
                root_certificates=ca,
                # A swap continues the adaptive hedge delays: the same shards answer.
                hedge_history=None if starting else self._current_client(),
            )
            if cfg.cache_rows:
                fetcher = row_cache.RowCache(
                    fetcher, table_rows=table_rows,
                    dims={name: int(t["dim"]) for name, t in tables.items()},
                    capacity=cfg.cache_rows,
                    tables=cached,
                    # On the quantized wire INT4/INT8 tables are cached as their codes.
                    bits={name: q.bits for name, q in art.tables.items()},
                )
        else:
            fetcher = _LocalTables(art)
        ver = _Version(
            version=art.version,
            path=str(art.path),
            config=rcfg,
            scorer=scorer,
            columns=entity_columns(rcfg),
            params=params,
            fetcher=fetcher,
            table_rows=table_rows,
            user_index=user_index,
            context_entities=tuple(
                e for e in ents if e not in (cfg.user_entity, cfg.candidate_entity)
            ),
            coarse={n: int(v) for n, v in rcfg.coarse_vocab_sizes},
            has_user=has_user,
            has_candidate=cfg.candidate_entity in ents,
            candidate_rows=table_rows[cfg.candidate_entity],
        )
        if cfg.shards:
            self._warm_fetches(ver)
        if cfg.warmup:
            t0 = time.perf_counter()
            for p in cfg.buckets:
                jax.block_until_ready(ver.scorer(ver.params, *self._zeros(ver, p)))
            log.info("compiled %d buckets in %.1fs", len(cfg.buckets), time.perf_counter() - t0)
        return ver

    @staticmethod
    def _zeros(ver: _Version, p: int):
        width = max((c.stop for c in ver.columns.values()), default=0)
        return np.zeros((p, width), np.float32), np.zeros((p, len(ver.coarse)), np.int32)

    # ---- lifecycle ----

    def start(self) -> int:
        """Binds and starts the gRPC server.

        Returns:
          The bound port.
        """
        cfg = self.config
        rpc = grpc_util.Server(
            workers=cfg.workers,
            max_concurrent_rpcs=cfg.max_concurrent_rpcs,
            thread_name_prefix="rank",
            options=[("grpc.so_reuseport", 0)],
        )
        server = rpc.grpc_server
        # Raw-bytes handler: garbage bytes become INVALID_ARGUMENT with a message.
        handlers = {"Rank": rpc.unary_handler(self._rank_rpc),
                    "Prefetch": rpc.unary_handler(self._prefetch_rpc)}
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),)
        )
        self._health = rpc.health
        address = grpc_util.host_port(cfg.host, cfg.port)
        port = grpc_util.bind(server, address, tls_cert=cfg.tls_cert, tls_key=cfg.tls_key)
        server.start()
        self._rpc, self.port = rpc, port
        with self._health_lock:
            self._publish_health()
        log.info("ranker (%s) serving version %s on %s", cfg.mode, self.version,
                 grpc_util.host_port(cfg.host, port))
        return port

    def stop(self, grace: float | None = 2.0) -> None:
        """Stops the gRPC server (in-flight requests get ``grace`` s; None: none) and the
        pipeline. A bad ``grace`` (`grpc_util.check_seconds`) is a ValueError before
        anything is stopped."""
        if grace is not None:
            grpc_util.check_seconds("grace", grace)
        if self._health is not None:
            self._health.enter_graceful_shutdown()
        if self._rpc is not None:
            self._rpc.grpc_server.stop(grace).wait()
        self._stopping.set()
        held = self._versions.close()
        for t in self._threads:
            t.join(5)
        for ver in held:
            ver.fetcher.close()

    def __enter__(self) -> RankerService:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop(grace=1.0)

    # ---- versions ----

    @property
    def version(self) -> str:
        """The version unpinned requests get."""
        return self._versions.current

    @property
    def versions(self) -> list[str]:
        """Every version servable now (two during a swap window)."""
        return self._versions.ids

    def swap(self, path: str, *, window_s: float | None = None) -> str:
        """Loads another artifact and serves it to new requests, without a pause.

        Swap the embedding shards first (they keep the old version servable for
        their window); requests in flight here finish on the old version with a
        client pinned to it. The old version stays servable to requests pinning
        it for ``window_s``.

        Args:
          path: the new artifact folder.
          window_s: overrides ``config.swap_window_s``.

        Returns:
          The new version id.
        """
        window = self.config.swap_window_s if window_s is None else window_s
        grpc_util.check_seconds("window_s", window)  # before loading: nothing to release
        new = self._load(path)
        if not self._versions.swap(new.version, new, window_s=window):
            new.fetcher.close()
        return new.version

    def retire(self, version: str) -> bool:
        """Stops serving a non-current version; returns True if it was dropped."""
        return self._versions.retire(version)

    def _close_later(self, ver: _Version) -> None:
        # Requests that took this version before it was dropped finish within their deadline.
        # (deadline_s <= MAX_SECONDS, so the cap still waits out every deadline.)
        self._versions.later(min(2 * self.config.deadline_s + 1.0, grpc_util.MAX_SECONDS),
                             ver.fetcher.close)

    def stats(self) -> dict:
        """Counters since start, and calls in flight now.

        Requests by code; batching (``requests_per_batch``, ``candidates_per_batch``);
        p50/p99 over recent Rank calls (``rank_p50_ms``: received to answered, in
        the handler) and over recent batches of each stage: ``fetch_p50_ms`` (the
        embedding lookups, from the shards or in-process, and their assembly into
        the padded batch) and ``score_p50_ms`` (host to device, the jitted scorer,
        device to host); each None before its first call or batch. In a hybrid ranker, its fetch minus a monolithic ranker's
        is what the shards cost; with ``hedge_after_s``, ``hedges_sent`` and
        ``hedges_throttled`` count the current version's hedged shard requests
        and those the hedge budget stopped (since that version was loaded), and
        ``hedge_delay_ms`` the current version's delay per shard (ms; None: a
        shard without replicas, or, with ``"auto"``, still warming up); with
        ``cache_rows``, ``cache_hits``, ``cache_misses`` (rows),
        ``cache_hit_rate`` and ``cache_bytes`` (its arrays) of the current
        version's cache (Prefetch lookups included), and ``prefetches`` /
        ``prefetch_rows`` (Prefetch calls that reached the cache since the start /
        those of them that fetched the row); ``prefetch_by_code``: Prefetch RPCs by
        status code (``requests`` and ``by_code`` count Rank calls only).
        """
        out = self._stats.summary()
        snap = self._versions.snapshot
        out.update(version=snap.current, versions=list(snap.versions), mode=self.config.mode)
        fetcher = snap.versions[snap.current].fetcher
        if isinstance(fetcher, row_cache.RowCache):
            out["cache_hits"], out["cache_misses"] = fetcher.hits, fetcher.misses
            out["cache_hit_rate"] = fetcher.hits / max(fetcher.hits + fetcher.misses, 1)
            out["cache_bytes"] = fetcher.nbytes
            with self._prefetch_lock:
                out["prefetches"], out["prefetch_rows"] = self._prefetches, self._prefetch_rows
            fetcher = fetcher.client
        if self.config.hedge_after_s is not None:
            out["hedges_sent"] = fetcher.hedges_sent
            out["hedges_throttled"] = fetcher.hedges_throttled
            out["hedge_delay_ms"] = [None if d is None else round(d * 1e3, 3)
                                     for d in fetcher.hedge_delays_s]
        with self._prefetch_lock:
            out["prefetch_by_code"] = dict(self._prefetch_codes)
        out["health"] = "NOT_SERVING" if self._shards_down else "SERVING"
        out["in_flight"] = self._rpc.in_flight if self._rpc else 0
        return out

    # ---- health: are the shards reachable? ----

    def _publish_health(self) -> None:
        """Health SERVING unless the shards are down (caller holds ``_health_lock``)."""
        if self._health is not None:
            status = health_pb2.HealthCheckResponse
            for service in ("", SERVICE_NAME):
                self._health.set(service, status.NOT_SERVING if self._shards_down else status.SERVING)

    def _set_shards_down(self, down: bool) -> None:
        with self._health_lock:
            if down == self._shards_down:
                return
            self._shards_down = down
            self._publish_health()
            if down:
                log.warning(
                    "embedding shards unavailable for %d batches: health NOT_SERVING",
                    self._fetch_failures,
                )
                if self._probe is None or not self._probe.is_alive():
                    self._probe = threading.Thread(
                        target=self._probe_loop, name="rank-probe", daemon=True
                    )
                    self._probe.start()
            else:
                self._fetch_failures = 0
                log.info("embedding shards reachable again: health SERVING")

    def _note_fetch(self, shards_ok: bool) -> None:
        """Counts consecutive fetches that found the shards unavailable (fetch thread)."""
        if shards_ok:
            self._fetch_failures = 0
            if self._shards_down:
                self._set_shards_down(False)
            return
        self._fetch_failures += 1
        after = self.config.unhealthy_after
        if after and self._fetch_failures >= after:
            self._set_shards_down(True)

    def _probe_shards(self, ver: _Version, deadline_s: float | None = None) -> None:
        """Fetches one candidate row from every shard through ``ver``'s client, past
        its row cache (the shards themselves must answer); raises what it raises."""
        n = len(self.config.shards)
        ranges = [codec.shard_range(ver.candidate_rows, i, n) for i in range(n)]
        probe = np.array(sorted({lo for lo, hi in ranges if hi > lo}), np.int64)
        self._shard_client(ver).lookup_many(
            {self.config.candidate_entity: probe}, deadline_s=deadline_s)

    def _warm_fetches(self, ver: _Version) -> None:
        """Connects a loaded version's new client to its shards before it serves:
        a fresh client's first fetch pays the connections and streams (on loopback
        1-5 ms against 0.4), which would fall on the first Rank call after a swap."""
        t0 = time.perf_counter()
        try:  # at most 1 s: shards that are down must not hold the start or swap
            self._probe_shards(ver, deadline_s=min(self.config.deadline_s, 1.0))
        except Exception as e:  # noqa: BLE001 (the Rank calls' fetches report it)
            log.warning("version %s: first fetch from the shards failed: %s", ver.version, e)
            return
        log.info("version %s: connected to the shards in %.1f ms", ver.version,
                 1e3 * (time.perf_counter() - t0))

    def _probe_loop(self) -> None:
        # The probe fetches through the fetch path itself (same channels, TLS,
        # version pin), so SERVING means Rank calls can fetch.
        cfg = self.config
        while self._shards_down and not self._stopping.wait(cfg.probe_every_s):
            snap = self._versions.snapshot
            try:
                self._probe_shards(snap.versions[snap.current])
            except Exception as e:  # down, wrong version, or a version closed by a swap
                log.debug("shard probe failed: %s", e)
                continue
            self._set_shards_down(False)

    # ---- requests ----

    def rank(self, request: pb.RankRequest, *, timeout_s: float | None = None) -> pb.RankResponse:
        """Scores one request in process (what the gRPC handler calls).

        Args:
          request: the RankRequest.
          timeout_s: time budget; default ``config.deadline_s``.

        Returns:
          The RankResponse (pCTR, pCVR as little-endian float32 [C]).

        Raises:
          RankError: with the gRPC status code the request gets.
        """
        budget = self._budget(timeout_s)
        job = self._validate(request, deadline=time.monotonic() + budget)
        self._queue.put(job)
        try:
            ctr_c, cvr_c = job.future.result(timeout=budget + 0.25)
        except futures.TimeoutError:
            job.future.cancel()
            raise RankError(
                grpc.StatusCode.UNAVAILABLE,
                f"no scores within the deadline ({budget:.3f}s): embedding shards slow or down",
            ) from None
        return pb.RankResponse(
            ctr=codec.encode_values(ctr_c),
            cvr=codec.encode_values(cvr_c),
            version=job.ver.version,
            request_id=request.request_id,
        )

    def _rank_rpc(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        t0 = time.perf_counter()
        try:
            try:
                req = pb.RankRequest.FromString(request)
            except DecodeError as e:
                raise RankError(_BAD, f"request is not a RankRequest protobuf: {e}") from None
            remaining = context.time_remaining()
            resp = self.rank(req, timeout_s=remaining)
        except RankError as e:
            self._stats.record(e.code)
            context.abort(e.code, e.message)
        except Exception as e:  # never let a request take the service down
            log.exception("rank failed")
            self._stats.record(grpc.StatusCode.INTERNAL)
            context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}: {e}")
        self._stats.record(grpc.StatusCode.OK, time.perf_counter() - t0)
        return resp.SerializeToString()

    def prefetch(self, request: pb.PrefetchRequest, *,
                 timeout_s: float | None = None) -> pb.PrefetchResponse:
        """Fetches a user's row into the row cache ahead of its Rank call.

        An ads server knows the user when the ad request arrives, well before
        retrieval has produced the candidates: a Prefetch sent then takes the
        user's round trip to the shards off the Rank call, which (with the
        candidates' rows cached too) then makes none. Monolithic: nothing to
        fetch (answers at once). Hybrid: needs a row cache holding the user
        table (``cache_rows``; ``cache_tables`` naming it, if set).

        Returns:
          The version used and ``rows_fetched`` (0: cached already, a cold-start
          user, no user table, or monolithic).

        Raises:
          RankError: INVALID_ARGUMENT (bad user), FAILED_PRECONDITION (version not
            served, no cache for the user table, or shards that dropped a pinned
            older version), UNAVAILABLE (shards down or mid-rollout), INTERNAL
            (a shard's other errors): as a Rank call's fetch would.
        """
        cfg = self.config
        ver = self._version_for(request.expected_version)
        resp = pb.PrefetchResponse(version=ver.version, rows_fetched=0)
        if not ver.has_user:
            return resp
        user_row = self._user_row(ver, request)
        fetcher = ver.fetcher
        if not cfg.shards:  # tables in process
            return resp
        if not (isinstance(fetcher, row_cache.RowCache)
                and cfg.user_entity in fetcher.cached_tables):
            raise RankError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"Prefetch needs a row cache holding the {cfg.user_entity!r} table "
                "(serve_ranker --cache_rows, and --cache_tables naming it if set): without "
                "one the Rank call fetches the user's row again",
            )
        if user_row < 0:  # a cold-start user: a zero embedding, nothing to fetch
            return resp
        budget = self._budget(timeout_s)
        try:
            _, contacted = fetcher.fetch({cfg.user_entity: np.array([user_row], np.int64)},
                                         deadline_s=budget)
        except client_lib.ServingError as e:  # health follows the Rank calls' fetches
            raise self._shard_error(e, ver, budget) from None
        with self._prefetch_lock:
            self._prefetches += 1
            self._prefetch_rows += int(contacted)
        resp.rows_fetched = int(contacted)
        return resp

    def _budget(self, timeout_s: float | None) -> float:
        """A call's time budget: the caller's, at most ``deadline_s`` (and >= 1 ms)."""
        if timeout_s is None:
            return self.config.deadline_s
        return max(min(timeout_s, self.config.deadline_s), 1e-3)

    def _prefetch_rpc(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            try:
                req = pb.PrefetchRequest.FromString(request)
            except DecodeError as e:
                raise RankError(_BAD, f"request is not a PrefetchRequest protobuf: {e}") from None
            resp = self.prefetch(req, timeout_s=context.time_remaining())
        except RankError as e:
            self._note_prefetch(e.code)
            context.abort(e.code, e.message)
        except Exception as e:  # never let a request take the service down
            log.exception("prefetch failed")
            self._note_prefetch(grpc.StatusCode.INTERNAL)
            context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}: {e}")
        self._note_prefetch(grpc.StatusCode.OK)
        return resp.SerializeToString()

    def _note_prefetch(self, code: grpc.StatusCode) -> None:
        with self._prefetch_lock:
            self._prefetch_codes[code.name] = self._prefetch_codes.get(code.name, 0) + 1

    def _version_for(self, expected: str) -> _Version:
        """The version a request pins (``expected``), or the current one ("")."""
        snap = self._versions.snapshot  # one snapshot for the whole request
        if not expected:
            return snap.versions[snap.current]
        ver = snap.versions.get(expected)
        if ver is None:
            raise RankError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"version {expected!r} not served; the ranker serves {sorted(snap.versions)}",
            )
        return ver

    def _user_row(self, ver: _Version, req) -> int:
        """The user row of a Rank or Prefetch request (-1: a cold-start raw id)."""
        cfg = self.config
        rows = ver.table_rows[cfg.user_entity]
        which = req.WhichOneof("user")
        if which is None:
            raise RankError(_BAD, "no user: set user_raw_id or user_row")
        if which == "user_row":
            user_row = int(req.user_row)
            if not 0 <= user_row < rows:
                raise RankError(
                    _BAD, f"user_row {user_row} outside table {cfg.user_entity!r} rows [0, {rows})"
                )
            return user_row
        return -1 if ver.user_index is None else ver.user_index.row(req.user_raw_id)

    def _validate(self, req: pb.RankRequest, *, deadline: float) -> _Job:
        cfg = self.config
        ver = self._version_for(req.expected_version)
        cand_c = _decode_int64(req.candidate_ids, "candidate_ids")
        c = cand_c.size
        if c == 0:
            raise RankError(_BAD, "empty request: no candidate_ids")
        if c > cfg.max_candidates:
            raise RankError(_BAD, f"too many candidates: {c} > max_candidates {cfg.max_candidates}")
        lo, hi = int(cand_c.min()), int(cand_c.max())
        if lo < 0 or hi >= ver.candidate_rows:
            raise RankError(
                _BAD,
                f"candidate_ids: row {lo if lo < 0 else hi} outside table "
                f"{cfg.candidate_entity!r} rows [0, {ver.candidate_rows})",
            )
        user_row = self._user_row(ver, req) if ver.has_user else -1  # -1: cold-start user
        known = set(ver.context_entities) | set(ver.coarse)
        unknown = sorted(set(req.context) - known)
        if unknown:
            raise RankError(_BAD, f"unknown context keys {unknown}; expected {sorted(known)}")
        context = {}
        for name in (*ver.context_entities, *ver.coarse):
            if name not in req.context:
                raise RankError(_BAD, f"context {name!r} missing (int64 [C] or [1] expected); "
                                      f"the ranker takes {sorted(known)}")
            v = _decode_int64(req.context[name], f"context {name!r}")
            if v.size == 1:
                v = np.broadcast_to(v, (c,))
            elif v.size != c:
                raise RankError(
                    _BAD,
                    f"context {name!r} has {v.size} values; expected {c} (one per candidate) or 1",
                )
            if name in ver.coarse:
                size = ver.coarse[name]
                if v.min() < 0 or v.max() >= size:
                    bad = int(v.min()) if v.min() < 0 else int(v.max())
                    raise RankError(
                        _BAD, f"context {name!r}: coarse value {bad} outside [0, {size})"
                    )
            else:
                rows = ver.table_rows[name]
                if v.min() < -1 or v.max() >= rows:
                    raise RankError(
                        _BAD, f"context {name!r}: rows must lie in [-1, {rows}) (-1 = unknown)"
                    )
            context[name] = v
        return _Job(
            ver=ver,
            user_row=user_row,
            cand_c=cand_c,
            context=context,
            deadline=deadline,
            future=futures.Future(),
        )

    # ---- pipeline: fetch thread -> compute thread ----

    def _next_batch(self) -> list[_Job] | None:
        cfg = self.config
        first = self._carry
        self._carry = None
        if first is None:
            try:
                first = self._queue.get(timeout=0.1)
            except queue.Empty:
                return None
        jobs, total = [first], first.size
        wait_until = time.monotonic() + cfg.batch_wait_s
        while True:
            try:
                nxt = self._queue.get_nowait()
            except queue.Empty:
                # An idle service answers at once; under load, wait briefly for stragglers.
                if len(jobs) == 1 or time.monotonic() >= wait_until:
                    break
                try:
                    nxt = self._queue.get(timeout=max(wait_until - time.monotonic(), 1e-5))
                except queue.Empty:
                    break
            if total + nxt.size > cfg.max_batch_candidates or nxt.ver is not first.ver:
                self._carry = nxt  # next batch starts with it
                break
            jobs.append(nxt)
            total += nxt.size
        return jobs

    def _fetch_loop(self) -> None:
        while not self._stopping.is_set():
            # A batch is formed only when the compute thread can take it soon.
            if not self._ahead.acquire(timeout=0.1):
                continue
            handed = False
            try:
                handed = self._fetch_one_batch()
            finally:
                if not handed:
                    self._ahead.release()

    def _fetch_one_batch(self) -> bool:
        """Takes a batch off the queue and fetches it; True if it went to the compute thread."""
        jobs = self._next_batch()
        if not jobs:
            return False
        now = time.monotonic()
        live = []
        for job in jobs:
            if not job.future.set_running_or_notify_cancel():
                continue
            if now >= job.deadline:
                job.future.set_exception(
                    RankError(grpc.StatusCode.UNAVAILABLE, "deadline passed while queued")
                )
                continue
            live.append(job)
        if not live:
            return False
        t0 = time.perf_counter()
        try:
            batch = self._fetch(live)
        except RankError as e:
            err = e
        except Exception as e:
            log.exception("fetch failed")
            err = RankError(grpc.StatusCode.INTERNAL, f"fetch failed: {type(e).__name__}: {e}")
        else:
            self._stats.fetched(time.perf_counter() - t0)
            self._compute_q.put((live, batch))
            return True
        for job in live:
            job.future.set_exception(err)
        return False

    def _fetch(self, jobs: list[_Job]):
        """A batch of jobs of one version packed for the scorer: rows [P, W], coarse [P, K].

        Written straight into arrays of the batch's bucket P (rows T.. are zero
        padding; ``jitted_scorer`` has the layout): np.pad after the fact cost
        ~50 us per entity per batch.
        """
        cfg = self.config
        ver = jobs[0].ver
        sizes = np.array([j.size for j in jobs])
        total = int(sizes.sum())
        p = next(b for b in cfg.buckets if b >= total)
        want: dict[str, np.ndarray] = {}
        if ver.has_user:
            users_j = np.array([j.user_row for j in jobs], np.int64)
            want[cfg.user_entity] = users_j[users_j >= 0]
        if ver.has_candidate:
            want[cfg.candidate_entity] = np.concatenate([j.cand_c for j in jobs])
        ctx = {
            name: np.concatenate([j.context[name] for j in jobs]).astype(np.int64, copy=False)
            for name in (*ver.context_entities, *ver.coarse)
        }
        for ent in ver.context_entities:
            want[ent] = ctx[ent][ctx[ent] >= 0]
        want = {t: r for t, r in want.items() if r.size}
        # The fetch may take as long as the latest deadline of the batch (its jobs
        # whose deadline passes first are answered UNAVAILABLE by their handlers),
        # not a fresh deadline_s: a hung shard must not hold the fetch thread longer.
        remaining = max(j.deadline for j in jobs) - time.monotonic()
        contacted = bool(want)  # were the shards asked (not all rows from the cache)?
        try:
            if isinstance(ver.fetcher, row_cache.RowCache):
                got, contacted = ver.fetcher.fetch(want, deadline_s=max(remaining, 1e-3))
            else:
                got = ver.fetcher.lookup_many(
                    want, deadline_s=max(remaining, 1e-3)) if want else {}
        except client_lib.ServingError as e:
            err = self._shard_error(e, ver, remaining)
            if err.code == grpc.StatusCode.UNAVAILABLE and cfg.shards:
                self._note_fetch(shards_ok=False)
            raise err from None
        if cfg.shards and contacted:
            self._note_fetch(shards_ok=True)
        rows_pw, coarse_pk = self._zeros(ver, p)
        cols = ver.columns
        for ent, dim in ver.config.entity_dims:
            out_td = rows_pw[:total, cols[ent]]  # a view: written in place
            if ent == cfg.user_entity:
                if ent in got:
                    known_j = users_j >= 0
                    per_job = np.zeros((len(jobs), dim), np.float32)
                    per_job[known_j] = got[ent]
                    out_td[:] = per_job if len(jobs) == 1 else np.repeat(per_job, sizes, axis=0)
            elif ent == cfg.candidate_entity:
                out_td[:] = got[ent]
            elif ent in got:
                out_td[ctx[ent] >= 0] = got[ent]
        for k, c in enumerate(ver.coarse):
            coarse_pk[:total, k] = ctx[c]
        return rows_pw, coarse_pk

    def _shard_error(self, e: client_lib.ServingError, ver: _Version,
                     budget_s: float) -> RankError:
        """What a fetch's failure is to the caller (Rank and Prefetch alike)."""
        mismatch = isinstance(e, client_lib.VersionMismatch)
        if mismatch and ver.version != self._versions.current:  # pinned by the caller
            return RankError(grpc.StatusCode.FAILED_PRECONDITION, f"embedding shards: {e}")
        # Down, slow, shedding load, or not serving the version this ranker
        # serves (the shard fleet mid-rollout): an outage, not the caller's doing.
        if mismatch or e.code in (None, *client_lib.RETRYABLE):
            what = (f"do not serve this ranker's version {ver.version}" if mismatch
                    else f"unavailable (budget {budget_s:.3f}s)")
            return RankError(grpc.StatusCode.UNAVAILABLE, f"embedding shards {what}: {e}")
        return RankError(grpc.StatusCode.INTERNAL, f"embedding shards: {e}")

    def _compute_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                jobs, (rows, coarse) = self._compute_q.get(timeout=0.1)
            except queue.Empty:
                continue
            self._ahead.release()  # the fetch thread may form the next batch
            try:
                self._score(jobs, rows, coarse)
            except Exception as e:
                log.exception("scoring failed")
                err = RankError(
                    grpc.StatusCode.INTERNAL, f"scoring failed: {type(e).__name__}: {e}"
                )
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(err)

    def _score(self, jobs: list[_Job], rows_pw: np.ndarray, coarse_pk: np.ndarray) -> None:
        """Scores a fetched batch (``_fetch``: padded to its bucket) and answers its jobs."""
        ver = jobs[0].ver
        total = sum(j.size for j in jobs)
        t0 = time.perf_counter()
        ctr_p, cvr_p = np.asarray(ver.scorer(ver.params, rows_pw, coarse_pk), np.float32)
        self._stats.batch(len(jobs), total, score_s=time.perf_counter() - t0)
        lo = 0
        for job in jobs:
            hi = lo + job.size
            job.future.set_result((ctr_p[lo:hi].copy(), cvr_p[lo:hi].copy()))
            lo = hi


def _check_shards(
    addresses: Sequence[str], version: str, timeout_s: float, root_certificates=None,
    batch_ids: int = 0, wait_s: float = 0.0,
) -> None:
    """Refuses to pair with shards that do not serve ``version`` (Info on each), or
    whose ``max_ids_per_request`` is below ``batch_ids`` (the most ids one batch can
    send one shard): every request of such a batch would fail, though each alone
    would pass. Of a shard's replicas (``"a|b"``), every one that answers must pass;
    one that does not answer is logged, as long as one of them answers. A shard none
    of whose replicas answers is asked again every 0.5 s for up to ``wait_s``."""
    end = time.monotonic() + wait_s
    for i, entry in enumerate(addresses):
        replicas = entry.split("|")
        waited = False
        while True:
            answered, silent = [], []
            for addr in replicas:
                try:
                    _check_shard(i, addr, len(addresses), version, timeout_s,
                                 root_certificates, batch_ids)
                    answered.append(addr)
                except client_lib.ServingError as e:
                    if e.code is None:  # it answered: another version, index or count
                        raise
                    silent.append(e)
            if answered or time.monotonic() >= end:
                break
            if not waited:
                log.info("embedding shard %d (%s) does not answer yet; waiting up to %.0f s "
                         "(wait_for_shards_s)", i, entry, end - time.monotonic())
                waited = True
            time.sleep(min(0.5, max(end - time.monotonic(), 0.0)))
        after = f" (after waiting {wait_s:g} s for it)" if wait_s > 0 else ""
        if not answered and len(replicas) == 1:
            raise client_lib.ServingError(f"{silent[0]}{after}", code=silent[0].code, shard=i)
        if not answered:
            raise client_lib.ServingError(
                f"embedding shard {i}: none of its replicas {replicas} answered Info{after}",
                shard=i,
            )
        for e in silent:
            log.warning("%s", e)


def _tls_hint(details: str, tls: bool) -> str:
    """What gRPC's words for a TLS mismatch at connect mean, in flags ('' if none)."""
    if not tls and "Socket closed" in details:
        return " (a TLS shard, serve_embeddings --tls_cert? give --shard_ca_cert)"
    if tls and "WRONG_VERSION_NUMBER" in details:
        return " (a plaintext shard? --shard_ca_cert talks TLS to the shards)"
    if tls and "CERTIFICATE_VERIFY_FAILED" in details:
        return " (the shard's certificate is not signed by --shard_ca_cert)"
    return ""


def _check_shard(i: int, addr: str, num_shards: int, version: str, timeout_s: float,
                 root_certificates, batch_ids: int) -> None:
    """`_check_shards` for one address of shard ``i``."""
    with grpc_util.channel(addr, root_certificates=root_certificates) as ch:
        info = ch.unary_unary(codec.INFO_METHOD)
        try:
            raw = info(pb.InfoRequest().SerializeToString(), timeout=max(timeout_s, 1.0))
        except grpc.RpcError as e:
            raise client_lib.ServingError(
                # gRPC's details name the cause (refused, TLS hostname check, ...).
                f"embedding shard {i} ({addr}) did not answer Info: {e.code().name}: "
                f"{e.details()}{_tls_hint(e.details() or '', root_certificates is not None)}",
                code=e.code(),
                shard=i,
            ) from None
    resp = pb.InfoResponse.FromString(raw)
    if version not in resp.versions:
        raise client_lib.VersionMismatch(
            f"embedding shard {i} ({addr}) serves {list(resp.versions)}, not the ranker's "
            f"version {version}; swap the shards first",
            shard=i,
        )
    if 0 < resp.max_ids_per_request < batch_ids:
        raise ValueError(
            f"embedding shard {i} ({addr}) takes at most {resp.max_ids_per_request} ids "
            f"per request, but a batch of max_batch_candidates can send it {batch_ids}; "
            "lower --max_batch_candidates or raise the shards' --max_ids_per_request"
        )
    if resp.num_shards != num_shards or resp.shard != i:
        raise client_lib.ServingError(
            f"embedding shard at {addr} is shard {resp.shard} of {resp.num_shards}, "
            f"listed as shard {i} of {num_shards}",
            shard=i,
        )


def rank_request(
    *,
    candidates: np.ndarray,
    user_raw_id: str | None = None,
    user_row: int | None = None,
    context: Mapping[str, np.ndarray | int] | None = None,
    expected_version: str = "",
    request_id: str = "",
) -> pb.RankRequest:
    """Builds a RankRequest from NumPy inputs (for clients, tools and tests).

    Args:
      candidates: int [C] candidate rows.
      user_raw_id: the user's raw id (exclusive with ``user_row``).
      user_row: the user's row (an int or NumPy integer).
      context: name -> int [C] or an integer scalar (see module docstring).
      expected_version: pin a version ("" = current).
      request_id: echoed back.

    Returns:
      The request.

    Raises:
      ValueError: both users given, or a value that is not integers of the
        right shape (floats are refused, not truncated; [C] arrays are 1-D).
    """
    req = pb.RankRequest(
        candidate_ids=codec.encode_ids(codec.int_array("candidates", candidates)),
        expected_version=expected_version,
        request_id=request_id,
    )
    if user_raw_id is not None and user_row is not None:
        raise ValueError("give user_raw_id or user_row, not both")
    if user_raw_id is not None:
        req.user_raw_id = str(user_raw_id)
    elif user_row is not None:
        req.user_row = _int_scalar("user_row", user_row)
    for name, v in (context or {}).items():
        req.context[name] = codec.encode_ids(
            codec.int_array(f"context[{name!r}]", v, scalar_ok=True))
    return req


def _int_scalar(what: str, value) -> int:
    """``value`` as an int: a Python or NumPy integer, not a bool or float (ValueError)."""
    if not isinstance(value, numbers.Integral) or isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{what} must be an integer, got {type(value).__name__} {value!r}")
    return int(value)


def prefetch_request(
    *, user_raw_id: str | None = None, user_row: int | None = None, expected_version: str = ""
) -> pb.PrefetchRequest:
    """A PrefetchRequest for one user (raw id or row; see ``RankerService.prefetch``)."""
    if (user_raw_id is None) == (user_row is None):
        raise ValueError("give user_raw_id or user_row (one of them)")
    req = pb.PrefetchRequest(expected_version=expected_version)
    if user_raw_id is not None:
        req.user_raw_id = str(user_raw_id)
    else:
        req.user_row = _int_scalar("user_row", user_row)
    return req


def decode_response(resp: pb.RankResponse | bytes) -> tuple[np.ndarray, np.ndarray, str]:
    """(p_ctr [C], p_cvr [C], version) of a RankResponse (or its bytes)."""
    if isinstance(resp, bytes):
        resp = pb.RankResponse.FromString(resp)
    ctr = np.frombuffer(resp.ctr, codec.VALUES_DTYPE)
    cvr = np.frombuffer(resp.cvr, codec.VALUES_DTYPE)
    return ctr, cvr, resp.version


def serve(config: RankerServiceConfig) -> RankerService:
    """Builds and starts a ranker service; its bound port is ``service.port``."""
    service = RankerService(config)
    service.start()
    return service


def default_device() -> str:
    """The device the scorer runs on (for logs and benchmark lines)."""
    return str(jax.devices()[0])


__all__ = [
    "RANK_METHOD",
    "SCORER_PRECISION",
    "RankError",
    "RankerService",
    "RankerServiceConfig",
    "decode_response",
    "default_device",
    "entity_columns",
    "jitted_scorer",
    "rank_request",
    "serve",
    "with_precision",
]
