"""Lookups over long-lived LookupStream calls: same answers, errors, deadlines, failover.

Real shard servers on loopback with ports bound at run time (port 0).
"""

import threading
import time

import grpc
import mp_util
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jax_recsys.quant import artifact, rowwise
from serving import client as client_lib, codec, echo_server, embedding_server as es, streaming
from serving.protos import embedding_pb2 as pb


@pytest.fixture(scope="module")
def arts(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream_art")
    out = {}
    for name, seed in (("a", 0), ("b", 1)):
        rng = np.random.default_rng(seed)
        tables = {
            "user": rng.normal(size=(100, 8)).astype(np.float32),
            "pin": rng.normal(size=(37, 5)).astype(np.float32),
        }
        vocabs = {k: np.arange(v.shape[0], dtype=np.int64) for k, v in tables.items()}
        artifact.write_artifact(str(root / name), tables=tables, vocabs=vocabs, bits=4)
        out[name] = artifact.load_artifact(str(root / name))
    return out


def _expected(art, table, rows):
    return rowwise.dequantize_rows(art.tables[table], np.asarray(rows))


def _start(art, **kw):
    return es.serve(es.ServerConfig(artifact=str(art.path), log_every_s=0, **kw))


def _client(art, addresses, **kw):
    return client_lib.EmbeddingClient.from_artifact(str(art.path), addresses, **kw)


def _req(table, rows, version=""):
    req = pb.LookupRequest(expected_version=version)
    req.tables.add(table=table, ids=codec.encode_ids(np.asarray(rows, np.int64)))
    return req.SerializeToString()


@pytest.mark.parametrize("wire", ["float32", "quantized"])
def test_stream_lookups_equal_unary_ones_and_reuse_one_stream(arts, wire):
    art = arts["a"]
    server = _start(art)
    addr = f"127.0.0.1:{server.port}"
    try:
        stream = _client(art, [addr], wire=wire)
        unary = _client(art, [addr], wire=wire, transport="unary")
        rng = np.random.default_rng(0)
        for _ in range(20):
            rows = {"user": rng.integers(0, 100, 9), "pin": rng.integers(0, 37, 4)}
            got, ref = stream.lookup_many(rows), unary.lookup_many(rows)
            for table, r in rows.items():
                np.testing.assert_array_equal(got[table], _expected(art, table, r))
                np.testing.assert_array_equal(ref[table], got[table])
        # One caller, one shard: every stream lookup went over the same call.
        assert server.stats()["streams_open"] == 1
        assert server.stats()["by_code"] == {"OK": 40}
        stream.close()
        mp_util.wait_for(lambda: server.stats()["streams_open"] == 0, timeout_s=10)
        unary.close()
    finally:
        server.stop(0)


def test_a_bad_request_ends_its_stream_with_its_status_and_the_server_still_answers(arts):
    art = arts["a"]
    server = _start(art, max_ids_per_request=64)
    bad = {
        "garbage": (b"\xff\x00not a protobuf", grpc.StatusCode.INVALID_ARGUMENT),
        "unknown table": (_req("nope", [1]), grpc.StatusCode.INVALID_ARGUMENT),
        "row out of range": (_req("user", [100]), grpc.StatusCode.INVALID_ARGUMENT),
        "negative row": (_req("user", [-1]), grpc.StatusCode.INVALID_ARGUMENT),
        "too many ids": (_req("user", np.zeros(65)), grpc.StatusCode.INVALID_ARGUMENT),
        "other version": (_req("user", [1], "v0"), grpc.StatusCode.FAILED_PRECONDITION),
    }
    good = _req("user", [3, 1, 4])
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            call = channel.stream_stream(codec.LOOKUP_STREAM_METHOD)
            for name, (payload, code) in bad.items():
                responses = call(iter([good, payload, good]), timeout=10)
                first = pb.LookupResponse.FromString(next(responses))
                np.testing.assert_array_equal(
                    np.frombuffer(first.tables[0].values, "<f4").reshape(3, 8),
                    _expected(art, "user", [3, 1, 4]),
                )
                with pytest.raises(grpc.RpcError) as e:  # the stream ends with the status
                    next(responses)
                assert e.value.code() == code, name
            # The client library: the status surfaces as it does for a unary call.
            with _client(art, [f"127.0.0.1:{server.port}"], pin=False) as client:
                client.version = "v0"
                with pytest.raises(client_lib.VersionMismatch):
                    client.lookup("user", [1])
                client.version = art.version
                np.testing.assert_array_equal(
                    client.lookup("user", [5, 6]), _expected(art, "user", [5, 6])
                )
        assert server.stats()["by_code"]["INVALID_ARGUMENT"] == 5
        mp_util.wait_for(lambda: server.stats()["streams_open"] == 0, timeout_s=10)
    finally:
        server.stop(0)


def test_stream_deadline_is_kept_and_the_client_recovers(arts):
    art = arts["a"]
    server = _start(art)
    try:
        client = _client(art, [f"127.0.0.1:{server.port}"], deadline_s=0.5)
        np.testing.assert_array_equal(client.lookup("user", [1]), _expected(art, "user", [1]))
        entered, release = mp_util.hold_first_call(server, "_handle_lookup")
        t0 = time.monotonic()
        with pytest.raises(client_lib.ServingError) as e:
            client.lookup("user", [2])
        took = time.monotonic() - t0
        assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert entered.is_set() and 0.45 < took < 2.0, took
        release.set()
        # The cancelled stream is dropped; the next lookup opens a fresh one.
        np.testing.assert_array_equal(client.lookup("user", [2]), _expected(art, "user", [2]))
        client.close()
    finally:
        server.stop(0)


def test_servers_refusing_streams_get_unary_lookups(arts):
    art = arts["a"]
    one = _start(art, max_streams=1)
    none = _start(art, max_streams=0)
    try:
        first = _client(art, [f"127.0.0.1:{one.port}"])
        second = _client(art, [f"127.0.0.1:{one.port}"])
        for client in (first, second, first, second):
            np.testing.assert_array_equal(
                client.lookup("pin", [36, 0]), _expected(art, "pin", [36, 0])
            )
        # The first client holds the only stream; the second was refused and went unary.
        assert one.stats()["streams_open"] == 1
        assert one.stats()["by_code"] == {"OK": 4}
        with _client(art, [f"127.0.0.1:{none.port}"]) as client:  # no LookupStream at all
            np.testing.assert_array_equal(client.lookup("pin", [3]), _expected(art, "pin", [3]))
        assert none.stats()["streams_open"] == 0
        first.close()
        second.close()
    finally:
        one.stop(0)
        none.stop(0)
    with pytest.raises(ValueError, match="max_streams"):
        _start(art, max_streams=-1)
    with pytest.raises(ValueError, match="transport"):
        _client(art, ["127.0.0.1:1"], transport="carrier pigeon")


def test_graceful_stop_ends_idle_streams_at_once_and_the_client_fails_over(arts):
    art = arts["a"]
    primary, replica = _start(art), _start(art)
    try:
        client = _client(
            art, [[f"127.0.0.1:{primary.port}", f"127.0.0.1:{replica.port}"]], deadline_s=5
        )
        np.testing.assert_array_equal(client.lookup("user", [9]), _expected(art, "user", [9]))
        assert primary.stats()["streams_open"] == 1
        t0 = time.monotonic()
        assert primary.stop(grace=10).wait(5)  # the idle stream does not hold the grace
        assert time.monotonic() - t0 < 5
        # The broken stream is dropped, a fresh one finds the primary gone: replica.
        np.testing.assert_array_equal(client.lookup("user", [8]), _expected(art, "user", [8]))
        assert replica.stats()["by_code"] == {"OK": 1}
        client.close()
    finally:
        primary.stop(0)
        replica.stop(0)


def test_a_server_restarted_between_lookups_is_found_on_a_fresh_stream(arts):
    art = arts["a"]
    server = _start(art)
    port = server.port
    client = _client(art, [f"127.0.0.1:{port}"], deadline_s=5)
    try:
        np.testing.assert_array_equal(client.lookup("user", [1]), _expected(art, "user", [1]))
        server.stop(0).wait(5)
        server = _start(art, port=port)
        # The old stream broke while idle: the lookup is retried once, unnoticed.
        np.testing.assert_array_equal(client.lookup("user", [2]), _expected(art, "user", [2]))
        assert server.stats()["by_code"] == {"OK": 1}
    finally:
        client.close()
        server.stop(0)


class _FakeStream:
    def __init__(self):
        self.expired_at = None

    def expire(self):
        self.expired_at = time.monotonic()


def test_watchdog_cancels_only_round_trips_past_their_deadline():
    dog = streaming.DeadlineWatchdog()
    try:
        late, on_time, later = _FakeStream(), _FakeStream(), _FakeStream()
        t0 = time.monotonic()
        dog.arm(late, t0 + 0.3)
        dog.arm(on_time, t0 + 0.1)
        dog.arm(later, t0 + 30)
        dog.disarm(on_time)  # answered in time
        dog.arm(later, t0 + 0.2)  # re-armed for its next round trip, earlier
        mp_util.wait_for(lambda: late.expired_at is not None, timeout_s=10)
        assert on_time.expired_at is None
        assert t0 + 0.2 <= later.expired_at < late.expired_at
        assert late.expired_at >= t0 + 0.3
    finally:
        dog.close()


def test_echo_stream_answers_the_sizes_asked_for_on_one_call():
    server, port = echo_server.start_echo_server(workers=2)
    dog = streaming.DeadlineWatchdog()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            pool = streaming.StreamPool(channel, echo_server.ECHO_STREAM_METHOD, watchdog=dog)
            for size in (0, 3000, 70_000):
                req = echo_server.echo_request(request_bytes=100, response_bytes=size)
                assert pool.call(req, time.monotonic() + 5) == bytes(size)
            assert pool.open_streams == 1
            with pytest.raises(grpc.RpcError) as e:
                pool.call(b"short", time.monotonic() + 5)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert pool.open_streams == 0
            pool.close()
    finally:
        dog.close()
        server.stop(0)


def test_abandon_cancels_a_round_trip_in_flight_and_is_a_no_op_once_answered():
    """abandon() before the answer: the waiting call raises Abandoned and the stream is
    closed. After the answer (the stream back in the pool, maybe lent to the next call)
    it must not touch the stream: a late abandon used to cancel the next caller's."""
    server, port = echo_server.start_echo_server(workers=2)
    dog = streaming.DeadlineWatchdog()
    req = echo_server.echo_request(request_bytes=100, response_bytes=10)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            pool = streaming.StreamPool(channel, echo_server.ECHO_STREAM_METHOD, watchdog=dog)
            first = pool.send(req, time.monotonic() + 5)
            assert first() == bytes(10)
            (stream,) = pool._all
            second = pool.send(req, time.monotonic() + 5)  # the same stream, lent again
            assert second.stream is stream
            first.abandon()  # late: no effect on the stream serving `second`
            assert second() == bytes(10) and stream.answered == 2 and not stream.abandoned
            assert pool.open_streams == pool.free_streams == 1
            # Abandoned in flight (a stalled answer is simulated by not reading it yet).
            third = pool.send(req, time.monotonic() + 5)
            third.abandon()
            with pytest.raises(streaming.Abandoned):
                third()
            assert pool.open_streams == 0  # closed, not reused
            assert pool.call(req, time.monotonic() + 5) == bytes(10)  # a fresh one
            pool.close()
    finally:
        dog.close()
        server.stop(0)


def test_concurrent_callers_each_get_their_own_rows(arts):
    art = arts["a"]
    server = _start(art)
    errors = []
    try:
        client = _client(art, [f"127.0.0.1:{server.port}"], deadline_s=10)

        def worker(seed):
            rng = np.random.default_rng(seed)
            try:
                for _ in range(50):
                    rows = rng.integers(0, 100, int(rng.integers(1, 20)))
                    np.testing.assert_array_equal(
                        client.lookup("user", rows), _expected(art, "user", rows)
                    )
            except Exception as e:  # reported below
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(s,)) for s in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors[:1]
        assert 1 <= server.stats()["streams_open"] <= 6
        assert server.stats()["by_code"] == {"OK": 300}
        client.close()
    finally:
        server.stop(0)


