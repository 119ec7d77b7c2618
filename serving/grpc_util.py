"""gRPC plumbing shared by the embedding shard server and the ranker service.

``Server`` builds a sync gRPC server whose health checks cannot be crowded
out: ``grpc.health.v1.Health/Check`` runs on two threads of its own (so it
answers while every handler thread is busy) and does not count toward
``max_concurrent_rpcs``; so do the handlers wrapped by ``Server.express``
(a shard's Info). The limit is enforced here rather than by gRPC (whose
``maximum_concurrent_rpcs`` counts every call, health checks included, so an
overloaded server failed its own health checks and a load balancer would take
it out): a call beyond the limit is answered RESOURCE_EXHAUSTED at once, from
those two threads. Streaming handlers (``Server.stream_handler``, for
long-lived calls like ``LookupStream``) run on threads of their own, one per
open stream up to ``max_streams``; one more stream is refused the same way.

Imports gRPC, grpc_health and the standard library only (the shard servers stay
JAX-free).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import numbers
import os
import socket
import ssl
import sys
import tempfile
import threading
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2

from serving.limits import MAX_SECONDS

_log = logging.getLogger(__name__)

HEALTH_SERVICE = "grpc.health.v1.Health"
_EXPRESS_THREADS = 2


def check_pem(data: bytes, what: str) -> None:
    """Raises ValueError unless ``data`` holds at least one PEM block."""
    if not data.strip() or b"-----BEGIN " not in data:
        raise ValueError(f"{what}: {'empty' if not data.strip() else 'not PEM'} "
                         "(expected a -----BEGIN ...----- block)")


def read_pem(path: str, what: str) -> bytes:
    """The bytes of PEM file ``path``, checked (see ``check_pem``).

    Raises:
      OSError: the file cannot be read; the message names ``what`` (the flag) and ``path``.
      ValueError: it is empty or not PEM.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:  # '[Errno 2] No such file or directory: ...' named no flag
        raise OSError(f"{what} {path}: cannot read it ({e.strerror})") from None
    check_pem(data, f"{what} {path}")
    return data


def check_server_settings(artifact, host: str, port: int) -> None:
    """Raises ValueError unless a server's ``artifact`` and ``host`` are not empty and
    ``port`` is in [0, 65535] (0: a free one): '--artifact=$ART' with ART unset must not
    serve the working folder, and an empty host is no interface."""
    if not str(artifact).strip():
        raise ValueError("artifact is empty: give the serving artifact folder")
    if not host.strip():
        raise ValueError("host is empty: give the interface to bind (127.0.0.1; 0.0.0.0 "
                         "for all)")
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be in [0, 65535] (0: pick a free one), got {port}")


def check_tls_pair(tls_cert: str | None, tls_key: str | None) -> None:
    """Raises ValueError unless both or neither of a server's TLS files are given."""
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("tls_cert and tls_key must be given together")


def check_key_pair(cert: bytes, key: bytes, tls_cert: str, tls_key: str) -> None:
    """Raises ValueError unless ``key`` (PEM) is the unencrypted private key of the first
    certificate in ``cert`` (PEM); ``tls_cert`` / ``tls_key`` are their paths, for the message.

    gRPC takes any PEM pair and then fails to bind with no word of why (``could not
    bind ...``): a swapped, mismatched or encrypted pair is named here instead.
    """
    if b"-----BEGIN CERTIFICATE-----" not in cert:
        raise ValueError(f"tls_cert {tls_cert} holds no certificate (no -----BEGIN "
                         "CERTIFICATE----- block; are --tls_cert and --tls_key swapped?)")
    if b"PRIVATE KEY-----" not in key:
        raise ValueError(f"tls_key {tls_key} holds no private key (no -----BEGIN ... PRIVATE "
                         "KEY----- block; are --tls_cert and --tls_key swapped?)")
    if b"ENCRYPTED" in key:
        raise ValueError(f"tls_key {tls_key} is encrypted; gRPC needs an unencrypted key "
                         f"(openssl pkey -in {tls_key} -out KEY.pem)")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:  # the files as read; a password callback so that OpenSSL never prompts
        context.load_cert_chain(tls_cert, tls_key, password=lambda: b"")
    except ssl.SSLError as e:
        if e.reason == "KEY_VALUES_MISMATCH":
            raise ValueError(f"tls_key {tls_key} is not the private key of the certificate "
                             f"in tls_cert {tls_cert}") from None
        raise ValueError(f"tls_cert {tls_cert} and tls_key {tls_key}: OpenSSL cannot load "
                         f"them as a certificate and its key ({e.reason or e})") from None


