"""Typed descriptions of embedding tables, the features that read them, and their optimizers.

These frozen, keyword-only dataclasses are the only thing a user writes to get a
sharded, sparsely-updated embedding table. Many features may share one table
(e.g. ``user_id`` and ``clicked_by_user_id`` both read the ``user`` table).

Dimension legend: B batch, L ids per example (multi-hot), D embedding dim,
R table rows, S shards/devices.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax.numpy as jnp
import numpy as np

Pooling = Literal["none", "sum", "mean"]
IdMode = Literal["direct", "oov", "hash"]
INITIALIZERS = ("normal", "uniform", "zeros", "ones")
SHARDINGS = ("row_wise", "table_wise", "column_wise", "replicated")
MAX_ROWS = 2**31 - 1  # ids and rows are int32 inside jit


def _real(owner: str, field: str, value: Any, *, low: float, low_ok: bool, high: float | None = None
          ) -> float:
    """``value`` as a Python float if it is a finite real number (not bool) in range, else ValueError.

    The range is [low, high) (``low_ok``) or (low, high); ``high=None`` means no upper bound.
    NumPy scalars (``np.float32(0.01)``) are accepted and converted.
    """
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)
    if ok:
        x = float(value)
        ok = math.isfinite(x) and (x >= low if low_ok else x > low) and (high is None or x < high)
    if not ok:
        rng = f"{'[' if low_ok else '('}{low:g}, {'inf' if high is None else f'{high:g}'})"
        raise ValueError(f"{owner}.{field} must be a finite number in {rng}, got {value!r}")
    return x


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerSpec:
    """Base of the sparse row-wise optimizers (use SGD, RowAdagrad or LazyAdam).

    Attributes:
      learning_rate: step size for this table's rows (per table: a sparse
        optimizer typically runs at a far larger rate than the dense layers).
      frequency_adaptive: if True, a per-row occurrence counter ``count`` is kept
        (every occurrence of the row in a batch adds 1, duplicates included) and
        the row's step size is ``learning_rate / sqrt(count)`` with ``count``
        including the current batch, so rare rows move faster than frequent ones.
    """

    learning_rate: float = 0.01
    frequency_adaptive: bool = False

    def __post_init__(self):
        self._set_real("learning_rate", low=0.0, low_ok=True)
        if not isinstance(self.frequency_adaptive, bool | np.bool_):
            raise ValueError(
                f"{type(self).__name__}.frequency_adaptive must be a bool, got {self.frequency_adaptive!r}"
            )
        object.__setattr__(self, "frequency_adaptive", bool(self.frequency_adaptive))

    def _set_real(self, field: str, *, low: float, low_ok: bool, high: float | None = None) -> None:
        value = _real(type(self).__name__, field, getattr(self, field), low=low, low_ok=low_ok, high=high)
        object.__setattr__(self, field, value)  # NumPy scalars -> float (frozen dataclass)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SGD(OptimizerSpec):
    """Plain SGD on touched rows: ``row -= lr_row * g`` (g = summed duplicate gradients)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class RowAdagrad(OptimizerSpec):
    """Row-wise Adagrad: one accumulator per row.

    ``acc += mean(g**2 over the row's D columns)``; ``row -= lr_row * g / (sqrt(acc) + eps)``.

    Attributes:
      initial_accumulator: starting value of every row's accumulator (>= 0).
      eps: added to ``sqrt(acc)`` (>= 0). At least one of the two must be > 0,
        else a touched row whose accumulator is still 0 divides 0 by 0.
    """

    learning_rate: float = 0.05
    initial_accumulator: float = 0.1
    eps: float = 1e-8

    def __post_init__(self):
        super().__post_init__()
        self._set_real("initial_accumulator", low=0.0, low_ok=True)
        self._set_real("eps", low=0.0, low_ok=True)
        if self.initial_accumulator == 0 and self.eps == 0:
            raise ValueError(
                "RowAdagrad: initial_accumulator and eps are both 0, so a touched row with a zero "
                "gradient would compute 0 / (sqrt(0) + 0) = NaN; make one of them > 0"
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class LazyAdam(OptimizerSpec):
    """Adam whose moments and step counts only change for rows touched in the batch.

    Per touched row (t = the row's own update count, kept in slot ``step``;
    rows not in the batch keep m, v and t unchanged -- no decay)::

        t += 1; m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g**2
        row -= lr_row * (m / (1 - b1**t)) / (sqrt(v / (1 - b2**t)) + eps)

    Attributes:
      b1, b2, eps: the usual Adam constants (b1, b2 in [0, 1): the bias
        correction divides by ``1 - b**t``; eps > 0).
    """

    learning_rate: float = 0.001
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self):
        super().__post_init__()
        self._set_real("b1", low=0.0, low_ok=True, high=1.0)
        self._set_real("b2", low=0.0, low_ok=True, high=1.0)
        self._set_real("eps", low=0.0, low_ok=False)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TableSpec:
    """One embedding table.

    Attributes:
      name: unique table name (e.g. an entity type: ``user``, ``pin``).
      rows: number of rows R (> 0, at most ``MAX_ROWS`` = 2**31 - 1: ids are int32
        inside jit). Row-wise sharding pads R to a multiple of the device count;
        padded rows are zero and never receive ids.
      dim: embedding dimension D (> 0).
      initializer: ``"normal"`` (stddev ``init_scale`` or 1/sqrt(D)),
        ``"uniform"`` (in +-``init_scale`` or +-1/sqrt(D)), ``"zeros"``, ``"ones"``,
        or a callable ``(key, shape, dtype) -> array``.
      init_scale: scale for ``normal``/``uniform``; None -> 1/sqrt(D).
      dtype: storage dtype name (``"float32"`` or ``"bfloat16"``); optimizer
        math and slots are float32.
      sharding: ``"row_wise"``, ``"table_wise"``, ``"column_wise"``,
        ``"replicated"``, or None to let the planner choose.
      optimizer: the sparse optimizer of this table's rows.
    """

    name: str
    rows: int
    dim: int
    initializer: str | Callable[..., Any] = "normal"
    init_scale: float | None = None
    dtype: str = "float32"
    sharding: str | None = None
    optimizer: OptimizerSpec = dataclasses.field(default_factory=RowAdagrad)

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"TableSpec.name must be a non-empty string, got {self.name!r}")
        for field in ("rows", "dim"):
            value = getattr(self, field)
            if not isinstance(value, int | np.integer) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"TableSpec {self.name!r}: {field} must be an int > 0, got {value!r}")
        if self.rows > MAX_ROWS:
            raise ValueError(
                f"TableSpec {self.name!r}: rows must be <= 2**31 - 1 = {MAX_ROWS} (ids and rows "
                f"are int32 inside jit: rows beyond could never be looked up), got {self.rows}; "
                "split the table or hash the ids into fewer rows"
            )
        if isinstance(self.initializer, str) and self.initializer not in INITIALIZERS:
            raise ValueError(
                f"TableSpec {self.name!r}: unknown initializer {self.initializer!r}; "
                f"use one of {INITIALIZERS} or a callable (key, shape, dtype)"
            )
        if self.init_scale is not None:
            object.__setattr__(self, "init_scale", _real(
                f"TableSpec {self.name!r}", "init_scale", self.init_scale, low=0.0, low_ok=True))
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(
                f"TableSpec {self.name!r}: dtype must be float32, bfloat16 or float16, got {self.dtype!r}"
            )
        if self.sharding is not None and str(self.sharding) not in SHARDINGS:
            raise ValueError(
                f"TableSpec {self.name!r}: unknown sharding {self.sharding!r}; use one of {SHARDINGS} or None"
            )
        if not isinstance(self.optimizer, OptimizerSpec) or type(self.optimizer) is OptimizerSpec:
            raise ValueError(
                f"TableSpec {self.name!r}: optimizer must be SGD, RowAdagrad or LazyAdam, "
                f"got {self.optimizer!r}"
            )

    @property
    def bytes(self) -> int:
        """Bytes of the table values alone (no optimizer state, no padding)."""
        return int(self.rows) * int(self.dim) * jnp.dtype(self.dtype).itemsize


