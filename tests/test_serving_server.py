"""Embedding shard server: exact values, bad input, fuzzing, swaps, TLS, no JAX.

Real servers on loopback with ports bound at run time (port 0).
"""

import collections
import json
import os
import queue
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from concurrent import futures

import grpc
import mp_util
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jax_recsys.quant import artifact, rowwise
from serving import client as client_lib, codec, echo_server, embedding_server as es
from serving.protos import embedding_pb2 as pb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BAD = grpc.StatusCode.INVALID_ARGUMENT


def _tables(seed):
    rng = np.random.default_rng(seed)
    return {
        "user": rng.normal(size=(100, 8)).astype(np.float32),
        "pin": rng.normal(size=(37, 5)).astype(np.float32),  # odd dim: packed nibbles
    }


def _write(path, seed, bits=4):
    tables = _tables(seed)
    vocabs = {k: np.arange(v.shape[0], dtype=np.int64) + 1000 for k, v in tables.items()}
    artifact.write_artifact(path, tables=tables, vocabs=vocabs, bits=bits)
    return artifact.load_artifact(path)


@pytest.fixture(scope="module")
def arts(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving_art")
    return {
        "a": _write(str(root / "a"), 0),
        "b": _write(str(root / "b"), 1),
        "int8": _write(str(root / "int8"), 2, bits=8),
    }


def _expected(art, table, rows):
    return rowwise.dequantize_rows(art.tables[table], np.asarray(rows))


def _start(art, shard=0, num_shards=1, **kw):
    cfg = es.ServerConfig(
        artifact=str(art.path), shard=shard, num_shards=num_shards, log_every_s=0, **kw
    )
    return es.serve(cfg)


def _raw(port):
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    return channel, channel.unary_unary(codec.LOOKUP_METHOD)


def _req(tables, version=""):
    req = pb.LookupRequest(expected_version=version)
    for name, ids in tables:
        req.tables.add(
            table=name,
            ids=ids if isinstance(ids, bytes) else codec.encode_ids(np.asarray(ids, np.int64)),
        )
    return req.SerializeToString()


def _parse(raw):
    resp = pb.LookupResponse.FromString(raw)
    return resp.version, {
        t.table: np.frombuffer(t.values, "<f4").reshape(-1, t.dim) for t in resp.tables
    }


@pytest.mark.parametrize("wire", ["float32", "quantized"])
@pytest.mark.parametrize("num_shards", [1, 2])
@pytest.mark.parametrize("which", ["a", "int8"])
def test_values_equal_dequantized_artifact_exactly(arts, num_shards, which, wire):
    art = arts[which]
    servers = [_start(art, i, num_shards) for i in range(num_shards)]
    try:
        client = client_lib.EmbeddingClient.from_artifact(
            str(art.path), [f"127.0.0.1:{s.port}" for s in servers], deadline_s=10, wire=wire
        )
        rng = np.random.default_rng(3)
        user_rows = np.concatenate([rng.integers(0, 100, 40), [0, 99, 99, 50, 0]])
        pin_rows = np.array([36, 0, 18, 18, 5])
        got = client.lookup_many({"user": user_rows, "pin": pin_rows})
        np.testing.assert_array_equal(got["user"], _expected(art, "user", user_rows))
        np.testing.assert_array_equal(got["pin"], _expected(art, "pin", pin_rows))
        assert got["user"].dtype == np.float32 and got["pin"].shape == (5, 5)
        # ...and the values are really the table's, within INT quantization error.
        src = _tables({"a": 0, "int8": 2}[which])
        step = 2.0 / (15 if which == "a" else 255)
        assert np.abs(got["user"] - src["user"][user_rows]).max() < 8 * step
        client.close()
    finally:
        for s in servers:
            s.stop(0)


def test_quantized_request_gets_stored_rows_and_float32_tables_still_get_values(arts, tmp_path):
    art = arts["a"]
    server = _start(art, 1, 2)  # user rows [50, 100), pin rows [18, 37)
    try:
        ch, lookup = _raw(server.port)
        req = pb.LookupRequest.FromString(_req([("user", [99, 50, 99]), ("pin", [20])]))
        req.quantized = True
        resp = pb.LookupResponse.FromString(lookup(req.SerializeToString(), timeout=5))
        assert resp.version == art.version
        for t, rows in zip(resp.tables, ([99, 50, 99], [20]), strict=True):
            q = art.tables[t.table]
            assert t.bits == 4 and not t.values
            codes = np.frombuffer(t.codes, np.uint8).reshape(len(rows), -1)
            np.testing.assert_array_equal(codes, q.codes[rows])
            # float16 scale and bias widened exactly to float32
            np.testing.assert_array_equal(np.frombuffer(t.scale, "<f4"), q.scale[rows])
            np.testing.assert_array_equal(np.frombuffer(t.bias, "<f4"), q.bias[rows])
        # The same request's ids outside the shard: INVALID_ARGUMENT, as unquantized.
        req = pb.LookupRequest.FromString(_req([("user", [49])]))
        req.quantized = True
        with pytest.raises(grpc.RpcError) as e:
            lookup(req.SerializeToString(), timeout=5)
        assert e.value.code() == BAD and "[50, 100)" in e.value.details()
        ch.close()
    finally:
        server.stop(0)
    # An unquantized (float32) artifact answers float32 values to a quantized request.
    f32 = _write(str(tmp_path / "f32"), 4, bits=32)
    server = _start(f32)
    try:
        for wire in ("quantized", "float32"):
            client = client_lib.EmbeddingClient.from_artifact(
                str(f32.path), [f"127.0.0.1:{server.port}"], wire=wire
            )
            got = client.lookup_many({"user": [3, 3, 0], "pin": [36]})
            np.testing.assert_array_equal(got["user"], _tables(4)["user"][[3, 3, 0]])
            np.testing.assert_array_equal(got["pin"], _tables(4)["pin"][[36]])
            client.close()
    finally:
        server.stop(0)


def test_shard_answers_only_its_rows_and_reports_its_ranges(arts):
    art = arts["a"]
    server = _start(art, 1, 2)
    try:
        ch, lookup = _raw(server.port)
        version, vals = _parse(lookup(_req([("user", [50, 99, 50])]), timeout=5))
        assert version == art.version
        np.testing.assert_array_equal(vals["user"], _expected(art, "user", [50, 99, 50]))
        with pytest.raises(grpc.RpcError) as e:
            lookup(_req([("user", [49])]), timeout=5)
        assert e.value.code() == BAD and "[50, 100)" in e.value.details()
        info = pb.InfoResponse.FromString(ch.unary_unary(codec.INFO_METHOD)(b"", timeout=5))
        ranges = {t.table: (t.lo, t.hi, t.rows, t.dim, t.dtype) for t in info.tables}
        assert ranges == {"user": (50, 100, 100, 8, "int4"), "pin": (18, 37, 37, 5, "int4")}
        assert (info.shard, info.num_shards, info.version) == (1, 2, art.version)
        ch.close()
    finally:
        server.stop(0)


@pytest.mark.parametrize(
    "ids",
    [
        [7, 7, 7, 7, 3, 3, 9, 7],  # mostly repeats: each distinct row dequantized once
        [1, 2, 3, 4, 5, 6, 7, 7],  # one repeat: rows dequantized as asked
        [99, 0, 42],
    ],
)
def test_repeated_ids_come_back_in_request_order(arts, ids):
    art = arts["a"]
    server = _start(art)
    try:
        ch, lookup = _raw(server.port)
        pins = [i % 37 for i in ids[:3]]
        version, vals = _parse(lookup(_req([("user", ids), ("pin", pins)]), timeout=5))
        np.testing.assert_array_equal(vals["user"], _expected(art, "user", ids))
        np.testing.assert_array_equal(vals["pin"], _expected(art, "pin", pins))
        ch.close()
    finally:
        server.stop(0)


BAD_REQUESTS = [
    ("not protobuf", b"\xff\xff\xff", BAD, "not a LookupRequest"),
    ("empty request", b"", BAD, "no tables"),
    ("no ids", _req([("user", [])]), BAD, "no ids"),
    ("ids not multiple of 8", _req([("user", b"\x01" * 12)]), BAD, "not a multiple of 8"),
    ("unknown table", _req([("nope", [1])]), BAD, "unknown table 'nope'"),
    ("negative id", _req([("user", [3, -1])]), BAD, "id -1 outside"),
    ("id past the table", _req([("user", [100])]), BAD, "id 100 outside"),
    ("sorted ids past the table", _req([("user", [0, 5, 100])]), BAD, "id 100 outside"),
    ("huge id", _req([("pin", [2**62])]), BAD, "outside"),
    ("most negative id", _req([("pin", [3, -(2**63)])]), BAD, f"id {-(2**63)} outside"),
    ("too many ids", _req([("user", np.zeros(65, np.int64))]), BAD, "too many ids"),
    (
        "too many over tables",
        _req([("user", np.zeros(40)), ("pin", np.zeros(40))]),
        BAD,
        "too many ids",
    ),
    (
        "version",
        _req([("user", [1])], version="feedfacefeedface"),
        grpc.StatusCode.FAILED_PRECONDITION,
        "not served here",
    ),
]


def test_each_bad_input_gets_its_status_and_server_keeps_answering(arts):
    art = arts["a"]
    server = _start(art, max_ids_per_request=64)
    try:
        _, lookup = _raw(server.port)
        for name, payload, code, message in BAD_REQUESTS:
            with pytest.raises(grpc.RpcError) as e:
                lookup(payload, timeout=5)
            assert e.value.code() == code, name
            assert message in e.value.details(), (name, e.value.details())
            version, vals = _parse(lookup(_req([("user", [7, 7])], art.version), timeout=5))
            assert version == art.version
            np.testing.assert_array_equal(vals["user"], _expected(art, "user", [7, 7]))
        stats = server.stats()
        assert stats["by_code"]["INVALID_ARGUMENT"] == len(BAD_REQUESTS) - 1
        assert stats["by_code"]["FAILED_PRECONDITION"] == 1
        assert stats["by_code"]["OK"] == len(BAD_REQUESTS)
    finally:
        server.stop(0)


def _malformed(rng):
    kind = rng.integers(8)
    if kind == 0:
        return rng.bytes(int(rng.integers(0, 200)))
    if kind == 1:  # valid envelope, random ids bytes of any length
        return _req([("user", rng.bytes(int(rng.integers(0, 80))))])
    if kind == 2:
        return _req([("user", rng.integers(-(2**63), 2**63 - 1, 3, dtype=np.int64))])
    if kind == 3:
        return _req([(rng.choice(["", "usr", "pin\x00", "ü"]), [1])])
    if kind == 4:
        return _req([("pin", [int(rng.integers(37, 10**6))])])
    if kind == 5:
        return _req([("user", [1])], version=rng.bytes(8).hex())
    if kind == 6:  # a valid request with random bytes appended/truncated
        good = _req([("user", [1, 2])])
        cut = int(rng.integers(1, len(good)))
        return good[:cut] + rng.bytes(int(rng.integers(0, 5)))
    return _req([("user", [1]), ("user", rng.bytes(7))])


def test_randomized_malformed_stream_leaves_server_healthy(arts):
    art = arts["a"]
    server = _start(art, workers=4)
    try:
        ch, lookup = _raw(server.port)
        rng = np.random.default_rng(0)
        codes = {}
        for _ in range(40):  # 40 waves of 50 concurrent requests = 2000
            # Half of them also ask for quantized rows (b"\x20\x01": field 4 = true).
            payloads = [_malformed(rng) + b"\x20\x01" * int(rng.integers(2)) for _ in range(50)]
            futs = [lookup.future(p, timeout=10) for p in payloads]
            for f in futs:
                try:
                    f.result()
                    code = grpc.StatusCode.OK
                except grpc.RpcError as e:
                    code = e.code()
                codes[code] = codes.get(code, 0) + 1
        # Only the documented codes; nothing internal, nothing dropped.
        allowed = {grpc.StatusCode.OK, BAD, grpc.StatusCode.FAILED_PRECONDITION}
        assert set(codes) <= allowed, codes
        assert codes[BAD] > 1000 and sum(codes.values()) == 2000
        health = health_pb2_grpc.HealthStub(ch)
        status = health.Check(
            health_pb2.HealthCheckRequest(service=codec.SERVICE_NAME), timeout=5
        ).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        rows = np.arange(100)[::-1]
        _, vals = _parse(lookup(_req([("user", rows)]), timeout=5))
        np.testing.assert_array_equal(vals["user"], _expected(art, "user", rows))
        ch.close()
    finally:
        server.stop(0)


def test_swap_under_concurrent_load_has_no_failed_request(arts):
    a, b = arts["a"], arts["b"]
    servers = [_start(a, i, 2, workers=4) for i in range(2)]
    addrs = [f"127.0.0.1:{s.port}" for s in servers]
    expected = {v.version: v for v in (a, b)}
    rows = np.array([0, 13, 49, 50, 77, 99, 13])
    stop = threading.Event()
    failures, seen, done = [], {0: set(), 1: set()}, collections.Counter()

    def wait_until(cond):  # progress-based, not sleep-based: robust on a busy box
        t_end = time.monotonic() + 20
        while not cond() and not failures:
            assert time.monotonic() < t_end, (seen, done)
            time.sleep(0.01)

    def unpinned(shard):  # raw calls: check each response's version against its values
        ch, lookup = _raw(servers[shard].port)
        my_rows = rows[(rows >= 50) == bool(shard)]
        try:
            while not stop.is_set():
                version, vals = _parse(lookup(_req([("user", my_rows)]), timeout=5))
                seen[shard].add(version)
                want = _expected(expected[version], "user", my_rows)
                if not np.array_equal(vals["user"], want):
                    failures.append(f"shard {shard}: values do not match version {version}")
        except Exception as e:  # noqa: BLE001 -- any failure fails the test below
            failures.append(repr(e))
        finally:
            ch.close()

    def pinned(art, started):  # a client pinned to one version, like a ranker
        client = client_lib.EmbeddingClient.from_artifact(str(art.path), addrs, deadline_s=5)
        started.wait()
        try:
            while not stop.is_set():
                got = client.lookup("user", rows)
                if not np.array_equal(got, _expected(art, "user", rows)):
                    failures.append(f"pinned {art.version}: wrong values")
                done[art.version] += 1
        except Exception as e:  # noqa: BLE001
            failures.append(repr(e))
        finally:
            client.close()

    now, after_swap = threading.Event(), threading.Event()
    now.set()
    threads = [threading.Thread(target=unpinned, args=(i,)) for i in range(2)]
    threads += [
        threading.Thread(target=pinned, args=(a, now)),
        threading.Thread(target=pinned, args=(b, after_swap)),
    ]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: seen[0] and seen[1] and done[a.version] >= 3)
        for s in servers:
            assert s.swap(str(b.path), window_s=60) == b.version
            assert s.versions == [a.version, b.version]
        after_swap.set()
        n_old = done[a.version]
        wait_until(
            lambda: (
                b.version in seen[0]
                and b.version in seen[1]
                and done[b.version] >= 3
                and done[a.version] >= n_old + 3
            )
        )
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    try:
        assert not failures, failures[:5]
        assert seen[0] == seen[1] == {a.version, b.version}
        # After the window, the old version is refused with FAILED_PRECONDITION.
        for s in servers:
            assert s.retire(a.version) and s.version == b.version
        old = client_lib.EmbeddingClient.from_artifact(str(a.path), addrs, deadline_s=5)
        with pytest.raises(client_lib.VersionMismatch, match="not served here"):
            old.lookup("user", rows)
        old.close()
    finally:
        for s in servers:
            s.stop(0)


