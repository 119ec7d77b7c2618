"""Ranker-side row cache: exact rows, hits, collisions, uncached tables, threads.

The fake fetcher's tests check the cache's bookkeeping on float32 rows; the ones
on real shard servers (loopback, ports bound at run time) check the codes cache
of the quantized wire against uncached lookups, bit for bit.
"""

import threading

import numpy as np
import pytest

from jax_recsys.quant import artifact, rowwise
from serving import client as client_lib, embedding_server as es, row_cache


class _Fetcher:
    """Rows whose values encode (table, row): row r of table t is [r, r + 0.5, ...] + 1000 k."""

    def __init__(self, dims):
        self.dims = dims
        self.asked = []  # (table, rows) per call
        self.closed = False

    def value(self, table, rows):
        k = sorted(self.dims).index(table)
        d = self.dims[table]
        return (np.asarray(rows, np.float32)[:, None] + 0.5 * np.arange(d, dtype=np.float32)
                + 1000 * k)

    def lookup_many(self, rows, *, deadline_s=None):
        self.asked.append({t: np.asarray(r).tolist() for t, r in rows.items()})
        return {t: self.value(t, r) for t, r in rows.items()}

    def close(self):
        self.closed = True


def _cache(capacity=8, tables=None):
    dims = {"pin": 3, "adv": 2, "user": 4}
    fetcher = _Fetcher(dims)
    rows = {"pin": 1000, "adv": 5, "user": 10**6}
    return row_cache.RowCache(fetcher, table_rows=rows, dims=dims, capacity=capacity,
                              tables=tables), fetcher


def test_misses_are_fetched_once_then_answered_from_the_cache_exactly():
    cache, f = _cache()
    rows = {"pin": np.array([7, 3, 7, 999]), "adv": np.array([4, 0, 4])}
    got, contacted = cache.fetch(rows)
    assert contacted and f.asked == [{"pin": [7, 3, 7, 999], "adv": [4, 0, 4]}]
    for t, r in rows.items():
        np.testing.assert_array_equal(got[t], f.value(t, r))
    assert (cache.hits, cache.misses) == (0, 7)
    got, contacted = cache.fetch(rows)  # every row held now
    assert not contacted and len(f.asked) == 1
    for t, r in rows.items():
        np.testing.assert_array_equal(got[t], f.value(t, r))
        assert got[t].flags.writeable
    assert (cache.hits, cache.misses) == (7, 7)
    # A mix: only the new rows go out.
    got = cache.lookup_many({"pin": np.array([3, 8]), "adv": np.array([1])})
    assert f.asked[-1] == {"pin": [8], "adv": [1]}
    np.testing.assert_array_equal(got["pin"], f.value("pin", [3, 8]))
    np.testing.assert_array_equal(got["adv"], f.value("adv", [1]))


def test_a_small_table_is_cached_whole_and_a_large_one_in_hashed_slots():
    cache, f = _cache(capacity=8)
    assert cache._caches["adv"].slots == 5  # 5 rows <= 8: one slot per row
    assert cache._caches["pin"].slots == 8 and cache._caches["user"].slots == 8
    assert cache.nbytes == (5 * 8 + 5 * 2 * 4) + (8 * 8 + 8 * 3 * 4) + (8 * 8 + 8 * 4 * 4)
    # 100 distinct pins through 8 slots: always exact, whatever got evicted.
    rng = np.random.default_rng(0)
    for _ in range(20):
        r = rng.integers(0, 1000, 12)
        np.testing.assert_array_equal(cache.lookup_many({"pin": r})["pin"], f.value("pin", r))
    assert cache.hits + cache.misses == 240 and cache.misses < 240
    slots = cache._caches["pin"].slot(np.arange(1000))
    assert slots.min() >= 0 and slots.max() < 8 and len(np.unique(slots)) == 8


def test_uncached_tables_always_go_to_the_fetcher_and_close_closes_it():
    cache, f = _cache(tables=["pin"])
    for _ in range(2):
        got, contacted = cache.fetch({"pin": np.array([1]), "user": np.array([5, 6])})
        assert contacted
        np.testing.assert_array_equal(got["user"], f.value("user", [5, 6]))
    assert f.asked == [{"pin": [1], "user": [5, 6]}, {"user": [5, 6]}]
    cache.close()
    assert f.closed


