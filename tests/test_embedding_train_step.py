"""The shared train step: it learns, is sharding-invariant, freezes, donates, and never builds a dense table gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jax_recsys.data.batching import Batch
from jax_recsys.embedding import collection, specs, train_step as ts

B = 32


def _mesh(n):
    return jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:n])


class Head(nnx.Module):
    def __init__(self, dim, rngs):
        self.lin = nnx.Linear(2 * dim, 1, rngs=rngs)

    def __call__(self, u, i):
        return self.lin(jnp.concatenate([u * i, u + i], -1))[:, 0]


def loss_fn(*, rows, params, batch):
    logits = params(rows["user_id"], rows["item_hist"])
    per_ex = optax.sigmoid_binary_cross_entropy(logits, batch.labels["click"]) * batch.mask
    loss = per_ex.sum() / jnp.maximum(batch.mask.sum(), 1.0)
    return loss, {"mean_logit": logits.mean()}


def _setup(n_dev, *, user_rows=64, user_kind="row_wise", item_kind="column_wise", dim=8):
    tables = [
        specs.TableSpec(name="user", rows=user_rows, dim=dim, sharding=user_kind,
                        optimizer=specs.RowAdagrad(learning_rate=0.5)),
        specs.TableSpec(name="item", rows=40, dim=dim, sharding=item_kind,
                        optimizer=specs.LazyAdam(learning_rate=0.05)),
    ]
    features = [specs.FeatureSpec(name="user_id", table="user"),
                specs.FeatureSpec(name="item_hist", table="item", pooling="mean", max_ids=3)]
    ec = collection.EmbeddingCollection(tables=tables, features=features, mesh=_mesh(n_dev))
    gd, params = nnx.split(Head(dim, nnx.Rngs(0)), nnx.Param)
    tx = optax.adam(1e-2)
    state = ts.init_train_state(collection=ec, key=jax.random.key(0), params=params, dense_tx=tx)
    return ec, gd, tx, state


def _batch(seed, user_rows=64):
    rng = np.random.RandomState(seed)
    u = rng.randint(0, user_rows, B).astype(np.int32)
    items = rng.randint(-1, 40, (B, 3)).astype(np.int32)
    click = ((u % 2) ^ (items[:, 0] % 2 == 0)).astype(np.float32)  # learnable from ids only
    mask = np.ones(B, np.float32)
    mask[-2:] = 0.0
    return Batch(ids={"user_id": u, "item_hist": items, "other_ids": u},
                 dense={}, labels={"click": click}, mask=mask)


def test_training_lowers_the_loss_on_8_devices():
    ec, gd, tx, state = _setup(8)
    step = ts.make_train_step(collection=ec, loss_fn=loss_fn, dense_tx=tx, model_graphdef=gd)
    batches = [ts.shard_batch(_batch(s), mesh=ec.mesh) for s in range(4)]
    # The dense state starts replicated on the mesh, where the step returns it (so the
    # second step does not compile again): the same shardings in and out.
    dense = lambda st: jax.tree.leaves((st.params, st.opt_state, st.step))  # noqa: E731
    replicated = jax.sharding.NamedSharding(ec.mesh, jax.sharding.PartitionSpec())
    assert all(x.sharding.is_equivalent_to(replicated, x.ndim) for x in dense(state))
    before = [x.sharding for x in dense(state)]
    losses = []
    for k in range(40):
        state, m = step(state, batches[k % 4])
        losses.append(float(m["loss"]))  # blocks on every step
    assert all(
        x.sharding.is_equivalent_to(b, x.ndim) for x, b in zip(dense(state), before, strict=True)
    )
    assert int(state.step) == 40
    assert np.isfinite(losses).all()
    assert np.mean(losses[-4:]) < 0.6 * np.mean(losses[:4]), losses
    eval_step = ts.make_eval_step(collection=ec, eval_fn=loss_fn, model_graphdef=gd)
    before = ec.export_tables(state.emb)
    loss, _ = eval_step(state, batches[0])
    assert float(loss) == pytest.approx(np.mean(losses[-4:]), rel=0.5)
    after = ec.export_tables(state.emb)
    for k in before:
        np.testing.assert_array_equal(before[k], after[k])


@pytest.mark.slow
def test_sharded_training_equals_unsharded():
    results = []
    for n_dev, kinds in [(1, ("row_wise", "replicated")), (8, ("row_wise", "column_wise")),
                         (2, ("table_wise", "table_wise"))]:
        ec, gd, tx, state = _setup(n_dev, user_kind=kinds[0], item_kind=kinds[1])
        step = ts.make_train_step(collection=ec, loss_fn=loss_fn, dense_tx=tx, model_graphdef=gd)
        losses = []
        for s in range(3):
            state, m = step(state, ts.shard_batch(_batch(s), mesh=ec.mesh))
            losses.append(float(m["loss"]))
        results.append((losses, ec.export_tables(state.emb),
                        jax.tree.map(np.asarray, jax.tree.leaves(state.params))))
    ref_losses, ref_tables, ref_params = results[0]
    for losses, tables, params in results[1:]:
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
        for k in ref_tables:
            np.testing.assert_allclose(tables[k], ref_tables[k], rtol=1e-4, atol=1e-6)
        for a, b in zip(params, ref_params, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_frozen_tables_are_bit_identical():
    ec, gd, tx, state = _setup(8)
    step = ts.make_train_step(collection=ec, loss_fn=loss_fn, dense_tx=tx, model_graphdef=gd,
                              frozen_tables=("user",))
    user0 = np.asarray(state.emb.tables["user"]).copy()
    acc0 = np.asarray(state.emb.slots["user"]["acc"]).copy()
    item0 = np.asarray(state.emb.tables["item"]).copy()
    for s in range(3):
        state, m = step(state, ts.shard_batch(_batch(s), mesh=ec.mesh))
        jax.block_until_ready(m)
    np.testing.assert_array_equal(np.asarray(state.emb.tables["user"]), user0)
    np.testing.assert_array_equal(np.asarray(state.emb.slots["user"]["acc"]), acc0)
    assert not np.array_equal(np.asarray(state.emb.tables["item"]), item0)
    with pytest.raises(ValueError, match="unknown tables \\['pin'\\]"):
        ts.make_train_step(collection=ec, loss_fn=loss_fn, dense_tx=tx, frozen_tables=("pin",))


def _shapes_in_jaxpr(jaxpr, shapes, found):
    """Records (primitive, shape) for every equation output whose shape is in ``shapes``."""
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            shp = tuple(getattr(v.aval, "shape", ()))
            if shp in shapes:
                found.append((eqn.primitive.name, shp))
        for p in eqn.params.values():
            for sub in p if isinstance(p, list | tuple) else [p]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    _shapes_in_jaxpr(inner, shapes, found)


@pytest.mark.parametrize("n_dev", [1, 8])
def test_no_full_table_gradient_and_table_is_donated(n_dev):
    rows, dim = 50_000, 16
    ec, gd, tx, state = _setup(n_dev, user_rows=rows, item_kind="row_wise", dim=dim)
    step = ts.make_train_step(collection=ec, loss_fn=loss_fn, dense_tx=tx, model_graphdef=gd)
    batch = ts.shard_batch(_batch(0, user_rows=rows), mesh=ec.mesh)
    r_pad = state.emb.tables["user"].shape[0]
    # Every array with the (global or per-device) table shape must be the table itself
    # being updated in place: only scatters (and the calls that wrap them) produce one.
    found = []
    _shapes_in_jaxpr(jax.make_jaxpr(step)(state, batch).jaxpr, {(r_pad, dim), (r_pad // n_dev, dim)}, found)
    prims = {p for p, _ in found}
    assert prims <= {"scatter", "pjit", "jit", "shard_map"}, found
    assert "scatter" in prims
    compiled = step.lower(state, batch).compile()
    mem = compiled.memory_analysis()
    table_bytes = r_pad // n_dev * dim * 4
    assert mem.temp_size_in_bytes < table_bytes / 4, (mem.temp_size_in_bytes, table_bytes)
    assert mem.alias_size_in_bytes >= table_bytes
    old = state.emb.tables["user"]
    state, m = step(state, batch)
    jax.block_until_ready(m)
    assert old.is_deleted()  # donated: the update reused the buffer


def test_shard_batch_rejects_ids_beyond_int32():
    mesh = _mesh(2)
    ids = {"user_id": np.array([1, 2**32 + 3], np.int64)}
    with pytest.raises(ValueError, match=r"batch array .*user_id.*id 4294967299 .* does not fit in int32"):
        ts.shard_batch(ids, mesh=mesh)
    out = ts.shard_batch({"user_id": np.array([1, 2**31 - 1], np.int64)}, mesh=mesh)
    np.testing.assert_array_equal(np.asarray(out["user_id"]), [1, 2**31 - 1])
