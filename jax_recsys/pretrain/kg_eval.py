"""Filtered link-prediction evaluation (MRR, Hits@1/3/10), vectorised and sharded.

Protocol (the standard filtered one, Bordes et al. 2013): for a test triple (h, r, t)
the tail is ranked against every entity of r's tail type, and the head against every
entity of r's head type. Candidates e != t for which (h, r, e) is a true triple in any
split (train, valid or test) are removed before ranking ("filtered").

Ties use the realistic rank, the expected rank under random tie-breaking:

    rank = 1 + #{e kept : s(e) > s(t)} + #{e kept, e != t : s(e) == s(t)} / 2

so a model that gives every entity the same score gets the mean rank (n + 1) / 2
rather than 1 (optimistic) or n (pessimistic). Ranks can be half-integers; Hits@k
counts rank <= k. MRR and Hits are averaged over both sides (head and tail), and
reported per side too.

Sharding: entity tables are row-sharded on one mesh axis (storage [R_pad, D] with
PartitionSpec(axis, None); the padded rows are never candidates). A block of B test
triples is scored inside `shard_map`: each device scores the queries against its own
rows with one matmul ([B, D'] x [R/S, D']^T), and only the per-query counts
(#greater, #equal) and the target score cross devices (psum). The filtered
candidates arrive as a padded [B, F] list of rows and are scattered into a local
mask, so nothing of size [B, R] ever leaves a device. Blocks are homogeneous in the
(head type, tail type) pair, and in the relation for models that project candidates
per relation (TransR).

Legend: B test triples per block, D entity dim, D' comparison dim, F filtered
candidates per query (block max), R rows of the candidate type, S shards, NR relations.

Non-finite scores (a NaN/inf table row or relation parameter reaching a kept candidate
or the target) are counted on device and raise a ValueError on the host, as
`metrics.realistic_rank` does, instead of silently ranking the target first.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jax_recsys import metrics
from jax_recsys.data import kg as kg_data
from jax_recsys.pretrain import kg_scoring

HITS_AT = (1, 3, 10)


@dataclasses.dataclass(frozen=True, kw_only=True)
class KGEvalConfig:
    """How to run filtered evaluation.

    Attributes:
      block_size: test triples scored per device program (B).
      max_triples: evaluate on a deterministic subset of at most this many triples
        (None: all).
      sides: which corruptions to rank: ("head", "tail"), ("tail",) or ("head",).
    """

    block_size: int = 256
    max_triples: int | None = None
    sides: tuple[str, ...] = ("head", "tail")

    def __post_init__(self):
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if self.max_triples is not None and self.max_triples < 1:  # None: all of them
            raise ValueError(f"max_triples must be >= 1 or None (all triples; -1 in a config "
                             f"file or on the command line), got {self.max_triples}")
        if not self.sides or any(s not in ("head", "tail") for s in self.sides):
            raise ValueError(f"sides must be a non-empty subset of ('head', 'tail'), got {self.sides}")


def realistic_rank(*, greater: np.ndarray, equal_others: np.ndarray) -> np.ndarray:
    """1 + #greater + #equal/2 (ties broken at random, in expectation)."""
    return 1.0 + greater + 0.5 * equal_others


def rank_metrics(ranks: np.ndarray) -> dict[str, float]:
    """MRR and Hits@{1,3,10} of 1-based (possibly half-integer) ranks."""
    ranks = np.asarray(ranks, np.float64)
    if ranks.size == 0:
        raise ValueError("no ranks to summarise")
    out = {"mrr": metrics.mrr(ranks)}
    for k in HITS_AT:
        out[f"hits@{k}"] = metrics.hits_at_k(ranks, k)
    return out


def count_above(scores_br, target_b, keep_br, axis: str):
    """Inside ``shard_map``: per query, the kept candidates of all shards scoring above
    and equal to its target, and the non-finite scores among them and the target.

    NaN compares False both ways, so a NaN table would rank every target first: the
    host rejects any non-finite count instead.

    Args:
      scores_br: float [B, R/S] this shard's candidate scores.
      target_b: float [B] the target's score (already summed over shards).
      keep_br: bool [B, R/S] candidates that count (valid, not filtered, not the target).
      axis: the mesh axis the candidates are sharded over.

    Returns:
      (greater, equal, non_finite), int [B] each, summed over ``axis``.
    """
    ts = target_b[:, None]
    greater = jax.lax.psum(jnp.sum(keep_br & (scores_br > ts), axis=1), axis)
    equal = jax.lax.psum(jnp.sum(keep_br & (scores_br == ts), axis=1), axis)
    bad = jax.lax.psum(jnp.sum(keep_br & ~jnp.isfinite(scores_br), axis=1), axis)
    return greater, equal, bad + (~jnp.isfinite(target_b)).astype(bad.dtype)


