"""serving.grpc_util.Server: what counts toward max_concurrent_rpcs, and when it stops."""

import threading

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