def test_bad_rows_and_capacity_are_refused():
    cache, f = _cache()
    for bad in ([-1], [5]):
        with pytest.raises(ValueError, match="outside the table"):
            cache.lookup_many({"adv": np.array(bad)})
    assert f.asked == []
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        row_cache.RowCache(f, table_rows={"a": 3}, dims={"a": 1}, capacity=0)


def test_concurrent_callers_get_exact_rows():
    cache, f = _cache(capacity=16)
    errors = []

    def work(seed):
        rng = np.random.default_rng(seed)
        try:
            for _ in range(200):
                r = rng.integers(0, 1000, 20)
                u = rng.integers(0, 10**6, 3)
                got = cache.lookup_many({"pin": r, "user": u})
                np.testing.assert_array_equal(got["pin"], f.value("pin", r))
                np.testing.assert_array_equal(got["user"], f.value("user", u))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert cache.hits + cache.misses == 4 * 200 * 23


def test_capacity_rounds_down_to_a_power_of_two_and_a_table_that_fits_is_whole():
    dims = {"t": 2}
    f = _Fetcher(dims)
    assert row_cache.RowCache(f, table_rows={"t": 1000}, dims=dims,
                              capacity=600)._caches["t"].slots == 512
    whole = row_cache.RowCache(f, table_rows={"t": 1000}, dims=dims, capacity=1000)
    assert whole._caches["t"].slots == 1000 and whole._caches["t"].shift is None


def test_rows_that_are_not_1d_integers_are_refused():
    cache, f = _cache()
    for bad in (np.array([1.7, 2.2]), np.array([True, False]), np.array([[1, 2]]),
                np.array(3)):
        with pytest.raises(ValueError, match="1-D integer array"):
            cache.lookup_many({"pin": bad})
    np.testing.assert_array_equal(cache.lookup_many({"pin": np.array([], np.int32)})["pin"],
                                  np.zeros((0, 3), np.float32))
    got = cache.lookup_many({"pin": np.array([5, 9], np.uint32)})["pin"]
    np.testing.assert_array_equal(got, f.value("pin", [5, 9]))


def test_a_failed_fetch_counts_nothing_and_caches_nothing():
    cache, f = _cache()
    cache.lookup_many({"pin": np.array([1, 2])})
    real = f.lookup_many
    f.lookup_many = lambda rows, deadline_s=None: (_ for _ in ()).throw(RuntimeError("down"))
    with pytest.raises(RuntimeError, match="down"):
        cache.lookup_many({"pin": np.array([1, 3])})
    assert (cache.hits, cache.misses) == (0, 2)
    f.lookup_many = real
    cache.lookup_many({"pin": np.array([3])})
    assert f.asked[-1] == {"pin": [3]} and (cache.hits, cache.misses) == (0, 3)


def test_misses_sharing_a_slot_leave_each_slot_with_its_own_rows_values():
    cache, f = _cache(capacity=4)
    rng = np.random.default_rng(1)
    for _ in range(30):
        r = rng.integers(0, 1000, 40)  # 40 rows into 4 slots: many share one per call
        np.testing.assert_array_equal(cache.lookup_many({"pin": r})["pin"], f.value("pin", r))
        c = cache._caches["pin"]
        held = c.tags >= 0
        np.testing.assert_array_equal(c.held[0][held], f.value("pin", c.tags[held]))
        np.testing.assert_array_equal(c.slot(c.tags[held]), np.flatnonzero(held))


# ---- on real shards: the quantized wire's codes, cached ----

# Odd D for "pin" (an INT4 row's last byte holds one value); "f32" is stored float32.
QDIMS = {"pin": 7, "adv": 4, "f32": 3}
QROWS = {"pin": 1000, "adv": 5, "f32": 20}


@pytest.fixture(scope="module", params=[4, 8], ids=["int4", "int8"])
def served(request, tmp_path_factory):
    """An INT4 or INT8 artifact (and one float32 table) on 2 shards: (artifact, addresses)."""
    rng = np.random.default_rng(request.param)
    tables = {t: rng.normal(size=(QROWS[t], d)).astype(np.float32) for t, d in QDIMS.items()}
    tables["f32"] = rowwise.quantize_rows(tables["f32"], bits=32)
    path = str(tmp_path_factory.mktemp(f"cache_art{request.param}") / "art")
    artifact.write_artifact(path, tables=tables, bits=request.param,
                            vocabs={t: np.arange(n) for t, n in QROWS.items()})
    art = artifact.load_artifact(path)
    assert {t: q.bits for t, q in art.tables.items()} == {
        "pin": request.param, "adv": request.param, "f32": 32}
    servers = [
        es.serve(es.ServerConfig(artifact=path, shard=i, num_shards=2, log_every_s=0, workers=2))
        for i in range(2)
    ]
    yield art, [f"127.0.0.1:{s.port}" for s in servers]
    for s in servers:
        s.stop(0)


