"""serving.grpc_util.Server: what counts toward max_concurrent_rpcs, and when it stops."""

import os
import socket
import threading
from concurrent import futures

import grpc
import pytest

from serving import grpc_util

_METHOD = "/test.Hold/Call"


def test_a_unary_call_stops_counting_when_its_handler_returns_not_when_its_item_ends():
    # The answer of a "hold" call is held back in its serializer, which gRPC runs
    # after the handler has returned, in the same work item: the client of a
    # real call may already have its answer at that point.
    handler_in, handler_go = threading.Event(), threading.Event()
    sending, send_go = threading.Event(), threading.Event()

    def handle(request, context):
        if request == b"hold":
            handler_in.set()
            assert handler_go.wait(10)
        return request

    def serialize(response):
        if response == b"hold":
            sending.set()
            assert send_go.wait(10)
        return response

    rpc = grpc_util.Server(workers=2, max_concurrent_rpcs=1, thread_name_prefix="t")
    rpc.grpc_server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "test.Hold", {"Call": rpc.unary_handler(handle, response_serializer=serialize)}
            ),
        )
    )
    port = grpc_util.bind(rpc.grpc_server, "127.0.0.1:0")
    rpc.grpc_server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    call = channel.unary_unary(_METHOD)
    try:
        held = call.future(b"hold", timeout=20)
        assert handler_in.wait(10)
        # While its handler runs the call counts: one more is shed.
        assert rpc.in_flight == 1
        with pytest.raises(grpc.RpcError) as e:
            call(b"next", timeout=10)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        handler_go.set()
        assert sending.wait(10)
        # Its handler has returned; only the answer is still being sent.
        assert rpc.in_flight == 0
        assert call(b"next", timeout=10) == b"next"
        send_go.set()
        assert held.result() == b"hold"
    finally:
        handler_go.set()
        send_go.set()
        channel.close()
        rpc.grpc_server.stop(None)


def test_a_port_in_use_is_one_error_and_grpcs_own_log_lines_stay_out_of_stderr(capfd):
    """gRPC's C core logged 'E... add_port.cc:83] Failed to add port to server: ...' on
    stderr above the server's one-line 'cannot start: could not bind ...'."""
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
        with pytest.raises(OSError) as e:
            grpc_util.bind(server, f"127.0.0.1:{port}")
    assert str(e.value) == (f"could not bind 127.0.0.1:{port}: Address already in use (another "
                            "process listens there: choose another --port, or --port=0 for a "
                            "free one)")
    assert capfd.readouterr().err == ""


class _LoggingServer:
    """Stands in for a grpc.Server whose add_insecure_port logs on stderr (file descriptor
    2, as gRPC's C core does) and returns ``port`` (0: not bound)."""

    def __init__(self, port):
        self.port = port

    def add_insecure_port(self, address):
        os.write(2, b"E0000 00:00:00.000000 1 add_port.cc:83] Failed to add port: busted\n")
        return self.port


def test_what_is_logged_during_a_bind_is_written_out_when_it_binds_and_names_why_when_not(capfd):
    assert grpc_util.bind(_LoggingServer(1234), "127.0.0.1:0") == 1234
    assert capfd.readouterr().err == ("E0000 00:00:00.000000 1 add_port.cc:83] Failed to add "
                                      "port: busted\n")
    # A bind the plain-socket probe cannot explain: gRPC's own last line says why.
    with pytest.raises(OSError, match=r"^could not bind 127.0.0.1:0: gRPC refused it "
                                      r"\(Failed to add port: busted\)$"):
        grpc_util.bind(_LoggingServer(0), "127.0.0.1:0")
    assert capfd.readouterr().err == ""


def test_cadence_keeps_its_due_times_after_late_checks_and_skips_those_missed_whole():
    now = [100.0]
    cadence = grpc_util.Cadence(1.0, clock=lambda: now[0])
    seen = []
    # Checked every 0.25 s, with one late check (1.5 s of work after 2.0) and one gap of
    # 2.75 s (a slow swap) after 4.0.
    for step in [0.25] * 8 + [1.5] + [0.25] * 2 + [2.75] + [0.25] * 8:
        now[0] += step
        if cadence.due():
            seen.append(now[0] - 100.0)
    assert seen == [1.0, 2.0, 3.5, 4.0, 6.75, 7.0, 8.0]
    assert cadence.left_s() == 0.25  # at 8.75: the next is due at 9.0
    with pytest.raises(ValueError, match="period_s must be a finite number of seconds > 0"):
        grpc_util.Cadence(0.0)


def test_split_host_port_is_host_ports_inverse():
    # TcpEchoClient split with rsplit(":", 1): "[::1]:5" gave the host "[::1]".
    for host in ("127.0.0.1", "localhost", "::1", "::"):
        assert grpc_util.split_host_port(grpc_util.host_port(host, 50051)) == (host, 50051)
    assert grpc_util.split_host_port("[::1]:0") == ("::1", 0)
    assert grpc_util.split_host_port(":7") == ("", 7)
    with pytest.raises(ValueError, match="invalid literal for int"):
        grpc_util.split_host_port("[::1]")