def test_old_version_retires_after_the_swap_window(arts):
    a, b = arts["a"], arts["b"]
    server = _start(a)
    try:
        server.swap(str(b.path), window_s=0.2)
        assert server.versions == [a.version, b.version]
        t_end = time.monotonic() + 10
        while server.versions != [b.version]:
            assert time.monotonic() < t_end, server.versions
            time.sleep(0.02)
        assert server.swap(str(b.path)) == b.version  # same version: no-op
        assert server.versions == [b.version]
    finally:
        server.stop(0)


def test_health_reports_not_serving_during_graceful_stop(arts):
    server = _start(arts["a"])
    ch, _ = _raw(server.port)
    health = health_pb2_grpc.HealthStub(ch)
    req = health_pb2.HealthCheckRequest(service="")
    serving = health_pb2.HealthCheckResponse.SERVING
    assert health.Check(req, timeout=5).status == serving
    watch = health.Watch(req, timeout=5)
    assert next(watch).status == serving
    watch.cancel()
    listed = health.List(health_pb2.HealthListRequest(), timeout=5).statuses
    assert {k: v.status for k, v in listed.items()} == {"": serving, codec.SERVICE_NAME: serving}
    assert server.stop(grace=2).wait(10)
    with pytest.raises(grpc.RpcError) as e:
        health.Check(req, timeout=2)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    ch.close()


