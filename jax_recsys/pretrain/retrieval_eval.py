"""Brute-force retrieval evaluation: sharded top-K over ALL pins, Recall@K and NDCG@K.

The pin embeddings are row-sharded over the mesh axis (the same layout as the pin
table). Each shard scores every query against its own rows, keeps its local top-K,
and the S local lists are all-gathered and merged into the global top-K. The
queries are replicated and processed in chunks, so memory is Q_chunk x R/S per
shard. With one positive per query, Recall@K is the fraction of queries whose
positive is in the top K and NDCG@K is the mean of 1 / log2(rank + 2) over those
hits (rank 0-based). The popularity baseline ranks every query against the same
list: the K most frequent training pins.

Legend: Q queries, D embedding dim, R pin rows, S shards, K top-k.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import shard_map
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jax_recsys import metrics


@functools.lru_cache(maxsize=32)
def _top_k_fn(mesh: Mesh, axis: str, k: int, rows_per_shard: int, valid_rows: int):
    local_k = min(k, rows_per_shard)

    def local(query_qd, items_rd):
        scores_qr = jnp.dot(query_qd, items_rd.T, preferred_element_type=jnp.float32)
        offset = jax.lax.axis_index(axis) * rows_per_shard
        rows_r = offset + jnp.arange(rows_per_shard)
        scores_qr = jnp.where(rows_r[None, :] < valid_rows, scores_qr, -jnp.inf)
        top_qk, idx_qk = jax.lax.top_k(scores_qr, local_k)
        rows_qk = (idx_qk + offset).astype(jnp.int32)
        all_scores = jax.lax.all_gather(top_qk, axis, axis=1, tiled=True)  # [Q, S*k]
        all_rows = jax.lax.all_gather(rows_qk, axis, axis=1, tiled=True)
        best_qk, pos_qk = jax.lax.top_k(all_scores, k)
        return best_qk, jnp.take_along_axis(all_rows, pos_qk, axis=1)

    fn = shard_map(
        local,
        mesh=mesh,
        in_specs=(P(), P(axis, None)),
        out_specs=(P(), P()),
        check_vma=False,
    )
    return jax.jit(fn)


def sharded_top_k(
    *,
    query_qd: np.ndarray | jax.Array,
    items_rd: jax.Array,
    k: int,
    mesh: Mesh,
    axis: str = "data",
    valid_rows: int | None = None,
    chunk: int = 1024,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-K items for each query by inner product, items row-sharded.

    Args:
      query_qd: [Q, D] queries (host or device; replicated on the mesh).
      items_rd: [R, D] item embeddings; R must divide by the mesh axis size. Rows
        at or beyond `valid_rows` (table padding) are never returned.
      k: how many items per query; at most `valid_rows`.
      mesh: the mesh whose `axis` shards the item rows.
      axis: mesh axis name.
      valid_rows: number of real rows (default R).
      chunk: queries scored per device call (memory is chunk x R / S per shard).

    Returns:
      (scores [Q, K] float32 descending, rows [Q, K] int32) as NumPy arrays.
    """
    r = items_rd.shape[0]
    s = mesh.shape[axis]
    valid_rows = r if valid_rows is None else int(valid_rows)
    if r % s:
        raise ValueError(f"items have {r} rows, not divisible by the {s} shards of '{axis}'")
    if not 0 < k <= valid_rows:
        raise ValueError(f"k={k} must be in [1, {valid_rows}] (the number of items)")
    items_rd = jax.device_put(items_rd, NamedSharding(mesh, P(axis, None)))
    fn = _top_k_fn(mesh, axis, int(k), r // s, valid_rows)
    query_qd = np.asarray(query_qd, np.float32)
    q = query_qd.shape[0]
    scores, rows = [], []
    for start in range(0, q, chunk):
        part = query_qd[start : start + chunk]
        pad = (-part.shape[0]) % chunk if q > chunk else 0
        if pad:  # one compiled shape for every chunk
            part = np.concatenate([part, np.zeros((pad, part.shape[1]), np.float32)])
        sc, rw = fn(jax.device_put(part, NamedSharding(mesh, P())), items_rd)
        sc, rw = np.asarray(sc), np.asarray(rw)  # blocks before the next chunk
        n = part.shape[0] - pad
        scores.append(sc[:n])
        rows.append(rw[:n])
    if not scores:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int32)
    return np.concatenate(scores), np.concatenate(rows)