def test_a_flood_of_stream_and_unary_lookups_beyond_the_limits_sheds_cleanly(arts):
    # 12 clients (6 on streams, 6 unary; a quarter with 3 ms deadlines) x 30 lookups
    # against a shard allowing 4 open streams and 4 lookups in flight on 2 threads.
    # Every lookup is OK with the right rows, RESOURCE_EXHAUSTED or DEADLINE_EXCEEDED;
    # never more than 4 streams open; health SERVING throughout; all drains to 0.
    art = arts["a"]
    server = _start(art, max_concurrent_rpcs=4, max_streams=4, workers=2)
    addr = f"127.0.0.1:{server.port}"
    clients = [
        _client(
            art,
            [addr],
            deadline_s=0.003 if k % 4 == 0 else 20,
            transport="stream" if k % 2 == 0 else "unary",
        )
        for k in range(12)
    ]
    codes, health, streams_seen, errors = [], [], [], []
    stop = threading.Event()

    def watch():
        with grpc.insecure_channel(addr) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while not stop.is_set():
                health.append(stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status)
                streams_seen.append(server.stats()["streams_open"])

    def flood(k):
        rng = np.random.default_rng(k)
        try:
            for _ in range(30):
                rows = rng.integers(0, 100, 200)
                try:
                    got = clients[k].lookup("user", rows)
                except client_lib.ServingError as e:
                    codes.append(e.code)
                    continue
                np.testing.assert_array_equal(got, _expected(art, "user", rows))
                codes.append(grpc.StatusCode.OK)
        except Exception as e:  # reported below
            errors.append(e)

    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=flood, args=(k,)) for k in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    stop.set()
    watcher.join(10)
    try:
        assert not errors, errors[:1]
        assert len(codes) == 360
        ok = grpc.StatusCode
        assert set(codes) <= {ok.OK, ok.RESOURCE_EXHAUSTED, ok.DEADLINE_EXCEEDED}, codes
        assert codes.count(ok.OK) > 0 and codes.count(ok.RESOURCE_EXHAUSTED) > 0
        assert health and set(health) == {health_pb2.HealthCheckResponse.SERVING}
        assert streams_seen and max(streams_seen) <= 4
        for client in clients:
            client.close()
        mp_util.wait_for(
            lambda: server.stats()["streams_open"] == 0 and server.stats()["in_flight"] == 0,
            timeout_s=10,
        )
        with _client(art, [addr]) as client:  # and it still serves, on a stream
            np.testing.assert_array_equal(client.lookup("user", [4]), _expected(art, "user", [4]))
            assert server.stats()["streams_open"] == 1
    finally:
        server.stop(0)


