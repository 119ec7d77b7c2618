"""A ranker-side cache of embedding rows in front of the shard servers.

In ads ranking the candidates repeat: a few thousand ads take most impressions,
so most of the rows a hybrid ranker fetches were fetched a moment ago. ``RowCache``
keeps recently fetched float32 rows in the ranker process and asks the shards
(``serving.client.EmbeddingClient``) only for the rows it does not hold: fewer
bytes on the wire and less work on the shard hosts, and a request whose rows
all hit costs no round trip at all. This is the role of HugeCTR's embedding
cache in front of its parameter server.

One cache belongs to one artifact version (the ranker builds one per loaded
version), so a row can only come from the version it was fetched for: a swap
starts with an empty cache and the two never mix. The rows are the client's
answers as they are, so scores are bit-identical with and without the cache.

Layout: per table, a direct-mapped cache of S slots (``tags`` int64 [S], the row
held or -1, and ``values`` float32 [S, D]). A table of at most ``capacity``
rows gets one slot per row (it is cached whole, as it is used); a larger one
S = ``capacity`` rounded down to a power of two slots and row r goes to slot
``hash(r) >> (64 - log2 S)`` (Fibonacci hashing), a newer row replacing the one
in its slot. The arrays are allocated zeroed (the operating system gives the
pages as rows are first written). All work is a handful of NumPy calls per
table (no per-row Python); a lock covers the reads and the writes, never the
fetch.

Imports NumPy and ``serving.codec`` only (no gRPC, no JAX).

Dimension legend: n rows asked for, D embedding dim, S slots.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

import numpy as np

from serving import codec

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # 2**64 / golden ratio (Fibonacci hashing)


class _TableCache:
    def __init__(self, rows: int, dim: int, capacity: int):
        self.rows = rows
        if rows <= capacity:  # the whole table: slot = row
            self.slots, self.shift = rows, None
        else:  # capacity rounded down to a power of two (>= 2: one hash bit at least)
            bits = max(int(capacity).bit_length() - 1, 1)
            self.slots, self.shift = 1 << bits, np.uint64(64 - bits)
        self.tags = np.full(self.slots, -1, np.int64)
        self.values = np.zeros((self.slots, dim), np.float32)

    def slot(self, rows_n: np.ndarray) -> np.ndarray:
        if self.shift is None:
            return rows_n
        return ((rows_n.astype(np.uint64) * _GOLDEN) >> self.shift).astype(np.intp)


class RowCache:
    """``fetcher.lookup_many`` with recently fetched rows kept here (module docstring).

    Args:
      fetcher: what fetches the misses (an ``EmbeddingClient``); ``lookup_many``
        and ``close`` go to it.
      table_rows: table -> its number of rows.
      dims: table -> D.
      capacity: rows per table, at most: a table of at most this many rows is
        cached whole, a larger one in ``capacity`` rounded down to a power of two
        slots (2 at least). Memory: at most ``(4 * D + 8) * capacity`` bytes per
        table.
      tables: the tables to cache (default: all); others always go to ``fetcher``.

    Attributes:
      client: ``fetcher``.
    """

    def __init__(
        self,
        fetcher,
        *,
        table_rows: Mapping[str, int],
        dims: Mapping[str, int],
        capacity: int,
        tables=None,
    ):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.client = fetcher
        names = sorted(table_rows) if tables is None else list(tables)
        self._caches = {
            t: _TableCache(int(table_rows[t]), int(dims[t]), int(capacity)) for t in names
        }
        self._lock = threading.Lock()
        self._hits = 0
        self._misses = 0

    @property
    def hits(self) -> int:
        """Rows of cached tables answered from the cache, in calls that succeeded."""
        return self._hits

    @property
    def misses(self) -> int:
        """Rows of cached tables not in the cache (sent to the fetcher, which may ask
        the shards for a row asked for twice once), in calls that succeeded."""
        return self._misses

    @property
    def nbytes(self) -> int:
        """Memory of the cache arrays."""
        return sum(c.tags.nbytes + c.values.nbytes for c in self._caches.values())

    def lookup_many(
        self, rows: Mapping[str, np.ndarray], *, deadline_s: float | None = None
    ) -> dict[str, np.ndarray]:
        """As ``EmbeddingClient.lookup_many``; cached rows are not fetched."""
        return self.fetch(rows, deadline_s=deadline_s)[0]

    def fetch(
        self, rows: Mapping[str, np.ndarray], *, deadline_s: float | None = None
    ) -> tuple[dict[str, np.ndarray], bool]:
        """``(lookup_many's result, whether the shards were asked)``; every row hit:
        no round trip (the shards' health is then unknown, not good)."""
        out: dict[str, np.ndarray] = {}
        missing: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        want: dict[str, np.ndarray] = {}
        hits = 0
        with self._lock:
            for table, rows_n in rows.items():
                cache = self._caches.get(table)
                if cache is None:
                    want[table] = rows_n
                    continue
                rows_n = codec.row_array(table, rows_n)
                if rows_n.size and (rows_n.min() < 0 or rows_n.max() >= cache.rows):
                    bad = rows_n[(rows_n < 0) | (rows_n >= cache.rows)][0]
                    raise ValueError(
                        f"table {table!r}: row {bad} is outside the table (rows [0, {cache.rows}))"
                    )
                rows_n = rows_n.astype(np.int64, copy=False)
                slot_n = cache.slot(rows_n)
                out[table] = cache.values[slot_n]  # a copy (fancy indexing)
                miss_m = np.flatnonzero(cache.tags[slot_n] != rows_n)
                hits += rows_n.size - miss_m.size
                if miss_m.size:
                    missing[table] = (miss_m, rows_n[miss_m], slot_n[miss_m])
                    want[table] = rows_n[miss_m]
        misses = sum(m[0].size for m in missing.values())
        if not want:
            with self._lock:
                self._hits += hits
            return out, False
        got = self.client.lookup_many(want, deadline_s=deadline_s)  # outside the lock
        with self._lock:
            self._hits += hits
            self._misses += misses
            for table, (miss_m, rows_m, slot_m) in missing.items():
                values = got[table]
                out[table][miss_m] = values
                # Misses sharing a slot: keep the last one, written to tags and values
                # alike (NumPy does not promise which of repeated indices wins).
                last_u = slot_m.size - 1 - np.unique(slot_m[::-1], return_index=True)[1]
                self._caches[table].tags[slot_m[last_u]] = rows_m[last_u]
                self._caches[table].values[slot_m[last_u]] = values[last_u]
        for table in want.keys() - missing.keys():
            out[table] = got[table]
        return out, True

    def close(self) -> None:
        """Closes the fetcher."""
        self.client.close()
