"""Brute-force retrieval evaluation over ALL pins: Recall@K and NDCG@K, sharded.

The pin embeddings are row-sharded over the mesh axis (the same layout as the pin
table). Each shard scores every query against its own rows and counts, per query,
the valid pins scoring strictly above / equal to the query's held-out positive; only
those counts (and the positive's score) cross devices (psum). The queries are
replicated and processed in chunks, so memory is Q_chunk x R/S per shard.

Ties use the project's realistic rank (see `jax_recsys.metrics`), the expected rank
under random tie-breaking:

    rank = 1 + #{pins p != pos : s(p) > s(pos)} + #{pins p != pos : s(p) == s(pos)} / 2

With one positive per query, Recall@K is the fraction of queries with rank <= K
(fractional ranks compare as numbers, as in `metrics.recall_at_k`) and NDCG@K the
mean of 1 / log2(1 + rank) over those queries. A collapsed model (every pin scored
the same) thus gets rank (R + 1) / 2 for every query, i.e. Recall@K = 0 whenever
R >= 2K, instead of the credit that a top-K with ties broken by row index would give
to positives on low rows. Non-finite scores (a NaN/inf user or pin embedding) are a
ValueError, not a silent rank. The popularity baseline ranks every query against
the same fixed list: the K most frequent training pins.

`sharded_top_k` (the exact sharded top-K list) is kept for retrieval itself.

Legend: Q queries, D embedding dim, R pin rows, S shards, K top-k.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import shard_map
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jax_recsys import metrics
from jax_recsys.pretrain import kg_eval


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
    r, s, valid_rows = _item_rows(items_rd, mesh, axis, valid_rows)
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


def _item_rows(items_rd, mesh: Mesh, axis: str, valid_rows: int | None) -> tuple[int, int, int]:
    """(rows R, shards S, valid rows) of a row-sharded item table, checked."""
    r = items_rd.shape[0]
    s = mesh.shape[axis]
    if r % s:
        raise ValueError(f"items have {r} rows, not divisible by the {s} shards of '{axis}'")
    return r, s, r if valid_rows is None else int(valid_rows)


@functools.lru_cache(maxsize=32)
def _rank_counts_fn(mesh: Mesh, axis: str, rows_per_shard: int, valid_rows: int):
    """Per query: #valid pins scoring > / == the positive, and #non-finite scores."""

    def local(query_qd, items_rd, pos_q):
        scores_qr = jnp.dot(query_qd, items_rd.T, preferred_element_type=jnp.float32)
        offset = jax.lax.axis_index(axis) * rows_per_shard
        rows_r = offset + jnp.arange(rows_per_shard)
        is_pos = rows_r[None, :] == pos_q[:, None]
        pos_score = jax.lax.psum(jnp.sum(jnp.where(is_pos, scores_qr, 0.0), axis=1), axis)
        keep = (rows_r[None, :] < valid_rows) & ~is_pos
        return kg_eval.count_above(scores_qr, pos_score, keep, axis)

    fn = shard_map(
        local,
        mesh=mesh,
        in_specs=(P(), P(axis, None), P()),
        out_specs=(P(), P(), P()),
        check_vma=False,
    )
    return jax.jit(fn)


