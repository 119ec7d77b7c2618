r"""Runs the ranker service: jitted CTR/CVR scoring fed by the embedding shards.

  python -m launch.serve_ranker --artifact=ART --shards=127.0.0.1:50051,127.0.0.1:50052 --port=0
  python -m launch.serve_ranker --artifact=ART --port=0          # monolithic: tables in process

The scorer runs on the default JAX device (GPU when present). Prints one JSON
line on stdout once serving, e.g. ``{"event": "serving", "port": 40125,
"mode": "hybrid", "version": "...", "device": "cuda:0", "start_s": 3.1}``, so
scripts and tests can bind port 0 and read the port back (``start_s``: seconds
from flags parsed to serving, JAX's import and the bucket compiles included; see
``--compilation_cache_dir``). SIGTERM/SIGINT stop it; SIGHUP swaps in
the artifact --artifact points to now (a symlink to the current version):
swap the shards first (``serve_embeddings`` also swaps on SIGHUP), then the
ranker. Request contract and status codes: ``serving/ranker_service.py``.
A start that cannot succeed (bad flags, no artifact, an address that cannot be
bound, a shard that does not answer within ``--wait_for_shards_s`` or serves another
version) prints one ``serve_ranker: cannot start: ...`` line on stderr and exits
with status 1 (bad flags at once: JAX is imported only after they are checked); Ctrl-C
before it serves (JAX's import and the compiles take seconds, 40 s on a GPU host)
prints ``serve_ranker: interrupted`` and exits with status 130.
"""

from __future__ import annotations

import json
import logging as std_logging
import math
import os
import signal
import sys
import time

import launch

if __name__ == "__main__":  # until serving: Ctrl-C is one line, exit 130; SIGHUP a swap
    launch.server_starting("serve_ranker")

from absl import app, flags, logging  # noqa: E402

from serving import client, grpc_util, ranker_config  # noqa: E402 (no JAX: flags checked at once)