def _health_check(port) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        req = health_pb2.HealthCheckRequest(service=codec.SERVICE_NAME)
        return health_pb2_grpc.HealthStub(ch).Check(req, timeout=5).status


def test_max_concurrent_rpcs_sheds_load_and_the_client_tries_the_replica(arts):
    art = arts["a"]
    with pytest.raises(ValueError, match="max_concurrent_rpcs"):
        _start(art, max_concurrent_rpcs=0)
    # One handler thread, two calls allowed in: one held, one queued behind it.
    busy, free = _start(art, max_concurrent_rpcs=2, workers=1), _start(art)
    entered, release = mp_util.hold_first_call(busy, "_handle_lookup")
    ch, lookup = _raw(busy.port)
    rows = [3, 1, 4, 1, 5]
    first = lookup.future(_req([("user", rows)]), timeout=30)
    assert entered.wait(20)
    with pytest.raises(grpc.RpcError) as e:  # queued; the client gives up before it runs
        lookup(_req([("user", rows)]), timeout=1.0)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert busy.stats()["in_flight"] == 2
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as e:  # two in: the next is shed at once
        lookup(_req([("user", rows)]), timeout=10)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_concurrent_rpcs" in e.value.details()
    # Health checks and Info neither count nor wait for the busy handler thread.
    assert _health_check(busy.port) == health_pb2.HealthCheckResponse.SERVING
    info = pb.InfoResponse.FromString(ch.unary_unary(codec.INFO_METHOD)(b"", timeout=5))
    assert info.version == art.version
    assert time.monotonic() - t0 < 5
    # A client whose shard has a replica gets its rows from the replica meanwhile.
    primary, replica = f"127.0.0.1:{busy.port}", f"127.0.0.1:{free.port}"
    client = client_lib.EmbeddingClient.from_artifact(str(art.path), [[primary, replica]])
    np.testing.assert_array_equal(client.lookup("user", rows), _expected(art, "user", rows))
    client.close()
    alone = client_lib.EmbeddingClient.from_artifact(str(art.path), [primary], deadline_s=5)
    with pytest.raises(client_lib.ServingError) as e:
        alone.lookup("user", rows)
    assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    release.set()
    np.testing.assert_array_equal(_parse(first.result())[1]["user"], _expected(art, "user", rows))
    # The call that timed out while queued leaves the count too (it never ran).
    mp_util.wait_for(lambda: busy.stats()["in_flight"] == 0, timeout_s=10)
    assert busy.stats()["by_code"] == {"OK": 1}  # shed calls never reach the handler
    raw = lookup(_req([("user", rows)]), timeout=10)
    np.testing.assert_array_equal(_parse(raw)[1]["user"], _expected(art, "user", rows))
    np.testing.assert_array_equal(alone.lookup("user", rows), _expected(art, "user", rows))
    alone.close()
    ch.close()
    busy.stop(0)
    free.stop(0)


