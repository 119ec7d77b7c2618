"""The serving wire contract: committed generated code is fresh, codec round trips."""

import pathlib
import shutil

import numpy as np
import pytest

from jax_recsys.quant import rowwise
from serving import codec
from serving.protos import embedding_pb2 as pb

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROTO = "serving/protos/embedding.proto"


def test_committed_generated_code_matches_proto(tmp_path):
    protoc = pytest.importorskip("grpc_tools.protoc")
    (tmp_path / "serving" / "protos").mkdir(parents=True)
    shutil.copy(ROOT / PROTO, tmp_path / PROTO)
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{tmp_path}",
            f"--python_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            str(tmp_path / PROTO),
        ]
    )
    assert rc == 0
    for name in ("embedding_pb2.py", "embedding_pb2_grpc.py"):
        fresh = (tmp_path / "serving" / "protos" / name).read_text()
        committed = (ROOT / "serving" / "protos" / name).read_text()
        assert fresh == committed, (
            f"serving/protos/{name} is stale; regenerate it (command in {PROTO})"
        )


def test_lookup_messages_round_trip_raw_bytes():
    ids = np.array([5, -1, 2**40, 0], np.int64)
    req = pb.LookupRequest(expected_version="abc", request_id="r1")
    req.tables.add(table="user", ids=codec.encode_ids(ids))
    got = pb.LookupRequest.FromString(req.SerializeToString())
    assert got.expected_version == "abc" and got.tables[0].table == "user"
    np.testing.assert_array_equal(codec.decode_ids(got.tables[0].ids), ids)
    # Little-endian int64 on the wire, whatever the host.
    assert got.tables[0].ids[:8] == (5).to_bytes(8, "little")

    vals = np.arange(6, dtype=np.float32).reshape(3, 2) / 7
    resp = pb.LookupResponse(version="v1")
    resp.tables.add(table="pin", dim=2, values=codec.encode_values(vals))
    got = pb.LookupResponse.FromString(resp.SerializeToString())
    np.testing.assert_array_equal(codec.decode_values(got.tables[0].values, n=3, dim=2), vals)


def test_rank_messages_exist_for_the_ranker():
    req = pb.RankRequest(
        user_row=3, candidate_ids=codec.encode_ids(np.arange(4)), expected_version="v"
    )
    req.context["hour"] = np.float32([1.5]).tobytes()
    got = pb.RankRequest.FromString(req.SerializeToString())
    assert got.WhichOneof("user") == "user_row" and got.user_row == 3
    assert np.frombuffer(got.context["hour"], "<f4")[0] == 1.5
    resp = pb.RankResponse(ctr=np.float32([0.25]).tobytes(), version="v")
    assert np.frombuffer(pb.RankResponse.FromString(resp.SerializeToString()).ctr, "<f4")[0] == 0.25


def test_codec_rejects_bad_lengths_and_shapes():
    with pytest.raises(codec.CodecError, match="not a multiple of 8"):
        codec.decode_ids(b"\x00" * 12, what="ids of table 'user'")
    with pytest.raises(codec.CodecError, match="expected 24"):
        codec.decode_values(b"\x00" * 20, n=3, dim=2)
    with pytest.raises(codec.CodecError, match="1-D"):
        codec.encode_ids(np.zeros((2, 2), np.int64))
    with pytest.raises(codec.CodecError, match="integers"):
        codec.encode_ids(np.zeros(2, np.float32))


def test_quantized_rows_decode_to_views_and_bad_lengths_are_refused():
    q = _quantized(4, 3, 5)
    raw = codec.encode_lookup_response([("pin", 5, q)], version="v")
    (_, dim, got), = codec.decode_lookup_response(raw)[2]
    codes, scale, bias = codec.decode_quantized(got, n=3, dim=dim, what="pin")
    assert codes.shape == (3, 3) and codes.dtype == np.uint8
    assert np.array_equal(codes, q.codes) and np.array_equal(scale, q.scale)
    assert np.array_equal(bias, q.bias) and bias.dtype == np.float32
    with pytest.raises(codec.CodecError, match="expected 12 .*3 rows \\* 4 bytes"):
        codec.decode_quantized(got, n=3, dim=8, what="pin")
    with pytest.raises(codec.CodecError, match="bytes of scale, expected 8"):
        codec.decode_quantized(got._replace(codes=got.codes[:6]), n=2, dim=5)
    with pytest.raises(codec.CodecError, match="3 bits"):
        codec.decode_quantized(got._replace(bits=3), n=3, dim=5)
    assert rowwise.packed_dim(5, 4) == 3 and rowwise.packed_dim(5, 8) == 5


