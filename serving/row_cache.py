"""A ranker-side cache of embedding rows in front of the shard servers.

In ads ranking the candidates repeat: a few thousand ads take most impressions,
so most of the rows a hybrid ranker fetches were fetched a moment ago. ``RowCache``
keeps recently fetched rows in the ranker process and asks the shards
(``serving.client.EmbeddingClient``) only for the rows it does not hold: fewer
bytes on the wire and less work on the shard hosts, and a request whose rows
all hit costs no round trip at all. This is the role of HugeCTR's embedding
cache in front of its parameter server.

One cache belongs to one artifact version (the ranker builds one per loaded
version), so a row can only come from the version it was fetched for: a swap
starts with an empty cache and the two never mix. The rows are the client's
answers as they are, so scores are bit-identical with and without the cache.

What a row is kept as follows the client's wire. On the quantized wire (the
ranker's default) an INT4/INT8 table's rows are kept as the shards send them:
``codes`` uint8 [S, P] (P = ceil(D/2) for INT4, D for INT8), ``scale`` and
``bias`` float32 [S]; a fetch gathers its hits' codes, puts its misses' codes
in (``EmbeddingClient.lookup_many(..., dequantize=False)``) and dequantizes the
table's batch once with the shards' own ``rowwise.dequantize_rows`` (row by row:
bit-identical to an uncached fetch). Per slot that is P + 16 bytes (tag
included): 48 for INT4 D=64, 80 for INT8, against 264 for float32 rows; a hit
then costs a gather and a dequantization, as in a monolithic ranker (500 INT4
rows, D=64, all hits: ~34 us against ~10 us as float32 rows on the 2-core box).
Which tables are INT4/INT8 is known up front (``bits``, from the artifact
manifest); a shard answering other bits or dim is an error, not a row. On the
float32 wire (and for float32 tables) the rows are kept as float32 [S, D]:
4 * D + 8 bytes a slot.

Layout: per table, a direct-mapped cache of S slots (``tags`` int64 [S], the row
held or -1, and ``held``: the codes, scale and bias, or the float32 rows, of
each slot). A table of at most ``capacity`` rows gets one slot per row (it is
cached whole, as it is used); a larger one
S = ``capacity`` rounded down to a power of two slots and row r goes to slot
``hash(r) >> (64 - log2 S)`` (Fibonacci hashing), a newer row replacing the one
in its slot. The arrays are allocated zeroed (the operating system gives the
pages as rows are first written). All work is a handful of NumPy calls per
table (no per-row Python); a lock covers the reads and the writes, never the
fetch.

Imports NumPy, ``serving.codec`` and ``jax_recsys.quant.rowwise`` only (no gRPC,
no JAX).

Dimension legend: n rows asked for, D embedding dim, P code bytes per row, S slots.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

import numpy as np

from jax_recsys.quant import rowwise
from serving import codec

_CODES = (4, 8)  # bits of the tables cached as codes (on the quantized wire)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # 2**64 / golden ratio (Fibonacci hashing)


class _TableCache:
    """One table's slots: ``tags`` and ``held``, the arrays a row is kept as."""

    def __init__(self, rows: int, dim: int, capacity: int, bits: int):
        self.rows, self.dim, self.bits = rows, dim, bits
        if rows <= capacity:  # the whole table: slot = row
            self.slots, self.shift = rows, None
        else:  # capacity rounded down to a power of two (>= 2: one hash bit at least)
            bits_s = max(int(capacity).bit_length() - 1, 1)
            self.slots, self.shift = 1 << bits_s, np.uint64(64 - bits_s)
        self.tags = np.full(self.slots, -1, np.int64)
        if bits in _CODES:  # as the quantized wire sends them (codec.decode_quantized)
            self.held = (
                np.zeros((self.slots, rowwise.packed_dim(dim, bits)), np.uint8),
                np.zeros(self.slots, codec.VALUES_DTYPE),
                np.zeros(self.slots, codec.VALUES_DTYPE),
            )
        else:
            self.held = (np.zeros((self.slots, dim), np.float32),)

    def slot(self, rows_n: np.ndarray) -> np.ndarray:
        if self.shift is None:
            return rows_n
        return ((rows_n.astype(np.uint64) * _GOLDEN) >> self.shift).astype(np.intp)

    def parts(self, table: str, got) -> tuple[np.ndarray, ...]:
        """The fetcher's answer for this table as arrays shaped like ``held``; a
        table sent otherwise than it is cached (other bits or dim) is an error."""
        if self.bits in _CODES:
            if not isinstance(got, rowwise.QuantizedTable):
                sent = f"float32 rows of dim {got.shape[-1]}"
            elif (got.bits, got.dim) != (self.bits, self.dim):
                sent = f"{got.bits}-bit codes of dim {got.dim}"
            else:
                return got.codes, got.scale, got.bias
        elif isinstance(got, rowwise.QuantizedTable):
            sent = f"{got.bits}-bit codes of dim {got.dim}"
        elif got.shape[1:] != (self.dim,):
            sent = f"float32 rows of dim {got.shape[-1]}"
        else:
            return (got,)
        held = f"{self.bits}-bit codes" if self.bits in _CODES else "float32 rows"
        raise ValueError(
            f"table {table!r}: the shards sent {sent}, the row cache holds {held} of dim "
            f"{self.dim} (from the artifact manifest): the shards serve another table"
        )

    def rows_of(self, parts: tuple[np.ndarray, ...]) -> np.ndarray:
        """float32 [n, D] of gathered ``held`` arrays: the codes dequantized in one call."""
        if self.bits in _CODES:
            return rowwise.dequantize_rows(
                rowwise.QuantizedTable(*parts, dim=self.dim, bits=self.bits)
            )
        return parts[0]