def test_a_client_dropped_without_close_ends_its_streams(arts):
    import gc

    art = arts["a"]
    server = _start(art)
    try:
        client = _client(art, [f"127.0.0.1:{server.port}"])
        np.testing.assert_array_equal(client.lookup("user", [1]), _expected(art, "user", [1]))
        assert server.stats()["streams_open"] == 1
        del client
        gc.collect()
        mp_util.wait_for(lambda: server.stats()["streams_open"] == 0, timeout_s=10)
    finally:
        server.stop(0)


def test_a_far_deadline_neither_kills_the_watchdog_nor_delays_a_near_one():
    """A deadline past threading.TIMEOUT_MAX (~292 years) used to raise OverflowError
    in the watchdog thread, which died: every later deadline was silently ignored."""
    dog = streaming.DeadlineWatchdog()
    try:
        far, farther, near = _FakeStream(), _FakeStream(), _FakeStream()
        dog.arm(far, time.monotonic() + 1e10)
        dog.arm(farther, time.monotonic() + 1e300)
        time.sleep(0.05)  # the thread sleeps towards the far deadline now
        t0 = time.monotonic()
        dog.arm(near, t0 + 0.05)
        mp_util.wait_for(lambda: near.expired_at is not None, timeout_s=3)
        assert near.expired_at - t0 < 1.0
        assert far.expired_at is None and farther.expired_at is None
        assert dog.alive and dog.errors == 0
    finally:
        dog.close()