def test_a_flood_beyond_max_concurrent_rpcs_sheds_cleanly_and_health_holds(arts):
    # 300 lookups, 60 in flight at a time, against 4 allowed on 2 threads. Some cancel
    # themselves (tiny deadlines) while queued. Every answer is OK with the right rows or
    # RESOURCE_EXHAUSTED; health says SERVING throughout; the count drains to 0.
    art = arts["a"]
    server = _start(art, max_concurrent_rpcs=4, workers=2)
    ch, lookup = _raw(server.port)
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, 64, 200) for _ in range(300)]
    codes = collections.Counter()
    health = []
    stop = threading.Event()

    def check_health():
        while not stop.is_set():
            try:
                health.append(_health_check(server.port))
            except grpc.RpcError as e:
                health.append(e.code())

    def one(i):
        timeout = 0.002 if i % 10 == 0 else 20  # some expire while queued
        try:
            raw = lookup(_req([("user", rows[i])]), timeout=timeout)
        except grpc.RpcError as e:
            return e.code()
        np.testing.assert_array_equal(_parse(raw)[1]["user"], _expected(art, "user", rows[i]))
        return grpc.StatusCode.OK

    watcher = threading.Thread(target=check_health)
    watcher.start()
    with futures.ThreadPoolExecutor(60) as pool:
        codes.update(pool.map(one, range(300)))
    stop.set()
    watcher.join(10)
    assert set(codes) <= {
        grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED
    }, codes
    assert codes[grpc.StatusCode.OK] > 0 and codes[grpc.StatusCode.RESOURCE_EXHAUSTED] > 0, codes
    assert health and set(health) == {health_pb2.HealthCheckResponse.SERVING}
    mp_util.wait_for(lambda: server.stats()["in_flight"] == 0, timeout_s=10)
    raw = lookup(_req([("user", rows[0])]), timeout=10)  # and it still serves
    np.testing.assert_array_equal(_parse(raw)[1]["user"], _expected(art, "user", rows[0]))
    ch.close()
    server.stop(0)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")
