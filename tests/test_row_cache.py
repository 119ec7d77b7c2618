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