def rank_of_positive(*, top_rows_qk: np.ndarray, pos_rows_q: np.ndarray) -> np.ndarray:
    """0-based rank of each query's positive in its top-K list, K when absent.

    Args:
      top_rows_qk: [Q, K] retrieved rows, best first.
      pos_rows_q: [Q] the positive row of each query.

    Returns:
      [Q] int64 ranks in [0, K].
    """
    hit_qk = top_rows_qk == np.asarray(pos_rows_q)[:, None]
    k = top_rows_qk.shape[1]
    return np.where(hit_qk.any(axis=1), hit_qk.argmax(axis=1), k).astype(np.int64)


def recall_ndcg_from_ranks(ranks_q: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    """Recall@K and NDCG@K for single-positive queries from their 0-based ranks.

    Args:
      ranks_q: [Q] ranks (anything >= K is a miss at K).
      ks: cut-offs.

    Returns:
      {"recall@K": ..., "ndcg@K": ...} for each K (0.0 when Q == 0).
    """
    one_based = np.asarray(ranks_q) + 1
    out = {}
    for k in ks:
        empty = one_based.size == 0
        out[f"recall@{k}"] = 0.0 if empty else metrics.recall_at_k(one_based, k)
        out[f"ndcg@{k}"] = 0.0 if empty else metrics.ndcg_at_k(one_based, k)
    return out


def popularity_ranks(
    *, train_pin_rows: np.ndarray, pos_rows_q: np.ndarray, num_rows: int, k: int
) -> np.ndarray:
    """Ranks of held-out positives in the K most popular training pins.

    Args:
      train_pin_rows: pin rows of the training pairs (one per pair).
      pos_rows_q: [Q] held-out positive rows.
      num_rows: number of pin rows.
      k: length of the popularity list.

    Returns:
      [Q] 0-based ranks in the popularity list, K when absent.
    """
    counts = np.bincount(np.asarray(train_pin_rows), minlength=num_rows)
    # Stable order: ties broken by lower row, so the baseline is deterministic.
    top = np.argsort(-counts, kind="stable")[:k]
    rank_of_row = np.full(num_rows, k, np.int64)
    rank_of_row[top] = np.arange(top.size)
    return rank_of_row[np.asarray(pos_rows_q)]


def evaluate_retrieval(
    *,
    user_qd: np.ndarray | jax.Array,
    pin_rd: jax.Array,
    pos_rows_q: np.ndarray,
    mesh: Mesh,
    ks: Sequence[int] = (10, 50, 100),
    axis: str = "data",
    valid_rows: int | None = None,
    train_pin_rows: np.ndarray | None = None,
    chunk: int = 1024,
) -> dict[str, float]:
    """Recall@K / NDCG@K of held-out pairs against all pins, plus the popularity baseline.

    Args:
      user_qd: [Q, D] the user embedding of each held-out pair.
      pin_rd: [R, D] all pin embeddings (row-sharded on `axis`).
      pos_rows_q: [Q] the held-out positive pin row of each pair.
      mesh: mesh whose `axis` shards the pins.
      ks: cut-offs; the top-K list is computed once at max(ks).
      axis: mesh axis name.
      valid_rows: real pin rows (default R).
      train_pin_rows: training pin rows; when given, adds `pop_recall@K` and
        `pop_ndcg@K` of the most-popular-pins baseline.
      chunk: queries per device call.

    Returns:
      Flat dict of metrics, plus `eval_pairs` (Q).
    """
    valid = pin_rd.shape[0] if valid_rows is None else int(valid_rows)
    kmax = min(max(ks), valid)
    _, top_rows = sharded_top_k(
        query_qd=user_qd, items_rd=pin_rd, k=kmax, mesh=mesh, axis=axis,
        valid_rows=valid, chunk=chunk,
    )
    ranks = rank_of_positive(top_rows_qk=top_rows, pos_rows_q=pos_rows_q)
    out = recall_ndcg_from_ranks(ranks, ks)
    if train_pin_rows is not None:
        pop = popularity_ranks(
            train_pin_rows=train_pin_rows, pos_rows_q=pos_rows_q, num_rows=valid, k=kmax
        )
        out.update({f"pop_{k}": v for k, v in recall_ndcg_from_ranks(pop, ks).items()})
    out["eval_pairs"] = int(np.asarray(pos_rows_q).size)
    return out