def _block_fn(fn: kg_scoring.ScoringFunction, mesh, axis: str, side: str, valid_rows: int):
    """The per-block device program: #greater, #equal and #non-finite scores per query."""

    def body(anchor_tab, cand_tab, rel_params, anchor, rel, target, filt):
        rows_l = cand_tab.shape[0]
        offset = jax.lax.axis_index(axis) * rows_l
        # Sharded gather of the known entity's rows: each device fills in its own rows.
        a_off = anchor - jax.lax.axis_index(axis) * anchor_tab.shape[0]
        a_ok = (a_off >= 0) & (a_off < anchor_tab.shape[0])
        a_rows = jnp.where(a_ok[:, None], anchor_tab[jnp.clip(a_off, 0, anchor_tab.shape[0] - 1)], 0)
        a_rows = jax.lax.psum(a_rows.astype(jnp.float32), axis)

        rel_b = kg_scoring.gather_relations(rel_params, rel)
        if side == "tail":
            query = fn.tail_query(head=a_rows, rel=rel_b)
        else:
            query = fn.head_query(tail=a_rows, rel=rel_b)
        cand = cand_tab.astype(jnp.float32)
        if fn.needs_projection:
            # Blocks are relation-homogeneous for projecting models.
            cand = fn.project(ent=cand, rel=kg_scoring.gather_relations(rel_params, rel[0]),
                              candidates=True)
        scores = fn.compare_all(query_cd=query, cand_nd=cand)  # [B, R/S]

        col = offset + jnp.arange(rows_l)
        is_target = col[None, :] == target[:, None]
        target_score = jax.lax.psum(jnp.sum(jnp.where(is_target, scores, 0.0), axis=1), axis)
        f_off = filt - offset
        f_off = jnp.where((filt >= 0) & (f_off >= 0) & (f_off < rows_l), f_off, rows_l)
        b_idx = jnp.broadcast_to(jnp.arange(filt.shape[0])[:, None], filt.shape)
        excluded = jnp.zeros(scores.shape, bool).at[b_idx, f_off].set(True, mode="drop")
        excluded = excluded | (col[None, :] >= valid_rows) | is_target
        return count_above(scores, target_score, ~excluded, axis)

    row_spec = P(axis, None)
    rel_spec = P()
    return jax.jit(
        jax.shard_map(
            body,
            mesh=mesh,
            in_specs=(row_spec, row_spec, rel_spec, P(), P(), P(), P()),
            out_specs=(P(), P(), P()),
            check_vma=False,
        )
    )


