"""Embedding client: routing, order, replicas, version pinning, dead shards.

Real servers on loopback (in-process, and real subprocesses started through
``launch.serve_embeddings`` for the kill/restart test), ports bound at run time.
"""

import functools
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time
from concurrent import futures

import grpc
import mp_util
import numpy as np
import pytest

from jax_recsys.quant import artifact, rowwise
from serving import client as client_lib, codec, embedding_server as es
from serving.protos import embedding_pb2 as pb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    rng = np.random.default_rng(0)
    tables = {
        "user": rng.normal(size=(90, 4)).astype(np.float32),
        "pin": rng.normal(size=(10, 6)).astype(np.float32),
    }
    path = str(tmp_path_factory.mktemp("client_art") / "art")
    artifact.write_artifact(
        path, tables=tables, vocabs={k: np.arange(len(v)) for k, v in tables.items()}
    )
    return artifact.load_artifact(path)


def _expected(art, table, rows):
    return rowwise.dequantize_rows(art.tables[table], np.asarray(rows))


@pytest.fixture(scope="module")
def three_shards(art):
    servers = [
        es.serve(
            es.ServerConfig(artifact=str(art.path), shard=i, num_shards=3, log_every_s=0, workers=2)
        )
        for i in range(3)
    ]
    yield [f"127.0.0.1:{s.port}" for s in servers]
    for s in servers:
        s.stop(0)


def test_routing_from_manifest_matches_server_ranges(art):
    specs = client_lib.routing_from_manifest(str(art.path), ["h0:1", ["h1:1", "h1r:1"], "h2:1"])
    assert [s.ranges["user"] for s in specs] == [(0, 30), (30, 60), (60, 90)]
    assert [s.ranges["pin"] for s in specs] == [(0, 3), (3, 6), (6, 10)]
    assert specs[1].addresses == ("h1:1", "h1r:1")


@pytest.mark.parametrize("transport", client_lib.TRANSPORTS)
def test_lookup_many_reassembles_in_caller_order_across_shards(art, three_shards, transport):
    client = client_lib.EmbeddingClient.from_artifact(
        str(art.path), three_shards, deadline_s=10, transport=transport
    )
    user_rows = np.array([89, 0, 45, 45, 30, 29, 60, 0, 89])  # every shard, duplicates
    pin_rows = np.array([9, 2, 3])
    got = client.lookup_many({"user": user_rows, "pin": pin_rows})
    np.testing.assert_array_equal(got["user"], _expected(art, "user", user_rows))
    np.testing.assert_array_equal(got["pin"], _expected(art, "pin", pin_rows))
    # One table, one shard only; and an empty lookup keeps the table's dim.
    np.testing.assert_array_equal(client.lookup("user", [31]), _expected(art, "user", [31]))
    assert client.lookup("pin", np.array([], np.int64)).shape == (0, 6)
    client.close()


@pytest.mark.parametrize("wire", ["float32", "quantized"])
def test_repeated_rows_go_once_when_they_are_many_and_come_back_in_order(art, wire):
    servers = [
        es.serve(es.ServerConfig(artifact=str(art.path), shard=i, num_shards=2, log_every_s=0))
        for i in range(2)
    ]
    try:
        client = client_lib.EmbeddingClient.from_artifact(
            str(art.path), [f"127.0.0.1:{s.port}" for s in servers], deadline_s=10, wire=wire
        )
        # 12 user rows, 3 distinct on two shards (75% repeats): 3 ids on the wire.
        many = np.array([80, 2, 2, 80, 44, 2, 80, 80, 44, 2, 2, 80])
        # 5 pin rows, one repeat (20%): sent as they are.
        few = np.array([9, 1, 9, 0, 4])
        got = client.lookup_many({"user": many, "pin": few})
        np.testing.assert_array_equal(got["user"], _expected(art, "user", many))
        np.testing.assert_array_equal(got["pin"], _expected(art, "pin", few))
        assert sum(s.stats()["ids"] for s in servers) == 3 + 5
        client.close()
    finally:
        for s in servers:
            s.stop(0)


def test_client_accepts_plain_dict_shards(art, three_shards):
    shards = [
        {"addresses": [a], "ranges": r}
        for a, r in zip(three_shards, codec.table_ranges({"user": 90, "pin": 10}, 3), strict=True)
    ]
    client = client_lib.EmbeddingClient(shards, deadline_s=10)  # unpinned
    np.testing.assert_array_equal(client.lookup("pin", [7, 1]), _expected(art, "pin", [7, 1]))
    client.close()


def test_bad_rows_are_refused_before_any_rpc(art):
    # Addresses nobody listens on: a ValueError proves no RPC was needed.
    client = client_lib.EmbeddingClient.from_artifact(str(art.path), ["127.0.0.1:1"] * 3)
    with pytest.raises(ValueError, match="row 90 is outside"):
        client.lookup("user", [1, 90])
    with pytest.raises(ValueError, match="row -1 is outside"):
        client.lookup("user", [-1])
    with pytest.raises(ValueError, match="unknown table 'x'"):
        client.lookup("x", [1])
    with pytest.raises(ValueError, match="1-D integer"):
        client.lookup("user", np.array([1.5]))
    client.close()


def test_pinned_version_mismatch_is_refused(art, three_shards):
    client = client_lib.EmbeddingClient.from_artifact(str(art.path), three_shards)
    client.version = "0000000000000000"
    with pytest.raises(client_lib.VersionMismatch) as e:
        client.lookup("user", [1])
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
    client.close()