def _real(served, *, wire="quantized", capacity=8, bits=None):
    """(a RowCache on its own client, an uncached client) of ``served``."""
    art, addrs = served
    clients = [client_lib.EmbeddingClient.from_artifact(str(art.path), addrs, deadline_s=10,
                                                        wire=wire) for _ in range(2)]
    bits = {t: q.bits for t, q in art.tables.items()} if bits is None else bits
    cache = row_cache.RowCache(clients[0], table_rows=QROWS, dims=QDIMS, capacity=capacity,
                               bits=bits)
    return cache, clients[1]


def _same_bits(got, want):
    assert got.dtype == want.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


def test_the_client_returns_the_codes_as_sent_when_asked_not_to_dequantize(served):
    art, addrs = served
    for wire in client_lib.WIRE_FORMATS:
        client = client_lib.EmbeddingClient.from_artifact(str(art.path), addrs, deadline_s=10,
                                                          wire=wire)
        rows = {
            "pin": np.array([999, 3, 3, 999, 3, 3, 500, 3]),  # both shards, 62% repeats
            "adv": np.array([4, 4, 4, 4]),  # one shard, repeats
            "f32": np.array([19, 0]),  # stored float32: sent as float32
        }
        dense = client.lookup_many(rows)
        got = client.lookup_many(rows, dequantize=False)
        for t, r in rows.items():
            q = art.tables[t]
            if wire == "float32" or q.bits == 32:
                _same_bits(got[t], dense[t])
                continue
            assert isinstance(got[t], rowwise.QuantizedTable)
            assert (got[t].bits, got[t].dim) == (q.bits, q.dim)
            np.testing.assert_array_equal(got[t].codes, q.codes[r])
            assert got[t].scale.dtype == got[t].bias.dtype == np.float32
            np.testing.assert_array_equal(got[t].scale, q.scale[r].astype(np.float32))
            np.testing.assert_array_equal(got[t].bias, q.bias[r].astype(np.float32))
            _same_bits(rowwise.dequantize_rows(got[t]), dense[t])
        client.close()


def test_codes_cache_rows_are_bit_identical_to_uncached_lookups(served):
    art, _ = served
    cache, plain = _real(served)
    bits = art.tables["pin"].bits
    pin, adv, f32 = cache._caches["pin"], cache._caches["adv"], cache._caches["f32"]
    assert pin.held[0].dtype == np.uint8 and pin.held[0].shape == (8, rowwise.packed_dim(7, bits))
    assert adv.held[0].shape == (5, rowwise.packed_dim(4, bits))
    assert f32.held[0].dtype == np.float32 and len(f32.held) == 1  # float32 rows as sent
    rng = np.random.default_rng(7)
    for k in range(25):
        # Repeats (a quarter or more: the client sends them once), hits and misses mixed,
        # many rows per slot of "pin" and "f32" (8 slots each).
        rows = {"pin": rng.integers(0, 1000, 30), "adv": rng.integers(0, 5, 6),
                "f32": rng.integers(0, 20, 10)}
        rows["pin"][:10] = rows["pin"][10:20]
        if k % 3 == 2:  # rows that were cached a moment ago, and new ones
            rows["pin"] = np.concatenate([pin.tags[pin.tags >= 0][:3], [rng.integers(1000)]])
        hits = cache.hits
        got, _ = cache.fetch(rows)
        want = plain.lookup_many(rows)
        for t in rows:
            _same_bits(got[t], want[t])
            _same_bits(got[t], art.lookup(t, rows[t]))
        if k % 3 == 2:
            assert cache.hits - hits >= 3
        # Each slot holds one row's codes, scale and bias, of the row its tag names.
        for t in ("pin", "adv"):
            c, q = cache._caches[t], art.tables[t]
            h = c.tags >= 0
            np.testing.assert_array_equal(c.slot(c.tags[h]), np.flatnonzero(h))
            np.testing.assert_array_equal(c.held[0][h], q.codes[c.tags[h]])
            np.testing.assert_array_equal(c.held[1][h], q.scale[c.tags[h]].astype(np.float32))
            np.testing.assert_array_equal(c.held[2][h], q.bias[c.tags[h]].astype(np.float32))
    assert adv.tags.tolist() == [0, 1, 2, 3, 4]  # cached whole
    assert cache.hits > 0 and cache.misses > 0
    # Every row held: no round trip, and still the same bits.
    rows = {"adv": np.array([3, 0, 3]), "pin": pin.tags[pin.tags >= 0]}
    got, contacted = cache.fetch(rows)
    assert not contacted
    for t in rows:
        _same_bits(got[t], art.lookup(t, rows[t]))
    got, contacted = cache.fetch({"pin": np.array([], np.int64)})  # no rows: [0, D]
    assert not contacted
    _same_bits(got["pin"], np.zeros((0, 7), np.float32))
    cache.close()
    plain.close()


