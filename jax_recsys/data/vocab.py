"""Vocabularies: raw ids (int or str) <-> embedding-table rows 0..V-1, vectorised.

A :class:`Vocab` holds the raw ids in row order (``ids[r]`` is the raw id of row ``r``)
and maps raw ids to rows with ``np.searchsorted`` over a sorted copy, so building and
looking up 10M ids takes seconds, not minutes. Raw ids are ``int64`` or fixed-width
unicode (``np.str_``); object arrays are never used, so vocabularies save and load as
plain ``.npy`` files with ``allow_pickle=False`` (the format of ``vocab/<name>.npy`` in
dataset folders, facet checkpoints and serving artifacts).

Row order of :meth:`Vocab.build` (deterministic for the same multiset of ids):

* ``"sorted"`` (default): ascending raw id;
* ``"frequency"``: descending count, ties by ascending raw id (hot rows first);
* ``"first"``: order of first appearance in the input.

Unknown ids map to ``-1`` (which :class:`~jax_recsys.data.batching.Batch` treats as
padding: the id is ignored), or to the OOV row ``V`` when the vocabulary reserves one
(``reserved_oov=True``; the table then has ``V + 1`` rows and the OOV row is the last,
as ``FeatureSpec(id_mode="oov")`` expects).

Mixed kinds: an integer vocabulary looks up strings that parse as integers, and a
string vocabulary looks up integers by their decimal string.

Dimension legend: V vocabulary size (rows without the OOV row), B looked-up ids.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterable

import numpy as np

ORDERS = ("sorted", "frequency", "first")
_DENSE_FACTOR = 4  # direct index table when the id range is at most 4x the vocabulary
_INT64_MAX = np.iinfo(np.int64).max


def _unique(raw_v: np.ndarray, *, need_first: bool):
    """Sorted unique ids, index of first appearance (or None) and counts."""
    if raw_v.dtype.kind == "i" and len(raw_v) and not need_first:
        lo, hi = int(raw_v.min()), int(raw_v.max())
        if hi - lo + 1 <= _DENSE_FACTOR * len(raw_v) + 1024:
            counts = np.bincount(raw_v - lo, minlength=hi - lo + 1)
            present = np.flatnonzero(counts)
            return present.astype(np.int64) + lo, None, counts[present]
    if need_first:
        return np.unique(raw_v, return_index=True, return_counts=True)
    uniq, counts = np.unique(raw_v, return_counts=True)
    return uniq, None, counts


def as_raw_ids(raw, *, what: str = "raw ids") -> np.ndarray:
    """Converts raw ids to a 1-D int64 or fixed-width unicode array.

    Args:
      raw: array-like of integers or strings (bytes are decoded as UTF-8).
      what: name used in error messages.

    Returns:
      int64 or ``np.str_`` array with the same number of elements (flattened).
    """
    arr = np.asarray(raw)
    if arr.size == 0 and arr.dtype.kind not in "iuUS":
        return np.zeros(0, np.int64)  # np.asarray([]) is float64: no ids, not bad ids
    if arr.dtype == object:
        if arr.size and all(isinstance(x, (int, np.integer)) for x in arr.ravel()):
            arr = arr.astype(np.int64)
        else:
            arr = arr.astype(np.str_)
    if arr.dtype.kind == "S":
        arr = np.char.decode(arr, "utf-8")
    if arr.dtype.kind in "iub":
        if arr.dtype.kind == "u" and arr.size and arr.max() > np.iinfo(np.int64).max:
            raise ValueError(f"{what}: unsigned ids above int64 range")
        return arr.astype(np.int64, copy=False).reshape(-1)
    if arr.dtype.kind == "U":
        return arr.reshape(-1)
    raise ValueError(f"{what} must be integers or strings, got dtype {arr.dtype}")


class Vocab:
    """Raw ids (int64 or str) in row order, with vectorised lookup.

    Args:
      ids: [V] unique raw ids; ``ids[r]`` is the raw id of row ``r``.
      reserved_oov: whether row ``V`` is an out-of-vocabulary row (``size == V + 1``).
    """

    def __init__(self, ids, *, reserved_oov: bool = False):
        # A private copy: the array is frozen below and must not alias the caller's.
        ids_v = np.array(as_raw_ids(ids, what="vocabulary ids"))
        order_v = np.argsort(ids_v, kind="stable")
        sorted_v = ids_v[order_v]
        if len(sorted_v) > 1:
            dup = sorted_v[1:] == sorted_v[:-1]
            if dup.any():
                raise ValueError(
                    f"vocabulary has duplicate raw id {sorted_v[1:][dup][0].item()!r}")
        self._ids = ids_v
        self._ids.flags.writeable = False
        self._sorted = sorted_v
        self._rows = order_v.astype(np.int64)
        # Dense integer ids (the common case: ids 0..R-1) get a direct index table,
        # which is several times faster than searchsorted on random queries.
        self._dense_lo = 0
        self._dense: np.ndarray | None = None
        if ids_v.dtype.kind == "i" and len(ids_v):
            lo, hi = int(sorted_v[0]), int(sorted_v[-1])
            if hi - lo + 1 <= _DENSE_FACTOR * len(ids_v) + 1024:
                dense = np.full(hi - lo + 1, -1, np.int64)
                dense[ids_v - lo] = np.arange(len(ids_v), dtype=np.int64)
                self._dense, self._dense_lo = dense, lo
        self.reserved_oov = bool(reserved_oov)

    # ------------------------------------------------------------------ building

    @classmethod
    def build(
        cls,
        raw_ids,
        *,
        min_count: int = 1,
        reserved_oov: bool = False,
        order: str = "sorted",
        max_size: int | None = None,
    ) -> Vocab:
        """Builds a vocabulary from a stream of raw ids (duplicates allowed).

        Args:
          raw_ids: array-like of raw ids, or an iterable of such chunks.
          min_count: keep ids seen at least this many times.
          reserved_oov: reserve row V for unknown ids.
          order: row order, one of "sorted", "frequency", "first" (module docstring).
          max_size: keep at most this many ids (the most frequent, ties by raw id),
            then order them by ``order``.

        Returns:
          The vocabulary.
        """
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        if max_size is not None and (
            isinstance(max_size, bool) or not isinstance(max_size, int | np.integer) or max_size < 0
        ):
            raise ValueError(f"max_size must be None or an int >= 0, got {max_size!r}")
        if isinstance(raw_ids, np.ndarray) or not _is_chunk_iterable(raw_ids):
            raw_v = as_raw_ids(raw_ids)
        else:
            chunks = [as_raw_ids(c) for c in raw_ids]
            raw_v = np.concatenate(chunks) if chunks else np.zeros(0, np.int64)
        uniq, first, counts = _unique(raw_v, need_first=order == "first")
        keep = counts >= min_count
        uniq, counts = uniq[keep], counts[keep]
        first = None if first is None else first[keep]
        if max_size is not None and len(uniq) > max_size:
            # uniq is sorted, so a stable sort on -count ties by raw id.
            top = np.sort(np.argsort(-counts, kind="stable")[:max_size])
            uniq, counts = uniq[top], counts[top]
            first = None if first is None else first[top]
        if order == "frequency":
            uniq = uniq[np.argsort(-counts, kind="stable")]
        elif order == "first":
            uniq = uniq[np.argsort(first, kind="stable")]
        return cls(uniq, reserved_oov=reserved_oov)

    # ------------------------------------------------------------------ accessors

    @property
    def ids(self) -> np.ndarray:
        """[V] raw ids in row order (read-only)."""
        return self._ids

    @property
    def dtype(self) -> np.dtype:
        """int64 or a unicode dtype."""
        return self._ids.dtype

    def __len__(self) -> int:
        """V: number of known ids (the OOV row not included)."""
        return len(self._ids)

    @property
    def size(self) -> int:
        """Table rows needed: V, plus 1 with a reserved OOV row."""
        return len(self._ids) + int(self.reserved_oov)

    @property
    def oov_row(self) -> int | None:
        """The OOV row (V) or None."""
        return len(self._ids) if self.reserved_oov else None

    def __eq__(self, other) -> bool:
        return (isinstance(other, Vocab) and self.reserved_oov == other.reserved_oov
                and self.dtype.kind == other.dtype.kind
                and np.array_equal(self._ids, other._ids))

    __hash__ = None  # compared by content; not meant as a dict key

    def __repr__(self) -> str:
        return (f"Vocab(V={len(self)}, dtype={self.dtype}, reserved_oov={self.reserved_oov})")

    # ------------------------------------------------------------------ mapping

    def _coerce(self, raw) -> tuple[np.ndarray, np.ndarray | None]:
        """Query ids in the vocabulary's kind, plus a mask of convertible ids (or None)."""
        q = np.asarray(raw)
        if q.dtype == object or q.dtype.kind == "S":
            q = as_raw_ids(q).reshape(q.shape)
        if self.dtype.kind == "i":
            if q.dtype.kind == "U":
                try:
                    return q.astype(np.int64), None
                except (ValueError, OverflowError):
                    # Non-numeric strings cannot be in an integer vocabulary.
                    flat = q.reshape(-1)
                    out = np.zeros(flat.shape, np.int64)
                    ok = np.zeros(flat.shape, bool)
                    for i, s in enumerate(flat):
                        try:
                            out[i] = int(s)
                            ok[i] = True
                        except (ValueError, OverflowError):
                            pass
                    return out.reshape(q.shape), ok.reshape(q.shape)
            if q.dtype.kind not in "iub":
                raise ValueError(f"cannot look up dtype {q.dtype} in an integer vocabulary")
            if q.dtype.kind == "u" and q.size and q.max() > _INT64_MAX:
                # Beyond int64: in no int64 vocabulary (a cast would wrap to negative ids).
                ok = q <= _INT64_MAX
                return np.where(ok, q, 0).astype(np.int64), ok
            return q.astype(np.int64, copy=False), None
        if q.dtype.kind in "iub":
            # uint64 straight to text: through int64 it would wrap to a negative id.
            return (q.astype(np.int64) if q.dtype.kind == "b" else q).astype(np.str_), None
        if q.dtype.kind != "U":
            raise ValueError(f"cannot look up dtype {q.dtype} in a string vocabulary")
        return q, None

    def lookup(self, raw, *, unknown: int | None = None) -> np.ndarray:
        """Maps raw ids to rows.

        Args:
          raw: raw ids of any shape (ints or strings).
          unknown: row for ids not in the vocabulary; default the OOV row if reserved,
            else -1. (Pass -2 to route unknown ids to an ``id_mode="oov"`` feature's
            OOV row instead of treating them as padding: BatchIterator keeps ids < -1
            and :func:`jax_recsys.embedding.lookup.map_ids` maps them to the OOV row
            R-1; ``lookup.check_ids`` refuses them for a ``"direct"`` feature.)

        Returns:
          int64 rows with the shape of ``raw``.
        """
        q, valid = self._coerce(raw)
        if unknown is None:
            unknown = self.oov_row if self.reserved_oov else -1
        if len(self._sorted) == 0:
            return np.full(q.shape, unknown, np.int64)
        if self._dense is not None:
            off = q - self._dense_lo
            inside = (off >= 0) & (off < len(self._dense))
            if valid is not None:
                inside &= valid
            rows = self._dense[np.where(inside, off, 0)]
            return np.where(inside & (rows >= 0), rows, np.int64(unknown))
        pos = np.searchsorted(self._sorted, q)
        pos_c = np.minimum(pos, len(self._sorted) - 1)
        found = self._sorted[pos_c] == q
        if valid is not None:
            found &= valid
        return np.where(found, self._rows[pos_c], np.int64(unknown)).astype(np.int64)

    def contains(self, raw) -> np.ndarray:
        """Bool array: which raw ids are in the vocabulary."""
        return self.lookup(raw, unknown=-1) >= 0

    def raw(self, rows) -> np.ndarray:
        """Maps rows back to raw ids (rows must lie in [0, V)).

        Args:
          rows: integer rows of any shape.

        Returns:
          raw ids with the shape of ``rows``.
        """
        r = np.asarray(rows)
        if r.dtype.kind not in "iu":
            raise ValueError(f"rows must be integers, got dtype {r.dtype}")
        if r.size and (r.min() < 0 or r.max() >= len(self._ids)):
            raise ValueError(f"rows out of range [0, {len(self._ids)}): "
                             f"min {r.min()}, max {r.max()}")
        return self._ids[r]

    # ------------------------------------------------------------------ files

    def save(self, path: str | os.PathLike) -> pathlib.Path:
        """Saves the raw ids in row order as ``.npy`` (no pickle).

        The ``reserved_oov`` flag is not stored; pass it to :meth:`load` again.

        Args:
          path: target file (``.npy`` is appended by NumPy if missing).

        Returns:
          The written path.
        """
        path = pathlib.Path(path)
        if path.suffix != ".npy":
            path = path.with_name(path.name + ".npy")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npy")
        np.save(tmp, np.ascontiguousarray(self._ids), allow_pickle=False)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *, reserved_oov: bool = False) -> Vocab:
        """Loads a vocabulary saved by :meth:`save` (or any 1-D int/unicode ``.npy``).

        Args:
          path: the ``.npy`` file.
          reserved_oov: whether row V is an OOV row.

        Returns:
          The vocabulary.
        """
        try:
            ids = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise ValueError(f"{path}: cannot load vocabulary: {e}") from None
        if ids.ndim != 1 or ids.dtype.kind not in "iuU":
            raise ValueError(f"{path}: vocabulary must be a 1-D int or unicode array, "
                             f"got shape {ids.shape} dtype {ids.dtype}")
        try:
            return cls(ids, reserved_oov=reserved_oov)
        except ValueError as e:  # duplicate ids, uint64 beyond int64: name the file
            raise ValueError(f"{path}: {e}") from None


def _is_chunk_iterable(x) -> bool:
    if isinstance(x, (str, bytes, np.ndarray)):
        return False
    if isinstance(x, Iterable) and not isinstance(x, (list, tuple)):
        return True  # generators, iterators of chunks
    # A list/tuple is one chunk of ids unless its items are arrays/lists.
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(
        isinstance(c, (np.ndarray, list, tuple)) for c in x)