def test_tls_server_serves_tls_clients_only(arts, tmp_path):
    key, cert = mp_util.self_signed_cert(tmp_path)
    art = arts["a"]
    server = _start(art, tls_cert=str(cert), tls_key=str(key))
    try:
        client = client_lib.EmbeddingClient.from_artifact(
            str(art.path),
            [f"localhost:{server.port}"],
            deadline_s=10,
            root_certificates=cert.read_bytes(),
        )
        np.testing.assert_array_equal(client.lookup("user", [4, 2]), _expected(art, "user", [4, 2]))
        client.close()
        plain = client_lib.EmbeddingClient.from_artifact(
            str(art.path), [f"localhost:{server.port}"], deadline_s=2
        )
        with pytest.raises(client_lib.ServingError) as e:
            plain.lookup("user", [4])
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
        plain.close()
    finally:
        server.stop(0)


def test_echo_floors_answer_the_sizes_asked_for_and_refuse_garbage():
    server, port = echo_server.start_echo_server(workers=2)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            echo = channel.unary_unary(echo_server.ECHO_METHOD)
            req = echo_server.echo_request(request_bytes=100, response_bytes=3000)
            assert len(req) == 100 and echo(req, timeout=5) == bytes(3000)
            with pytest.raises(grpc.RpcError) as e:
                echo(b"short", timeout=5)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        server.stop(0)
    ports = queue.Queue()
    threading.Thread(target=echo_server.serve_tcp_forever, args=(ports,), daemon=True).start()
    address = f"127.0.0.1:{ports.get(timeout=10)}"
    tcp = echo_server.TcpEchoClient(address, request_bytes=70_000, response_bytes=200_000)
    for _ in range(3):  # the connection stays usable
        assert bytes(tcp.call()) == bytes(200_000)
    tcp.close()
    host, tcp_port = address.rsplit(":", 1)
    with socket.create_connection((host, int(tcp_port)), timeout=10) as raw:
        raw.sendall(struct.pack("<QQ", 1 << 62, 8))  # not an echo client: the server hangs up
        assert raw.recv(16) == b""