def filtered_ranks(
    fn: kg_scoring.ScoringFunction,
    *,
    tables: Mapping[str, jax.Array],
    num_rows: Mapping[str, int],
    rel_params: Mapping[str, jax.Array],
    triples: np.ndarray,
    rel_head_type: Sequence[str],
    rel_tail_type: Sequence[str],
    filter_index: kg_data.TripleIndex,
    mesh: jax.sharding.Mesh,
    axis: str = "data",
    config: KGEvalConfig = KGEvalConfig(),
) -> dict[str, np.ndarray]:
    """Filtered realistic ranks of every test triple, for each side.

    Args:
      fn: the scoring function.
      tables: entity type -> table storage [R_pad, D], R_pad a multiple of the axis
        size (row-sharded on `axis`, or anything that can be resharded to it).
      num_rows: entity type -> R (real rows; rows >= R are padding, never candidates).
      rel_params: dense relation parameters {name: [NR, ...]}.
      triples: int [T, 3] (head_row, relation, tail_row), rows within each type.
      rel_head_type / rel_tail_type: entity type of each relation's head / tail.
      filter_index: all true triples (`KnowledgeGraph.filter_index()`).
      mesh: device mesh holding the tables.
      axis: the mesh axis the table rows are sharded on.
      config: block size, subset, sides.

    Returns:
      {"head": float64 [T], "tail": float64 [T]} ranks (only the requested sides), in
      the order of `triples` (after the `max_triples` subset).

    Raises:
      ValueError: a non-finite score, the target's or a kept candidate's (NaN
        compares False, so it would otherwise rank the target first).
    """
    triples = np.asarray(triples, np.int64).reshape(-1, 3)
    if config.max_triples is not None and len(triples) > config.max_triples:
        pick = np.random.default_rng(0).choice(len(triples), config.max_triples, replace=False)
        triples = triples[np.sort(pick)]
    h, r, t = triples[:, 0], triples[:, 1], triples[:, 2]
    head_t = np.asarray(rel_head_type, object)[r]
    tail_t = np.asarray(rel_tail_type, object)[r]
    n_dev = mesh.shape[axis]
    row_sharding = NamedSharding(mesh, P(axis, None))
    tabs = {}
    for name, tab in tables.items():
        if tab.shape[0] % n_dev:
            pad = -tab.shape[0] % n_dev
            tab = jnp.pad(tab, ((0, pad), (0, 0)))
        tabs[name] = jax.device_put(tab, row_sharding) if not _is_row_sharded(tab, axis) else tab
    rel_rep = jax.device_put(dict(rel_params), NamedSharding(mesh, P()))

    out = {}
    bsz = config.block_size
    for side in config.sides:
        anchor, target = (h, t) if side == "tail" else (t, h)
        anchor_type, cand_type = (head_t, tail_t) if side == "tail" else (tail_t, head_t)
        group = np.array([f"{a}\x00{c}" for a, c in zip(anchor_type, cand_type, strict=True)])
        if fn.needs_projection:
            group = np.char.add(group, np.char.mod("\x00%d", r))
        ranks = np.zeros(len(triples), np.float64)
        fns = {}
        for g in np.unique(group):
            sel = np.flatnonzero(group == g)
            a_type, c_type = anchor_type[sel[0]], cand_type[sel[0]]
            key = (a_type, c_type)
            if key not in fns:
                fns[key] = _block_fn(fn, mesh, axis, side, int(num_rows[c_type]))
            prog = fns[key]
            for start in range(0, len(sel), bsz):
                idx = sel[start:start + bsz]
                n = len(idx)
                padded = np.concatenate([idx, np.full(bsz - n, idx[0])])
                filt = filter_index.answers(side=side, anchor=anchor[padded], rel=r[padded],
                                            target=target[padded])
                greater, equal, bad = prog(
                    tabs[a_type], tabs[c_type], rel_rep,
                    jnp.asarray(anchor[padded], jnp.int32), jnp.asarray(r[padded], jnp.int32),
                    jnp.asarray(target[padded], jnp.int32), jnp.asarray(filt),
                )
                greater, equal = np.asarray(greater)[:n], np.asarray(equal)[:n]
                n_bad = int(np.asarray(bad)[:n].sum())
                if n_bad:
                    raise ValueError(
                        f"{side} ranking of {a_type}->{c_type} triples: {n_bad} non-finite "
                        "scores (NaN/inf in the entity tables or relation parameters); "
                        "refusing to rank them")
                ranks[idx] = realistic_rank(greater=greater, equal_others=equal)
        out[side] = ranks
    return out


def _is_row_sharded(x, axis) -> bool:
    sh = getattr(x, "sharding", None)
    return isinstance(sh, NamedSharding) and tuple(sh.spec)[:1] == (axis,)


def evaluate(fn: kg_scoring.ScoringFunction, **kwargs) -> dict[str, float]:
    """Filtered MRR and Hits@1/3/10 (both sides together and per side).

    Args:
      fn: the scoring function.
      **kwargs: everything `filtered_ranks` takes.

    Returns:
      {"mrr", "hits@1", "hits@3", "hits@10", "tail_mrr", "head_mrr", ..., "num_triples"}.

    Raises:
      ValueError: non-finite scores (see `filtered_ranks`).
    """
    ranks = filtered_ranks(fn, **kwargs)
    out = rank_metrics(np.concatenate(list(ranks.values())))
    for side, rk in ranks.items():
        out.update({f"{side}_{k}": v for k, v in rank_metrics(rk).items()})
    out["num_triples"] = int(len(next(iter(ranks.values()))))
    return out
