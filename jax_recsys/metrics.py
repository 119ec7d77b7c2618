"""Exact evaluation metrics in NumPy: ranking-quality (AUC, log loss, NE, calibration)
for the CTR/CVR rankers and retrieval/link-prediction metrics (Recall@K, NDCG@K, MRR,
Hits@K) for contrastive and knowledge-graph pretraining.

Everything is computed on the host in float64 and exactly (no binning): AUC is the
Mann-Whitney statistic with ties counted as one half, via average ranks.

Retrieval metrics take the 1-based *rank of the single positive* per query. Ranks may
be fractional: :func:`realistic_rank` returns the expected rank under random
tie-breaking, ``1 + #greater + #equal / 2``, which neither rewards a model that gives
every candidate the same score (as the optimistic rank ``1 + #greater`` would) nor
punishes it unduly (pessimistic ``1 + #greater + #equal``). For fractional ranks,
``hits_at_k``/``recall_at_k`` count ``rank <= k`` and ``ndcg_at_k`` uses
``1 / log2(1 + rank)``.

Dimension legend: B examples or queries, C candidates per query.
"""

from __future__ import annotations

import numpy as np

_EPS = 1e-15


def _as_1d(x, name: str, dtype=np.float64) -> np.ndarray:
    a = np.asarray(x, dtype=dtype)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{name} is empty")
    return a


def _check_labels(labels_b: np.ndarray) -> None:
    bad = (labels_b < 0) | (labels_b > 1) | ~np.isfinite(labels_b)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"labels must lie in [0, 1]; labels[{i}] = {labels_b[i]}")


def _check_probs(probs_b: np.ndarray) -> None:
    bad = (probs_b < 0) | (probs_b > 1) | ~np.isfinite(probs_b)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"probs must lie in [0, 1]; probs[{i}] = {probs_b[i]}")


def _check_same_len(**arrays: np.ndarray) -> None:
    lens = {k: len(v) for k, v in arrays.items()}
    if len(set(lens.values())) > 1:
        raise ValueError(f"length mismatch: {lens}")


def auc(labels, scores, weights=None) -> float:
    """Area under the ROC curve, exact, ties counted as 1/2 (Mann-Whitney U).

    Args:
      labels: [B] 0/1 labels (anything > 0.5 counts as positive).
      scores: [B] real scores (logits or probabilities; only the order matters).
      weights: optional [B] non-negative example weights; a weighted pair counts
        ``w_pos * w_neg``.

    Returns:
      AUC in [0, 1]; NaN when there is no positive or no negative (with weight > 0).
    """
    labels_b = _as_1d(labels, "labels")
    scores_b = _as_1d(scores, "scores")
    _check_labels(labels_b)
    w_b = np.ones_like(scores_b) if weights is None else _as_1d(weights, "weights")
    _check_same_len(labels=labels_b, scores=scores_b, weights=w_b)
    bad = (w_b < 0) | ~np.isfinite(w_b)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"weights must be finite and non-negative; weights[{i}] = {w_b[i]}")
    if not np.isfinite(scores_b).all():
        raise ValueError("scores contain NaN or inf")
    pos_b = labels_b > 0.5
    w_pos = float(w_b[pos_b].sum())
    w_neg = float(w_b[~pos_b].sum())
    if w_pos == 0 or w_neg == 0:
        return float("nan")
    # Group equal scores; for each positive-weight in a group, it beats all negative
    # weight in lower groups and half the negative weight in its own group.
    uniq, inv = np.unique(scores_b, return_inverse=True)
    neg_w_g = np.bincount(inv, weights=np.where(pos_b, 0.0, w_b), minlength=len(uniq))
    pos_w_g = np.bincount(inv, weights=np.where(pos_b, w_b, 0.0), minlength=len(uniq))
    neg_below_g = np.cumsum(neg_w_g) - neg_w_g
    u = float(np.sum(pos_w_g * (neg_below_g + 0.5 * neg_w_g)))
    return u / (w_pos * w_neg)


def log_loss(labels, probs, *, eps: float = _EPS) -> float:
    """Mean binary cross-entropy.

    Args:
      labels: [B] labels in [0, 1].
      probs: [B] predicted probabilities, clipped to [eps, 1 - eps].
      eps: clipping constant.

    Returns:
      ``-mean(y log p + (1 - y) log(1 - p))`` in nats.
    """
    labels_b = _as_1d(labels, "labels")
    probs_b = _as_1d(probs, "probs")
    _check_labels(labels_b)
    _check_same_len(labels=labels_b, probs=probs_b)
    _check_probs(probs_b)
    return _log_loss(labels_b, probs_b, eps)


def _log_loss(labels_b: np.ndarray, probs_b: np.ndarray, eps: float) -> float:
    """`log_loss` of inputs already checked."""
    p_b = np.clip(probs_b, eps, 1 - eps)
    return float(-np.mean(labels_b * np.log(p_b) + (1 - labels_b) * np.log1p(-p_b)))


