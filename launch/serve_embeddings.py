r"""Runs one CPU embedding shard server over a serving artifact.

  python -m launch.serve_embeddings --artifact=ART --shard=0 --num_shards=2 --port=0

Prints one JSON line on stdout once serving, e.g.
``{"event": "serving", "port": 40123, "shard": 0, "num_shards": 2, "version": "..."}``
(so scripts and tests can bind port 0 and read the port back). SIGTERM/SIGINT
stop it gracefully (in-flight requests get --grace_s); SIGHUP swaps in the
artifact that --artifact points to now (point it at a symlink to the current
version). Imports no JAX: starts in well under a second plus artifact
verification time. A start that cannot succeed (bad flags, no artifact, an
address that cannot be bound) prints one ``serve_embeddings: cannot start: ...``
line on stderr and exits with status 1 (``--verbosity=1`` adds the traceback); Ctrl-C
before it serves (e.g. during ``--verify=full`` of a large artifact) prints
``serve_embeddings: interrupted`` and exits with status 130.
"""

from __future__ import annotations

import json
import logging as std_logging
import os
import signal
import sys

import launch

if __name__ == "__main__":  # until serving: Ctrl-C is one line, exit 130; SIGHUP a swap
    launch.server_starting("serve_embeddings")

from absl import app, flags, logging  # noqa: E402

from serving import embedding_server, grpc_util  # noqa: E402

_ARTIFACT = flags.DEFINE_string("artifact", None, "Serving artifact folder.", required=True)
_SHARD = flags.DEFINE_integer("shard", 0, "This server's shard index i in [0, num_shards).")
_NUM_SHARDS = flags.DEFINE_integer(
    "num_shards", 1,
    "Number of shards S, at most the rows of the artifact's largest table (more would "
    "leave some shards no row of any table: refused). A table of fewer rows than S "
    "leaves some shards none of its rows, with a warning on each.")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Interface to bind (0.0.0.0 for all).")
_PORT = flags.DEFINE_integer("port", 0, "Port; 0 picks a free one (printed).")
_WORKERS = flags.DEFINE_integer("workers", 8, "Handler threads.")
_MAX_IDS = flags.DEFINE_integer("max_ids_per_request", 1 << 16, "Ids per request limit.")
_MAX_RPCS = flags.DEFINE_integer(
    "max_concurrent_rpcs",
    0,
    "Lookups in the server at once; one more is RESOURCE_EXHAUSTED at once (load "
    "shedding). 0: unbounded. Health checks do not count.",
    lower_bound=0,
)
_MAX_STREAMS = flags.DEFINE_integer(
    "max_streams",
    64,
    "LookupStream calls open at once (clients keep one per concurrent caller), each on a "
    "thread of its own; one more is RESOURCE_EXHAUSTED (the client then uses unary "
    "Lookup). 0: no streaming.",
    lower_bound=0,
)
_TLS_CERT = flags.DEFINE_string("tls_cert", None, "PEM certificate file (enables TLS).")
_TLS_KEY = flags.DEFINE_string("tls_key", None, "PEM private key file.")
_VERIFY = flags.DEFINE_enum(
    "verify", "sizes", ["sizes", "full", "none"], "Artifact check at load (sizes: stat only)."
)
_SWAP_WINDOW = flags.DEFINE_float("swap_window_s", 60.0, "Old version kept after a swap.")
_LOG_EVERY = flags.DEFINE_float("log_every_s", 30.0, "Stats log period (0: off).")
_GRACE = flags.DEFINE_float("grace_s", 5.0, "Grace period for in-flight requests on stop.")


def main(argv):
    del argv
    std_logging.getLogger("serving").setLevel(std_logging.INFO)
    try:  # a bad flag, artifact or address: one line and exit status 1, no traceback
        grpc_util.check_seconds("grace_s", _GRACE.value)  # not in the config
        config = embedding_server.ServerConfig(
            artifact=_ARTIFACT.value,
            shard=_SHARD.value,
            num_shards=_NUM_SHARDS.value,
            host=_HOST.value,
            port=_PORT.value,
            workers=_WORKERS.value,
            max_ids_per_request=_MAX_IDS.value,
            max_concurrent_rpcs=_MAX_RPCS.value or None,
            max_streams=_MAX_STREAMS.value,
            tls_cert=_TLS_CERT.value,
            tls_key=_TLS_KEY.value,
            verify=_VERIFY.value,
            swap_window_s=_SWAP_WINDOW.value,
            log_every_s=_LOG_EVERY.value,
        )
        server = embedding_server.serve(config)
    except (ValueError, OSError) as e:
        logging.debug("start-up failed", exc_info=True)  # --verbosity=1 shows it
        sys.exit(f"serve_embeddings: cannot start: {e}")
    stop = launch.SignalFlag()  # no threading.Event: its lock can deadlock a handler
    swap = launch.HANGUP_PENDING  # set: a SIGHUP came while starting
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())  # serving: a graceful stop from now
    signal.signal(signal.SIGHUP, lambda *_: swap.set())
    print(
        json.dumps(
            {
                "event": "serving",
                "port": server.port,
                "host": config.host,
                "shard": config.shard,
                "num_shards": config.num_shards,
                "version": server.version,
                "pid": os.getpid(),
            }
        ),
        flush=True,
    )
    # The shard logs its own stats lines (a thread of the server: --log_every_s).
    grpc_util.serve_until_stopped(server, artifact=config.artifact, stop=stop, swap=swap,
                                  log_every_s=0)
    logging.info("stopping (grace %.1fs); stats %s", _GRACE.value,
                 grpc_util.stats_line(server.stats()))
    server.stop(_GRACE.value).wait()
    print(json.dumps({"event": "stopped", "stats": server.stats()}), flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    app.run(main)
