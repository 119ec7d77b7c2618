"""Sharded lookup equals an unsharded NumPy reference for every sharding, pooling and device count."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_recsys.embedding import collection, lookup, specs

B = 16


def _mesh(n):
    return jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:n])


KINDS = ("row_wise", "table_wise", "column_wise", "replicated")


def _features(kind):
    return [
        specs.FeatureSpec(name=f"u.{kind}", table=f"user.{kind}"),
        specs.FeatureSpec(name=f"u_hist.{kind}", table=f"user.{kind}", max_ids=3),
        specs.FeatureSpec(name=f"i_sum.{kind}", table=f"item.{kind}", pooling="sum", max_ids=4),
        specs.FeatureSpec(name=f"i_mean.{kind}", table=f"item.{kind}", pooling="mean", max_ids=4),
        specs.FeatureSpec(name=f"u_hash.{kind}", table=f"user.{kind}", id_mode="hash"),
        specs.FeatureSpec(name=f"u_oov.{kind}", table=f"user.{kind}", id_mode="oov"),
    ]


def _ids(rng):
    return {
        # includes padding (-1) and out-of-range ids (37, 99, -5): zero rows inside jit
        "u": np.array([0, 36, 5, 5, -1, 37, 99, -5, 1, 2, 3, 4, 30, 31, 32, 33], np.int32),
        "u_hist": rng.randint(-1, 37, (B, 3)).astype(np.int32),
        "i_sum": rng.randint(-1, 11, (B, 4)).astype(np.int32),
        "i_mean": np.concatenate([np.full((1, 4), -1), rng.randint(-1, 11, (B - 1, 4))]).astype(np.int32),
        "u_hash": rng.randint(0, 2**31 - 1, (B,)).astype(np.int32),
        "u_oov": np.array([0, 1, 35, 36, 37, 1000, -1, -3] * 2, np.int32),
    }


def _ref_rows(table, rows):
    valid = (rows >= 0) & (rows < table.shape[0])
    return np.where(valid[..., None], table[np.clip(rows, 0, table.shape[0] - 1)], 0.0), valid


def _reference(user, item, ids, weights):
    out = {}
    out["u"], _ = _ref_rows(user, ids["u"])
    out["u_hist"], _ = _ref_rows(user, ids["u_hist"])
    r, v = _ref_rows(item, ids["i_sum"])
    out["i_sum"] = (r * (weights["i_sum"] * v)[..., None]).sum(1)
    r, v = _ref_rows(item, ids["i_mean"])
    out["i_mean"] = r.sum(1) / np.maximum(v.sum(1), 1)[:, None]
    out["u_hash"], _ = _ref_rows(user, lookup.hash_ids_np(ids["u_hash"], rows=37))
    oov = np.where((ids["u_oov"] >= 36) | (ids["u_oov"] < -1), 36, ids["u_oov"])
    out["u_oov"], _ = _ref_rows(user, oov)
    return out


@pytest.mark.parametrize("n_dev", [1, 2, 8])
def test_lookup_matches_numpy_reference(n_dev):
    """Every sharding type (one table pair each) and pooling, in one program per device count."""
    mesh = _mesh(n_dev)
    tables, features = [], []
    for kind in KINDS:
        tables += [specs.TableSpec(name=f"user.{kind}", rows=37, dim=6, sharding=kind),
                   specs.TableSpec(name=f"item.{kind}", rows=11, dim=6, sharding=kind)]
        features += _features(kind)
    ec = collection.EmbeddingCollection(tables=tables, features=features, mesh=mesh)
    state = ec.init(jax.random.key(1))
    vals = ec.export_tables(state)
    rng = np.random.RandomState(n_dev)
    base_ids = _ids(rng)
    ids = {f"{k}.{kind}": v for kind in KINDS for k, v in base_ids.items()}
    w = rng.uniform(0.5, 2.0, (B, 4)).astype(np.float32)
    weights = {f"i_sum.{kind}": w for kind in KINDS}

    @jax.jit
    def run(tables, ids, weights):
        rows = ec.gather(tables, ids)
        return ec.lookup(tables, ids, weights), rows, ec.pool(rows, ids, weights)

    pooled, rows, repooled = run(state.tables, ids, weights)
    for kind in KINDS:
        ref = _reference(vals[f"user.{kind}"], vals[f"item.{kind}"], base_ids, {"i_sum": w})
        for name in ref:
            key = f"{name}.{kind}"
            np.testing.assert_allclose(np.asarray(pooled[key]), ref[name], rtol=1e-5, atol=1e-6,
                                       err_msg=f"{kind} on {n_dev} devices, feature {name}")
            np.testing.assert_allclose(np.asarray(repooled[key]), ref[name], rtol=1e-5, atol=1e-6,
                                       err_msg=f"gather+pool, {kind} on {n_dev} devices, {name}")
        assert pooled[f"u.{kind}"].shape == (B, 6) and pooled[f"u_hist.{kind}"].shape == (B, 3, 6)
        assert rows[f"i_sum.{kind}"].shape == (B, 4, 6)
        # out-of-range and padding ids give exact zeros, never garbage
        np.testing.assert_array_equal(np.asarray(pooled[f"u.{kind}"])[4:8], 0.0)
    # the tables really are different (else the comparison above proves little)
    assert not np.allclose(vals["user.row_wise"], vals["user.column_wise"])


def test_lookup_rejects_bad_batches():
    ec = collection.EmbeddingCollection(
        tables=[specs.TableSpec(name="user", rows=8, dim=2)],
        features=[specs.FeatureSpec(name="u", table="user", pooling="sum", max_ids=2)],
        mesh=_mesh(8))
    st = ec.init(jax.random.key(0))
    with pytest.raises(ValueError, match="batch size 12 is not a multiple of the 8 devices"):
        ec.lookup(st.tables, {"u": jnp.zeros((12, 2), jnp.int32)})
    with pytest.raises(ValueError, match="unknown feature 'v'"):
        ec.lookup(st.tables, {"v": jnp.zeros((8,), jnp.int32)})
    with pytest.raises(ValueError, match="pooling='sum' needs ids \\[B, L\\]"):
        ec.lookup(st.tables, {"u": jnp.zeros((8,), jnp.int32)})
    # float ids were truncated to rows (2.7 -> row 2) and trained; bools read as rows 0/1
    bad = {"u": np.full((8, 2), 2.7, np.float32)}
    with pytest.raises(ValueError, match="'u': ids must be an integer array, got dtype float32"):
        ec.lookup(st.tables, bad)
    with pytest.raises(ValueError, match="'u': ids must be an integer array, got dtype float32"):
        ec.apply_gradients(st, bad, {"u": np.ones((8, 2), np.float32)})
    with pytest.raises(ValueError, match="'u': ids must be an integer array, got dtype bool"):
        ec.gather(st.tables, {"u": np.ones((8, 2), bool)})


@pytest.mark.parametrize("kind", KINDS)
def test_empty_batch_gives_empty_rows(kind):
    """B = 0 (a multiple of every device count): row-wise, table-wise and column-wise
    lookups failed to compile ('result dimension size at scatter_dimension cannot be zero')."""
    ec = collection.EmbeddingCollection(
        tables=[specs.TableSpec(name="user", rows=10, dim=3, sharding=kind, dtype="bfloat16")],
        features=[specs.FeatureSpec(name="u", table="user"),
                  specs.FeatureSpec(name="h", table="user", max_ids=2),
                  specs.FeatureSpec(name="p", table="user", pooling="sum", max_ids=2)],
        mesh=_mesh(8))
    st = ec.init(jax.random.key(0))
    ids = {"u": np.zeros((0,), np.int32), "h": np.zeros((0, 2), np.int32),
           "p": np.zeros((0, 2), np.int32)}
    out = ec.lookup(st.tables, ids, {"p": np.zeros((0, 2), np.float32)})
    assert {k: (v.shape, v.dtype) for k, v in out.items()} == {
        "u": ((0, 3), jnp.bfloat16), "h": ((0, 2, 3), jnp.bfloat16), "p": ((0, 3), jnp.bfloat16)}
    assert ec.gather(st.tables, ids)["p"].shape == (0, 2, 3)
    grads = {"u": np.zeros((0, 3), np.float32), "p": np.zeros((0, 3), np.float32)}
    new = ec.apply_gradients(st, ids, grads)
    np.testing.assert_array_equal(ec.export_tables(new)["user"], ec.export_tables(st)["user"])


def test_bfloat16_table_lookup():
    ec = collection.EmbeddingCollection(
        tables=[specs.TableSpec(name="user", rows=16, dim=4, dtype="bfloat16", sharding="row_wise")],
        features=[specs.FeatureSpec(name="u", table="user")], mesh=_mesh(2))
    st = ec.init(jax.random.key(0))
    ids = np.array([3, 15, 0, -1], np.int32)
    out = ec.lookup(st.tables, {"u": ids})["u"]
    assert out.dtype == jnp.bfloat16
    vals = ec.export_tables(st)["user"]
    np.testing.assert_array_equal(np.asarray(out, np.float32)[:3], vals[ids[:3]].astype(np.float32))


def _weighted_setup():
    t = specs.TableSpec(name="item", rows=6, dim=2, initializer="ones", sharding="row_wise",
                        optimizer=specs.SGD(learning_rate=1.0))
    fs = [specs.FeatureSpec(name="hist", table="item", pooling="sum", max_ids=3),
          specs.FeatureSpec(name="seq", table="item", pooling="none", max_ids=3)]
    ec = collection.EmbeddingCollection(tables=[t], features=fs, mesh=_mesh(2))
    return ec, ec.init(jax.random.key(0)), np.array([[0, 1, 2], [3, -1, -1]], np.int32)


def test_weights_with_unknown_key_or_wrong_shape_raise():
    ec, st, ids = _weighted_setup()
    w = np.zeros((2, 3), np.float32)
    # the real key works: all-zero weights pool to zeros
    np.testing.assert_array_equal(np.asarray(ec.lookup(st.tables, {"hist": ids}, {"hist": w})["hist"]), 0.0)
    with pytest.raises(ValueError, match=r"weights given for feature\(s\) \['hsit'\] that have no ids"):
        ec.lookup(st.tables, {"hist": ids}, {"hsit": w})
    with pytest.raises(ValueError, match=r"feature 'hist': weights have shape \(2,\) but its ids have "
                                         r"shape \(2, 3\)"):
        ec.lookup(st.tables, {"hist": ids}, {"hist": np.ones((2,), np.float32)})
    with pytest.raises(ValueError, match=r"weights have shape \(2, 2\)"):
        ec.lookup(st.tables, {"hist": ids}, {"hist": np.ones((2, 2), np.float32)})
    with pytest.raises(ValueError, match="feature 'seq', which has pooling='none'"):
        ec.lookup(st.tables, {"seq": ids}, {"seq": w})
    with pytest.raises(ValueError, match=r"\['hsit'\] that have no ids"):
        ec.apply_gradients(st, {"hist": ids}, {"hist": jnp.ones((2, 2))}, weights={"hsit": w})
    with pytest.raises(ValueError, match=r"\['hsit'\] that have no ids"):
        ec.pool({"hist": jnp.ones((2, 3, 2))}, {"hist": ids}, {"hsit": w})


def test_pooled_gradient_for_unpooled_multi_hot_feature_raises():
    ec, st, ids = _weighted_setup()
    with pytest.raises(ValueError, match=r"feature 'seq' has pooling='none': its lookup gives "
                                         r"\(2, 3, 2\), so the gradient must have that shape, got \(2, 2\)"):
        ec.apply_gradients(st, {"seq": ids}, {"seq": jnp.ones((2, 2))})
    # the per-id gradient works: rows 0..3 each move by -1 (SGD, lr 1), padding untouched
    st = ec.apply_gradients(st, {"seq": ids}, {"seq": jnp.ones((2, 3, 2))})
    np.testing.assert_array_equal(ec.export_tables(st)["item"][:, 0], [0, 0, 0, 0, 1, 1])