def test_shard_ranges_are_contiguous_and_cover_the_table():
    assert codec.shard_range(10, 0, 3) == (0, 3)
    assert codec.shard_range(10, 1, 3) == (3, 6)
    assert codec.shard_range(10, 2, 3) == (6, 10)
    assert codec.shard_range(2, 2, 4) == (1, 1)
    assert codec.shard_range(2, 3, 4) == (1, 2)
    ranges = codec.table_ranges({"a": 7, "b": 1}, 4)
    assert [r["a"] for r in ranges] == [(0, 1), (1, 3), (3, 5), (5, 7)]
    assert [r["b"] for r in ranges] == [(0, 0), (0, 0), (0, 0), (0, 1)]
    with pytest.raises(ValueError, match="shard must be in"):
        codec.shard_range(10, 3, 3)


# ---- the hand-written lookup wire format (serving.codec) equals the generated code ----


def _pb_response(tables, version, request_id=""):
    resp = pb.LookupResponse(version=version, request_id=request_id)
    for name, dim, vals in tables:
        if isinstance(vals, codec.QuantizedRows):
            resp.tables.add(
                table=name,
                dim=dim,
                bits=vals.bits,
                codes=np.asarray(vals.codes, np.uint8).tobytes(),
                scale=np.asarray(vals.scale, "<f4").tobytes(),
                bias=np.asarray(vals.bias, "<f4").tobytes(),
            )
        else:
            resp.tables.add(table=name, dim=dim, values=np.asarray(vals, "<f4").tobytes())
    return resp


def _as_tuple(version, request_id, tables):
    def rows(v):
        if isinstance(v, codec.QuantizedRows):
            return (v.bits, bytes(v.codes), bytes(v.scale), bytes(v.bias))
        return bytes(v)

    return version, request_id, [(t, d, rows(v)) for t, d, v in tables]


def _pb_tuple(resp):
    def rows(t):
        return (t.bits, t.codes, t.scale, t.bias) if t.bits else t.values

    return resp.version, resp.request_id, [(t.table, t.dim, rows(t)) for t in resp.tables]


def _quantized(bits, n, dim, seed=0):
    rng = np.random.default_rng(seed)
    return codec.QuantizedRows(
        bits,
        rng.integers(0, 256, (n, rowwise.packed_dim(dim, bits)), dtype=np.uint8),
        rng.normal(size=n).astype(np.float32),
        rng.normal(size=n).astype(np.float32),
    )


RESPONSE_CASES = [
    ([("pin", 4, np.arange(12, dtype=np.float32).reshape(3, 4) / 7)], "v1", "r1"),
    ([("user", 2, np.ones((1, 2))), ("pin", 3, np.zeros((0, 3))), ("ad", 300, np.full((2, 300), -1.5))], "abc", ""),
    ([("t\u00e9", 1, np.array([[np.inf]]))], "", "req-\u00fc"),
    ([], "only-a-version", ""),
    # quantized rows (a request marked `quantized`), beside float32 ones
    ([("pin", 5, _quantized(4, 3, 5)), ("ad", 2, np.ones((3, 2)))], "v2", "r"),
    ([("user", 3, _quantized(8, 1, 3)), ("pin", 4, _quantized(4, 0, 4))], "v3", ""),
]


@pytest.mark.parametrize("tables,version,request_id", RESPONSE_CASES)
def test_hand_written_response_is_byte_identical_to_generated(tables, version, request_id):
    raw = codec.encode_lookup_response(tables, version=version, request_id=request_id)
    want = _pb_response(tables, version, request_id)
    assert raw == want.SerializeToString()
    got = codec.decode_lookup_response(want.SerializeToString())
    assert _as_tuple(*got) == _pb_tuple(want)
    # The rows come back without a copy: views into the received bytes.
    views = [
        v
        for _, _, rows in got[2]
        for v in (rows[1:] if isinstance(rows, codec.QuantizedRows) else (rows,))
    ]
    assert all(isinstance(v, memoryview) and v.obj is views[0].obj for v in views)