@pytest.mark.parametrize("launcher", ["serve_embeddings", "serve_ranker"])
def test_server_and_client_import_no_jax(launcher):
    # launch.serve_ranker too: its flags are checked (serving.ranker_config) before JAX loads.
    code = (
        "import sys\n"
        "import serving.embedding_server, serving.client, serving.echo_server\n"
        f"import serving.ranker_config, launch.{launcher}\n"
        "bad = sorted(m for m in sys.modules if m == 'jax' or m.startswith(('jax.', 'jaxlib', 'flax')))\n"
        "assert not bad, bad\n"
    )
    env = dict(os.environ, PYTHONPATH=mp_util.pythonpath(ROOT))
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--artifact={a}", "--shard=3", "--num_shards=2"], "shard must be in [0, 2), got 3"),
        (["--artifact={a}/nowhere"], "nowhere/manifest.json: missing"),
        (["--artifact={a}", "--host=256.0.0.1"], "could not bind 256.0.0.1:0"),
        (["--artifact={a}", "--num_shards=101"],
         "num_shards=101 is more than the 100 rows of its largest table ('user'): 1 of the "
         "shards would hold no row of any table; serve it with at most 100 shards"),
    ],
)
def test_launch_script_refuses_bad_start_in_one_line(arts, args, message):
    out = subprocess.run(
        [sys.executable, "-m", "launch.serve_embeddings", "--log_every_s=0"]
        + [a.format(a=arts["a"].path) for a in args],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=mp_util.pythonpath(ROOT)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1 and out.stdout == ""
    assert "serve_embeddings: cannot start: " in out.stderr and message in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.multiprocess
def test_launch_script_swaps_on_sighup_and_stops_on_sigterm(arts, tmp_path):
    a, b = arts["a"], arts["b"]
    current = tmp_path / "current"
    current.symlink_to(a.path)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "launch.serve_embeddings",
            f"--artifact={current}",
            "--port=0",
            "--workers=2",
            "--max_concurrent_rpcs=8",
            "--log_every_s=0",
            "--verify=full",
        ],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=mp_util.pythonpath(ROOT)),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        event = json.loads(proc.stdout.readline())
        assert event["event"] == "serving" and event["version"] == a.version
        ch, lookup = _raw(event["port"])
        assert _parse(lookup(_req([("user", [1])]), timeout=5))[0] == a.version
        tmp_link = tmp_path / "next"
        tmp_link.symlink_to(b.path)
        os.replace(tmp_link, current)  # atomic repoint, then tell the server
        proc.send_signal(signal.SIGHUP)
        assert json.loads(proc.stdout.readline()) == {"event": "swapped", "version": b.version}
        version, vals = _parse(lookup(_req([("user", [1, 2])]), timeout=5))
        assert version == b.version
        np.testing.assert_array_equal(vals["user"], _expected(b, "user", [1, 2]))
        # The old version is still servable to pinned callers during the window.
        assert _parse(lookup(_req([("user", [1])], a.version), timeout=5))[0] == a.version
        ch.close()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0
        assert json.loads(out.strip().splitlines()[-1])["stats"]["by_code"]["OK"] == 3
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.mark.parametrize("field, bad, message", [
    ("swap_window_s", float("inf"), "swap_window_s must be a finite number of seconds >= 0"),
    ("swap_window_s", float("nan"), "swap_window_s must be a finite number of seconds >= 0"),
    ("swap_window_s", -1.0, r"swap_window_s .* \(1 day\), got -1.0"),
    ("log_every_s", float("nan"), "log_every_s must be a finite number of seconds >= 0"),
    ("log_every_s", 1e10, "log_every_s must be a finite number of seconds >= 0"),
    ("workers", 0, "workers must be >= 1, got 0"),
    ("max_ids_per_request", 0, "max_ids_per_request must be >= 1, got 0"),
    ("max_message_bytes", 0, "max_message_bytes must be >= 1, got 0"),
    ("max_streams", -1, "max_streams must be >= 0"),
    ("max_concurrent_rpcs", 0, "max_concurrent_rpcs must be >= 1 or None"),
    ("num_shards", 0, "num_shards must be >= 1, got 0"),
    ("shard", 2, r"shard must be in \[0, 1\), got 2"),
    ("tls_cert", "cert.pem", "tls_cert and tls_key must be given together"),
])
def test_config_refuses_bad_fields_when_made(field, bad, message):
    """Checked before any load: inf swap windows killed the retirement timer (the old
    version was never retired), nan/negative ones acted as 0, a nan log period was
    taken silently."""
    with pytest.raises(ValueError, match=message):
        es.ServerConfig(artifact="unused", **{field: bad})
    es.ServerConfig(artifact="unused", log_every_s=0, swap_window_s=0)  # 0: off / at once


