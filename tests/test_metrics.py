"""Tests for jax_recsys.metrics: hand-computed values on tiny inputs (ties included) and
AUC against an O(n^2) pairwise reference."""

import math
import re

import numpy as np
import pytest

from jax_recsys import metrics


def _pairwise_auc(labels, scores, weights):
    num = den = 0.0
    for i in range(len(labels)):
        if labels[i] != 1:
            continue
        for j in range(len(labels)):
            if labels[j] != 0:
                continue
            w = weights[i] * weights[j]
            den += w
            if scores[i] > scores[j]:
                num += w
            elif scores[i] == scores[j]:
                num += 0.5 * w
    return num / den


def test_auc_hand_computed():
    assert metrics.auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    # Pairs (pos, neg): (.5,.5)=1/2, (.5,.1)=1, (.9,.5)=1, (.9,.1)=1 -> 3.5 / 4.
    assert metrics.auc([1, 0, 1, 0], [0.5, 0.5, 0.9, 0.1]) == pytest.approx(0.875)
    # Weight 2 on the tied positive: (2*.5 + 2*1 + 1 + 1) / (3 * 2) = 5/6.
    assert metrics.auc([1, 0, 1, 0], [0.5, 0.5, 0.9, 0.1], weights=[2, 1, 1, 1]) == (
        pytest.approx(5 / 6))
    assert metrics.auc([1, 0, 1, 0], [3.0, 3.0, 3.0, 3.0]) == pytest.approx(0.5)
    assert metrics.auc([1, 1, 0], [0.0, 1.0, 2.0]) == pytest.approx(0.0)
    assert math.isnan(metrics.auc([1, 1], [0.2, 0.3]))


def test_auc_matches_pairwise_reference_with_ties():
    rng = np.random.default_rng(0)
    for trial in range(5):
        n = 200
        labels = rng.integers(0, 2, n)
        scores = np.round(rng.normal(size=n) + 0.5 * labels, 1)  # rounding makes ties
        weights = rng.uniform(0.1, 2.0, n) if trial % 2 else np.ones(n)
        got = metrics.auc(labels, scores, weights)
        want = _pairwise_auc(labels, scores, weights)
        assert got == pytest.approx(want, abs=1e-12)


def test_log_loss_ne_calibration():
    want = -(math.log(0.8) + math.log(0.6)) / 2
    assert metrics.log_loss([1, 0], [0.8, 0.4]) == pytest.approx(want)
    # Predicting the base rate gives NE = 1 exactly.
    assert metrics.normalized_entropy([1, 0, 0, 0], [0.25] * 4) == pytest.approx(1.0)
    base = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    ll = -(math.log(0.7) + math.log(0.9) * 2 + math.log(0.6)) / 4
    assert metrics.normalized_entropy([1, 0, 0, 0], [0.7, 0.1, 0.1, 0.4]) == pytest.approx(
        ll / base)
    assert metrics.calibration([1, 0, 0, 1], [0.5] * 4) == pytest.approx(1.0)
    assert metrics.calibration([1, 0, 0, 1], [0.2] * 4) == pytest.approx(0.4)
    assert math.isnan(metrics.normalized_entropy([0, 0], [0.1, 0.2]))
    # Clipping keeps a confidently wrong prediction finite.
    assert np.isfinite(metrics.log_loss([1], [0.0]))


def test_rank_metrics_hand_computed():
    ranks = [1, 2, 4, 10]
    assert metrics.hits_at_k(ranks, 3) == pytest.approx(0.5)
    assert metrics.recall_at_k(ranks, 10) == pytest.approx(1.0)
    assert metrics.hits_at_k(ranks, 1) == pytest.approx(0.25)
    assert metrics.mrr(ranks) == pytest.approx((1 + 0.5 + 0.25 + 0.1) / 4)
    assert metrics.ndcg_at_k(ranks, 3) == pytest.approx((1 + 1 / math.log2(3)) / 4)
    assert metrics.ndcg_at_k(ranks, 10) == pytest.approx(
        (1 + 1 / math.log2(3) + 1 / math.log2(5) + 1 / math.log2(11)) / 4)
    # Fractional (realistic) ranks: 1.5 counts within k=1? no; within k=2 yes.
    assert metrics.hits_at_k([1.5], 1) == 0.0
    assert metrics.hits_at_k([1.5], 2) == 1.0