@dataclasses.dataclass(frozen=True, kw_only=True)
class FeatureSpec:
    """One id feature of a batch, read from one table.

    Attributes:
      name: the key of this feature in ``Batch.ids``.
      table: name of the TableSpec it reads.
      pooling: ``"none"`` (one row per id: [B, D] for ids [B], [B, L, D] for
        ids [B, L]), ``"sum"`` or ``"mean"`` (multi-hot ids [B, L] pooled to
        [B, D]; mean divides by the number of non-padding ids, at least 1).
      max_ids: L, the fixed number of ids per example for multi-hot features
        (1 for single-id features given as [B]). -1 marks padding.
      id_mode: how raw ids become rows:
        ``"direct"`` -- ids are rows; out-of-range ids are an error in
        ``check_ids`` and, inside jit, behave like padding (zero vector, no update).
        ``"oov"`` -- the table's last row (R-1) is an out-of-vocabulary row that
        every id >= R-1 or < -1 maps to (it is trained like any row).
        ``"hash"`` -- non-negative raw ids in [0, 2**31) are hashed (murmur3
        finalizer) into rows [0, R-1); ids < -1 map to the OOV row R-1.
        Ids are int32 inside jit in every mode: ids that do not fit (e.g.
        64-bit raw ids) are rejected by ``check_ids``; hash them on the host
        with ``lookup.hash_ids_np`` (same rows as in-jit hashing for ids
        < 2**31) and feed the rows to an ``id_mode="direct"`` feature.
    """

    name: str
    table: str
    pooling: Pooling = "none"
    max_ids: int = 1
    id_mode: IdMode = "direct"

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"FeatureSpec.name must be a non-empty string, got {self.name!r}")
        if self.pooling not in ("none", "sum", "mean"):
            raise ValueError(
                f"FeatureSpec {self.name!r}: pooling must be 'none', 'sum' or 'mean', got {self.pooling!r}"
            )
        m = self.max_ids
        if not isinstance(m, int | np.integer) or isinstance(m, bool) or m < 1:
            raise ValueError(f"FeatureSpec {self.name!r}: max_ids must be an int >= 1, got {m!r}")
        object.__setattr__(self, "max_ids", int(m))
        if self.id_mode not in ("direct", "oov", "hash"):
            raise ValueError(
                f"FeatureSpec {self.name!r}: id_mode must be 'direct', 'oov' or 'hash', got {self.id_mode!r}"
            )


def validate_specs(tables: Sequence[TableSpec], features: Sequence[FeatureSpec]) -> None:
    """Checks that names are unique and every feature names an existing table.

    Args:
      tables: the table specs.
      features: the feature specs.

    Raises:
      ValueError: naming the offending table or feature.
    """
    names = [t.name for t in tables]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"duplicate table names: {dup}")
    fnames = [f.name for f in features]
    fdup = sorted({n for n in fnames if fnames.count(n) > 1})
    if fdup:
        raise ValueError(f"duplicate feature names: {fdup}")
    by_name = {t.name: t for t in tables}
    for f in features:
        if f.table not in by_name:
            raise ValueError(
                f"feature {f.name!r} reads unknown table {f.table!r}; tables are {sorted(by_name)}"
            )
        if f.id_mode in ("oov", "hash") and by_name[f.table].rows < 2:
            raise ValueError(
                f"feature {f.name!r} uses id_mode={f.id_mode!r}, which needs table {f.table!r} "
                "to have at least 2 rows (the last one is the OOV row)"
            )

