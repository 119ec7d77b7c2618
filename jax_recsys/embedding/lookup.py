"""Sharded embedding lookup kernels, id hashing/OOV mapping and host-side id checks.

The kernels here run *inside* ``jax.shard_map`` over the table axis: ids and
results are sharded by batch, tables as described in ``sharding.py``.

* row-wise / table-wise: all-gather the ids (tiled) -> gather the rows that
  live in this device's block (others are zero) -> optional pooling ->
  ``psum_scatter`` over the batch back to this device's examples.
* column-wise: all-gather the ids -> gather this device's columns for every
  example -> ``all_to_all`` (split batch, concat columns).
* replicated: a local gather of the local ids; no communication.

Invalid ids: -1 is padding. Inside jit, any id outside [0, R) (and any id of
a ``"direct"`` feature that is out of range) is treated exactly like padding:
its row is a zero vector and it never receives an update. ``check_ids`` is the
host-side check that turns out-of-range ids into a clear error instead.

Ids are int32 inside jit. Raw ids that do not fit (e.g. 64-bit hashes) must be
hashed on the host with ``hash_ids_np``; ``check_ids`` and the collection's
eager entry points raise for NumPy ids outside int32 in every ``id_mode``.

Dimension legend: B batch (global), b = B/S local batch, L ids per example,
D embedding dim, R table rows, S shards.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jax_recsys.embedding import sharding as sharding_lib, specs as specs_lib

ShardingType = sharding_lib.ShardingType


# --------------------------------------------------------------------------- hashing / OOV


def _fmix32_np(h: np.ndarray) -> np.ndarray:
    h = h.astype(np.uint32)
    h ^= h >> np.uint32(16)
    h *= np.uint32(0x85EBCA6B)
    h ^= h >> np.uint32(13)
    h *= np.uint32(0xC2B2AE35)
    h ^= h >> np.uint32(16)
    return h


def _fmix32(h: jax.Array) -> jax.Array:
    h = h.astype(jnp.uint32)
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    h = h ^ (h >> 16)
    return h


INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def hash_ids_np(raw_ids: np.ndarray, *, rows: int) -> np.ndarray:
    """Host hashing of raw ids of any integer size; equals :func:`hash_ids` for ids < 2**31.

    This is the way to use 64-bit raw ids: ids inside jit are int32, so hash them
    here, on the host, and feed the resulting rows (already in [0, R) or -1) to
    a feature with ``id_mode="direct"`` on the same table. Ids >= 2**31 are
    folded as ``low32 ^ high32`` before the same murmur3 finalizer, so an id
    < 2**31 gets the same row here as in :func:`hash_ids` inside jit.

    Args:
      raw_ids: integer array of any shape and integer dtype (int64, uint64, ...);
        -1 padding, other negatives -> OOV.
      rows: table rows R (>= 2); rows [0, R-1) are hash buckets, R-1 is OOV.

    Returns:
      int32 array of the same shape with rows in [0, R) or -1.

    Raises:
      ValueError: non-integer ids or rows < 2.
    """
    raw = np.asarray(raw_ids)
    if not np.issubdtype(raw.dtype, np.integer):
        raise ValueError(f"hash_ids_np: raw ids must be integers, got dtype {raw.dtype}")
    if not isinstance(rows, int | np.integer) or isinstance(rows, bool) or rows < 2:
        raise ValueError(f"hash_ids_np: rows must be an int >= 2 (the last row is OOV), got {rows!r}")
    u = raw.astype(np.uint64)  # two's complement for negatives (masked below)
    folded = ((u & np.uint64(0xFFFFFFFF)) ^ (u >> np.uint64(32))).astype(np.uint32)
    bucket = (_fmix32_np(folded) % np.uint32(rows - 1)).astype(np.int32)
    if np.issubdtype(raw.dtype, np.signedinteger):
        out = np.where(raw >= 0, bucket, np.int32(rows - 1))
        out = np.where(raw == -1, np.int32(-1), out)
    else:
        out = bucket
    return out.astype(np.int32)


def hash_ids(raw_ids: jax.Array, *, rows: int) -> jax.Array:
    """Hashes raw non-negative ids into rows [0, R-1); R-1 is the OOV row.

    Ids inside jit are int32 (JAX's default), so raw ids must be < 2**31: hash
    wider ids on the host with :func:`hash_ids_np` (``check_ids`` and the
    collection's eager entry points reject NumPy ids that do not fit in int32).
    Ids that arrive as int64/uint64 (``jax_enable_x64``) or uint32 arrays are
    folded exactly like :func:`hash_ids_np` (a static dtype branch: int32 ids
    take the plain path).

    Args:
      raw_ids: integer ids of any shape; -1 stays padding, other negative ids
        map to the OOV row R-1.
      rows: table rows R (>= 2).

    Returns:
      int32 rows in [0, R) or -1, same shape.
    """
    raw = jnp.asarray(raw_ids)
    signed = jnp.issubdtype(raw.dtype, jnp.signedinteger)
    if raw.dtype.itemsize > 4:  # only with jax_enable_x64
        u = raw.astype(jnp.uint64)
        folded = ((u & jnp.uint64(0xFFFFFFFF)) ^ (u >> jnp.uint64(32))).astype(jnp.uint32)
    else:
        if signed:
            raw = raw.astype(jnp.int32)
        folded = raw.astype(jnp.uint32)
    bucket = (_fmix32(folded) % jnp.uint32(rows - 1)).astype(jnp.int32)
    if not signed:
        return bucket
    out = jnp.where(raw >= 0, bucket, rows - 1)
    return jnp.where(raw == -1, -1, out).astype(jnp.int32)


def map_ids(ids: jax.Array, *, feature: specs_lib.FeatureSpec, rows: int) -> jax.Array:
    """Raw feature ids -> table rows, -1 for padding and for invalid ids.

    int32 ids (the normal case) are mapped directly. Wider or unsigned id
    dtypes (int64 with ``jax_enable_x64``, uint32) are range-checked *before*
    narrowing, so an id outside int32 is never truncated into a valid row: it
    is invalid for ``"direct"``, the OOV row for ``"oov"`` and hashed like
    :func:`hash_ids_np` for ``"hash"``.

    Args:
      ids: int ids [B] or [B, L].
      feature: its FeatureSpec (``id_mode`` decides direct/oov/hash).
      rows: R of the table the feature reads.

    Returns:
      int32 rows in [0, R) or -1 (never updated, zero vector), same shape.
    """
    ids = jnp.asarray(ids)
    if feature.id_mode == "hash":
        return hash_ids(ids, rows=rows)
    if ids.dtype.itemsize > 4 or not jnp.issubdtype(ids.dtype, jnp.signedinteger):
        beyond = ids > INT32_MAX
        if jnp.issubdtype(ids.dtype, jnp.signedinteger):
            beyond = beyond | (ids < INT32_MIN)
        replacement = rows - 1 if feature.id_mode == "oov" else -1
        ids = jnp.where(beyond, replacement, ids.astype(jnp.int32))
    ids = ids.astype(jnp.int32)
    if feature.id_mode == "oov":
        oov = jnp.where((ids >= rows - 1) | (ids < -1), rows - 1, ids)
        return oov.astype(jnp.int32)
    return jnp.where((ids >= 0) & (ids < rows), ids, -1).astype(jnp.int32)


def check_int32_ids(name: str, ids, *, rows: int | None = None, kind: str = "feature") -> None:
    """Raises if host ids of a feature do not fit in int32 (inside jit they would be truncated).

    A no-op for jax.Arrays and tracers (already on device) and for int32 or
    narrower dtypes; otherwise one min/max scan of the array.

    Args:
      name: feature name (for the message).
      ids: host ids (NumPy array, list, ...) or a jax.Array.
      rows: R of the feature's table, for the hint in the message.
      kind: what ``name`` names, for the message.

    Raises:
      ValueError: naming the feature, the first bad position and value, and
        pointing to :func:`hash_ids_np`.
    """
    if isinstance(ids, jax.Array):
        return
    a = np.asarray(ids)
    if not np.issubdtype(a.dtype, np.integer) or not a.size:
        return
    info = np.iinfo(a.dtype)
    if info.min >= INT32_MIN and info.max <= INT32_MAX:
        return
    bad = a > INT32_MAX
    if info.min < 0:
        bad |= a < INT32_MIN
    if bad.any():
        pos = tuple(int(i) for i in np.argwhere(bad)[0])
        r = rows if rows is not None else "R"
        raise ValueError(
            f"{kind} {name!r}: id {int(a[pos])} at position {pos} does not fit in int32 "
            f"({int(bad.sum())} such id(s)); ids are int32 inside jit and would be silently "
            f"truncated. Hash 64-bit raw ids on the host with "
            f"jax_recsys.embedding.lookup.hash_ids_np(ids, rows={r}) and feed the rows to a "
            f"feature with id_mode='direct', or map them to rows with a vocabulary"
        )


def check_ids(
    ids: Mapping[str, np.ndarray],
    *,
    features: Mapping[str, specs_lib.FeatureSpec],
    tables: Mapping[str, specs_lib.TableSpec],
) -> None:
    """Host-side validation of a batch's ids (eager; never inside jit).

    Args:
      ids: feature name -> int ids [B] or [B, L] (-1 = padding).
      features: feature name -> FeatureSpec.
      tables: table name -> TableSpec.

    Raises:
      ValueError: unknown feature, non-integer ids, wrong rank or L, ids that
        do not fit in int32 (any ``id_mode``: hash 64-bit ids on the host with
        :func:`hash_ids_np`), or (for ``id_mode="direct"``) ids outside
        [-1, R), naming the feature, the first bad position and value.
    """
    for name, arr in ids.items():
        if name not in features:
            raise ValueError(f"batch has ids for unknown feature {name!r}; features are {sorted(features)}")
        f = features[name]
        a = np.asarray(arr)
        if not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"feature {name!r}: ids must be integers, got dtype {a.dtype}")
        if a.ndim not in (1, 2):
            raise ValueError(f"feature {name!r}: ids must be [B] or [B, L], got shape {a.shape}")
        if a.ndim == 2 and a.shape[1] != f.max_ids:
            raise ValueError(
                f"feature {name!r}: ids have L={a.shape[1]} per example but max_ids={f.max_ids}"
            )
        if a.ndim == 1 and f.pooling != "none":
            raise ValueError(f"feature {name!r}: pooling={f.pooling!r} needs ids [B, L], got {a.shape}")
        rows = tables[f.table].rows
        check_int32_ids(name, a, rows=rows)
        if f.id_mode != "direct":
            continue
        bad = (a < -1) | (a >= rows)
        if bad.any():
            pos = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(
                f"feature {name!r}: id {int(a[pos])} at position {pos} is out of range for table "
                f"{f.table!r} with {rows} rows (valid: 0..{rows - 1}, -1 = padding); "
                f"{int(bad.sum())} bad id(s) in total"
            )


# --------------------------------------------------------------------------- pooling


def pool(
    rows: jax.Array, valid: jax.Array, *, pooling: str, weights: jax.Array | None = None
) -> jax.Array:
    """Pools [..., L, D] rows over L.

    Args:
      rows: [B, L, D] rows (zero where invalid).
      valid: bool [B, L], False for padding/invalid ids.
      pooling: ``"sum"`` (sum_l w_l x_l) or ``"mean"`` (that sum / max(#valid, 1)).
      weights: optional float [B, L] per-id weights (default 1).

    Returns:
      [B, D] pooled rows.
    """
    w = valid.astype(jnp.float32)
    if weights is not None:
        w = w * weights.astype(jnp.float32)
    out = jnp.einsum("bl,bld->bd", w, rows.astype(jnp.float32))
    if pooling == "mean":
        out = out / jnp.maximum(valid.sum(-1, keepdims=True).astype(jnp.float32), 1.0)
    return out.astype(rows.dtype)


def pool_weights(
    valid: jax.Array, *, pooling: str, weights: jax.Array | None = None
) -> jax.Array:
    """d(pooled)/d(row_l) for each id: the factor that maps a pooled gradient back to ids.

    Args:
      valid: bool [B, L].
      pooling: ``"sum"`` or ``"mean"``.
      weights: optional float [B, L].

    Returns:
      float32 [B, L]: w_l (sum) or w_l / max(#valid, 1) (mean), zero where invalid.
    """
    w = valid.astype(jnp.float32)
    if weights is not None:
        w = w * weights.astype(jnp.float32)
    if pooling == "mean":
        w = w / jnp.maximum(valid.sum(-1, keepdims=True).astype(jnp.float32), 1.0)
    return w


# --------------------------------------------------------------------------- kernels (in shard_map)


def local_gather(
    table: jax.Array,
    ids_all: jax.Array,
    *,
    layout: sharding_lib.StorageLayout,
    axis: str,
) -> tuple[jax.Array, jax.Array]:
    """Gathers this device's part of the rows for (all-gathered or local) storage ids.

    Args:
      table: this device's storage block [R_local, D_local].
      ids_all: storage rows, -1 invalid, any shape [...] (the whole batch for
        row-wise/table-wise/column-wise, the local batch for replicated).
      layout: the storage layout.
      axis: mesh axis name.

    Returns:
      (rows [..., D_local] zero where this device has nothing, valid bool [...]
      -- True where the id is valid at all, regardless of which device owns it).
    """
    valid = ids_all >= 0
    if layout.row_sharded:
        lo = jax.lax.axis_index(axis) * layout.local_rows
        loc = ids_all - lo
        mine = valid & (loc >= 0) & (loc < layout.local_rows)
    else:
        loc = ids_all
        mine = valid
    rows = jnp.take(table, jnp.where(mine, loc, 0), axis=0)
    rows = jnp.where(mine[..., None], rows, jnp.zeros((), table.dtype))
    return rows, valid


def sharded_lookup(
    table: jax.Array,
    ids_local: jax.Array,
    *,
    layout: sharding_lib.StorageLayout,
    axis: str,
    pooling: str,
    weights_local: jax.Array | None = None,
) -> jax.Array:
    """Lookup of one feature inside shard_map; ids and result sharded by batch.

    Args:
      table: this device's storage block.
      ids_local: storage rows for this device's examples [b] or [b, L], -1 invalid.
      layout: the storage layout.
      axis: mesh axis name.
      pooling: ``"none"`` (result [b, D] / [b, L, D]) or ``"sum"``/``"mean"`` ([b, D]).
      weights_local: optional [b, L] per-id weights for pooling.

    Returns:
      This device's rows, D = the table's true dim.
    """
    st = layout.sharding
    if st == ShardingType.REPLICATED:
        rows, valid = local_gather(table, ids_local, layout=layout, axis=axis)
        if pooling != "none":
            rows = pool(rows, valid, pooling=pooling, weights=weights_local)
        return rows
    ids_all = jax.lax.all_gather(ids_local, axis, axis=0, tiled=True)
    rows, valid = local_gather(table, ids_all, layout=layout, axis=axis)
    if pooling != "none":
        w_all = None
        if weights_local is not None:
            w_all = jax.lax.all_gather(weights_local, axis, axis=0, tiled=True)
        rows = pool(rows, valid, pooling=pooling, weights=w_all)
    if st == ShardingType.COLUMN_WISE:
        out = jax.lax.all_to_all(rows, axis, 0, rows.ndim - 1, tiled=True)
        return out[..., : layout.true_dim]
    return jax.lax.psum_scatter(rows, axis, scatter_dimension=0, tiled=True)