class RowCache:
    """``fetcher.lookup_many`` with recently fetched rows kept here (module docstring).

    Args:
      fetcher: what fetches the misses (an ``EmbeddingClient``); ``lookup_many``
        and ``close`` go to it.
      table_rows: table -> its number of rows.
      dims: table -> D.
      capacity: rows per table, at most: a table of at most this many rows is
        cached whole, a larger one in ``capacity`` rounded down to a power of two
        slots (2 at least). Memory per slot: ``4 * D + 8`` bytes (float32 rows), or
        ``ceil(D / 2) + 16`` (INT4 codes) / ``D + 16`` (INT8 codes).
      tables: the tables to cache (default: all); others always go to ``fetcher``.
      bits: table -> 4, 8 or 32, as the artifact stores it (the manifest's dtype).
        With a fetcher on the quantized wire (``fetcher.wire == "quantized"``) the
        INT4/INT8 tables are cached as codes, scale and bias (asked for with
        ``lookup_many(..., dequantize=False)``; a shard answering other bits or
        dim is a ValueError). None, or the float32 wire: float32 rows.

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
        bits: Mapping[str, int] | None = None,
    ):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.client = fetcher
        names = sorted(table_rows) if tables is None else list(tables)
        if bits is None or getattr(fetcher, "wire", None) != "quantized":
            bits = {}
        for t in names:
            if bits.get(t, 32) not in rowwise.SUPPORTED_BITS:
                raise ValueError(f"table {t!r}: bits must be one of "
                                 f"{rowwise.SUPPORTED_BITS}, got {bits[t]}")
        self._caches = {
            t: _TableCache(int(table_rows[t]), int(dims[t]), int(capacity), int(bits.get(t, 32)))
            for t in names
        }
        # Codes come back only when asked for (and a fetcher of float32 rows, such
        # as a test's, need not know the argument).
        self._codes = any(c.bits in _CODES for c in self._caches.values())
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
    def cached_tables(self) -> list[str]:
        """The tables kept here (the others always go to the fetcher)."""
        return list(self._caches)

    @property
    def nbytes(self) -> int:
        """Memory of the cache arrays."""
        return sum(c.tags.nbytes + sum(a.nbytes for a in c.held) for c in self._caches.values())

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
        held: dict[str, tuple[np.ndarray, ...]] = {}  # table -> gathered slots' arrays
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
                held[table] = tuple(a.take(slot_n, axis=0) for a in cache.held)  # copies
                miss_m = np.flatnonzero(cache.tags[slot_n] != rows_n)
                hits += rows_n.size - miss_m.size
                if miss_m.size:
                    missing[table] = (miss_m, rows_n[miss_m], slot_n[miss_m])
                    want[table] = rows_n[miss_m]
        misses = sum(m[0].size for m in missing.values())
        got = {}
        if want:  # outside the lock
            if self._codes:
                got = self.client.lookup_many(want, deadline_s=deadline_s, dequantize=False)
            else:
                got = self.client.lookup_many(want, deadline_s=deadline_s)
        # Checked before anything is written: a wrong answer leaves the cache as it was.
        parts = {t: self._caches[t].parts(t, got[t]) for t in missing}
        with self._lock:
            self._hits += hits
            self._misses += misses
            for table, (_, rows_m, slot_m) in missing.items():
                cache = self._caches[table]
                # Misses sharing a slot: keep the last one, written to tags and every
                # array alike (NumPy does not promise which of repeated indices wins).
                last_u = slot_m.size - 1 - np.unique(slot_m[::-1], return_index=True)[1]
                slot_u = slot_m[last_u]
                cache.tags[slot_u] = rows_m[last_u]
                for a, part in zip(cache.held, parts[table], strict=True):
                    a[slot_u] = part[last_u]
        out: dict[str, np.ndarray] = {}
        for table, held_n in held.items():  # the batch's own copies: no lock needed
            if table in missing:
                miss_m = missing[table][0]
                for a, part in zip(held_n, parts[table], strict=True):
                    a[miss_m] = part
            out[table] = self._caches[table].rows_of(held_n)
        for table in want.keys() - missing.keys():
            got_t = got[table]  # an uncached table: as lookup_many would return it
            out[table] = (rowwise.dequantize_rows(got_t)
                          if isinstance(got_t, rowwise.QuantizedTable) else got_t)
        return out, bool(want)

    def close(self) -> None:
        """Closes the fetcher."""
        self.client.close()
