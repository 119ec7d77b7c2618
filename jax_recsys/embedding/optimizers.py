"""Sparse row-wise optimizers: updates that touch only the rows in the batch.

Every update follows the same three steps, run on one device's block of a
table inside ``shard_map`` (after the ids and row gradients of the whole batch
were all-gathered, or all-to-all'ed for column-wise tables):

1. combine duplicates: ``jnp.unique(ids, size=N)`` + ``segment_sum`` sums the
   gradients of repeated ids (N = ids in the batch, so shapes are static);
2. gather the U <= N touched rows and their optimizer slots, apply the rule;
3. scatter rows and slots back with ``mode="drop"`` -- ids not on this device
   (and invalid ids) use an out-of-bounds sentinel and are dropped.

No array of the table's shape is ever created for a gradient; with the table
and slots donated to the jitted step the scatters run in place, so the cost of
a step is flat in the table size.

Rules (g = summed gradient of a row, c = occurrences of the row in the batch,
lr_row = lr, or lr / sqrt(count) with ``frequency_adaptive`` where ``count``
is the per-row occurrence counter including this batch):

* SGD: ``row -= lr_row * g``.
* RowAdagrad: ``acc += mean_d(g**2)``; ``row -= lr_row * g / (sqrt(acc) + eps)``.
* LazyAdam: per-row step t (its own update count), m, v only for touched rows;
  ``row -= lr_row * mhat / (sqrt(vhat) + eps)`` with bias correction by t.

Slots (float32 unless noted): ``acc`` [R] (RowAdagrad), ``m``/``v`` [R, D] and
``step`` int32 [R] (LazyAdam), ``count`` [R] (frequency_adaptive).

Dimension legend: N ids in the (all-gathered) batch, U unique rows (padded to
N), R rows of the local block, D local columns.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jax_recsys.embedding import specs as specs_lib


def slot_layout(optimizer: specs_lib.OptimizerSpec) -> dict[str, tuple[str, float, str]]:
    """The optimizer state of one table: slot name -> (kind, init value, dtype).

    Args:
      optimizer: the sparse optimizer spec.

    Returns:
      dict of slot name -> ("row" for [R] or "matrix" for [R, D], initial value, dtype name).
    """
    slots: dict[str, tuple[str, float, str]] = {}
    if isinstance(optimizer, specs_lib.RowAdagrad):
        slots["acc"] = ("row", float(optimizer.initial_accumulator), "float32")
    elif isinstance(optimizer, specs_lib.LazyAdam):
        slots["m"] = ("matrix", 0.0, "float32")
        slots["v"] = ("matrix", 0.0, "float32")
        slots["step"] = ("row", 0, "int32")
    if optimizer.frequency_adaptive:
        slots["count"] = ("row", 0.0, "float32")
    return slots


def combine_duplicates(
    ids_n: jax.Array, grads_nd: jax.Array, *, sentinel: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Sums the gradients of repeated ids.

    Args:
      ids_n: int32 [N] local row ids; invalid/non-local entries must equal ``sentinel``.
      grads_nd: [N, D] gradients.
      sentinel: an out-of-bounds row id (the local block's row count).

    Returns:
      (uniq_u [N] unique ids padded with ``sentinel``, grads_ud float32 [N, D]
      summed gradients, count_u float32 [N] occurrences per unique id).
    """
    n = ids_n.shape[0]
    uniq, inv = jnp.unique(ids_n, size=n, fill_value=sentinel, return_inverse=True)
    inv = inv.reshape(-1)
    g = jax.ops.segment_sum(grads_nd.astype(jnp.float32), inv, num_segments=n)
    c = jax.ops.segment_sum(jnp.ones((n,), jnp.float32), inv, num_segments=n)
    return uniq, g, c