def test_the_watchdog_refuses_nan_and_takes_inf_as_never():
    dog = streaming.DeadlineWatchdog()
    try:
        fake, never, near = _FakeStream(), _FakeStream(), _FakeStream()
        for bad in (float("nan"), None, "1"):  # refused before it is stored: a stored
            with pytest.raises(ValueError, match="deadline must be"):  # None broke every
                dog.arm(fake, bad)  # later step of the loop, and no deadline was kept
        dog.arm(never, time.monotonic() + 0.05)
        dog.arm(never, float("inf"))  # re-armed with no deadline: disarmed
        dog.arm(near, time.monotonic() + 0.1)
        mp_util.wait_for(lambda: near.expired_at is not None, timeout_s=3)
        time.sleep(0.05)
        assert fake.expired_at is None and never.expired_at is None
        assert dog.alive
    finally:
        dog.close()


def test_the_watchdog_survives_an_unexpected_error_in_its_loop(monkeypatch, caplog):
    class Clock:  # time as the watchdog sees it: its next reading fails once
        fail = threading.Event()

        def monotonic(self):
            if self.fail.is_set():
                self.fail.clear()
                raise RuntimeError("clock trouble")
            return time.monotonic()

        sleep = staticmethod(time.sleep)

    clock = Clock()
    monkeypatch.setattr(streaming, "time", clock)
    dog = streaming.DeadlineWatchdog()
    try:
        near = _FakeStream()
        clock.fail.set()
        dog.arm(near, time.monotonic() + 0.05)  # wakes the thread: its reading fails
        mp_util.wait_for(lambda: near.expired_at is not None, timeout_s=3)
        assert dog.alive and dog.errors == 1
        assert "deadline watchdog: unexpected error" in caplog.text
    finally:
        dog.close()