def normalized_entropy(labels, probs, *, eps: float = _EPS) -> float:
    """Normalized entropy: log loss divided by the entropy of the base rate.

    NE < 1 means the model beats always predicting the average label.

    Args:
      labels: [B] labels in [0, 1].
      probs: [B] predicted probabilities.
      eps: clipping constant.

    Returns:
      ``log_loss / H(mean(labels))``; NaN when all labels are equal (H = 0).

    Raises:
      ValueError: labels outside [0, 1] or probs outside [0, 1] (also when all
        labels are equal).
    """
    labels_b = _as_1d(labels, "labels")
    probs_b = _as_1d(probs, "probs")
    _check_labels(labels_b)
    _check_same_len(labels=labels_b, probs=probs_b)
    _check_probs(probs_b)
    p = float(np.mean(labels_b))
    if p <= 0 or p >= 1:
        return float("nan")
    base = -(p * np.log(p) + (1 - p) * np.log1p(-p))
    return _log_loss(labels_b, probs_b, eps) / float(base)


def calibration(labels, probs) -> float:
    """Calibration ratio: sum of predicted probabilities over sum of observed labels.

    Args:
      labels: [B] labels in [0, 1].
      probs: [B] predicted probabilities in [0, 1] (not logits).

    Returns:
      ``sum(probs) / sum(labels)`` (1 is perfectly calibrated); NaN when no label is
      positive.
    """
    labels_b = _as_1d(labels, "labels")
    probs_b = _as_1d(probs, "probs")
    _check_labels(labels_b)
    _check_same_len(labels=labels_b, probs=probs_b)
    _check_probs(probs_b)
    observed = float(labels_b.sum())
    if observed == 0:
        return float("nan")
    return float(probs_b.sum()) / observed


def _ranks(ranks) -> np.ndarray:
    r = _as_1d(ranks, "ranks")
    if (r < 1).any() or not np.isfinite(r).all():
        raise ValueError(f"ranks must be finite and >= 1 (1-based); min is {r.min()}")
    return r


def _check_k(k: int) -> None:
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k}")


def hits_at_k(ranks, k: int) -> float:
    """Fraction of queries whose positive has rank <= k.

    Args:
      ranks: [B] 1-based ranks of the single positive (may be fractional).
      k: cut-off.

    Returns:
      Hits@k in [0, 1].
    """
    _check_k(k)
    return float(np.mean(_ranks(ranks) <= k))


def recall_at_k(ranks, k: int) -> float:
    """Recall@k with one relevant item per query (equal to Hits@k).

    Args:
      ranks: [B] 1-based ranks of the single positive.
      k: cut-off.

    Returns:
      Recall@k in [0, 1].
    """
    return hits_at_k(ranks, k)


def ndcg_at_k(ranks, k: int) -> float:
    """NDCG@k with one relevant item per query: ``1/log2(1 + rank)`` if rank <= k.

    The ideal DCG is 1 (the positive at rank 1), so no further normalisation.

    Args:
      ranks: [B] 1-based ranks of the single positive.
      k: cut-off.

    Returns:
      NDCG@k in [0, 1].
    """
    _check_k(k)
    r = _ranks(ranks)
    gain = np.where(r <= k, 1.0 / np.log2(1.0 + r), 0.0)
    return float(np.mean(gain))


def mrr(ranks) -> float:
    """Mean reciprocal rank.

    Args:
      ranks: [B] 1-based ranks of the single positive.

    Returns:
      ``mean(1 / rank)``.
    """
    return float(np.mean(1.0 / _ranks(ranks)))


def realistic_rank(score_pos, scores, filter_mask=None) -> np.ndarray:
    """Expected 1-based rank of each positive under random tie-breaking.

    ``rank = 1 + #{c : scores[c] > score_pos} + #{c : scores[c] == score_pos} / 2``,
    counting only candidates ``c`` with ``filter_mask[c]`` False.

    Candidate semantics: ``scores`` may hold negatives only, or every candidate
    (e.g. all entities of a type) *including the positive itself*; in the second case
    ``filter_mask`` must be True at the positive's own column (and, for the filtered
    setting of link prediction, at every other known true answer), otherwise the
    positive ties with itself and its rank grows by 1/2. NaN scores are an error.

    Args:
      score_pos: [B] score of the positive of each query.
      scores: [B, C] candidate scores.
      filter_mask: optional bool [B, C]; True removes the candidate from the ranking.

    Returns:
      float64 [B] ranks >= 1.
    """
    pos_b = np.asarray(score_pos, dtype=np.float64)
    scores_bc = np.asarray(scores, dtype=np.float64)
    if pos_b.ndim != 1 or scores_bc.ndim != 2 or scores_bc.shape[0] != pos_b.shape[0]:
        raise ValueError(
            f"want score_pos [B] and scores [B, C], got {pos_b.shape} and {scores_bc.shape}")
    if np.isnan(pos_b).any() or np.isnan(scores_bc).any():
        raise ValueError("scores contain NaN")
    keep_bc = np.ones(scores_bc.shape, dtype=bool)
    if filter_mask is not None:
        mask_bc = np.asarray(filter_mask, dtype=bool)
        if mask_bc.shape != scores_bc.shape:
            raise ValueError(f"filter_mask shape {mask_bc.shape} != scores shape {scores_bc.shape}")
        keep_bc = ~mask_bc
    greater_b = np.sum((scores_bc > pos_b[:, None]) & keep_bc, axis=1)
    equal_b = np.sum((scores_bc == pos_b[:, None]) & keep_bc, axis=1)
    return 1.0 + greater_b + 0.5 * equal_b
