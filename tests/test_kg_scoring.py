"""KG scoring functions: hand-computed values, and the matmul forms equal the pure ones."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_recsys.pretrain import kg_scoring as ks


def f32(x):
    return jnp.asarray(x, jnp.float32)


def test_transe_hand_computed():
    head, rel = f32([[1.0, 0.0], [1.0, 0.0]]), {"vec": f32([[0.0, 1.0], [0.0, 1.0]])}
    tail = f32([[1.0, 1.0], [0.0, 0.0]])  # h + r - t = 0, then (1, 1)
    got = ks.transe_score(head=head, rel=rel, tail=tail, gamma=2.0)
    np.testing.assert_allclose(got, [2.0, 2.0 - math.sqrt(2.0)], atol=1e-4)


def test_distmult_hand_computed():
    got = ks.distmult_score(head=f32([[1, 2, 3]]), rel={"vec": f32([[1, 0, -1]])},
                            tail=f32([[2, 2, 2]]))
    np.testing.assert_allclose(got, [-4.0])


def test_complex_hand_computed():
    # h = 1+2i, r = i, t = 3-i: Re(h r conj(t)) = Re((-2+i)(3+i)) = Re(-7+i) = -7.
    got = ks.complex_score(head=f32([[1, 2]]), rel={"vec": f32([[0, 1]])}, tail=f32([[3, -1]]))
    np.testing.assert_allclose(got, [-7.0])
    # Asymmetric: swapping head and tail gives Re(t r conj(h)) = Re((1+3i)(1-2i)) = 7.
    got = ks.complex_score(head=f32([[3, -1]]), rel={"vec": f32([[0, 1]])}, tail=f32([[1, 2]]))
    np.testing.assert_allclose(got, [7.0])


def test_rotate_hand_computed():
    # h = (1, i), theta = (pi/2, pi): h o r = (i, -i).
    head = f32([[1, 0, 0, 1]])
    rel = {"phase": f32([[math.pi / 2, math.pi]])}
    exact = f32([[0, 0, 1, -1]])  # (i, -i)
    off = f32([[0, 1, 1, 0]])  # (i, 1): second coordinate differs by -1 - i
    got = ks.rotate_score(head=head, rel=rel, tail=jnp.stack([exact, off], axis=1), gamma=3.0)
    np.testing.assert_allclose(got, [[3.0, 3.0 - math.sqrt(2.0)]], atol=1e-4)


def test_transr_hand_computed():
    # D = 2, D_r = 1, M = [[1], [2]], r = 0.5: hM + r = 3.5, tM = 2, distance 1.5.
    rel = {"vec": f32([[0.5]]), "proj": f32([[[1.0], [2.0]]])}
    got = ks.transr_score(head=f32([[1, 1]]), rel=rel, tail=f32([[2, 0]]), gamma=1.0)
    np.testing.assert_allclose(got, [1.0 - 1.5], atol=1e-4)


@pytest.mark.parametrize("name", ks.MODEL_NAMES)
def test_matmul_forms_equal_pure_score(name):
    """Chunk scoring via one matmul (both corruption sides) == the pure score function."""
    fn = ks.ScoringFunction(name=name, gamma=1.5, rel_dim=4 if name == "transr" else None)
    k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
    K, C, N, D = 2, 3, 5, 6
    rel = ks.gather_relations(fn.init_relations(k1, num_relations=4, dim=D), jnp.array([1, 3]))
    heads = jax.random.normal(k2, (K, C, D))
    tails = jax.random.normal(k3, (K, C, D))
    cands = jax.random.normal(k4, (K, N, D))
    rel_kc = jax.tree.map(lambda x: jnp.broadcast_to(x[:, None], (K, C) + x.shape[1:]), rel)

    # Tail corruption: (h_kc, r_k, cand_kn).
    chunk = fn.compare_all(query_cd=fn.tail_query(head=heads, rel=rel_kc),
                           cand_nd=fn.project(ent=cands, rel=rel, candidates=True))
    pure = fn.score(head=heads, rel=rel_kc,
                    tail=jnp.broadcast_to(cands[:, None], (K, C, N, D)))
    np.testing.assert_allclose(chunk, pure, rtol=1e-4, atol=1e-4)

    # Head corruption: (cand_kn, r_k, t_kc).
    chunk = fn.compare_all(query_cd=fn.head_query(tail=tails, rel=rel_kc),
                           cand_nd=fn.project(ent=cands, rel=rel, candidates=True))
    rel_kcn = jax.tree.map(lambda x: jnp.broadcast_to(x[:, None, None], (K, C, N) + x.shape[1:]), rel)
    pure = fn.score(head=jnp.broadcast_to(cands[:, None], (K, C, N, D)), rel=rel_kcn,
                    tail=jnp.broadcast_to(tails[:, :, None], (K, C, N, D)))
    np.testing.assert_allclose(chunk, pure, rtol=1e-4, atol=1e-4)


def test_bad_model_and_dims():
    with pytest.raises(ValueError, match="unknown KG model"):
        ks.ScoringFunction(name="transx")
    with pytest.raises(ValueError, match="even"):
        ks.ScoringFunction(name="complex").check_dim(5)
    with pytest.raises(ValueError, match=r"\[\.\.\., N, D\]"):
        ks.distmult_score(head=f32(np.ones((2, 3))), rel={"vec": f32(np.ones((2, 3)))},
                          tail=f32(np.ones((2, 1, 1, 3))))