def test_codes_cache_nbytes_follows_the_formula(served):
    art, _ = served
    bits = art.tables["pin"].bits
    cache, plain = _real(served)
    # Per slot: 8 B tag + codes (ceil(D/2) B for INT4, D for INT8) + float32 scale and bias;
    # pin: 8 hashed slots, adv: 5 (whole), f32: 8 slots of float32 rows.
    per_pin, per_adv = (8 + 4 + 8, 8 + 2 + 8) if bits == 4 else (8 + 7 + 8, 8 + 4 + 8)
    assert cache.nbytes == 8 * per_pin + 5 * per_adv + 8 * (8 + 3 * 4)
    for c in cache._caches.values():  # allocated up front
        assert c.tags.size == c.slots and all(a.shape[0] == c.slots for a in c.held)
    cache.close()
    plain.close()
    # The float32 wire, or no bits given: float32 rows, (4 * D + 8) B per slot.
    for kw in ({"wire": "float32"}, {"bits": {}}):
        cache, plain = _real(served, **kw)
        assert cache.nbytes == 8 * (8 + 7 * 4) + 5 * (8 + 4 * 4) + 8 * (8 + 3 * 4)
        cache.close()
        plain.close()


@pytest.mark.parametrize("kw", [{"wire": "float32"}, {"bits": {}}], ids=["f32_wire", "no_bits"])
def test_float32_rows_cache_is_exact_on_either_wire(served, kw):
    art, _ = served
    cache, plain = _real(served, **kw)
    assert all(c.held[0].dtype == np.float32 for c in cache._caches.values())
    rng = np.random.default_rng(3)
    for _ in range(10):
        rows = {"pin": rng.integers(0, 1000, 20), "adv": rng.integers(0, 5, 4)}
        got, _ = cache.fetch(rows)
        for t in rows:
            _same_bits(got[t], plain.lookup_many(rows)[t])
            _same_bits(got[t], art.lookup(t, rows[t]))
    assert cache.hits > 0
    cache.close()
    plain.close()


def test_shards_sending_other_bits_or_dim_than_the_cache_holds_is_an_error(served):
    art, addrs = served
    bits = art.tables["pin"].bits
    other = 8 if bits == 4 else 4
    for wrong in ({"pin": other, "adv": bits, "f32": 32}, {"pin": bits, "adv": bits, "f32": 4}):
        cache, plain = _real(served, bits=wrong)
        for rows in ({"pin": np.array([1, 2])}, {"f32": np.array([1, 2])}):
            t = next(iter(rows))
            if wrong[t] == art.tables[t].bits:
                continue
            with pytest.raises(ValueError, match=f"table '{t}': the shards sent"):
                cache.fetch(rows)
            assert (cache._caches[t].tags == -1).all()  # nothing written
        assert (cache.hits, cache.misses) == (0, 0)
        cache.close()
        plain.close()
    # The same bits, another dim.
    client = client_lib.EmbeddingClient.from_artifact(str(art.path), addrs, deadline_s=10,
                                                      wire="quantized")
    cache = row_cache.RowCache(client, table_rows=QROWS, dims={**QDIMS, "pin": 8}, capacity=8,
                               bits={t: q.bits for t, q in art.tables.items()})
    with pytest.raises(ValueError, match=f"sent {bits}-bit codes of dim 7.*of dim 8"):
        cache.fetch({"pin": np.array([1])})
    with pytest.raises(ValueError, match="bits must be one of"):
        row_cache.RowCache(client, table_rows=QROWS, dims=QDIMS, capacity=8, bits={"pin": 2})
    cache.close()