def update_rows(
    optimizer: specs_lib.OptimizerSpec,
    *,
    rows_ud: jax.Array,
    slots_u: dict[str, jax.Array],
    grads_ud: jax.Array,
    count_u: jax.Array,
    true_dim: int,
    row_sum: Callable[[jax.Array], jax.Array] = lambda x: x,
    lr_scale: jax.Array | float = 1.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Applies one optimizer rule to U gathered rows (pure, no scatter).

    Args:
      optimizer: the rule.
      rows_ud: [U, D] current rows.
      slots_u: slot name -> [U] or [U, D] current slot values of those rows.
      grads_ud: float32 [U, D] summed gradients.
      count_u: float32 [U] occurrences of each row in the batch.
      true_dim: the table's D (mean for RowAdagrad, excluding column padding).
      row_sum: reduces a per-row partial sum over devices that hold other
        columns of the row (psum for column-wise tables; identity otherwise).
      lr_scale: multiplies the learning rate (e.g. a schedule).

    Returns:
      (new rows [U, D] in the table dtype, new slots dict).
    """
    new_slots = dict(slots_u)
    lr = optimizer.learning_rate * lr_scale
    lr_u = jnp.full(count_u.shape, lr, jnp.float32)
    if optimizer.frequency_adaptive:
        cnt = slots_u["count"] + count_u
        new_slots["count"] = cnt
        lr_u = lr_u * jax.lax.rsqrt(jnp.maximum(cnt, 1.0))
    x = rows_ud.astype(jnp.float32)
    g = grads_ud
    if isinstance(optimizer, specs_lib.SGD):
        delta = g
    elif isinstance(optimizer, specs_lib.RowAdagrad):
        acc = slots_u["acc"] + row_sum(jnp.sum(g * g, axis=-1)) / true_dim
        new_slots["acc"] = acc
        delta = g / (jnp.sqrt(acc)[:, None] + optimizer.eps)
    elif isinstance(optimizer, specs_lib.LazyAdam):
        t = slots_u["step"] + 1
        m = optimizer.b1 * slots_u["m"] + (1.0 - optimizer.b1) * g
        v = optimizer.b2 * slots_u["v"] + (1.0 - optimizer.b2) * g * g
        tf = t.astype(jnp.float32)[:, None]
        mhat = m / (1.0 - optimizer.b1**tf)
        vhat = v / (1.0 - optimizer.b2**tf)
        new_slots.update(m=m, v=v, step=t)
        delta = mhat / (jnp.sqrt(vhat) + optimizer.eps)
    else:
        raise TypeError(f"unsupported sparse optimizer {optimizer!r}")
    new_rows = x - lr_u[:, None] * delta
    return new_rows.astype(rows_ud.dtype), new_slots


def sparse_update(
    table_rd: jax.Array,
    slots: dict[str, jax.Array],
    ids_n: jax.Array,
    grads_nd: jax.Array,
    *,
    optimizer: specs_lib.OptimizerSpec,
    true_dim: int,
    row_sum: Callable[[jax.Array], jax.Array] = lambda x: x,
    lr_scale: jax.Array | float = 1.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Updates the touched rows of one local table block in place (when donated).

    Args:
      table_rd: [R, D] local block.
      slots: slot name -> [R] or [R, D] local slot arrays.
      ids_n: int32 [N] local row ids; anything outside [0, R) is ignored.
      grads_nd: [N, D] row gradients (duplicates allowed).
      optimizer: the rule.
      true_dim: the table's D.
      row_sum: see :func:`update_rows`.
      lr_scale: multiplies the learning rate.

    Returns:
      (new table block, new slots) -- same shapes, only touched rows differ.
    """
    r = table_rd.shape[0]
    ids = jnp.where((ids_n >= 0) & (ids_n < r), ids_n, r).astype(jnp.int32)
    uniq, g, c = combine_duplicates(ids, grads_nd, sentinel=r)
    rows = table_rd.at[uniq].get(mode="fill", fill_value=0)
    slots_u = {k: s.at[uniq].get(mode="fill", fill_value=0) for k, s in slots.items()}
    new_rows, new_slots_u = update_rows(
        optimizer, rows_ud=rows, slots_u=slots_u, grads_ud=g, count_u=c,
        true_dim=true_dim, row_sum=row_sum, lr_scale=lr_scale,
    )
    table_rd = table_rd.at[uniq].set(new_rows, mode="drop", unique_indices=False)
    new_slots = {
        k: slots[k].at[uniq].set(new_slots_u[k].astype(slots[k].dtype), mode="drop")
        for k in slots
    }
    return table_rd, new_slots
