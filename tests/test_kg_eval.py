"""Filtered ranking: hand-built graph (ties, filtered true triples, padding), sharded == 1 device,
and equality with a brute-force reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_recsys.data.kg import TripleIndex
from jax_recsys.pretrain import kg_eval, kg_scoring


def _mesh(n):
    return jax.sharding.Mesh(np.array(jax.devices()[:n]), ("data",))


def _hand_graph():
    # Type "a": 3 rows, type "b": 4 rows. DistMult with D = 2, only column 0 matters.
    tables = {
        "a": jnp.array([[1.0, 0], [1.0, 0], [0.5, 0]]),
        "b": jnp.array([[3.0, 0], [2.0, 0], [2.0, 0], [5.0, 0]]),
    }
    rel = {"vec": jnp.array([[1.0, 0.0], [-1.0, 0.0]])}
    test = np.array([[0, 0, 1],    # tail scores 3, 2(target), 2, 5; head scores 2, 2, 1
                     [0, 1, 0]])   # tail scores -3(target), -2, -2, -5 (padding rows score 0)
    train = np.array([[0, 0, 3], [2, 1, 1]])
    valid = np.array([[1, 0, 1]])
    return tables, rel, test, train, valid


@pytest.mark.parametrize("n_dev", [1, 8])
def test_hand_built_filtered_ranks(n_dev):
    tables, rel, test, train, valid = _hand_graph()
    fn = kg_scoring.ScoringFunction(name="distmult")
    fidx = TripleIndex([train, valid, test], max_rows=10)
    ranks = kg_eval.filtered_ranks(
        fn, tables=tables, num_rows={"a": 3, "b": 4}, rel_params=rel, triples=test,
        rel_head_type=["a", "a"], rel_tail_type=["b", "b"], filter_index=fidx,
        mesh=_mesh(n_dev), config=kg_eval.KGEvalConfig(block_size=4))
    # Tail of (0,0,1): 3 greater, 5 filtered (train has (0,0,3)), one tie -> 1 + 1 + 0.5.
    # Tail of (0,1,0): -2, -2 greater; zero-score padding rows must not count -> 3.
    np.testing.assert_array_equal(ranks["tail"], [2.5, 3.0])
    # Head of (0,0,1): row 1 ties but (1,0,1) is true (valid) -> filtered -> 1.
    # Head of (0,1,0): scores -3 (target), -3 (tie), -1.5 (greater) -> 1 + 1 + 0.5.
    np.testing.assert_array_equal(ranks["head"], [1.0, 2.5])

    # Without the filter, the true tail 5 counts: rank 3.5.
    unfiltered = TripleIndex([test], max_rows=10)
    ranks = kg_eval.filtered_ranks(
        fn, tables=tables, num_rows={"a": 3, "b": 4}, rel_params=rel, triples=test[:1],
        rel_head_type=["a", "a"], rel_tail_type=["b", "b"], filter_index=unfiltered,
        mesh=_mesh(n_dev), config=kg_eval.KGEvalConfig(sides=("tail",)))
    np.testing.assert_array_equal(ranks["tail"], [3.5])


@pytest.mark.parametrize("bad", [0, -5])
def test_config_rejects_max_triples_below_one(bad):
    # Were accepted: after the whole training run, 0 failed with "no ranks to summarise"
    # and -5 with NumPy's "negative dimensions are not allowed".
    with pytest.raises(ValueError, match=rf"max_triples must be >= 1 or None \(all triples; -1 in "
                                         rf"a config file or on the command line\), got {bad}"):
        kg_eval.KGEvalConfig(max_triples=bad)
    assert kg_eval.KGEvalConfig(max_triples=1).max_triples == 1
    assert kg_eval.KGEvalConfig(max_triples=None).max_triples is None


def test_rank_metrics_hand_computed():
    m = kg_eval.rank_metrics(np.array([1.0, 2.5, 4.0, 20.0]))
    np.testing.assert_allclose(m["mrr"], (1 + 0.4 + 0.25 + 0.05) / 4)
    assert m["hits@1"] == 0.25 and m["hits@3"] == 0.5 and m["hits@10"] == 0.75


def test_all_equal_scores_give_mean_rank():
    # Every candidate scores 0 (zero tables): realistic rank = (n + 1) / 2.
    fn = kg_scoring.ScoringFunction(name="distmult")
    tables = {"e": jnp.zeros((5, 4))}
    test = np.array([[0, 0, 1], [2, 0, 3]])
    ranks = kg_eval.filtered_ranks(
        fn, tables=tables, num_rows={"e": 5}, rel_params={"vec": jnp.ones((1, 4))},
        triples=test, rel_head_type=["e"], rel_tail_type=["e"],
        filter_index=TripleIndex([test], max_rows=5), mesh=_mesh(8))
    np.testing.assert_array_equal(ranks["tail"], [3.0, 3.0])


@pytest.mark.parametrize("n_dev", [1, 8])
def test_non_finite_scores_are_errors(n_dev):
    # NaN compares False both ways: without the check an all-NaN model ranks every
    # target first (MRR 1.0).
    fn = kg_scoring.ScoringFunction(name="distmult")
    test = np.array([[0, 0, 1], [2, 0, 3]])
    kw = dict(num_rows={"e": 16}, rel_params={"vec": jnp.ones((1, 4))}, triples=test,
              rel_head_type=["e"], rel_tail_type=["e"],
              filter_index=TripleIndex([test], max_rows=16), mesh=_mesh(n_dev))
    with pytest.raises(ValueError, match="non-finite"):
        kg_eval.evaluate(fn, tables={"e": jnp.full((16, 4), jnp.nan)}, **kw)
    one_row = jnp.ones((16, 4)).at[7].set(jnp.nan)  # row 7: a kept candidate only
    with pytest.raises(ValueError, match="non-finite"):
        kg_eval.evaluate(fn, tables={"e": one_row}, **kw)
    with pytest.raises(ValueError, match="non-finite"):
        kg_eval.evaluate(fn, tables={"e": jnp.ones((16, 4))},
                         **{**kw, "rel_params": {"vec": jnp.full((1, 4), jnp.inf)}})


def test_nan_in_filtered_or_padding_rows_is_ignored():
    # The hand graph's tail of (0,0,1): row 3 of "b" is a filtered true answer and rows
    # 4.. are padding; NaN there never reaches the ranking, so the rank stays 2.5.
    tables, rel, test, train, valid = _hand_graph()
    b = jnp.concatenate([tables["b"].at[3].set(jnp.nan), jnp.full((4, 2), jnp.nan)])
    ranks = kg_eval.filtered_ranks(
        kg_scoring.ScoringFunction(name="distmult"), tables={"a": tables["a"], "b": b},
        num_rows={"a": 3, "b": 4}, rel_params=rel, triples=test[:1],
        rel_head_type=["a", "a"], rel_tail_type=["b", "b"],
        filter_index=TripleIndex([train, valid, test], max_rows=10), mesh=_mesh(8),
        config=kg_eval.KGEvalConfig(sides=("tail",)))
    np.testing.assert_array_equal(ranks["tail"], [2.5])


@pytest.mark.parametrize("name", ["transe", "distmult", "complex", "transr"])
def test_matches_brute_force(name):
    rng = np.random.default_rng(1)
    fn = kg_scoring.ScoringFunction(name=name, gamma=2.0)
    nr, rows, dim = 3, {"u": 13, "p": 21}, 6
    head_type, tail_type = ["u", "u", "p"], ["p", "u", "p"]
    tables = {k: jnp.asarray(rng.normal(size=(v, dim)), jnp.float32) for k, v in rows.items()}
    rel = fn.init_relations(jax.random.key(2), num_relations=nr, dim=dim)
    trip = []
    for _ in range(60):
        r = int(rng.integers(nr))
        trip.append([rng.integers(rows[head_type[r]]), r, rng.integers(rows[tail_type[r]])])
    trip = np.unique(np.array(trip), axis=0)
    train, test = trip[:40], trip[40:]
    fidx = TripleIndex([train, test], max_rows=32)
    got = kg_eval.filtered_ranks(
        fn, tables=tables, num_rows=rows, rel_params=rel, triples=test, rel_head_type=head_type,
        rel_tail_type=tail_type, filter_index=fidx, mesh=_mesh(8),
        config=kg_eval.KGEvalConfig(block_size=8))

    true = {tuple(x) for x in trip.tolist()}
    for side in ("tail", "head"):
        want = []
        for h, r, t in test.tolist():
            rl = {k: v[r] for k, v in rel.items()}
            ctype = tail_type[r] if side == "tail" else head_type[r]
            cands = np.arange(rows[ctype])
            if side == "tail":
                s = fn.score(head=jnp.broadcast_to(tables[head_type[r]][h], (len(cands), dim)),
                             rel={k: jnp.broadcast_to(v, (len(cands),) + v.shape) for k, v in rl.items()},
                             tail=tables[ctype])
                others = [c for c in cands if c != t and (h, r, c) not in true]
                target = t
            else:
                s = fn.score(head=tables[ctype],
                             rel={k: jnp.broadcast_to(v, (len(cands),) + v.shape) for k, v in rl.items()},
                             tail=jnp.broadcast_to(tables[tail_type[r]][t], (len(cands), dim)))
                others = [c for c in cands if c != h and (c, r, t) not in true]
                target = h
            s = np.asarray(s)
            want.append(1 + np.sum(s[others] > s[target]) + 0.5 * np.sum(s[others] == s[target]))
        np.testing.assert_array_equal(got[side], want, err_msg=side)