def test_a_table_with_fewer_rows_than_shards_is_a_warning_on_the_shards_it_leaves_empty(
        arts, caplog):
    """With more shards than a table has rows, some shards started holding none of its
    rows without a word."""
    art = arts["a"]  # user: 100 rows, pin: 37
    with caplog.at_level("WARNING", logger="serving"):
        empty, holding = _start(art, 0, 50), _start(art, 1, 50)  # pin rows [0, 0), [0, 1)
    try:
        assert [r.getMessage() for r in caplog.records] == [
            "shard 0/50 holds no rows of table 'pin' (37 rows over 50 shards); its lookups "
            "go to the other shards"]
        ch, lookup = _raw(empty.port)
        _, vals = _parse(lookup(_req([("user", [1, 0])]), timeout=10))
        np.testing.assert_array_equal(vals["user"], _expected(art, "user", [1, 0]))
        ch.close()
    finally:
        empty.stop(0).wait()
        holding.stop(0).wait()


def test_more_shards_than_the_largest_table_has_rows_is_refused_by_every_shard(arts):
    """101 shards of a 100-row table started, one of them holding no row at all."""
    art = arts["a"]
    for shard in (0, 100):  # one that holds rows, the one that would hold none
        with pytest.raises(ValueError, match=r"num_shards=101 is more than the 100 rows of its "
                                             r"largest table \('user'\): 1 of the shards "
                                             r"would hold no row of any table; serve it with "
                                             r"at most 100 shards$"):
            _start(art, shard, 101)
    server = _start(art, 0, 100)
    try:  # a swap to an artifact too small for the shard count keeps the old version
        small = _write_small(art.path.parent / "small")
        with pytest.raises(ValueError, match="num_shards=100 is more than the 5 rows"):
            server.swap(str(small.path))
        assert server.versions == [art.version]
    finally:
        server.stop(0).wait()


def _write_small(path):
    tables = {"user": np.ones((5, 4), np.float32)}
    artifact.write_artifact(str(path), tables=tables, vocabs={"user": np.arange(5)})
    return artifact.load_artifact(str(path))