_ARTIFACT = flags.DEFINE_string("artifact", None, "Serving artifact folder.", required=True)
_SHARDS = flags.DEFINE_list(
    "shards", [],
    "host:port of each embedding shard in shard order; 'host:port|host:port' lists a "
    "shard's primary and replicas (lookups fail over; quote the flag in a shell); "
    "empty = monolithic.",
)
_WAIT_SHARDS = flags.DEFINE_float(
    "wait_for_shards_s",
    0.0,
    "At start, how long to wait for a shard that does not answer yet (not started, still "
    "loading; asked again every 0.5 s), e.g. when shards and ranker start together. 0: "
    "refuse to start at once. A shard serving another version is refused at once.",
)
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Interface to bind (0.0.0.0 for all).")
_PORT = flags.DEFINE_integer("port", 0, "Port; 0 picks a free one (printed).")
_DEADLINE = flags.DEFINE_float("deadline_s", 1.0, "Time budget of one Rank call.")
_MAX_CANDIDATES = flags.DEFINE_integer("max_candidates", 2048, "Candidates per request limit.")
_MAX_BATCH = flags.DEFINE_integer("max_batch_candidates", 4096, "Candidates per scored batch.")
_MIN_BUCKET = flags.DEFINE_integer("min_bucket", 64, "Smallest padded batch (power of two).")
_BATCH_WAIT = flags.DEFINE_float("batch_wait_s", 0.001, "Batcher wait under concurrent load.")
_FETCH_AHEAD = flags.DEFINE_integer(
    "fetch_ahead",
    1,
    "Batches fetched and waiting for the scorer, at most; under load, requests that queue "
    "meanwhile are merged into the next batch.",
)
_WORKERS = flags.DEFINE_integer("workers", 16, "gRPC handler threads.")
_MAX_RPCS = flags.DEFINE_integer(
    "max_concurrent_rpcs",
    0,
    "Rank calls in the service at once; one more is RESOURCE_EXHAUSTED at once (load "
    "shedding). 0: unbounded. Health checks do not count.",
    lower_bound=0,
)
_UNHEALTHY_AFTER = flags.DEFINE_integer(
    "unhealthy_after",
    3,
    "Consecutive batches whose fetch found the shards unavailable before gRPC health says "
    "NOT_SERVING (a probe sets SERVING again once every shard answers); 0: never.",
    lower_bound=0,
)
_SWAP_WINDOW = flags.DEFINE_float("swap_window_s", 60.0, "Old version kept after a swap.")
_VERIFY = flags.DEFINE_enum("verify", "sizes", ["sizes", "full", "none"], "Artifact check at load.")
_WIRE = flags.DEFINE_enum(
    "wire",
    "quantized",
    list(client.WIRE_FORMATS),
    "How shards send INT4/INT8 rows: as stored, dequantized here (~5x fewer bytes), or "
    "dequantized on the shard as float32. Scores are identical.",
)
_TRANSPORT = flags.DEFINE_enum(
    "transport",
    "stream",
    list(client.TRANSPORTS),
    "How fetches reach the shards: long-lived LookupStream calls (no per-call gRPC setup) "
    "or one unary Lookup per shard and batch. Scores are identical.",
)
_HEDGE_MS = flags.DEFINE_string(
    "hedge_after_ms",
    None,
    "Hedged fetches for shards with replicas: a shard that has not answered after this "
    "many ms is also asked on its next replica and the first answer is used (set it at "
    "or a little above the fetch p99, from the service's stats line). 'auto': per shard, "
    "the --hedge_quantile of its last 1,000 answer times (at least --hedge_min_ms; no "
    "hedging for its first 100; the stats line shows hedge_delay_ms). Unset: replicas are "
    "tried one after another (failover).",
)
_HEDGE_QUANTILE = flags.DEFINE_float(
    "hedge_quantile",
    0.99,
    "With --hedge_after_ms=auto: the quantile of a shard's recent answer times to hedge "
    "after, in (0, 1) (0.99 hedges ~1% of fetches when the shards are as fast as usual).",
)
_HEDGE_MIN_MS = flags.DEFINE_float(
    "hedge_min_ms",
    1.0,
    "With --hedge_after_ms=auto: the shortest hedge delay, in ms.",
)
_CACHE_TABLES = flags.DEFINE_list(
    "cache_tables",
    [],
    "With --cache_rows: the tables to cache, e.g. pin,advertiser (default: every table "
    "the ranker fetches). Leave out a table whose rows rarely repeat (users not seen for "
    "a while): it costs memory and misses every time; keep the user table to serve "
    "Prefetch calls. A name the ranker does not fetch is refused at start (a swap to a "
    "model without that table only warns).",
)
_HEDGE_BUDGET = flags.DEFINE_float(
    "hedge_budget",
    0.05,
    "With --hedge_after_ms: hedges per shard fetch, at most, over time (a token bucket); "
    "caps the load hedging adds when the shards are slow because they are saturated.",
    lower_bound=0.0,
    upper_bound=1.0,
)
_CACHE_ROWS = flags.DEFINE_integer(
    "cache_rows",
    0,
    "With --shards: keep up to this many recently fetched rows per table in the ranker "
    "(a table that small is kept whole, a larger one in this many slots rounded down to a "
    "power of two; with --wire=quantized an INT4/INT8 table keeps its codes, "
    "ceil(dim/2)+16 (INT4) or dim+16 (INT8) bytes a slot, 48 for INT4 dim 64; with "
    "--wire=float32 float32 rows, 4*dim+8 bytes a slot) and fetch only the others from "
    "the shards: "
    "repeated candidates and context rows cost no fetch. One cache per loaded version; "
    "scores are identical. 0: off.",
    lower_bound=0,
)
_SHARD_CA = flags.DEFINE_string(
    "shard_ca_cert",
    None,
    "PEM file of the CA (or self-signed certificate) of the shards' TLS certificates: talk "
    "TLS to the shards (serve_embeddings --tls_cert). Unset: plaintext.",
)
_TLS_CERT = flags.DEFINE_string("tls_cert", None, "PEM certificate file (serve Rank over TLS).")
_TLS_KEY = flags.DEFINE_string("tls_key", None, "PEM private key file (with --tls_cert).")
_LOG_EVERY = flags.DEFINE_float("log_every_s", 30.0, "Stats log period (0: off).")
_CACHE_DIR = flags.DEFINE_string(
    "compilation_cache_dir",
    None,
    "Persistent XLA compilation cache folder (created if missing; may be shared by the "
    "rankers of a host): a restarted ranker, or a second one of the same architecture, "
    "loads its compiled bucket programs instead of compiling them, which is most of a "
    "ranker's start on a GPU. Unset: compile at every start.",
)


