"""Ranker-side row cache: exact rows, hits, collisions, uncached tables, threads."""

import threading

import numpy as np
import pytest

from serving import row_cache


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
        np.testing.assert_array_equal(c.values[held], f.value("pin", c.tags[held]))
        np.testing.assert_array_equal(c.slot(c.tags[held]), np.flatnonzero(held))