def positive_ranks(
    *,
    query_qd: np.ndarray | jax.Array,
    items_rd: jax.Array,
    pos_rows_q: np.ndarray,
    mesh: Mesh,
    axis: str = "data",
    valid_rows: int | None = None,
    chunk: int = 1024,
) -> np.ndarray:
    """Realistic 1-based rank of each query's positive among all valid items.

    ``rank = 1 + #{p != pos : s(p) > s(pos)} + #{p != pos : s(p) == s(pos)} / 2``
    over the rows below `valid_rows`, s the inner product; see the module docstring.

    Args:
      query_qd: [Q, D] queries (host or device; replicated on the mesh).
      items_rd: [R, D] item embeddings; R must divide by the mesh axis size. Rows
        at or beyond `valid_rows` (table padding) are never candidates.
      pos_rows_q: [Q] the positive row of each query, in [0, valid_rows).
      mesh: the mesh whose `axis` shards the item rows.
      axis: mesh axis name.
      valid_rows: number of real rows (default R).
      chunk: queries scored per device call (memory is chunk x R / S per shard).

    Returns:
      float64 [Q] ranks in [1, valid_rows] (half-integers where ties occur).

    Raises:
      ValueError: bad shapes or positive rows, or any non-finite score (the positive's
        or a candidate's), e.g. from a NaN embedding.
    """
    r, s, valid_rows = _item_rows(items_rd, mesh, axis, valid_rows)
    if not 0 < valid_rows <= r:
        raise ValueError(f"valid_rows={valid_rows} must be in [1, {r}] (the item rows)")
    query_qd = np.asarray(query_qd, np.float32)
    pos_q = np.asarray(pos_rows_q, np.int64).reshape(-1)
    q = query_qd.shape[0]
    if pos_q.shape[0] != q:
        raise ValueError(f"{q} queries but {pos_q.shape[0]} positive rows")
    if q and (pos_q.min() < 0 or pos_q.max() >= valid_rows):
        raise ValueError(f"positive rows must lie in [0, {valid_rows}); got "
                         f"[{pos_q.min()}, {pos_q.max()}]")
    items_rd = jax.device_put(items_rd, NamedSharding(mesh, P(axis, None)))
    fn = _rank_counts_fn(mesh, axis, r // s, valid_rows)
    rep = NamedSharding(mesh, P())
    ranks, bad = [], 0
    for start in range(0, q, chunk):
        part = query_qd[start : start + chunk]
        pos = pos_q[start : start + chunk]
        pad = (-part.shape[0]) % chunk if q > chunk else 0
        if pad:  # one compiled shape for every chunk
            part = np.concatenate([part, np.zeros((pad, part.shape[1]), np.float32)])
            pos = np.concatenate([pos, np.zeros(pad, np.int64)])
        greater, equal, nonfinite = fn(jax.device_put(part, rep), items_rd,
                                       jax.device_put(pos.astype(np.int32), rep))
        n = part.shape[0] - pad
        greater, equal = np.asarray(greater)[:n], np.asarray(equal)[:n]  # blocks
        bad += int(np.asarray(nonfinite)[:n].sum())
        ranks.append(kg_eval.realistic_rank(greater=greater, equal_others=equal))
    if bad:
        raise ValueError(
            f"retrieval scores contain {bad} non-finite values (NaN/inf user or pin "
            "embeddings); refusing to rank them")
    return np.concatenate(ranks) if ranks else np.zeros(0, np.float64)


def rank_of_positive(*, top_rows_qk: np.ndarray, pos_rows_q: np.ndarray) -> np.ndarray:
    """0-based position of each query's positive in a top-K list, K when absent.

    Positions follow the list order, so ties inside the list are broken however the
    list was built; `evaluate_retrieval` uses `positive_ranks` (realistic ties) instead.

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
      ranks_q: [Q] 0-based ranks, possibly fractional (realistic rank - 1); the
        query is a hit at K when ranks_q + 1 <= K.
      ks: cut-offs.

    Returns:
      {"recall@K": ..., "ndcg@K": ...} for each K (NaN when Q == 0: undefined, where 0.0
      read as a model, and a popularity baseline, that never found a positive).
    """
    one_based = np.asarray(ranks_q) + 1
    out = {}
    for k in ks:
        empty = one_based.size == 0
        out[f"recall@{k}"] = math.nan if empty else metrics.recall_at_k(one_based, k)
        out[f"ndcg@{k}"] = math.nan if empty else metrics.ndcg_at_k(one_based, k)
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

    The positive's rank is the realistic rank over all valid pins (module docstring):
    ties count one half, so equal scores never earn credit from row order.

    Args:
      user_qd: [Q, D] the user embedding of each held-out pair.
      pin_rd: [R, D] all pin embeddings (row-sharded on `axis`).
      pos_rows_q: [Q] the held-out positive pin row of each pair.
      mesh: mesh whose `axis` shards the pins.
      ks: cut-offs; the popularity list has min(max(ks), valid_rows) pins.
      axis: mesh axis name.
      valid_rows: real pin rows (default R).
      train_pin_rows: training pin rows; when given, adds `pop_recall@K` and
        `pop_ndcg@K` of the most-popular-pins baseline.
      chunk: queries per device call.

    Returns:
      Flat dict of metrics, plus `eval_pairs` (Q).

    Raises:
      ValueError: a non-finite score (NaN/inf in a user or pin embedding).
    """
    valid = pin_rd.shape[0] if valid_rows is None else int(valid_rows)
    kmax = min(max(ks), valid)
    ranks = positive_ranks(
        query_qd=user_qd, items_rd=pin_rd, pos_rows_q=pos_rows_q, mesh=mesh, axis=axis,
        valid_rows=valid, chunk=chunk,
    ) - 1.0
    out = recall_ndcg_from_ranks(ranks, ks)
    if train_pin_rows is not None:
        pop = popularity_ranks(
            train_pin_rows=train_pin_rows, pos_rows_q=pos_rows_q, num_rows=valid, k=kmax
        )
        out.update({f"pop_{k}": v for k, v in recall_ndcg_from_ranks(pop, ks).items()})
    out["eval_pairs"] = int(np.asarray(pos_rows_q).size)
    return out