def _hedge_after_s() -> float | str | None:
    """``hedge_after_s`` from the hedge flags; ValueError names the bad flag."""
    ms = _HEDGE_MS.value
    if _HEDGE_BUDGET.present and ms is None:
        raise ValueError("--hedge_budget needs --hedge_after_ms (it caps the hedges)")
    auto = ms is not None and ms.strip().lower() == client.HEDGE_AUTO
    for flag in (_HEDGE_QUANTILE, _HEDGE_MIN_MS):
        if flag.present and not auto:
            raise ValueError(f"--{flag.name} needs --hedge_after_ms=auto")
    if not 0 < _HEDGE_QUANTILE.value < 1:
        raise ValueError(f"--hedge_quantile must be in (0, 1), got {_HEDGE_QUANTILE.value}")
    if not (math.isfinite(_HEDGE_MIN_MS.value) and _HEDGE_MIN_MS.value >= 0):
        raise ValueError(f"--hedge_min_ms must be a finite number >= 0, got "
                         f"{_HEDGE_MIN_MS.value}")
    if ms is None or auto:
        return client.HEDGE_AUTO if auto else None
    try:
        value = float(ms)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"--hedge_after_ms must be 'auto' or a finite number of ms >= 0, "
                         f"got {ms!r}")
    return value / 1000.0


def main(argv):
    del argv
    std_logging.getLogger("serving").setLevel(std_logging.INFO)
    t0 = time.perf_counter()
    try:  # a bad flag, artifact, address or shard: one line and exit status 1
        hedge_after_s = _hedge_after_s()
        grpc_util.check_seconds("log_every_s", _LOG_EVERY.value)  # not in the config
        config = ranker_config.RankerServiceConfig(
            artifact=_ARTIFACT.value,
            shards=tuple(_SHARDS.value),
            host=_HOST.value,
            port=_PORT.value,
            deadline_s=_DEADLINE.value,
            max_candidates=_MAX_CANDIDATES.value,
            max_batch_candidates=_MAX_BATCH.value,
            min_bucket=_MIN_BUCKET.value,
            batch_wait_s=_BATCH_WAIT.value,
            fetch_ahead=_FETCH_AHEAD.value,
            workers=_WORKERS.value,
            max_concurrent_rpcs=_MAX_RPCS.value or None,
            unhealthy_after=_UNHEALTHY_AFTER.value,
            wait_for_shards_s=_WAIT_SHARDS.value,
            swap_window_s=_SWAP_WINDOW.value,
            verify=_VERIFY.value,
            wire=_WIRE.value,
            transport=_TRANSPORT.value,
            hedge_after_s=hedge_after_s,
            hedge_quantile=_HEDGE_QUANTILE.value,
            hedge_min_s=_HEDGE_MIN_MS.value / 1000.0,
            hedge_budget=_HEDGE_BUDGET.value,
            cache_rows=_CACHE_ROWS.value,
            cache_tables=tuple(t.strip() for t in _CACHE_TABLES.value),
            shard_ca_cert=_SHARD_CA.value,
            tls_cert=_TLS_CERT.value,
            tls_key=_TLS_KEY.value,
        )
        from serving import ranker_service  # JAX: seconds, after the flags are checked

        if _CACHE_DIR.value:
            import jax

            jax.config.update("jax_compilation_cache_dir", _CACHE_DIR.value)
            # Every bucket program, however quick to compile: on a GPU each takes seconds.
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        service = ranker_service.serve(config)
    except (ValueError, OSError, client.ServingError) as e:
        logging.debug("start-up failed", exc_info=True)  # --verbosity=1 shows it
        sys.exit(f"serve_ranker: cannot start: {e}")
    # Not threading.Event: its set() in a handler can deadlock (launch.SignalFlag).
    stop, swap = launch.SignalFlag(), launch.HANGUP_PENDING  # set: a SIGHUP while starting
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())  # serving: a graceful stop from now
    signal.signal(signal.SIGHUP, lambda *_: swap.set())
    print(
        json.dumps(
            {
                "event": "serving",
                "port": service.port,
                "host": config.host,
                "mode": config.mode,
                "shards": list(config.shards),
                "version": service.version,
                "device": ranker_service.default_device(),
                "pid": os.getpid(),
                "start_s": round(time.perf_counter() - t0, 2),
            }
        ),
        flush=True,
    )
    grpc_util.serve_until_stopped(service, artifact=config.artifact, stop=stop, swap=swap,
                                  log_every_s=_LOG_EVERY.value)
    service.stop(grace=2.0)
    print(json.dumps({"event": "stopped", "stats": service.stats()}), flush=True)


if __name__ == "__main__":
    app.run(main)