def test_realistic_rank():
    pos = np.array([0.5, 1.0])
    scores = np.array([[0.9, 0.5, 0.5, 0.1, 0.7],
                       [1.0, 1.0, 1.0, 1.0, 1.0]])
    # Unfiltered: row 0 has 2 greater, 2 equal -> 1 + 2 + 1 = 4; row 1: 5 ties -> 3.5.
    np.testing.assert_allclose(metrics.realistic_rank(pos, scores), [4.0, 3.5])
    mask = np.array([[False, False, True, False, True],
                     [True, False, False, False, False]])
    # Row 0: 0.7 and one 0.5 filtered -> 1 + 1 + 0.5 = 2.5; row 1: 4 ties -> 3.0.
    np.testing.assert_allclose(metrics.realistic_rank(pos, scores, mask), [2.5, 3.0])
    # A constant-score model lands in the middle, not at rank 1.
    r = metrics.realistic_rank(np.zeros(1), np.zeros((1, 99)))
    assert r[0] == pytest.approx(50.5)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="length mismatch"):
        metrics.auc([0, 1], [0.1])
    with pytest.raises(ValueError, match=r"labels\[1\]"):
        metrics.log_loss([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="1-based"):
        metrics.mrr([0, 1])
    with pytest.raises(ValueError, match="positive integer"):
        metrics.hits_at_k([1], 0)
    with pytest.raises(ValueError, match="filter_mask"):
        metrics.realistic_rank([0.1], [[0.2, 0.3]], [[True]])


@pytest.mark.parametrize("call, message", [
    (lambda: metrics.calibration([1, 0, 0, 1], [2.0, -3.0, 1.5, 4.0]),
     "probs must lie in [0, 1]; probs[0] = 2.0"),
    (lambda: metrics.calibration([1, 0], [np.nan, 0.5]),
     "probs must lie in [0, 1]; probs[0] = nan"),
    (lambda: metrics.calibration([1, 0], [0.2, -0.5]), "probs must lie in [0, 1]; probs[1] = -0.5"),
    (lambda: metrics.log_loss([1, 0], [2.0, 0.5]), "probs must lie in [0, 1]; probs[0] = 2.0"),
    (lambda: metrics.normalized_entropy([2, 2], [0.1, 0.2]),
     "labels must lie in [0, 1]; labels[0] = 2.0"),
    (lambda: metrics.normalized_entropy([0, 2], [0.1, 0.2]),
     "labels must lie in [0, 1]; labels[1] = 2.0"),
    (lambda: metrics.normalized_entropy([1, 1], [np.nan, 0.2]),
     "probs must lie in [0, 1]; probs[0] = nan"),
    (lambda: metrics.normalized_entropy([1, 1], [0.2]), "length mismatch"),
    (lambda: metrics.auc([1, 0], [0.2, 0.1], [np.nan, 1.0]),
     "weights must be finite and non-negative; weights[0] = nan"),
    (lambda: metrics.auc([1, 0, 0], [0.2, 0.1, 0.3], [1.0, 1.0, np.inf]),
     "weights must be finite and non-negative; weights[2] = inf"),
    (lambda: metrics.auc([1, 0], [0.2, 0.1], [1.0, -1.0]),
     "weights must be finite and non-negative; weights[1] = -1.0"),
])
def test_out_of_range_probs_labels_and_weights_raise(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()
    # Valid inputs keep their values; all-equal labels still give NaN NE.
    assert metrics.calibration([1, 0, 0, 1], [0.5, 0.25, 0.25, 1.0]) == pytest.approx(1.0)
    assert np.isnan(metrics.normalized_entropy([1, 1], [0.5, 0.2]))
    assert metrics.auc([1, 0, 0], [0.2, 0.1, 0.3], [1.0, 1.0, 0.0]) == pytest.approx(1.0)
