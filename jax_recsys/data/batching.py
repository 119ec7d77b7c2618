"""The one batch type (:class:`Batch`) and a NumPy iterator that makes fixed-shape batches.

``Batch`` is shared by training, evaluation, the serving client and tests. It is a
frozen dataclass registered as a JAX pytree, so it passes straight into jitted
functions and through ``jax.device_put``/``distributed.host_to_global``.

:class:`BatchIterator` turns in-memory (or memory-mapped) columns into batches with
vectorised fancy indexing: one permutation per epoch from ``(seed, epoch)``, each batch
one ``take`` per column, no Python loop over examples. Multi-process runs: each of
``process_count`` processes gets the same global batch order and reads only its own
contiguous ``batch_size // process_count`` rows of every global batch, so the
concatenation over processes equals the single-process stream. ``state()`` /
``restore(state)`` record the position (epoch, batch) so a resumed run sees exactly
the batches an uninterrupted run would have seen.

Ragged multi-hot features are given as ``(values, offsets)`` with ``offsets`` of length
N + 1 (example i owns ``values[offsets[i]:offsets[i+1]]``) and padded (or truncated)
to L ids with -1.

Dimension legend: N examples in the columns, B global batch, B_p = B / process_count
rows per process, L ids per example (multi-hot), F dense features per column.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence

import jax
import numpy as np

_INT32_MAX = np.iinfo(np.int32).max
_INT32_MIN = np.iinfo(np.int32).min


@dataclasses.dataclass(frozen=True)
class Batch:
    """One batch of examples.

    Attributes:
      ids: feature -> int32 [B] or [B, L] table rows; -1 is padding (ignored); ids
        < -1 are out-of-vocabulary: the OOV row of an ``id_mode="oov"`` or ``"hash"``
        feature (:func:`jax_recsys.embedding.lookup.map_ids`; ``lookup.check_ids``
        refuses them for ``"direct"`` features).
      dense: feature -> float32 [B] or [B, F].
      labels: label name -> float32 [B].
      mask: float32 [B]; 1 for real examples, 0 for padding examples.
    """

    ids: dict[str, np.ndarray]
    dense: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    mask: np.ndarray

    @property
    def size(self) -> int:
        """B: number of rows (including padding examples)."""
        return int(self.mask.shape[0])

    def num_valid(self) -> int:
        """Number of real (non-padding) examples."""
        return int(np.asarray(self.mask).sum())


jax.tree_util.register_dataclass(
    Batch, data_fields=["ids", "dense", "labels", "mask"], meta_fields=[])


def pad_batch(batch: Batch, batch_size: int) -> Batch:
    """Pads a partial batch to ``batch_size`` rows: ids -1, dense/labels 0, mask 0.

    Args:
      batch: a batch with B <= batch_size rows.
      batch_size: target number of rows.

    Returns:
      The padded batch (the same object if already full).
    """
    b = batch.size
    if b > batch_size:
        raise ValueError(f"batch has {b} rows, more than batch_size={batch_size}")
    if b == batch_size:
        return batch

    def pad(x, value):
        x = np.asarray(x)
        out = np.full((batch_size,) + x.shape[1:], value, dtype=x.dtype)
        out[:b] = x
        return out

    return Batch(
        ids={k: pad(v, -1) for k, v in batch.ids.items()},
        dense={k: pad(v, 0) for k, v in batch.dense.items()},
        labels={k: pad(v, 0) for k, v in batch.labels.items()},
        mask=pad(batch.mask, 0),
    )


def _ragged_to_padded(values: np.ndarray, offsets: np.ndarray, rows_b: np.ndarray,
                      length: int) -> np.ndarray:
    """Gathers examples ``rows_b`` of a ragged column into int32 [B, L], -1 padded."""
    start_b = offsets[rows_b]
    len_b = np.minimum(offsets[rows_b + 1] - start_b, length)
    pos_bl = start_b[:, None] + np.arange(length)[None, :]
    valid_bl = np.arange(length)[None, :] < len_b[:, None]
    safe_bl = np.where(valid_bl, pos_bl, 0)
    if len(values) == 0:
        return np.full((len(rows_b), length), -1, np.int32)
    return np.where(valid_bl, values[safe_bl], -1).astype(np.int32)


class BatchIterator:
    """Fixed-shape batches from columns, resumable, sliced per process.

    Args:
      columns: name -> array with N rows (NumPy or memory-mapped); a multi-hot
        feature is a ``(values, offsets)`` pair instead (see module docstring).
      batch_size: B, the global batch size (divisible by ``process_count``).
      id_features: columns that become ``Batch.ids`` (integer rows in int32 range;
        -1 padding, < -1 OOV, e.g. ``Vocab.lookup(raw, unknown=-2)``).
      dense_features: columns that become ``Batch.dense`` (float32).
      label_features: columns that become ``Batch.labels`` (float32).
      multi_hot: feature -> L for ragged id features (padded/truncated to L).
      shuffle: permute examples each epoch (permutation seeded by (seed, epoch)).
      seed: shuffling seed.
      drop_remainder: drop the last partial batch; otherwise it is padded (mask 0).
      num_epochs: stop after this many whole epochs; None = repeat forever.
      process_index: this process's index.
      process_count: number of processes; each yields B_p = B / process_count rows.
    """

    def __init__(
        self,
        columns: Mapping[str, np.ndarray | tuple[np.ndarray, np.ndarray]],
        *,
        batch_size: int,
        id_features: Sequence[str],
        dense_features: Sequence[str] = (),
        label_features: Sequence[str] = (),
        multi_hot: Mapping[str, int] | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_remainder: bool = True,
        num_epochs: int | None = None,
        process_index: int = 0,
        process_count: int = 1,
    ):
        multi_hot = dict(multi_hot or {})
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(f"bad process_index={process_index} / process_count={process_count}")
        if batch_size % process_count:
            raise ValueError(f"batch_size={batch_size} is not divisible by "
                             f"process_count={process_count}")
        if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
            # NumPy refused a negative seed only at the first batch ("expected
            # non-negative integer"), and int() truncated 1.5.
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
        if num_epochs is not None and (isinstance(num_epochs, bool) or num_epochs < 1
                                       or not isinstance(num_epochs, int | np.integer)):
            # The iterator stops at an epoch boundary: 1.5 ran 2 whole epochs. A fraction
            # of an epoch is a step count (the trainers' num_epochs * steps per epoch).
            raise ValueError(f"num_epochs must be a whole number >= 1 or None, got {num_epochs!r}")
        names = list(id_features) + list(dense_features) + list(label_features)
        if len(set(names)) != len(names):
            raise ValueError(f"a column is listed twice among id/dense/label features: {names}")
        unknown_mh = set(multi_hot) - set(id_features)
        if unknown_mh:
            raise ValueError(f"multi_hot features {sorted(unknown_mh)} are not id_features")
        self._dense_cols: dict[str, np.ndarray] = {}
        self._label_cols: dict[str, np.ndarray] = {}
        self._id_cols: dict[str, np.ndarray] = {}
        self._ragged: dict[str, tuple[np.ndarray, np.ndarray, int]] = {}
        n = None

        def check_len(name, rows):
            nonlocal n
            if n is None:
                n = rows
            elif rows != n:
                raise ValueError(f"column {name!r} has {rows} rows, expected {n}")

        for name in names:
            if name not in columns:
                raise ValueError(f"column {name!r} not found (have {sorted(columns)})")
        for name in id_features:
            col = columns[name]
            if name in multi_hot:
                if not (isinstance(col, tuple) and len(col) == 2):
                    raise ValueError(f"multi-hot column {name!r} must be (values, offsets)")
                values, offsets = np.asarray(col[0]), np.asarray(col[1])
                # 2-D values or float offsets gathered garbage rows without an error.
                if values.ndim != 1 or offsets.dtype.kind not in "iu":
                    raise ValueError(f"multi-hot column {name!r}: values must be 1-D and "
                                     f"offsets integers, got values {values.shape} and "
                                     f"offsets {offsets.dtype}")
                offsets = offsets.astype(np.int64)
                length = int(multi_hot[name])
                if length < 1:
                    raise ValueError(f"multi_hot[{name!r}] must be >= 1, got {length}")
                if offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0 or \
                        offsets[-1] != len(values) or (np.diff(offsets) < 0).any():
                    raise ValueError(f"column {name!r}: offsets must be non-decreasing, start "
                                     f"at 0 and end at len(values)={len(values)}")
                _check_ids(name, values)
                check_len(name, len(offsets) - 1)
                self._ragged[name] = (values, offsets, length)
            else:
                if isinstance(col, tuple):
                    raise ValueError(f"column {name!r} is ragged; give its length in multi_hot")
                col = np.asarray(col) if not isinstance(col, np.ndarray) else col
                _check_ids(name, col)
                check_len(name, col.shape[0])
                self._id_cols[name] = col
        for name, dst in [(f, self._dense_cols) for f in dense_features] + \
                         [(f, self._label_cols) for f in label_features]:
            col = columns[name]
            if isinstance(col, tuple):
                raise ValueError(f"column {name!r}: ragged dense/label columns are not supported")
            if not isinstance(col, np.ndarray):
                col = np.asarray(col)
            if col.dtype.kind not in "iufb":
                raise ValueError(f"column {name!r}: dtype {col.dtype} is not numeric")
            if dst is self._label_cols and col.ndim != 1:
                raise ValueError(f"label column {name!r} must be 1-D, got {col.shape}")
            check_len(name, col.shape[0])
            dst[name] = col
        if n is None:
            raise ValueError("no columns selected: give id/dense/label features")
        if n == 0:
            raise ValueError("columns have 0 rows")
        self.num_examples = int(n)
        self.batch_size = int(batch_size)
        self.local_batch_size = self.batch_size // process_count
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_remainder = bool(drop_remainder)
        self.num_epochs = num_epochs
        self.process_index = int(process_index)
        self.process_count = int(process_count)
        if self.drop_remainder:
            self._batches_per_epoch = self.num_examples // self.batch_size
        else:
            self._batches_per_epoch = -(-self.num_examples // self.batch_size)
        if self._batches_per_epoch == 0:
            raise ValueError(f"{self.num_examples} examples make no full batch of "
                             f"{self.batch_size} (drop_remainder=True)")
        self._epoch = 0
        self._position = 0
        self._perm: np.ndarray | None = None
        self._perm_epoch = -1

    # ------------------------------------------------------------------ state

    def __len__(self) -> int:
        """Batches per epoch."""
        return self._batches_per_epoch

    def state(self) -> dict:
        """The data position, JSON-serialisable: resume with :meth:`restore`."""
        return {"epoch": self._epoch, "position": self._position, "seed": self.seed,
                "num_examples": self.num_examples, "batch_size": self.batch_size}

    def restore(self, state: Mapping) -> None:
        """Moves to a position recorded by :meth:`state`.

        Args:
          state: the dict from ``state()``; seed, num_examples and batch_size must match.
        """
        for key in ("seed", "num_examples", "batch_size"):
            if key in state and int(state[key]) != getattr(self, key):
                raise ValueError(f"iterator state has {key}={state[key]}, this iterator "
                                 f"has {getattr(self, key)}")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self._batches_per_epoch:
            raise ValueError(f"bad iterator state epoch={epoch} position={position}")
        self._epoch, self._position = epoch, position

    # ------------------------------------------------------------------ iteration

    def _permutation(self, epoch: int) -> np.ndarray | None:
        if not self.shuffle:
            return None
        if self._perm_epoch != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm = rng.permutation(self.num_examples)
            self._perm_epoch = epoch
        return self._perm

    def _gather(self, rows: np.ndarray, valid: int) -> Batch:
        """Gathers local example indices ``rows`` (B_p,) of which the first ``valid``
        are real; the rest are padding."""
        b = len(rows)
        ids = {k: _to_int32(c[rows]) for k, c in self._id_cols.items()}
        for k, (values, offsets, length) in self._ragged.items():
            ids[k] = _ragged_to_padded(values, offsets, rows, length)
        dense = {k: np.asarray(c[rows], dtype=np.float32) for k, c in self._dense_cols.items()}
        labels = {k: np.asarray(c[rows], dtype=np.float32) for k, c in self._label_cols.items()}
        mask = np.zeros(b, np.float32)
        mask[:valid] = 1.0
        if valid < b:
            for v in ids.values():
                v[valid:] = -1
            for v in (*dense.values(), *labels.values()):
                v[valid:] = 0
        return Batch(ids=ids, dense=dense, labels=labels, mask=mask)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        if self._position >= self._batches_per_epoch:
            self._epoch += 1
            self._position = 0
        if self.num_epochs is not None and self._epoch >= self.num_epochs:
            raise StopIteration
        perm = self._permutation(self._epoch)
        start = self._position * self.batch_size + self.process_index * self.local_batch_size
        stop = min(start + self.local_batch_size, self.num_examples)
        valid = max(stop - start, 0)
        if perm is None:
            rows = np.arange(start, start + valid, dtype=np.int64)
        else:
            rows = perm[start:start + valid]
        if valid < self.local_batch_size:
            rows = np.concatenate([rows, np.zeros(self.local_batch_size - valid, np.int64)])
        batch = self._gather(rows, valid)
        self._position += 1
        return batch


def _check_ids(name: str, col: np.ndarray) -> None:
    """Id rows must be integers that fit in int32: -1 is padding and ids < -1 are
    out-of-vocabulary (the OOV row of an ``id_mode="oov"`` feature, see
    :func:`jax_recsys.embedding.lookup.map_ids`), so only int32 overflow is refused."""
    if col.dtype.kind not in "iu":
        raise ValueError(f"id column {name!r} must hold integer rows, got dtype {col.dtype} "
                         "(map raw ids with jax_recsys.data.vocab.Vocab first)")
    if col.size:
        # One scan of the column (memory-mapped or not); cheap relative to training.
        hi, lo = int(col.max()), int(col.min())
        if hi > _INT32_MAX or lo < _INT32_MIN:
            raise ValueError(f"id column {name!r} has rows outside int32 [-2^31, 2^31): "
                             f"min {lo}, max {hi}")


def _to_int32(x: np.ndarray) -> np.ndarray:
    return x.astype(np.int32) if x.dtype != np.int32 else np.array(x)