def _fake_shard(version, bits=0, delay_s=0.0):
    """A shard that ignores expected_version and answers zeros as `version`.

    With ``bits``: quantized rows whose codes are one byte short. With ``delay_s``:
    each answer comes that late (a function: it waits, and returns what to sleep).
    """

    def lookup(raw, context):
        time.sleep(delay_s() if callable(delay_s) else delay_s)
        req = pb.LookupRequest.FromString(raw)
        resp = pb.LookupResponse(version=version)
        for t in req.tables:
            n = len(t.ids) // 8
            if bits:
                resp.tables.add(
                    table=t.table, dim=4, bits=bits, codes=bytes(2 * n - 1),
                    scale=bytes(4 * n), bias=bytes(4 * n),
                )
            else:
                resp.tables.add(table=t.table, dim=4, values=bytes(16 * n))
        return resp.SerializeToString()

    server = grpc.server(futures.ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                codec.SERVICE_NAME, {"Lookup": grpc.unary_unary_rpc_method_handler(lookup)}
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


def test_response_from_another_version_is_refused(art, three_shards):
    fake, addr = _fake_shard("ffffffffffffffff")
    try:
        addrs = [three_shards[0], addr, three_shards[2]]
        pinned = client_lib.EmbeddingClient.from_artifact(str(art.path), addrs, deadline_s=5)
        with pytest.raises(client_lib.VersionMismatch, match="answered version 'ffff"):
            pinned.lookup("user", [0, 40])
        # Unpinned: shards of one call must still agree.
        loose = client_lib.EmbeddingClient.from_artifact(str(art.path), addrs, pin=False)
        with pytest.raises(client_lib.VersionMismatch, match="different versions"):
            loose.lookup("user", [0, 40])
        assert loose.lookup("user", [40]).tolist() == [[0.0] * 4]
        pinned.close()
        loose.close()
    finally:
        fake.stop(0)


def test_quantized_parts_from_several_shards_are_dequantized_once_bit_identically():
    rng = np.random.default_rng(5)
    q = rowwise.quantize_rows(rng.normal(size=(9, 7)).astype(np.float32), bits=4)
    f32 = [np.asarray(a, np.float32) if a.dtype == np.float16 else a for a in (q.scale, q.bias)]

    def part(rows):  # one shard's answer on the quantized wire
        return rowwise.QuantizedTable(q.codes[rows], f32[0][rows], f32[1][rows], dim=7, bits=4)

    pos_a, pos_b = np.array([4, 0, 2]), np.array([1, 5, 3])
    rows_a, rows_b = np.array([0, 3, 8]), np.array([2, 2, 6])
    got = client_lib._reassemble("t", 6, [(0, pos_a, part(rows_a)), (1, pos_b, part(rows_b))])
    want = np.empty((6, 7), np.float32)
    want[pos_a] = rowwise.dequantize_rows(q, rows_a)
    want[pos_b] = rowwise.dequantize_rows(q, rows_b)
    np.testing.assert_array_equal(got, want)
    # A float32 part next to a quantized one (mixed wires) still reassembles exactly.
    mixed = [(0, pos_a, part(rows_a)), (1, pos_b, rowwise.dequantize_rows(q, rows_b))]
    np.testing.assert_array_equal(client_lib._reassemble("t", 6, mixed), want)
    q8 = rowwise.quantize_rows(rng.normal(size=(9, 7)).astype(np.float32), bits=8)
    other = rowwise.QuantizedTable(q8.codes[:3], f32[0][:3], f32[1][:3], dim=7, bits=8)
    with pytest.raises(client_lib.ServingError, match="disagree on dim/bits"):
        client_lib._reassemble("t", 6, [(0, pos_a, part(rows_a)), (1, pos_b, other)])
    with pytest.raises(client_lib.ServingError, match="disagree on dim"):
        client_lib._reassemble("t", 6, [(0, pos_a, want[:3]), (1, pos_b, want[:3, :5])])


def test_malformed_quantized_answer_is_a_serving_error_and_bad_wire_is_refused(art):
    fake, addr = _fake_shard("v", bits=4)
    try:
        client = client_lib.EmbeddingClient([{"addresses": [addr], "lo": 0, "hi": 90,
                                              "tables": ["user"]}], wire="quantized")
        with pytest.raises(client_lib.ServingError, match="3 bytes of codes, expected 4"):
            client.lookup("user", [0, 1])
        client.close()
    finally:
        fake.stop(0)
    with pytest.raises(ValueError, match="wire must be one of"):
        client_lib.EmbeddingClient.from_artifact(str(art.path), ["127.0.0.1:1"], wire="int4")


# Replica handling with failover (None) and with hedged requests.
HEDGES = [None, 0.05]


@pytest.mark.parametrize("hedge", HEDGES)
@pytest.mark.parametrize("transport", client_lib.TRANSPORTS)
def test_dead_primary_falls_back_to_replica_and_dead_shard_is_unavailable(
    art, three_shards, transport, hedge, dead_address
):
    dead = dead_address()
    with_replica = [three_shards[0], [dead, three_shards[1]], three_shards[2]]
    client = client_lib.EmbeddingClient.from_artifact(
        str(art.path), with_replica, deadline_s=5, transport=transport, hedge_after_s=hedge
    )
    rows = np.array([5, 35, 65])
    np.testing.assert_array_equal(client.lookup("user", rows), _expected(art, "user", rows))
    client.close()

    client = client_lib.EmbeddingClient.from_artifact(
        str(art.path), [three_shards[0], dead, three_shards[2]], deadline_s=0.5,
        transport=transport,
    )
    t0 = time.monotonic()
    with pytest.raises(client_lib.ServingError) as e:
        client.lookup("user", rows)
    assert time.monotonic() - t0 < 0.5 + 0.25
    assert e.value.code == grpc.StatusCode.UNAVAILABLE and e.value.shard == 1
    if transport == "stream":  # the answer of shard 2, sent with shard 1's, is read
        pool = client._streams[three_shards[2]]  # (on a pool thread) and its stream kept
        t_end = time.monotonic() + 5
        while pool.free_streams < 1 and time.monotonic() < t_end:
            time.sleep(0.01)
        assert pool.open_streams == pool.free_streams == 1
    np.testing.assert_array_equal(client.lookup("user", [5, 65]), _expected(art, "user", [5, 65]))
    client.close()


def _hung_server(release):
    """A shard that takes every Lookup / LookupStream call and answers none (a stalled
    process) until ``release`` is set."""

    def lookup(raw, ctx):
        release.wait(30)
        ctx.abort(grpc.StatusCode.UNAVAILABLE, "released")

    def stream(requests, ctx):
        for _ in requests:
            release.wait(30)
            ctx.abort(grpc.StatusCode.UNAVAILABLE, "released")
        return iter(())

    server = grpc.server(futures.ThreadPoolExecutor(16))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(codec.SERVICE_NAME, {
        "Lookup": grpc.unary_unary_rpc_method_handler(lookup),
        "LookupStream": grpc.stream_stream_rpc_method_handler(stream)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
def hung_and_real(art):
    """``(hung primary's address, a real replica's address)``: one shard of ``art``."""
    real = es.serve(es.ServerConfig(artifact=str(art.path), shard=0, num_shards=1,
                                    log_every_s=0, workers=2))
    release = threading.Event()
    hung, hung_addr = _hung_server(release)
    yield hung_addr, f"127.0.0.1:{real.port}"
    release.set()
    hung.stop(0)
    real.stop(0)


@pytest.mark.parametrize("transport", client_lib.TRANSPORTS)
def test_a_hung_primary_leaves_its_replica_time_to_answer(art, transport, hung_and_real):
    """Each try gets a share of the budget: a stalled primary does not eat all of it."""
    client = client_lib.EmbeddingClient.from_artifact(
        str(art.path), [list(hung_and_real)], deadline_s=1.0, transport=transport)
    for _ in range(3):
        t0 = time.monotonic()
        np.testing.assert_array_equal(client.lookup("user", [1, 2]),
                                      _expected(art, "user", [1, 2]))
        assert time.monotonic() - t0 < 1.0
    assert client._preferred == [1]  # later calls start on the replica that answered
    client.close()


@pytest.mark.parametrize("transport", client_lib.TRANSPORTS)
def test_hedged_requests_answer_from_the_replica_while_the_primary_hangs(art, transport,
                                                                         hung_and_real):
    """With hedging, a stalled primary costs about ``hedge_after_s``, not a share of the
    deadline (failover would wait 2/3 of 5 s here), and its try is abandoned."""
    hung_addr = hung_and_real[0]
    client = client_lib.EmbeddingClient.from_artifact(
        str(art.path), [list(hung_and_real)], deadline_s=5.0, transport=transport,
        hedge_after_s=0.05)
    t0 = time.monotonic()
    np.testing.assert_array_equal(client.lookup("user", [1, 2]), _expected(art, "user", [1, 2]))
    assert time.monotonic() - t0 < 1.5  # failover: >= 3.3 s
    assert client._preferred == [1]  # later calls start on the replica that answered
    assert client.hedges_sent == 1
    if transport == "stream":  # the primary's stream was abandoned (closed), not kept
        assert client._streams[hung_addr].open_streams == 0
    for _ in range(3):
        np.testing.assert_array_equal(client.lookup("user", [5]), _expected(art, "user", [5]))
    client.close()


@pytest.mark.parametrize("transport", client_lib.TRANSPORTS)
def test_hedged_requests_take_the_first_answer_when_every_replica_is_slow(art, transport):
    # Both answer after 0.3 s; the hedge goes out at 0.05 s; the primary's answer wins.
    servers, addrs = zip(*[_fake_shard(art.version, delay_s=0.3) for _ in range(2)],
                         strict=True)
    try:
        client = client_lib.EmbeddingClient.from_artifact(
            str(art.path), [list(addrs)], deadline_s=5.0, transport=transport,
            hedge_after_s=0.05)
        for _ in range(2):
            assert client.lookup("user", [1, 2]).tolist() == [[0.0] * 4] * 2
        assert (client.hedges_sent, client.hedges_throttled) == (2, 0)
        client.close()
        # The hedge budget: one token and none earned: the second late lookup is not
        # hedged, and still answers (its try keeps the whole deadline).
        client = client_lib.EmbeddingClient.from_artifact(
            str(art.path), [list(addrs)], deadline_s=5.0, transport=transport,
            hedge_after_s=0.05, hedge_budget=0.0, hedge_burst=1.0)
        for _ in range(2):
            assert client.lookup("user", [1, 2]).tolist() == [[0.0] * 4] * 2
        assert (client.hedges_sent, client.hedges_throttled) == (1, 1)
        client.close()
        # Every replica hung: DEADLINE_EXCEEDED at the deadline, not later.
        client = client_lib.EmbeddingClient.from_artifact(
            str(art.path), [list(addrs)], deadline_s=0.2, transport=transport,
            hedge_after_s=0.05)
        t0 = time.monotonic()
        with pytest.raises(client_lib.ServingError) as e:
            client.lookup("user", [1])
        assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and e.value.shard == 0
        assert time.monotonic() - t0 < 0.2 + 0.25
        client.close()
    finally:
        for server in servers:
            server.stop(0)


def _refusing_server(code):
    """A shard that answers every Lookup with status ``code`` and counts the calls."""
    calls = []

    def lookup(raw, ctx):
        calls.append(1)
        ctx.abort(code, "refused on purpose")

    server = grpc.server(futures.ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        codec.SERVICE_NAME, {"Lookup": grpc.unary_unary_rpc_method_handler(lookup)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}", calls


@pytest.mark.parametrize("hedge", HEDGES)
@pytest.mark.parametrize("transport", client_lib.TRANSPORTS)
def test_a_replica_stopping_mid_call_hands_over_to_the_next(art, hedge, transport,
                                                            hung_and_real):
    """grpcio answers CANCELLED to a call that races its server's graceful stop: the
    lookup goes to the next replica (it failed with CANCELLED, and the ranker answered
    INTERNAL)."""
    stopping, stopping_addr, calls = _refusing_server(grpc.StatusCode.CANCELLED)
    try:
        client = client_lib.EmbeddingClient.from_artifact(
            str(art.path), [[stopping_addr, hung_and_real[1]]], deadline_s=5.0,
            hedge_after_s=hedge, transport=transport)
        np.testing.assert_array_equal(client.lookup("user", [4]), _expected(art, "user", [4]))
        assert len(calls) == 1
        client.close()
    finally:
        stopping.stop(0)


@pytest.mark.parametrize("hedge", HEDGES)
@pytest.mark.parametrize("transport", client_lib.TRANSPORTS)
def test_a_replica_stopped_gracefully_under_load_fails_no_lookup(art, hedge, transport):
    """Rolling restart: one of a shard's two replicas stops (graceful, as on SIGTERM)
    while three threads look up rows; every lookup is answered, by the other."""
    servers = [es.serve(es.ServerConfig(artifact=str(art.path), shard=0, num_shards=1,
                                        log_every_s=0, workers=4)) for _ in range(2)]
    client = client_lib.EmbeddingClient.from_artifact(
        str(art.path), [[f"127.0.0.1:{s.port}" for s in servers]], deadline_s=5.0,
        hedge_after_s=hedge, transport=transport)
    stop, failures, done = threading.Event(), [], [0]

    def work(seed):
        rng = np.random.default_rng(seed)
        while not stop.is_set():
            rows = rng.integers(0, 90, 5)
            try:
                np.testing.assert_array_equal(client.lookup("user", rows),
                                              _expected(art, "user", rows))
                done[0] += 1
            except Exception as e:  # noqa: BLE001
                failures.append(repr(e))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    try:
        for t in threads:
            t.start()
        time.sleep(0.3)
        servers[0].stop(1.0).wait()  # the primary goes away mid-stream
        before = done[0]
        time.sleep(0.3)
        stop.set()
        for t in threads:
            t.join(30)
        assert failures == [] and done[0] > before > 0
    finally:
        stop.set()
        client.close()
        for s in servers:
            s.stop(0)


@pytest.mark.parametrize("hedge", HEDGES)
def test_a_non_retryable_error_is_not_sent_to_the_replica(art, hedge):
    """INVALID_ARGUMENT is the request's fault: another replica would say the same."""
    bad, bad_addr, calls = _refusing_server(grpc.StatusCode.INVALID_ARGUMENT)
    spare, spare_addr, spare_calls = _refusing_server(grpc.StatusCode.INVALID_ARGUMENT)
    try:
        client = client_lib.EmbeddingClient.from_artifact(
            str(art.path), [[bad_addr, spare_addr]], deadline_s=5.0, hedge_after_s=hedge)
        with pytest.raises(client_lib.ServingError, match="INVALID_ARGUMENT: refused on purp") as e:
            client.lookup("user", [1])
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and e.value.shard == 0
        assert (len(calls), len(spare_calls)) == (1, 0)
        client.close()
    finally:
        bad.stop(0)
        spare.stop(0)


@pytest.mark.parametrize("transport", client_lib.TRANSPORTS)
def test_always_hedged_concurrent_lookups_are_exact(art, transport):
    """hedge_after_s=0: every request races both replicas of its shard, from 6 threads
    at once; every answer is exact and the abandoned tries leave the client healthy."""
    servers = [es.serve(es.ServerConfig(artifact=str(art.path), shard=i % 2, num_shards=2,
                                        log_every_s=0, workers=4)) for i in range(4)]
    addrs = [[f"127.0.0.1:{servers[i].port}", f"127.0.0.1:{servers[i + 2].port}"]
             for i in range(2)]
    client = client_lib.EmbeddingClient.from_artifact(
        str(art.path), addrs, deadline_s=10.0, transport=transport, hedge_after_s=0.0,
        hedge_budget=1.0)

    def work(seed):
        rng = np.random.default_rng(seed)
        for _ in range(25):
            rows = rng.integers(0, 90, 7)
            got = client.lookup_many({"user": rows, "pin": rows % 10})
            np.testing.assert_array_equal(got["user"], _expected(art, "user", rows))
            np.testing.assert_array_equal(got["pin"], _expected(art, "pin", rows % 10))

    try:
        with futures.ThreadPoolExecutor(6) as pool:
            for f in [pool.submit(work, seed) for seed in range(6)]:
                f.result(timeout=120)
        np.testing.assert_array_equal(client.lookup("user", [0, 89]),
                                      _expected(art, "user", [0, 89]))
        if transport == "stream":  # a try that lost its race leaves no stream behind
            time.sleep(0.3)  # (was: about one stream per two lookups, kept until close)
            for shard in addrs:
                for addr in shard:
                    assert client._streams[addr].open_streams <= 6, addr
    finally:
        client.close()
        for server in servers:
            server.stop(0)


@pytest.mark.parametrize("transport", client_lib.TRANSPORTS)
def test_over_the_hedge_budget_the_replica_is_still_asked_when_failover_would(
        art, transport, hung_and_real):
    """No token left: the late try is not hedged, but the next replica is asked at
    failover's hand-over point (2/3 of the budget), not never (the lookup used to
    wait out the deadline on the hung replica and fail)."""
    client = client_lib.EmbeddingClient.from_artifact(
        str(art.path), [list(hung_and_real)], deadline_s=1.5, transport=transport,
        hedge_after_s=0.05, hedge_budget=0.0, hedge_burst=1.0)
    np.testing.assert_array_equal(client.lookup("user", [1]), _expected(art, "user", [1]))
    assert (client.hedges_sent, client._preferred) == (1, [1])  # the token is spent
    client._preferred[0] = 0  # start on the hung replica again
    t0 = time.monotonic()
    np.testing.assert_array_equal(client.lookup("user", [2]), _expected(art, "user", [2]))
    assert 0.7 < time.monotonic() - t0 < 1.5  # handed over at ~1.0 s
    assert (client.hedges_sent, client.hedges_throttled) == (1, 1)
    client.close()


def test_hedge_timer_starts_when_the_caller_waits_for_the_shard(art):
    """Shards are read in turn: a fast shard read after a slow one has its answer
    waiting, and must not be hedged (its timer used to start at the send)."""
    slow, slow_addr = _fake_shard(art.version, delay_s=0.3)
    reals = [es.serve(es.ServerConfig(artifact=str(art.path), shard=1, num_shards=2,
                                      log_every_s=0, workers=2)) for _ in range(2)]
    try:
        client = client_lib.EmbeddingClient.from_artifact(
            str(art.path), [slow_addr, [f"127.0.0.1:{r.port}" for r in reals]],
            deadline_s=5.0, hedge_after_s=0.1, hedge_budget=1.0)
        for _ in range(3):
            got = client.lookup("user", [1, 80])
            np.testing.assert_array_equal(got[1], _expected(art, "user", [80])[0])
        assert (client.hedges_sent, client.hedges_throttled) == (0, 0)
        client.close()
    finally:
        slow.stop(0)
        for r in reals:
            r.stop(0)


@pytest.mark.parametrize("hedge", HEDGES)
def test_a_failed_shard_is_reported_without_waiting_for_a_hung_one(art, hedge, hung_and_real):
    """Shard 0 refuses the request at once; shard 1's first replica hangs. The error
    comes back at once (it waited for the hung try: 2/3 of the deadline, or all of it
    with hedging)."""
    bad, bad_addr, _ = _refusing_server(grpc.StatusCode.INVALID_ARGUMENT)
    try:
        # Shard 0 of 2 (rows 0-44) refuses; shard 1 (rows 45-89) is [hung, real] --
        # the real server serves all rows, as shard 0 of 1, which is fine for routing.
        client = client_lib.EmbeddingClient.from_artifact(
            str(art.path), [bad_addr, list(hung_and_real)], deadline_s=3.0,
            hedge_after_s=hedge)
        t0 = time.monotonic()
        with pytest.raises(client_lib.ServingError) as e:
            client.lookup("user", [1, 80])
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and e.value.shard == 0
        assert time.monotonic() - t0 < 1.0
        client.close()
    finally:
        bad.stop(0)


def test_a_hedge_token_is_spent_only_for_a_hedge_that_goes_out(art, monkeypatch):
    """The token is taken with the replica reserved, under the race's lock: a race that
    ends while the watchdog thread is slow to take the token spends none (it used to
    count hedges that never went out)."""
    servers = [es.serve(es.ServerConfig(artifact=str(art.path), shard=0, num_shards=1,
                                        log_every_s=0, workers=2)) for _ in range(2)]
    launched = []
    real_launch = client_lib._Race._launch
    monkeypatch.setattr(client_lib._Race, "_launch",
                        lambda self, r, **kw: (launched.append(r), real_launch(self, r, **kw)))
    try:
        client = client_lib.EmbeddingClient.from_artifact(
            str(art.path), [[f"127.0.0.1:{s.port}" for s in servers]], deadline_s=5.0,
            hedge_after_s=0.0, hedge_budget=0.0, hedge_burst=3.0)
        real_take = client._take_hedge_token

        def slow_take():  # the watchdog thread preempted while it takes the token
            time.sleep(0.02)
            return real_take()

        client._take_hedge_token = slow_take
        for i in range(5):
            client.lookup("user", [i])
            time.sleep(0.05)
        # A hedge that finds its race over before it is sent gives its token back
        # (so a token may be spent again: launches can outnumber the tokens).
        assert client.hedges_sent <= min(len(launched), 3)
        assert client.hedges_sent + client._hedge_tokens == 3.0
        client.close()
    finally:
        for s in servers:
            s.stop(0)


def test_hedge_after_s_is_validated(art):
    # A bool is no delay (False would be 0 ms: hedge every request).
    for bad in (-0.1, float("nan"), float("inf"), False, True, np.True_):
        with pytest.raises(ValueError, match="hedge_after_s must be None, 'auto' or a finite"):
            client_lib.EmbeddingClient.from_artifact(str(art.path), ["127.0.0.1:1"],
                                                     hedge_after_s=bad)
    for budget, burst in ((-0.1, 10.0), (1.5, 10.0), (0.1, 0.5)):
        with pytest.raises(ValueError, match="hedge_budget must be in"):
            client_lib.EmbeddingClient.from_artifact(
                str(art.path), ["127.0.0.1:1"], hedge_after_s=0.01, hedge_budget=budget,
                hedge_burst=burst)


_BAD_DEADLINES = (float("nan"), float("inf"), -float("inf"), 0, 0.0, -1, -1.0, 1e10,
                  86_401.0, True, "1")  # over MAX_DEADLINE_S (one day)


@pytest.mark.parametrize("transport", client_lib.TRANSPORTS)
def test_deadline_s_is_validated_by_the_client_and_each_lookup(art, transport):
    """NaN/inf used to mean no deadline on streams and DEADLINE_EXCEEDED at once on
    unary calls, 0/-1 the reverse; over ~9.2e9 s killed the stream watchdog."""
    # Addresses nobody listens on: a ValueError proves no RPC was made.
    addrs = ["127.0.0.1:1"]
    for bad in _BAD_DEADLINES:
        with pytest.raises(ValueError, match="deadline_s must be a finite number of seconds > 0"):
            client_lib.EmbeddingClient.from_artifact(str(art.path), addrs, deadline_s=bad,
                                                     transport=transport)
    client = client_lib.EmbeddingClient.from_artifact(
        str(art.path), addrs, transport=transport, deadline_s=client_lib.MAX_DEADLINE_S)
    assert client.deadline_s == client_lib.MAX_DEADLINE_S
    for bad in _BAD_DEADLINES:
        with pytest.raises(ValueError, match="deadline_s must be a finite number of seconds > 0"):
            client.lookup_many({"user": [1]}, deadline_s=bad)
    with pytest.raises(client_lib.ServingError) as e:  # a good one goes out (and fails)
        client.lookup_many({"user": [1]}, deadline_s=np.float32(0.2))
    assert e.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert client._watchdog is None or client._watchdog.alive
    client.close()


@pytest.mark.parametrize("transport", client_lib.TRANSPORTS)
def test_stalled_replicas_still_time_out_with_far_hedge_timers(art, transport):
    """Hedge timers share the watchdog: a huge hedge delay (never before failover) and a
    refused huge deadline leave every later deadline kept."""
    release = threading.Event()
    servers, addrs = zip(*[_hung_server(release) for _ in range(2)], strict=True)
    timer = threading.Timer(5.0, release.set)  # bounds a failing run
    timer.start()
    try:
        client = client_lib.EmbeddingClient.from_artifact(
            str(art.path), [list(addrs)], deadline_s=0.3, transport=transport,
            hedge_after_s=1e12)
        with pytest.raises(ValueError, match="deadline_s must be"):
            client.lookup_many({"user": [1]}, deadline_s=1e10)
        for _ in range(2):
            t0 = time.monotonic()
            with pytest.raises(client_lib.ServingError) as e:
                client.lookup("user", [1])
            took = time.monotonic() - t0
            assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert 0.25 < took < 1.5, took
        assert client.hedges_sent == 0 and client._watchdog.alive
        client.close()
    finally:
        timer.cancel()
        release.set()
        for s in servers:
            s.stop(0)


def test_hedge_after_s_auto_settings_are_validated(art):
    for bad in ("soon", "AUTO", -1, float("nan")):
        with pytest.raises(ValueError, match="hedge_after_s must be None, 'auto' or a finite"):
            client_lib.EmbeddingClient.from_artifact(str(art.path), ["127.0.0.1:1"],
                                                     hedge_after_s=bad)
    with pytest.raises(ValueError, match="hedge_quantile must be in"):
        client_lib.EmbeddingClient.from_artifact(str(art.path), ["127.0.0.1:1"],
                                                 hedge_after_s="auto", hedge_quantile=1.0)
    with pytest.raises(ValueError, match="hedge_min_s must be a finite number"):
        client_lib.EmbeddingClient.from_artifact(str(art.path), ["127.0.0.1:1"],
                                                 hedge_after_s="auto", hedge_min_s=-0.001)
    for fixed in (None, 0.01):  # settings a fixed delay (or none) would ignore
        for extra in ({"hedge_quantile": 0.9}, {"hedge_min_s": 0.002}):
            with pytest.raises(ValueError, match="need hedge_after_s='auto'"):
                client_lib.EmbeddingClient.from_artifact(
                    str(art.path), ["127.0.0.1:1"], hedge_after_s=fixed, **extra)


def _stallable_shards(art, n=2):
    """``n`` replicas of one shard (``_fake_shard``s, zeros), each answering after
    ``delays[i]`` s (settable while they run); ``release`` ends every wait."""
    delays, release = [0.0] * n, threading.Event()

    def wait(i):
        def delay():  # waits here (release ends it), sleeps no more
            release.wait(delays[i])
            return 0.0
        return delay

    servers, addrs = zip(*[_fake_shard(art.version, delay_s=wait(i)) for i in range(n)],
                         strict=True)
    return servers, list(addrs), delays, release


@pytest.mark.parametrize("transport", client_lib.TRANSPORTS)
def test_auto_hedge_delay_hedges_a_stalled_replica_once_warmed_up_and_not_before(
        art, transport):
    servers, addrs, delays, release = _stallable_shards(art)
    try:
        client = client_lib.EmbeddingClient.from_artifact(
            str(art.path), [addrs], deadline_s=6.0, transport=transport, hedge_after_s="auto")
        est = client._delays[0]
        # Warming up: a slow primary (0.3 s, failover hands over at 4 s) is waited for.
        delays[0] = 0.3
        assert client.lookup("user", [1]).shape == (1, 4)
        assert (client.hedges_sent, client.hedges_throttled, client._preferred) == (0, 0, [0])
        assert est.window()[0] >= 0.3  # the slow answer counts (timer start to answer)
        delays[0] = 0.0
        for _ in range(98):
            client.lookup("user", [2])
        assert client.hedge_delays_s == [None] and client.hedges_sent == 0
        client.lookup("user", [3])  # the 100th answer: a delay, from the fast ones
        (delay,) = client.hedge_delays_s
        assert delay == est.delay_s and 0.001 <= delay < 0.3
        # Warmed up: the primary hangs; the replica is asked after the delay.
        delays[0] = 60.0
        assert client.lookup("user", [4]).shape == (1, 4)
        assert (client.hedges_sent, client._preferred) == (1, [1])
        # The hedged race counts as the delay plus the hedge's round trip (a lower
        # bound on the hung try), not as the hedge's own quick round trip.
        assert est.samples == 101 and est.window()[-1] >= delay
        client.close()
    finally:
        release.set()
        for server in servers:
            server.stop(0)


def test_a_client_continues_the_adaptive_hedge_delays_of_the_one_it_replaces(art):
    """hedge_history (a ranker's swap): the new client shares the old one's answer
    times of the same replicas, so it hedges at once instead of after 100 answers."""
    servers, addrs, delays, release = _stallable_shards(art)
    make = functools.partial(client_lib.EmbeddingClient.from_artifact, str(art.path),
                             deadline_s=6.0)
    clients = []
    try:
        old = make([addrs], hedge_after_s="auto")
        clients.append(old)
        est = old._delays[0]
        for _ in range(100):
            est.record(0.004)
        assert old.hedge_delays_s == [est.delay_s] and est.delay_s >= 0.004
        new = make([addrs], hedge_after_s="auto", hedge_history=old)
        clients.append(new)
        assert new._delays[0] is est and new.hedge_delays_s == old.hedge_delays_s
        # Warm from the start: a hung primary is hedged on the first lookup.
        delays[0] = 60.0
        assert new.lookup("user", [4]).shape == (1, 4)
        assert (new.hedges_sent, new._preferred) == (1, [1]) and est.samples == 101
        delays[0] = 0.0
        # Cold: other replicas (or their order), other settings, or no adaptive history.
        fixed = make([addrs], hedge_after_s=0.01)
        clients.append(fixed)
        for shards, kwargs in (([addrs[::-1]], {}), ([addrs], {"hedge_quantile": 0.9}),
                               ([addrs], {"hedge_min_s": 0.002}),
                               ([addrs], {"hedge_history": fixed}),
                               ([addrs], {"hedge_history": None})):
            c = make(shards, hedge_after_s="auto", **{"hedge_history": old, **kwargs})
            clients.append(c)
            assert c.hedge_delays_s == [None] and c._delays[0] is not est
        # A fixed delay takes nothing from the history.
        c = make([addrs], hedge_after_s=0.02, hedge_history=old)
        clients.append(c)
        assert c.hedge_delays_s == [0.02] and c._delays == [None]
    finally:
        release.set()
        for c in clients:
            c.close()
        for server in servers:
            server.stop(0)


def test_auto_hedge_delay_follows_a_replica_whose_latency_rises_and_falls(art, monkeypatch):
    """A small window and the median, so the test is quick and noise-proof: every
    answer after the rise takes >= 0.1 s from the timer's start, whichever replica
    gives it, and the median of mostly-fast loopback answers is far below that."""
    monkeypatch.setattr(client_lib.hedge_delay, "HedgeDelay", functools.partial(
        client_lib.hedge_delay.HedgeDelay, window=20, every=5, warmup=10))
    servers, addrs, delays, release = _stallable_shards(art)
    try:
        client = client_lib.EmbeddingClient.from_artifact(
            str(art.path), [addrs], deadline_s=5.0, hedge_after_s="auto", hedge_quantile=0.5)
        delays_ms = []
        for phase in (0.0, 0.1, 0.0):
            delays[0] = delays[1] = phase
            for _ in range(10 if not delays_ms else 15):
                client.lookup("user", [1])
            delays_ms.append(client.hedge_delays_s[0])
        assert client._delays[0].samples == 40
        low, high, low_again = delays_ms
        assert 0.001 <= low < 0.1 <= high and 0.001 <= low_again < 0.1
        client.close()
    finally:
        release.set()
        for server in servers:
            server.stop(0)


def test_slow_but_in_time_replicas_still_answer(art):
    """Both replicas answer in 0.6 of the budget: the first try keeps 2/3 of it (an
    equal split cut it at 1/2 and failed every lookup once a replica was added)."""
    servers, addrs = [], []
    for _ in range(2):
        server, addr = _fake_shard(art.version, delay_s=0.6)
        servers.append(server)
        addrs.append(addr)
    try:
        client = client_lib.EmbeddingClient.from_artifact(
            str(art.path), [addrs], deadline_s=1.0, transport="unary")
        assert client.lookup("user", [1, 2]).shape == (2, 4)
        client.close()
    finally:
        for server in servers:
            server.stop(0)
    now = time.monotonic()
    assert client_lib._try_deadline(now + 0.9, 2) - now == pytest.approx(0.6, abs=0.02)
    assert client_lib._try_deadline(now + 0.9, 1) == now + 0.9


@pytest.mark.parametrize("hedge", HEDGES)
@pytest.mark.parametrize("transport", client_lib.TRANSPORTS)
def test_a_replica_without_the_pinned_version_hands_over_to_one_with_it(art, tmp_path,
                                                                       transport, hedge):
    """Mid-rollout, a replica restarted on the next artifact refuses the pinned
    version: the lookup goes to a replica still serving it, and fails only when none does."""
    rng = np.random.default_rng(1)
    nxt = str(tmp_path / "next")
    artifact.write_artifact(nxt, tables={"user": rng.normal(size=(90, 4)).astype(np.float32),
                                         "pin": rng.normal(size=(10, 6)).astype(np.float32)},
                            vocabs={"user": np.arange(90), "pin": np.arange(10)})
    cfg = dict(shard=0, num_shards=1, log_every_s=0, workers=2)
    new = es.serve(es.ServerConfig(artifact=nxt, **cfg))
    old = es.serve(es.ServerConfig(artifact=str(art.path), **cfg))
    try:
        client = client_lib.EmbeddingClient.from_artifact(
            str(art.path), [[f"127.0.0.1:{new.port}", f"127.0.0.1:{old.port}"]],
            transport=transport, hedge_after_s=hedge)
        for _ in range(2):
            np.testing.assert_array_equal(client.lookup("user", [3]), _expected(art, "user", [3]))
        client.close()
        client = client_lib.EmbeddingClient.from_artifact(
            str(art.path), [[f"127.0.0.1:{new.port}"] * 2], transport=transport,
            hedge_after_s=hedge)
        with pytest.raises(client_lib.VersionMismatch, match="no replica tried serves") as e:
            client.lookup("user", [3])
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
        client.close()
    finally:
        new.stop(0)
        old.stop(0)


def _wait_stopped(pid, timeout_s=10.0):
    """Waits until process ``pid`` is in the stopped state (T in /proc/PID/stat)."""
    stat = pathlib.Path(f"/proc/{pid}/stat")
    t_end = time.monotonic() + timeout_s
    while stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "T":
        assert time.monotonic() < t_end, f"process {pid} did not stop"
        time.sleep(0.01)


def _spawn_shard(art, shard, num_shards, port=0):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "launch.serve_embeddings",
            f"--artifact={art.path}",
            f"--shard={shard}",
            f"--num_shards={num_shards}",
            f"--port={port}",
            "--workers=2",
            "--log_every_s=0",
        ],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=mp_util.pythonpath(ROOT)),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        raise RuntimeError(f"shard {shard} did not start (rc={proc.wait()})")
    event = json.loads(line)
    assert event["event"] == "serving" and event["version"] == art.version
    return proc, event["port"]


@pytest.mark.multiprocess
def test_killed_shard_gives_clean_unavailable_and_recovers_after_restart(art):
    procs = [_spawn_shard(art, i, 2) for i in range(2)]
    try:
        addrs = [f"127.0.0.1:{port}" for _, port in procs]
        deadline_s = 1.0
        client = client_lib.EmbeddingClient.from_artifact(
            str(art.path), addrs, deadline_s=deadline_s
        )
        rows = np.array([3, 44, 50, 89, 3])
        want = _expected(art, "user", rows)
        for _ in range(20):
            np.testing.assert_array_equal(client.lookup("user", rows), want)

        procs[1][0].send_signal(signal.SIGKILL)  # mid-stream, no goodbye
        procs[1][0].wait(10)
        errors = 0
        for _ in range(10):
            t0 = time.monotonic()
            try:
                client.lookup("user", rows)
            except client_lib.ServingError as e:
                assert e.code == grpc.StatusCode.UNAVAILABLE and e.shard == 1, e
                errors += 1
            assert time.monotonic() - t0 < deadline_s + 0.5
            # The live shard keeps answering its own rows.
            np.testing.assert_array_equal(client.lookup("user", [3, 44]), want[:2])
        assert errors == 10

        procs[1] = _spawn_shard(art, 1, 2, port=procs[1][1])
        t_end = time.monotonic() + 10
        while True:
            try:
                got = client.lookup("user", rows)
                break
            except client_lib.ServingError:
                assert time.monotonic() < t_end, "client did not reconnect to the restarted shard"
                time.sleep(0.05)
        np.testing.assert_array_equal(got, want)

        # A hung shard (stopped, connection open) fails at the deadline, not later.
        procs[0][0].send_signal(signal.SIGSTOP)
        try:
            _wait_stopped(procs[0][0].pid)  # SIGSTOP is asynchronous: it may still answer
            t0 = time.monotonic()
            with pytest.raises(client_lib.ServingError) as e:
                client.lookup("user", rows)
            assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and e.value.shard == 0
            assert time.monotonic() - t0 < deadline_s + 0.5
        finally:
            procs[0][0].send_signal(signal.SIGCONT)
        np.testing.assert_array_equal(client.lookup("user", rows), want)
        client.close()

        # SIGTERM: graceful stop, exit code 0, final stats line.
        proc = procs[0][0]
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0
        assert json.loads(out.strip().splitlines()[-1])["event"] == "stopped"
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
