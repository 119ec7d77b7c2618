"""Contrastive loss on a hand-computed 3x3 example, and the sharded top-K evaluation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_recsys.distributed import global_mesh
from jax_recsys.pretrain import contrastive_loss as closs, retrieval_eval
from jax_recsys.pretrain.contrastive_loss import sampled_softmax_loss

# Users and pins, D = 2, temperature 0.5, so logits = 2 * U P^T:
#   row 0: [2, 0, 2]   row 1: [0, 2, 0]   row 2: [2, 2, 2]
U = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
PINS = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
PIN_IDS = jnp.array([10, 20, 10])  # rows 0 and 2 share a pin (same embedding)
E2 = math.exp(2.0)


def _loss(**kw):
    return sampled_softmax_loss(user_bd=U, pin_bd=PINS, temperature=0.5, **kw)


def test_plain_in_batch_softmax():
    loss, aux = _loss()
    ce = [math.log(2 * E2 + 1) - 2, math.log(E2 + 2) - 2, math.log(3 * E2) - 2]
    np.testing.assert_allclose(aux["ce_b"], ce, rtol=1e-5)
    assert float(loss) == pytest.approx(sum(ce) / 3, rel=1e-6)


def test_accidental_hits_same_pin():
    loss, aux = _loss(user_ids_b=jnp.array([1, 2, 3]), pin_ids_b=PIN_IDS,
                      remove_accidental_hits=True)
    # Row 0 loses column 2 and row 2 loses column 0 (same pin 10).
    ce = [math.log(E2 + 1) - 2, math.log(E2 + 2) - 2, math.log(2 * E2) - 2]
    np.testing.assert_allclose(aux["ce_b"], ce, rtol=1e-5)
    assert float(loss) == pytest.approx(sum(ce) / 3, rel=1e-6)


def test_accidental_hits_same_user():
    # Users 0 and 1 are the same person: pin 20 is not a negative for row 0, nor
    # pin 10 (row 0's) for row 1. Pins are all distinct here.
    loss, aux = _loss(user_ids_b=jnp.array([7, 7, 8]), pin_ids_b=jnp.array([1, 2, 3]),
                      remove_accidental_hits=True)
    ce = [math.log(2 * E2) - 2, math.log(E2 + 1) - 2, math.log(3 * E2) - 2]
    np.testing.assert_allclose(aux["ce_b"], ce, rtol=1e-5)
    assert float(loss) == pytest.approx(sum(ce) / 3, rel=1e-6)


def test_logq_correction():
    lq = [math.log(0.5), math.log(0.25), math.log(0.5)]
    loss, aux = _loss(pin_log_q_b=jnp.array(lq))
    # logit_ij = 2 <u_i, p_j> - log q_j; exp(-log q) = 1/q: [2, 4, 2].
    ce = [
        math.log(2 * E2 + 4 * 1 + 2 * E2) - (2 - lq[0]),
        math.log(2 * 1 + 4 * E2 + 2 * 1) - (2 - lq[1]),
        math.log(2 * E2 + 4 * E2 + 2 * E2) - (2 - lq[2]),
    ]
    np.testing.assert_allclose(aux["ce_b"], ce, rtol=1e-5)
    assert float(loss) == pytest.approx(sum(ce) / 3, rel=1e-6)


def test_logq_and_accidental_hits_together():
    lq = [math.log(0.5), math.log(0.25), math.log(0.5)]
    _, aux = _loss(pin_log_q_b=jnp.array(lq), user_ids_b=jnp.array([1, 2, 3]),
                   pin_ids_b=PIN_IDS, remove_accidental_hits=True)
    ce = [
        math.log(2 * E2 + 4 * 1) - (2 - lq[0]),
        math.log(2 * 1 + 4 * E2 + 2 * 1) - (2 - lq[1]),
        math.log(4 * E2 + 2 * E2) - (2 - lq[2]),
    ]
    np.testing.assert_allclose(aux["ce_b"], ce, rtol=1e-5)


def test_weights_mask_and_extra_negatives():
    # Extra negative [0, 1] (pin 20): logits 0, 2, 2 for rows 0..2; row 1's own pin, masked.
    loss, aux = _loss(
        user_ids_b=jnp.array([1, 2, 3]), pin_ids_b=PIN_IDS, remove_accidental_hits=True,
        weights_b=jnp.array([1.0, 2.0, 5.0]), mask_b=jnp.array([1.0, 1.0, 0.0]),
        neg_pin_nd=jnp.array([[0.0, 1.0]]), neg_ids_n=jnp.array([20]),
    )
    # Row 2 is padding: not an anchor, and not a candidate for rows 0 and 1.
    ce0 = math.log(E2 + 1 + 1) - 2
    ce1 = math.log(1 + E2) - 2
    np.testing.assert_allclose(aux["ce_b"], [ce0, ce1, 0.0], rtol=1e-5)
    assert float(loss) == pytest.approx((ce0 + 2 * ce1) / 3, rel=1e-6)
    assert aux["logits"].shape == (3, 4)


def test_gradient_is_finite_with_masking():
    def f(u):
        return _loss(user_ids_b=jnp.array([1, 1, 1]), pin_ids_b=PIN_IDS,
                     remove_accidental_hits=True)[0]

    g = jax.grad(lambda u: sampled_softmax_loss(
        user_bd=u, pin_bd=PINS, temperature=0.5, user_ids_b=jnp.array([1, 1, 1]),
        pin_ids_b=PIN_IDS, remove_accidental_hits=True)[0])(U)
    # Every column but the positive is masked: loss 0, gradient 0.
    assert float(f(U)) == pytest.approx(0.0, abs=1e-6)
    np.testing.assert_allclose(g, 0.0, atol=1e-6)


def _dense_reference_loss(u, p, neg, *, temperature, w, m, **kw):
    """The loss written the obvious way: full [B, C] logits, autodiff gradients."""
    cand, bias, rows, cols = closs._columns(pin_bd=p, mask_b=m, neg_pin_nd=neg, **kw)
    idx = jnp.arange(u.shape[0])
    ce, correct, _ = closs._block_ce(temperature, u, cand, bias, idx, rows, cols)
    wm = w * m
    return jnp.sum(wm * ce) / jnp.sum(wm), jnp.sum(wm * correct) / jnp.sum(wm)


@pytest.mark.parametrize("ndev", [0, 1, 8])
def test_blocked_gradients_equal_dense_autodiff(devices, ndev):
    # B * C is large enough for several row blocks; every feature is on: logQ,
    # accidental hits (duplicate pins and users), weights, padding, extra negatives.
    b, n, d = 1024, 1024, 8
    assert closs._num_blocks(b, b + n) > 1
    rng = np.random.default_rng(0)
    u = jnp.asarray(rng.normal(size=(b, d)).astype(np.float32))
    p = jnp.asarray(rng.normal(size=(b, d)).astype(np.float32))
    neg = jnp.asarray(rng.normal(size=(n, d)).astype(np.float32))
    kw = dict(pin_log_q_b=jnp.asarray(np.log(rng.uniform(1e-4, 1e-1, b)).astype(np.float32)),
              user_ids_b=jnp.asarray(rng.integers(0, 300, b)),
              pin_ids_b=jnp.asarray(rng.integers(0, 400, b)),
              neg_log_q_n=jnp.asarray(np.log(rng.uniform(1e-4, 1e-1, n)).astype(np.float32)),
              neg_ids_n=jnp.asarray(rng.integers(0, 400, n)),
              neg_mask_n=jnp.asarray((rng.uniform(size=n) > 0.1).astype(np.float32)))
    w = jnp.asarray(rng.uniform(0.5, 3.0, b).astype(np.float32))
    m = jnp.asarray((rng.uniform(size=b) > 0.05).astype(np.float32))
    temp = 0.2

    def ref(u, p, neg):
        return _dense_reference_loss(u, p, neg, temperature=temp, w=w, m=m,
                                     remove_accidental_hits=True, **kw)

    def blocked(u, p, neg):
        if ndev == 0:
            loss, aux = sampled_softmax_loss(
                user_bd=u, pin_bd=p, temperature=temp, remove_accidental_hits=True,
                weights_b=w, mask_b=m, neg_pin_nd=neg, **kw)
            return loss, aux["acc"]
        return closs.sharded_loss_and_acc(
            mesh=global_mesh(devices=devices[:ndev]), axis="data", user_bd=u, pin_bd=p,
            temperature=temp, remove_accidental_hits=True, weights_b=w, mask_b=m,
            neg_pin_nd=neg, **kw)

    (want, want_acc), want_g = jax.value_and_grad(ref, argnums=(0, 1, 2), has_aux=True)(
        u, p, neg)
    (got, got_acc), got_g = jax.jit(jax.value_and_grad(blocked, argnums=(0, 1, 2),
                                                       has_aux=True))(u, p, neg)
    assert float(got) == pytest.approx(float(want), rel=1e-5)
    assert 0.0 < float(want_acc) < 1.0
    assert float(got_acc) == pytest.approx(float(want_acc), abs=1e-6)
    for g, wg in zip(got_g, want_g, strict=True):
        assert float(jnp.max(jnp.abs(wg))) > 0
        np.testing.assert_allclose(g, wg, rtol=1e-4, atol=1e-6)


def test_bad_shapes_are_errors():
    with pytest.raises(ValueError, match="B, D"):
        sampled_softmax_loss(user_bd=U, pin_bd=PINS[:2], temperature=1.0)
    with pytest.raises(ValueError, match="user_ids_b"):
        sampled_softmax_loss(user_bd=U, pin_bd=PINS, temperature=1.0,
                             remove_accidental_hits=True)


@pytest.mark.parametrize("ndev", [1, 8])
def test_sharded_top_k_matches_numpy(devices, ndev):
    rng = np.random.default_rng(0)
    items = rng.normal(size=(64, 4)).astype(np.float32)
    queries = rng.normal(size=(37, 4)).astype(np.float32)
    mesh = global_mesh(devices=devices[:ndev])
    scores, rows = retrieval_eval.sharded_top_k(
        query_qd=queries, items_rd=jnp.asarray(items), k=5, mesh=mesh,
        valid_rows=61, chunk=16,
    )
    full = queries @ items[:61].T
    want = np.argsort(-full, axis=1)[:, :5]
    np.testing.assert_array_equal(rows, want)
    np.testing.assert_allclose(scores, np.take_along_axis(full, want, 1), rtol=1e-5)


def test_recall_ndcg_and_popularity():
    top = np.array([[3, 1, 2], [0, 1, 2], [2, 3, 0]])
    ranks = retrieval_eval.rank_of_positive(top_rows_qk=top, pos_rows_q=np.array([1, 5, 2]))
    np.testing.assert_array_equal(ranks, [1, 3, 0])
    m = retrieval_eval.recall_ndcg_from_ranks(ranks, ks=(1, 2))
    assert m["recall@1"] == pytest.approx(1 / 3)
    assert m["recall@2"] == pytest.approx(2 / 3)
    assert m["ndcg@2"] == pytest.approx((1 / math.log2(3) + 1.0) / 3)
    # No queries (no held-out pairs): undefined, not a model that never finds the positive.
    empty = retrieval_eval.recall_ndcg_from_ranks(np.zeros(0), ks=(10,))
    assert list(empty) == ["recall@10", "ndcg@10"] and all(map(math.isnan, empty.values()))
    # Pin 4 is most popular, then pin 1 (ties to 2 broken by row).
    pop = retrieval_eval.popularity_ranks(
        train_pin_rows=np.array([4, 4, 4, 1, 1, 2, 2]), pos_rows_q=np.array([4, 2, 0]),
        num_rows=5, k=2)
    np.testing.assert_array_equal(pop, [0, 2, 2])


@pytest.mark.parametrize("ndev", [1, 8])
def test_retrieval_collapsed_model_gets_realistic_rank(devices, ndev):
    # Every pin scores the same: the positive's rank is 1 + (5 - 1) / 2 = 3 for every
    # query, wherever it sits. A top-K with ties broken by row index would put the
    # low-row positives (rows 0 and 1) in the top 2 and report recall@2 = 1.
    mesh = global_mesh(devices=devices[:ndev])
    pins = jnp.zeros((8, 4), jnp.float32)
    users = np.zeros((2, 4), np.float32)
    out = retrieval_eval.evaluate_retrieval(
        user_qd=users, pin_rd=pins, pos_rows_q=np.array([0, 1]), mesh=mesh, ks=(1, 2, 3),
        valid_rows=5)
    assert out["recall@1"] == 0.0 and out["ndcg@1"] == 0.0
    assert out["recall@2"] == 0.0 and out["ndcg@2"] == 0.0
    # rank 3 <= 3 (the project rule: fractional ranks count rank <= K).
    assert out["recall@3"] == 1.0
    assert out["ndcg@3"] == pytest.approx(1 / math.log2(4))


@pytest.mark.parametrize("ndev", [1, 8])
def test_retrieval_exact_ranks_hand_built(devices, ndev):
    # D = 1, query 1.0: scores are the pin values [3, 1, 1, 2]; rows 4.. are padding
    # with a huge score that must never count.
    mesh = global_mesh(devices=devices[:ndev])
    pins = jnp.asarray(np.array([3, 1, 1, 2, 100, 100, 100, 100], np.float32)[:, None])
    users = np.ones((3, 1), np.float32)
    pos = np.array([0, 1, 3])
    ranks = retrieval_eval.positive_ranks(query_qd=users, items_rd=pins, pos_rows_q=pos,
                                          mesh=mesh, valid_rows=4, chunk=2)
    # pin 0: best; pin 1: 2 greater + 1 tie -> 3.5; pin 3: 1 greater -> 2.
    np.testing.assert_array_equal(ranks, [1.0, 3.5, 2.0])
    out = retrieval_eval.evaluate_retrieval(user_qd=users, pin_rd=pins, pos_rows_q=pos,
                                            mesh=mesh, ks=(1, 2, 4), valid_rows=4, chunk=2)
    assert out["recall@1"] == pytest.approx(1 / 3)
    assert out["recall@2"] == pytest.approx(2 / 3)
    assert out["recall@4"] == pytest.approx(1.0)
    assert out["ndcg@2"] == pytest.approx((1 + 1 / math.log2(3)) / 3)
    assert out["ndcg@4"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(4.5)) / 3)


def test_retrieval_non_finite_scores_are_errors(devices):
    mesh = global_mesh(devices=devices)
    pins = np.random.default_rng(0).normal(size=(8, 2)).astype(np.float32)
    users = np.ones((3, 2), np.float32)
    kw = dict(pos_rows_q=np.array([0, 1, 2]), mesh=mesh, ks=(2,), valid_rows=6)
    nan_user = users.copy()
    nan_user[1] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        retrieval_eval.evaluate_retrieval(user_qd=nan_user, pin_rd=jnp.asarray(pins), **kw)
    nan_pin = pins.copy()
    nan_pin[4] = np.nan  # a candidate, not a positive
    with pytest.raises(ValueError, match="non-finite"):
        retrieval_eval.evaluate_retrieval(user_qd=users, pin_rd=jnp.asarray(nan_pin), **kw)
    nan_pad = pins.copy()
    nan_pad[7] = np.nan  # padding rows are never candidates
    out = retrieval_eval.evaluate_retrieval(user_qd=users, pin_rd=jnp.asarray(nan_pad), **kw)
    assert 0.0 <= out["recall@2"] <= 1.0