def stats_line(stats: dict) -> str:
    """A server's ``stats()`` as one JSON object for its periodic log line, floats rounded
    to 3 decimals (latencies in ms to the microsecond; ``stats()`` keeps them exact)."""

    def rounded(value):
        if isinstance(value, float):
            return round(value, 3)
        if isinstance(value, dict):
            return {k: rounded(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [rounded(v) for v in value]
        return value

    return json.dumps(rounded(stats))


class Cadence:
    """Due times on a fixed cadence, ``start + k * period_s``: when a periodic stats line
    is due.

    A loop that sleeps ``period_s`` after its work (or counts its polls) drifts by that
    work's time: after a ranker's SIGHUP swap, which takes seconds, every later line came
    that much later. Here a late check does not move the due times after it, and due
    times missed whole (a swap longer than the period) are skipped, not made up in a
    burst of lines.

    Args:
      period_s: seconds between due times, > 0.
      clock: seconds, monotonic (``time.monotonic``; tests pass their own).
    """

    def __init__(self, period_s: float, *, clock=time.monotonic):
        check_seconds("period_s", period_s, positive=True)
        self.period_s = period_s
        self._clock = clock
        self._due = clock() + period_s

    def left_s(self) -> float:
        """Seconds until the next due time; 0 when it has come."""
        return max(0.0, self._due - self._clock())

    def due(self) -> bool:
        """Whether a due time has come; if so, the next one is the first after now."""
        now = self._clock()
        if now < self._due:
            return False
        self._due += self.period_s * (1 + (now - self._due) // self.period_s)
        return True


def serve_until_stopped(service, *, artifact: str, stop, swap, log_every_s: float,
                        clock=time.monotonic) -> None:
    """A server launcher's main loop (``launch.serve_embeddings``, ``launch.serve_ranker``):
    serves until ``stop`` is set, swaps in what ``artifact`` points to now each time
    ``swap`` is set (SIGHUP; a ``{"event": "swapped"}`` line on stdout, or an error
    log line and the old version kept), and logs the stats line every ``log_every_s``
    seconds (0: never) on a fixed cadence (``Cadence``), which a slow swap does not
    shift.

    Args:
      service: the started server (``swap(path)``, ``version``, ``stats()``).
      artifact: the --artifact path (a symlink to the current version).
      stop: set to return (``launch.SignalFlag``: a signal handler sets it).
      swap: set to swap; cleared here (``launch.SignalFlag``).
      log_every_s: stats line period in seconds, 0: no stats lines here.
      clock: monotonic seconds, for the cadence.
    """
    stats_due = Cadence(log_every_s, clock=clock) if log_every_s > 0 else None
    while not stop.wait(0.2 if stats_due is None else min(0.2, stats_due.left_s())):
        if swap.is_set():
            swap.clear()
            try:
                version = service.swap(os.path.realpath(artifact))
                print(json.dumps({"event": "swapped", "version": version}), flush=True)
            except Exception as e:  # a bad new artifact must not take the server down
                _log.error("swap failed, still serving %s: %s", service.version, e)
        if stats_due is not None and stats_due.due():
            _log.info("stats %s", stats_line(service.stats()))


def check_seconds(name: str, value, *, positive: bool = False) -> None:
    """Raises ValueError unless ``value`` is a number of seconds in ``[0, MAX_SECONDS]``
    (``(0, MAX_SECONDS]`` when ``positive``).

    A duration a server waits on must be finite: inf (or 1e10) overflows timers,
    queue waits and gRPC deadlines (``OverflowError`` in the thread that waits),
    and nan never ends a wait (``queue.get(timeout=nan)`` spins). A bool is no
    duration (True would be 1 s).
    """
    # type() first: a float or int (not bool) skips the slower ABC check (the lookup path).
    real = type(value) in (float, int) or (
        isinstance(value, numbers.Real) and not isinstance(value, bool))
    ok = real and (0 < value <= MAX_SECONDS if positive else 0 <= value <= MAX_SECONDS)
    if not ok:
        raise ValueError(f"{name} must be a finite number of seconds {'>' if positive else '>='} "
                         f"0 and at most {MAX_SECONDS:g} (1 day), got {value!r}")


def check_max_concurrent_rpcs(value: int | None) -> None:
    """Raises ValueError unless ``value`` is None (unbounded) or at least 1."""
    if value is not None and value < 1:
        raise ValueError(f"max_concurrent_rpcs must be >= 1 or None, got {value}")


def check_max_streams(value: int) -> None:
    """Raises ValueError unless ``value`` (open streams allowed; 0: none) is >= 0."""
    if value < 0:
        raise ValueError(f"max_streams must be >= 0 (0: no streams), got {value}")


def host_port(host: str, port: int) -> str:
    """``host:port`` for gRPC, an IPv6 host in brackets (``[::1]:50051``; ``::1:50051`` is
    no address to gRPC)."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def split_host_port(address: str) -> tuple[str, int]:
    """(host, port) of ``host:port``, the inverse of `host_port`: an IPv6 host loses its
    brackets (``[::1]:50051`` -> ``("::1", 50051)``); no colon: an empty host.

    Raises:
      ValueError: the port is not an integer.
    """
    host, _, port = address.rpartition(":")
    return host.removeprefix("[").removesuffix("]"), int(port)


def bind(
    server: grpc.Server, address: str, *, tls_cert: str | None = None, tls_key: str | None = None
) -> int:
    """Binds ``address`` (``host:port``), TLS only when a certificate is given.

    Args:
      server: the not yet started server.
      address: ``host:port``; port 0 picks a free one.
      tls_cert: PEM certificate (chain) file; with ``tls_key``, the port speaks TLS only.
      tls_key: PEM private key file.

    Returns:
      The bound port.

    Raises:
      OSError: the address cannot be bound (in use, no such interface) or a
        TLS file cannot be read.
      ValueError: a TLS file is empty or not PEM, or the key is not the certificate's
        (or is encrypted).
    """
    check_tls_pair(tls_cert, tls_key)
    credentials = None
    if tls_cert is not None:
        cert = read_pem(tls_cert, "tls_cert")
        key = read_pem(tls_key, "tls_key")
        check_key_pair(cert, key, tls_cert, tls_key)
        credentials = grpc.ssl_server_credentials([(key, cert)])
    # gRPC's C core logs a failed bind on stderr itself ('E... add_port.cc:83] Failed to
    # add port ...'), above the one line that says why: held back, and written out only
    # when the bind succeeds (then it is no failure of ours to explain).
    with _stderr_held() as held:
        try:  # gRPC raises (newer releases) or returns 0 when it cannot bind
            if credentials is not None:
                port = server.add_secure_port(address, credentials)
            else:
                port = server.add_insecure_port(address)
        except RuntimeError:
            port = 0
    if port == 0:  # gRPC says only 'Failed to bind ...; set GRPC_VERBOSITY=debug ...'
        raise OSError(f"could not bind {address}: {_why_not_bound(address, held.text)}")
    held.release()
    return port


class _Held:
    """What ``_stderr_held`` caught: ``text``; ``release()`` writes it to stderr."""

    text = ""

    def release(self) -> None:
        if self.text and sys.stderr is not None:
            sys.stderr.write(self.text)
            sys.stderr.flush()


@contextlib.contextmanager
def _stderr_held():
    """Catches what anything in this process (gRPC's C core included) writes to file
    descriptor 2 meanwhile; yields a ``_Held`` that has it once the block ends. Catches
    nothing where descriptor 2 is not open."""
    held = _Held()
    if sys.stderr is not None:
        sys.stderr.flush()
    try:
        caught = tempfile.TemporaryFile()
    except OSError:  # nowhere to hold it: let it through
        yield held
        return
    with caught:
        try:
            saved = os.dup(2)
        except OSError:  # no stderr to hold back
            yield held
            return
        os.dup2(caught.fileno(), 2)
        try:
            yield held
        finally:
            if sys.stderr is not None:
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            held.text = caught.read().decode(errors="replace")


def _why_not_bound(address: str, grpc_log: str = "") -> str:
    """Why ``host:port`` cannot be bound, from a bind of a plain socket (as gRPC's:
    SO_REUSEADDR): 'Address already in use', an unknown host, a foreign address; else
    the last line gRPC logged of it (``grpc_log``)."""
    try:
        host, port = split_host_port(address)
        infos = socket.getaddrinfo(host or None, port,
                                   type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, ValueError, OverflowError) as e:
        return f"no such host or interface ({e})"
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(sockaddr)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    return (f"{e.strerror} (another process listens there: choose another "
                            "--port, or --port=0 for a free one)")
                return e.strerror or str(e)
    said = [ln.split("] ", 1)[-1].strip() for ln in grpc_log.splitlines() if ln.strip()]
    return f"gRPC refused it ({said[-1]})" if said else "gRPC refused it"


def channel(
    address: str, *, root_certificates: bytes | None = None, options=()
) -> grpc.Channel:
    """A channel to ``address``: TLS verified against ``root_certificates`` (PEM), else plaintext.

    Only ``None`` means plaintext: empty or non-PEM certificates are an error, never
    a silent fall back to an unauthenticated channel.
    """
    if root_certificates is not None:
        check_pem(root_certificates, "root_certificates")
        creds = grpc.ssl_channel_credentials(root_certificates)
        return grpc.secure_channel(address, creds, options=list(options))
    return grpc.insecure_channel(address, options=list(options))


def _busy(limit: int | None) -> str:
    """The RESOURCE_EXHAUSTED message of a call beyond ``max_concurrent_rpcs``."""
    return f"server busy: {limit} calls in flight (max_concurrent_rpcs)"


class _CountingPool(futures.ThreadPoolExecutor):
    """A handler pool that knows how many calls it holds (running or queued).

    The sync gRPC server submits one work item per admitted call and the item
    ends when the call does (also when the client cancelled before it ran), so
    the count cannot leak. A call stops counting earlier when its handler has
    returned (``release_current``, from ``Server.unary_handler``): the rest of its
    work item is sending the answer, which its client may have before the item
    ends, and a client that calls again at once must not find the server still
    full of it.
    """

    def __init__(self, *, max_workers: int, thread_name_prefix: str = ""):
        super().__init__(max_workers=max_workers, thread_name_prefix=thread_name_prefix)
        self.capacity = max_workers
        self._count_lock = threading.Lock()
        self._local = threading.local()  # .held: the running call's [still counted]
        self.in_flight = 0

    def submit(self, fn, /, *args, **kwargs):
        held = [True]
        with self._count_lock:
            self.in_flight += 1

        def run():
            self._local.held = held
            try:
                return fn(*args, **kwargs)
            finally:
                self._local.held = None

        try:
            fut = super().submit(run)
        except BaseException:
            self._release(held)
            raise
        fut.add_done_callback(lambda _: self._release(held))
        return fut

    def _release(self, held: list[bool]) -> None:
        with self._count_lock:
            if held[0]:
                held[0] = False
                self.in_flight -= 1

    def release_current(self) -> None:
        """Stops counting the call this thread runs (no-op on other threads)."""
        held = getattr(self._local, "held", None)
        if held is not None:
            self._release(held)


class _ShedBeyond(grpc.ServerInterceptor):
    """Answers RESOURCE_EXHAUSTED, on the express threads, to calls beyond a limit.

    Unary calls: once ``limit`` calls are in the server (``in_flight()``: the
    unary calls in their pool plus the stream messages being answered; None:
    no limit).
    Streams run on ``streams`` (``Server.stream_handler``): once
    ``streams.capacity`` are open, a new one is refused, since it would
    wait for a thread until another stream ends. Runs in gRPC's polling
    thread, which also submits each admitted call to its pool right after: the
    check and the count move together. Calls whose handler runs on the express
    threads (health checks) are never shed, and neither are other streaming
    calls (health Watch: it returns at once).
    """

    def __init__(
        self,
        in_flight,
        limit: int | None,
        express: futures.ThreadPoolExecutor,
        streams: _CountingPool | None,
    ):
        self._in_flight, self._limit, self._express = in_flight, limit, express
        self._streams = streams

        def reject(request, context):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, _busy(limit))

        def reject_stream(request_iterator, context):
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"server busy: {streams.capacity} streams open (max_streams)",
            )

        reject.experimental_thread_pool = express
        reject_stream.experimental_thread_pool = express
        self._reject = grpc.unary_unary_rpc_method_handler(reject)
        self._reject_stream = grpc.stream_stream_rpc_method_handler(reject_stream)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return handler
        if handler.unary_unary is not None:
            if (
                self._limit is None
                or self._in_flight() < self._limit
                or getattr(handler.unary_unary, "experimental_thread_pool", None) is self._express
            ):
                return handler
            return self._reject
        streams = self._streams
        if (
            streams is None
            or handler.stream_stream is None
            or getattr(handler.stream_stream, "experimental_thread_pool", None) is not streams
            or streams.in_flight < streams.capacity
        ):
            return handler
        return self._reject_stream


class _Health(health.HealthServicer):
    """grpc_health's servicer with ``List`` (the package's own answers UNIMPLEMENTED)."""

    def List(self, request, context):
        """Every service's status as last ``set`` (NOT_SERVING after a graceful shutdown)."""
        try:
            with self._lock:  # the attributes the package's Check reads
                statuses = dict(self._server_status)
        except AttributeError:  # another grpcio-health-checking layout
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "health List is not available")
        resp = health_pb2.HealthListResponse()
        for service, status in statuses.items():
            resp.statuses[service].status = status
        return resp


class Server:
    """A sync gRPC server, not started, with its health service (see module docstring).

    Args:
      workers: handler threads.
      max_concurrent_rpcs: calls in the server at once (handled or waiting for
        a handler thread), health checks aside; one more is answered
        RESOURCE_EXHAUSTED at once. None: unbounded.
      thread_name_prefix: names of the handler threads.
      options: gRPC server options.
      max_streams: streaming calls open at once, for handlers made by
        ``stream_handler``: each holds a thread of its own while open (parked
        in gRPC between messages), apart from the ``workers``; one more is
        refused RESOURCE_EXHAUSTED at once. 0: no stream handlers.

    Attributes:
      grpc_server: the ``grpc.Server`` (add handlers, bind, start, stop).
      health: its ``grpc_health`` servicer (``health.set(service, status)``);
        Check, List and Watch are served, Check and List on two threads of
        their own.
    """

    def __init__(
        self,
        *,
        workers: int,
        max_concurrent_rpcs: int | None,
        thread_name_prefix: str,
        options=(),
        max_streams: int = 0,
    ):
        check_max_concurrent_rpcs(max_concurrent_rpcs)
        check_max_streams(max_streams)
        self._express = futures.ThreadPoolExecutor(
            max_workers=_EXPRESS_THREADS, thread_name_prefix=f"{thread_name_prefix}-health"
        )
        self._pool = _CountingPool(max_workers=workers, thread_name_prefix=thread_name_prefix)
        self._limit = max_concurrent_rpcs
        self._stream_lock = threading.Lock()
        self._stream_calls = 0  # stream messages being answered
        self._idle_streams: set[grpc.ServicerContext] = set()  # open, awaiting a request
        self._streams_ending = False
        self._streams = None
        if max_streams:
            self._streams = _CountingPool(
                max_workers=max_streams, thread_name_prefix=f"{thread_name_prefix}-stream"
            )
        interceptors = ()
        if max_concurrent_rpcs is not None or self._streams is not None:
            interceptors = (
                _ShedBeyond(lambda: self.in_flight, max_concurrent_rpcs, self._express,
                            self._streams),
            )
        self.grpc_server = grpc.server(
            self._pool, options=list(options), interceptors=interceptors
        )
        self.health = _Health(experimental_non_blocking=True)
        servicer = self.health
        wire = {
            "request_deserializer": health_pb2.HealthCheckRequest.FromString,
            "response_serializer": health_pb2.HealthCheckResponse.SerializeToString,
        }
        handlers = {
            "Check": grpc.unary_unary_rpc_method_handler(self.express(servicer.Check), **wire),
            "List": grpc.unary_unary_rpc_method_handler(
                self.express(servicer.List),
                request_deserializer=health_pb2.HealthListRequest.FromString,
                response_serializer=health_pb2.HealthListResponse.SerializeToString,
            ),
            # Non-blocking (experimental_non_blocking): returns at once, updates go out later.
            "Watch": grpc.unary_stream_rpc_method_handler(servicer.Watch, **wire),
        }
        self.grpc_server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(HEALTH_SERVICE, handlers),)
        )

    def express(self, fn):
        """``fn`` (a unary ``(request, context) -> response``) run on the two express
        threads and never shed, like health checks: for cheap control-plane calls
        (a shard's Info) that must answer while every handler thread is busy."""

        def run(request, context):
            return fn(request, context)

        run.experimental_thread_pool = self._express  # gRPC runs it on that pool
        return run

    def unary_handler(self, fn, **wire) -> grpc.RpcMethodHandler:
        """A unary-unary handler for ``fn`` (``(request, context) -> response``) that
        stops counting toward ``max_concurrent_rpcs`` as soon as ``fn`` returns or
        aborts, not when gRPC has sent the answer: a client calling again at once,
        on a server at its limit, is not shed for a call it already has the answer of.

        Args:
          fn: the handler.
          **wire: ``request_deserializer`` / ``response_serializer``, if any.
        """
        release = self._pool.release_current

        def run(request, context):
            try:
                return fn(request, context)
            finally:
                release()

        return grpc.unary_unary_rpc_method_handler(run, **wire)

    @property
    def in_flight(self) -> int:
        """Calls in the server now, health checks aside: unary ones in the handler pool
        (waiting for a thread, or running; a ``unary_handler`` one until its handler
        returns) and stream messages being answered."""
        return self._pool.in_flight + self._stream_calls

    @property
    def streams_open(self) -> int:
        """Streaming calls open now on the stream threads (``stream_handler``)."""
        return self._streams.in_flight if self._streams is not None else 0

    def stream_handler(self, answer, **wire) -> grpc.RpcMethodHandler:
        """A stream-stream handler that answers each request in turn, on the stream threads.

        Each request is answered with ``answer(request, context)``, as a unary
        handler would be; ``answer`` aborting ends the stream with that status.
        A request that arrives when ``max_concurrent_rpcs`` calls are in the
        server (stream messages being answered count with unary calls) ends the
        stream RESOURCE_EXHAUSTED. After ``end_streams`` a stream ends after the
        answer in progress, or at once when it waits for a request.

        Args:
          answer: ``(request, context) -> response``.
          **wire: ``request_deserializer`` / ``response_serializer``, if any.

        Returns:
          The handler, for ``method_handlers_generic_handler``.

        Raises:
          ValueError: the server was built with ``max_streams=0``.
        """
        if self._streams is None:
            raise ValueError("this server was built with max_streams=0: no stream handlers")
        lock, idle = self._stream_lock, self._idle_streams

        def run(request_iterator, context):
            try:
                while True:
                    with lock:
                        if self._streams_ending:
                            return
                        idle.add(context)
                    try:
                        request = next(request_iterator)
                    except (StopIteration, grpc.RpcError):  # client done, or call cancelled
                        return
                    with lock:
                        idle.discard(context)
                        admitted = self._limit is None or self.in_flight < self._limit
                        self._stream_calls += admitted
                    if not admitted:
                        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, _busy(self._limit))
                    try:
                        response = answer(request, context)
                    finally:
                        with lock:
                            self._stream_calls -= 1
                    yield response
            finally:
                with lock:
                    idle.discard(context)

        run.experimental_thread_pool = self._streams  # gRPC runs it on that pool
        return grpc.stream_stream_rpc_method_handler(run, **wire)

    def end_streams(self) -> None:
        """Ends the streams: those waiting for a request at once (cancelled: their
        clients reconnect and find the server gone), the others after their answer."""
        with self._stream_lock:
            self._streams_ending = True
            waiting = list(self._idle_streams)
        for context in waiting:
            context.cancel()