def test_swap_checks_its_window_before_loading(arts):
    server = _start(arts["a"])
    try:
        with pytest.raises(ValueError, match="window_s must be a finite number of seconds"):
            server.swap("/nonexistent/artifact", window_s=float("inf"))  # not a load error
        assert server.versions == [arts["a"].version]
    finally:
        server.stop(0).wait()


def test_the_periodic_stats_line_is_json_with_latencies_to_the_microsecond(arts, caplog):
    """The shard's stats line was a Python dict repr with latencies like
    'lookup_p50_ms': 0.2081179999890992 (the ranker's, from serve_ranker, alike)."""
    art = arts["a"]
    server = es.serve(es.ServerConfig(artifact=str(art.path), log_every_s=0.05))
    channel, lookup = _raw(server.port)
    try:
        with caplog.at_level("INFO", logger="serving"):
            for _ in range(5):
                _parse(lookup(_req([("user", [1, 2, 3])]), timeout=10))
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                lines = [r.getMessage() for r in caplog.records
                         if r.getMessage().startswith("stats ")]
                if lines and json.loads(lines[-1][6:])["requests"] == 5:
                    break
                time.sleep(0.05)
        stats = json.loads(lines[-1][len("stats "):])
        exact = server.stats()
        assert stats["requests"] == 5 and stats["by_code"] == {"OK": 5}
        assert stats["version"] == art.version and stats["shard"] == 0
        for key in ("lookup_p50_ms", "lookup_p99_ms"):
            assert stats[key] == round(exact[key], 3) and stats[key] > 0
            assert len(repr(stats[key]).split(".")[1]) <= 3, lines[-1]
    finally:
        channel.close()
        server.stop(0).wait()


def test_latencies_are_null_until_a_lookup_is_answered(arts):
    """Before any lookup the stats said lookup_p50_ms 0.0, as if lookups took no time."""
    art = arts["a"]
    server = _start(art)
    channel, lookup = _raw(server.port)
    try:
        stats = server.stats()
        assert (stats["lookup_p50_ms"], stats["lookup_p99_ms"]) == (None, None)
        line = json.loads(es.grpc_util.stats_line(stats))
        assert (line["lookup_p50_ms"], line["lookup_p99_ms"]) == (None, None)
        with pytest.raises(grpc.RpcError):  # refused: counted, but no lookup latency
            lookup(_req([("nope", [1])]), timeout=10)
        assert server.stats()["lookup_p50_ms"] is None
        _parse(lookup(_req([("user", [1])]), timeout=10))
        stats = server.stats()
        assert 0 < stats["lookup_p50_ms"] == stats["lookup_p99_ms"]
    finally:
        channel.close()
        server.stop(0).wait()


def test_an_ipv6_host_is_bound_in_brackets(arts, caplog):
    """--host=::1 (or ::, every IPv6 interface) was bound as '::1:0', which gRPC cannot
    parse: 'could not bind ::1:0 (in use, or no such interface)'; once bound, the log
    said 'serving ... on ::1:P' (and the echo floor still could not bind ::1)."""
    if not mp_util.has_ipv6_loopback():
        pytest.skip("no IPv6 loopback here")
    art = arts["a"]
    with caplog.at_level("INFO", logger="serving"):
        server = _start(art, host="::1")
    assert f"shard 0/1 serving version {art.version} on [::1]:{server.port}" in [
        r.getMessage() for r in caplog.records]
    echo, echo_port = echo_server.start_echo_server(host="::1", workers=1)
    echo.stop(0)
    assert echo_port > 0
    # The bare-TCP echo floor's client split "[::1]:P" into the host "[::1]".
    ports = queue.Queue()
    threading.Thread(target=echo_server.serve_tcp_forever, args=(ports,),
                     kwargs={"host": "::1"}, daemon=True).start()
    tcp = echo_server.TcpEchoClient(f"[::1]:{ports.get(timeout=10)}", request_bytes=3,
                                    response_bytes=5)
    assert bytes(tcp.call()) == bytes(5)
    tcp.close()
    try:
        client = client_lib.EmbeddingClient.from_artifact(
            str(art.path), [f"[::1]:{server.port}"], deadline_s=10)
        np.testing.assert_array_equal(client.lookup("user", [4, 2]), _expected(art, "user", [4, 2]))
        client.close()
    finally:
        server.stop(0).wait()
