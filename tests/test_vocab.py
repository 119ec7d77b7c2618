"""Tests for jax_recsys.data.vocab: exact row orders, OOV handling, save/load, and
hypothesis properties of the raw id <-> row remapping."""

import re

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jax_recsys.data.vocab import Vocab

int_ids = st.lists(st.integers(min_value=-(2**62), max_value=2**62), max_size=60)
str_ids = st.lists(st.text(alphabet="abcxyz:_é0123", min_size=1, max_size=6), max_size=60)


def test_build_orders_hand_computed():
    raw = [30, 10, 30, 20, 10, 30, 40]
    assert Vocab.build(raw).ids.tolist() == [10, 20, 30, 40]
    assert Vocab.build(raw, order="frequency").ids.tolist() == [30, 10, 20, 40]
    assert Vocab.build(raw, order="first").ids.tolist() == [30, 10, 20, 40]
    assert Vocab.build(raw, min_count=2).ids.tolist() == [10, 30]
    assert Vocab.build(raw, max_size=2, order="first").ids.tolist() == [30, 10]
    # Chunks (a generator) give the same vocabulary as the concatenation.
    chunks = (np.array(raw[i:i + 3]) for i in range(0, len(raw), 3))
    assert Vocab.build(chunks, order="first") == Vocab.build(raw, order="first")
    # Empty input is an empty vocabulary (np.asarray([]) is float64, not bad ids);
    # a negative max_size is an error, not "all but the last" by slicing.
    assert Vocab.build([]).ids.tolist() == [] and len(Vocab.build([])) == 0
    assert Vocab.build(raw, max_size=0).ids.tolist() == []
    with pytest.raises(ValueError, match="max_size must be None or an int >= 0, got -1"):
        Vocab.build(raw, max_size=-1)


def test_lookup_unknown_and_oov():
    v = Vocab.build(["b", "a", "c"])
    assert v.ids.tolist() == ["a", "b", "c"]
    np.testing.assert_array_equal(v.lookup([["c", "zz"], ["a", "b"]]), [[2, -1], [0, 1]])
    assert v.lookup(np.array(["zz"]), unknown=-2).tolist() == [-2]
    o = Vocab.build(["b", "a", "c"], reserved_oov=True)
    assert (len(o), o.size, o.oov_row) == (3, 4, 3)
    assert o.lookup(["zz", "a"]).tolist() == [3, 0]
    assert v.raw(np.array([2, 0])).tolist() == ["c", "a"]
    with pytest.raises(ValueError, match="out of range"):
        v.raw([3])


def test_mixed_kinds():
    v = Vocab.build(np.array([12, 7, 3]))
    assert v.lookup(np.array(["7", "12", "x", "99"])).tolist() == [1, 2, -1, -1]
    s = Vocab.build(np.array(["12", "7"]))
    assert s.lookup(np.array([7, 12, 5])).tolist() == [1, 0, -1]
    b = Vocab.build(np.array([b"q", b"p"]))
    assert b.ids.tolist() == ["p", "q"] and b.lookup(["q"]).tolist() == [1]


def test_uint64_ids_beyond_int64_do_not_wrap_onto_negative_ids():
    big = np.array([2**64 - 1, 5], np.uint64)  # 2**64 - 1 is -1 once cast to int64
    for v in (Vocab([-1, 5]), Vocab([-1, 5, 10**15])):  # dense and searchsorted lookups
        assert v.lookup(big).tolist() == [-1, 1]
        assert v.lookup(big, unknown=-2).tolist() == [-2, 1]
    s = Vocab(["-1", "18446744073709551615", "5"])
    assert s.lookup(big).tolist() == [1, 2]
    assert s.lookup(np.array([True])).tolist() == [-1]  # bools are 0/1, not "True"


def test_load_names_the_file_of_a_bad_vocabulary(tmp_path):
    for name, ids, message in (("dup", np.array([3, 1, 3]), "duplicate raw id 3"),
                               ("big", np.array([2**64 - 1], np.uint64), "above int64 range")):
        np.save(tmp_path / f"{name}.npy", ids)
        with pytest.raises(ValueError, match=f"^{re.escape(str(tmp_path / name))}.npy: .*{message}"):
            Vocab.load(tmp_path / f"{name}.npy")


def test_unsorted_vocab_and_duplicates():
    v = Vocab(np.array([5, 1, 9]))
    assert v.lookup([9, 5, 1, 2]).tolist() == [2, 0, 1, -1]
    with pytest.raises(ValueError, match="duplicate raw id 5"):
        Vocab(np.array([5, 1, 5]))
    with pytest.raises(ValueError, match="order"):
        Vocab.build([1], order="random")


def test_save_load_roundtrip(tmp_path):
    for ids in (np.array([3, 1, 2]), np.array(["pin:é", "user:1"])):
        v = Vocab(ids)
        path = v.save(tmp_path / f"v_{ids.dtype.kind}")
        assert path.suffix == ".npy"
        w = Vocab.load(path)
        assert w == v and w.dtype.kind == ids.dtype.kind
        assert np.load(path, allow_pickle=False).dtype != object
    (tmp_path / "bad.npy").write_bytes(b"not npy")
    with pytest.raises(ValueError, match="bad.npy"):
        Vocab.load(tmp_path / "bad.npy")


@settings(max_examples=60, deadline=None)
@given(raw=st.one_of(int_ids, str_ids), min_count=st.integers(1, 3),
       order=st.sampled_from(["sorted", "frequency", "first"]))
def test_property_remap_roundtrip(raw, min_count, order):
    arr = np.array(raw, dtype=np.int64 if raw and isinstance(raw[0], int) else np.str_)
    if not raw:
        arr = np.zeros(0, np.int64)
    v = Vocab.build(arr, min_count=min_count, order=order)
    rows = v.lookup(arr)
    counts = {x: raw.count(x) for x in set(raw)}
    kept = np.array([counts[x] >= min_count for x in raw], dtype=bool)
    # Known ids: rows in range and raw(rows) gives the id back; the rest are -1.
    assert ((rows >= 0) == kept).all()
    np.testing.assert_array_equal(v.raw(rows[kept]), arr[kept])
    assert len(v) == sum(1 for c in counts.values() if c >= min_count)
    # Every row maps back to itself.
    np.testing.assert_array_equal(v.lookup(v.ids), np.arange(len(v)))


@settings(max_examples=30, deadline=None)
@given(raw=st.one_of(int_ids, str_ids))
def test_property_save_load(raw, tmp_path_factory):
    arr = np.array(raw) if raw else np.zeros(0, np.int64)
    v = Vocab.build(arr, order="first")
    path = v.save(tmp_path_factory.mktemp("v") / "v.npy")
    w = Vocab.load(path)
    assert w == v
    np.testing.assert_array_equal(w.lookup(arr), v.lookup(arr))


@pytest.mark.slow
def test_build_and_lookup_2m_zipf_ids():
    # Speed is measured by launch.bench_data (vocab_build line), not asserted here.
    rng = np.random.default_rng(0)
    raw = rng.zipf(1.2, size=2_000_000).astype(np.int64)
    v = Vocab.build(raw)
    rows = v.lookup(raw)
    assert (rows >= 0).all()
    uniq = np.unique(raw)
    assert len(v) == uniq.size
    np.testing.assert_array_equal(np.sort(v.ids), uniq)
    np.testing.assert_array_equal(v.ids[rows], raw)
