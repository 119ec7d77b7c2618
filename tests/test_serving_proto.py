"""The serving wire contract: committed generated code is fresh, codec round trips."""

import pathlib
import shutil

import numpy as np
import pytest

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
