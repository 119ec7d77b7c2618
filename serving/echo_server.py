"""Raw-bytes gRPC echo server: the transport floor for the serving benchmark.

It answers one unary method, ``/jax_recsys.serving.Echo/Echo``, with no
protobuf and no work: the request's first 8 bytes (little-endian uint64) give
the response size, and the server returns that many (cached) bytes.
``EchoStream`` does the same for each request of a long-lived bidi call (the
floor of ``LookupStream``; each open stream holds one of ``_STREAM_THREADS``
threads of its own, as the shards' streams do). Sending a
request as large as a lookup request and asking for a response as large as a
lookup response measures what gRPC itself costs on the same payloads, so
``lookup_p50 / echo_p50`` shows what the embedding server adds.

``serve_tcp_forever`` is the same echo over a bare TCP socket (no gRPC), to
separate what gRPC costs from what the kernel and the machine cost.

Imports the stdlib, gRPC and ``serving.grpc_util`` only (no NumPy).
"""

from __future__ import annotations

import socket
import struct
import threading
from concurrent import futures

import grpc

from serving import grpc_util

ECHO_METHOD = "/jax_recsys.serving.Echo/Echo"
ECHO_STREAM_METHOD = "/jax_recsys.serving.Echo/EchoStream"
_MAX_RESPONSE = 256 << 20
_STREAM_THREADS = 64


class _Echo:
    def __init__(self) -> None:
        self._cache: dict[int, bytes] = {}
        self._lock = threading.Lock()

    def __call__(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        if len(request) < 8:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "echo request needs an 8-byte size")
        (size,) = struct.unpack_from("<Q", request)
        if size > _MAX_RESPONSE:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"echo size {size} > {_MAX_RESPONSE}")
        out = self._cache.get(size)
        if out is None:
            with self._lock:
                out = self._cache.setdefault(size, bytes(size))
        return out


def echo_request(*, request_bytes: int, response_bytes: int) -> bytes:
    """Builds an echo request of ``request_bytes`` asking for ``response_bytes`` back.

    Args:
      request_bytes: total request size (at least 8).
      response_bytes: size of the response the server sends.

    Returns:
      The request payload.
    """
    return struct.pack("<Q", response_bytes) + bytes(max(0, request_bytes - 8))


def start_echo_server(
    *, host: str = "127.0.0.1", port: int = 0, workers: int = 8
) -> tuple[grpc.Server, int]:
    """Starts an echo server.

    Args:
      host: interface to bind (loopback by default).
      port: port, 0 picks a free one.
      workers: handler threads.

    Returns:
      ``(server, bound_port)``; stop it with ``server.stop(grace)``.
    """
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers),
        options=[
            ("grpc.max_receive_message_length", _MAX_RESPONSE),
            ("grpc.max_send_message_length", _MAX_RESPONSE),
        ],
    )
    echo = _Echo()

    def stream(request_iterator, context):  # a function: it carries the thread pool
        for request in request_iterator:
            yield echo(request, context)

    stream.experimental_thread_pool = futures.ThreadPoolExecutor(max_workers=_STREAM_THREADS)
    handlers = {
        "Echo": grpc.unary_unary_rpc_method_handler(echo),
        "EchoStream": grpc.stream_stream_rpc_method_handler(stream),
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("jax_recsys.serving.Echo", handlers),)
    )
    address = grpc_util.host_port(host, port)
    bound = server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"echo server could not bind {address}")
    server.start()
    return server, bound


def serve_forever(port_queue, *, host: str = "127.0.0.1", workers: int = 8) -> None:
    """Runs an echo server until the process is killed (multiprocessing target).

    Args:
      port_queue: a ``multiprocessing`` queue; the bound port is put on it.
      host: interface to bind.
      workers: handler threads.
    """
    server, bound = start_echo_server(host=host, port=0, workers=workers)
    port_queue.put(bound)
    server.wait_for_termination()


# ---- the same echo over a bare TCP socket ----

_TCP_HEAD = struct.Struct("<QQ")  # request payload bytes, response bytes


def _recv_exactly(conn: socket.socket, n: int, buf: bytearray) -> bool:
    view, got = memoryview(buf)[:n], 0
    while got < n:
        k = conn.recv_into(view[got:])
        if k == 0:
            return False
        got += k
    return True


def _tcp_echo_connection(conn: socket.socket) -> None:
    head, payload, cache = bytearray(_TCP_HEAD.size), bytearray(), {}
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while _recv_exactly(conn, _TCP_HEAD.size, head):
            request_bytes, response_bytes = _TCP_HEAD.unpack(head)
            if request_bytes > _MAX_RESPONSE or response_bytes > _MAX_RESPONSE:
                return  # not an echo client
            if len(payload) < request_bytes:
                payload = bytearray(request_bytes)
            if not _recv_exactly(conn, request_bytes, payload):
                return
            if response_bytes not in cache:  # this connection's thread only: no lock
                cache[response_bytes] = bytes(response_bytes)
            conn.sendall(cache[response_bytes])


def serve_tcp_forever(port_queue, *, host: str = "127.0.0.1") -> None:
    """A bare-TCP echo server (a thread per connection) until the process is killed.

    Protocol: the client sends 16 bytes (little-endian uint64 request payload
    size, uint64 response size), then the payload; the server answers with the
    response size's worth of bytes. ``TcpEchoClient`` speaks it.

    Args:
      port_queue: a ``multiprocessing`` queue; the bound port is put on it.
      host: interface to bind.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # "::1" was not bound
    with socket.create_server((host, 0), family=family) as sock:
        port_queue.put(sock.getsockname()[1])
        while True:
            conn, _ = sock.accept()
            threading.Thread(target=_tcp_echo_connection, args=(conn,), daemon=True).start()


class TcpEchoClient:
    """One connection to ``serve_tcp_forever`` at ``host:port`` (an IPv6 host in
    brackets: ``[::1]:P``); ``call()`` is one round trip."""

    def __init__(self, address: str, *, request_bytes: int, response_bytes: int):
        self._conn = socket.create_connection(grpc_util.split_host_port(address))
        self._conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._request = _TCP_HEAD.pack(request_bytes, response_bytes) + bytes(request_bytes)
        self._response = bytearray(response_bytes)
        self._response_bytes = response_bytes

    def call(self) -> bytearray:
        """Sends the request, waits for the whole response; returns it (a reused buffer)."""
        self._conn.sendall(self._request)
        if not _recv_exactly(self._conn, self._response_bytes, self._response):
            raise ConnectionError("tcp echo server closed the connection")
        return self._response

    def close(self) -> None:
        self._conn.close()