def test_hand_written_request_is_byte_identical_to_generated():
    tables = [("user", np.array([5, -1, 2**40])), ("pin", np.zeros(0, np.int64)), ("x", [3])]
    raw = codec.encode_lookup_request(tables, expected_version="v9", request_id="abc")
    want = pb.LookupRequest(expected_version="v9", request_id="abc")
    for name, rows in tables:
        want.tables.add(table=name, ids=np.asarray(rows, "<i8").tobytes())
    assert raw == want.SerializeToString()
    want.quantized = True
    raw = codec.encode_lookup_request(
        tables, expected_version="v9", request_id="abc", quantized=True
    )
    assert raw == want.SerializeToString()
    assert codec.encode_lookup_request([("u", [1])]) == _pb_request_bytes([("u", [1])])


def _pb_request_bytes(tables):
    req = pb.LookupRequest()
    for name, rows in tables:
        req.tables.add(table=name, ids=np.asarray(rows, "<i8").tobytes())
    return req.SerializeToString()


def test_decoder_skips_unknown_fields_and_wrong_wire_types_like_generated_code():
    base = _pb_response([("pin", 2, [[1.0, 2.0]])], "v1", "r").SerializeToString()
    extras = [
        b"\x48\x07",  # field 9 varint
        b"\x52\x03abc",  # field 10 bytes
        b"\x59" + bytes(8),  # field 11 fixed64
        b"\x65" + bytes(4),  # field 12 fixed32
        b"\x10\x05",  # field 2 (version) as a varint: not a string, skipped
    ]
    for extra in extras:
        for raw in (base + extra, extra + base):
            want = pb.LookupResponse.FromString(raw)
            assert _as_tuple(*codec.decode_lookup_response(raw)) == _pb_tuple(want)
    # The last value of a repeated scalar field wins, as in the generated code.
    raw = base + b"\x12\x02v2"
    assert codec.decode_lookup_response(raw)[0] == pb.LookupResponse.FromString(raw).version == "v2"


def test_decoder_agrees_with_generated_code_on_corrupted_messages():
    rng = np.random.default_rng(0)
    base = _pb_response(
        [
            ("user", 3, rng.normal(size=(4, 3))),
            ("pin", 2, rng.normal(size=(2, 2))),
            ("ad", 3, _quantized(4, 2, 3)),
        ],
        "ver",
        "id",
    ).SerializeToString()
    both_ok = only_pb_ok = 0
    for i in range(3000):
        raw = bytearray(base)
        if i % 3 == 0:
            raw = raw[: rng.integers(0, len(raw))]  # truncated
        else:
            for _ in range(rng.integers(1, 4)):  # a few random bytes
                raw[rng.integers(0, len(raw))] = rng.integers(0, 256)
        raw = bytes(raw)
        try:
            want = _pb_tuple(pb.LookupResponse.FromString(raw))
        except Exception:  # noqa: BLE001 -- any parse failure of the generated code
            want = None
        try:
            got = _as_tuple(*codec.decode_lookup_response(raw))
        except codec.CodecError:
            got = None
        if want is None:
            assert got is None, f"accepted what the generated code refuses: {raw!r}"
        elif got is None:
            only_pb_ok += 1  # e.g. a group wire type, which the decoder refuses
        else:
            assert got == want
            both_ok += 1
    assert both_ok > 300 and only_pb_ok < 0.01 * both_ok


def test_decoder_refuses_truncated_and_malformed_messages():
    raw = _pb_response([("pin", 2, [[1.0, 2.0]])], "v1").SerializeToString()
    with pytest.raises(codec.CodecError, match="past the end|truncated"):
        codec.decode_lookup_response(raw[:-3])
    with pytest.raises(codec.CodecError, match="field number 0"):
        codec.decode_lookup_response(b"\x02\x00")
    with pytest.raises(codec.CodecError, match="not UTF-8"):
        codec.decode_lookup_response(b"\x12\x02\xff\xfe")
    with pytest.raises(codec.CodecError, match="varint"):
        codec.decode_lookup_response(b"\x08" + b"\xff" * 11)


def test_deduplication_rule():
    assert not codec.worth_deduplicating(512, 0)
    assert not codec.worth_deduplicating(512, 127)
    assert codec.worth_deduplicating(512, 128)
    assert codec.worth_deduplicating(2, 1)