def test_a_stream_pool_refuses_a_deadline_that_is_not_finite():
    dog = streaming.DeadlineWatchdog()
    try:
        with grpc.insecure_channel("127.0.0.1:1") as channel:
            pool = streaming.StreamPool(channel, echo_server.ECHO_STREAM_METHOD, watchdog=dog)
            for bad in (float("nan"), float("inf"), -float("inf")):
                with pytest.raises(ValueError, match="deadline must be a finite"):
                    pool.send(b"", bad)
            assert pool.open_streams == 0  # refused before taking a stream
            pool.close()
        assert dog.alive
    finally:
        dog.close()


def test_a_stalled_shard_gets_deadline_exceeded_after_a_huge_deadline_was_asked(arts):
    """The review's case: one lookup_many(deadline_s=1e10) killed the client's watchdog,
    and a later 0.5 s lookup against a stalled shard waited as long as the stall."""
    art = arts["a"]
    server = _start(art)
    try:
        client = _client(art, [f"127.0.0.1:{server.port}"], deadline_s=0.5)
        np.testing.assert_array_equal(client.lookup("user", [1]), _expected(art, "user", [1]))
        with pytest.raises(ValueError, match="deadline_s must be"):
            client.lookup_many({"user": [1]}, deadline_s=1e10)
        far = _FakeStream()  # a timer past threading.TIMEOUT_MAX on the client's watchdog
        client._watchdog.arm(far, time.monotonic() + 1e12)
        time.sleep(0.05)
        entered, release = mp_util.hold_first_call(server, "_handle_lookup", timeout_s=3)
        t0 = time.monotonic()
        with pytest.raises(client_lib.ServingError) as e:
            client.lookup_many({"user": [2]}, deadline_s=0.5)
        took = time.monotonic() - t0
        assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert entered.is_set() and 0.45 < took < 2.0, took
        release.set()
        np.testing.assert_array_equal(client.lookup("user", [2]), _expected(art, "user", [2]))
        assert far.expired_at is None and client._watchdog.alive
        client.close()
    finally:
        server.stop(0)
