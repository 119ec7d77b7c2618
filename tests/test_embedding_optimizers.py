"""Sparse row-wise optimizers equal a dense NumPy reference of the same rule, with duplicate ids."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_recsys.embedding import collection, specs

B, R, D = 16, 13, 5
OPTIMIZERS = {
    "sgd": specs.SGD(learning_rate=0.3),
    "sgd_freq": specs.SGD(learning_rate=0.3, frequency_adaptive=True),
    "adagrad": specs.RowAdagrad(learning_rate=0.2, initial_accumulator=0.1),
    "adagrad_freq": specs.RowAdagrad(learning_rate=0.2, frequency_adaptive=True),
    # same spec as "adagrad": table-wise packs the two into one group storage
    "adagrad_b": specs.RowAdagrad(learning_rate=0.2, initial_accumulator=0.1),
    "adam": specs.LazyAdam(learning_rate=0.05),
    "adam_freq": specs.LazyAdam(learning_rate=0.05, b1=0.8, b2=0.9, frequency_adaptive=True),
}


def _mesh(n):
    return jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:n])


class DenseReference:
    """The same rules, written densely over the whole table in NumPy (float64)."""

    def __init__(self, opt, table):
        self.opt = opt
        self.table = table.astype(np.float64)
        self.acc = np.full(R, getattr(opt, "initial_accumulator", 0.0))
        self.m = np.zeros((R, D))
        self.v = np.zeros((R, D))
        self.t = np.zeros(R)
        self.count = np.zeros(R)

    def step(self, ids, grads):
        ok = (ids >= 0) & (ids < R)
        g = np.zeros((R, D))
        np.add.at(g, ids[ok], grads[ok])
        c = np.zeros(R)
        np.add.at(c, ids[ok], 1.0)
        hit = c > 0
        opt = self.opt
        lr = np.full(R, opt.learning_rate)
        if opt.frequency_adaptive:
            self.count += c
            lr = lr / np.sqrt(np.maximum(self.count, 1.0))
        if isinstance(opt, specs.SGD):
            delta = g
        elif isinstance(opt, specs.RowAdagrad):
            self.acc[hit] += (g[hit] ** 2).mean(1)
            delta = g / (np.sqrt(self.acc)[:, None] + opt.eps)
        else:
            self.t[hit] += 1
            self.m[hit] = opt.b1 * self.m[hit] + (1 - opt.b1) * g[hit]
            self.v[hit] = opt.b2 * self.v[hit] + (1 - opt.b2) * g[hit] ** 2
            t = np.maximum(self.t, 1)[:, None]
            delta = (self.m / (1 - opt.b1**t)) / (np.sqrt(self.v / (1 - opt.b2**t)) + opt.eps)
        self.table[hit] -= lr[hit, None] * delta[hit]


def _batch(rng):
    # few distinct rows -> many duplicates within and across examples; -1 padding; 99 invalid
    x = rng.randint(-1, 6, (B,)).astype(np.int32)
    x[0] = 99
    s = rng.randint(-1, 6, (B, 3)).astype(np.int32)
    m = rng.randint(-1, R, (B, 2)).astype(np.int32)
    gx = rng.normal(size=(B, D)).astype(np.float32)
    gs = rng.normal(size=(B, D)).astype(np.float32)  # w.r.t. the pooled (sum) output
    gm = rng.normal(size=(B, D)).astype(np.float32)  # w.r.t. the pooled (mean) output
    h = rng.randint(-1, 4, (B, 2)).astype(np.int32)
    gh = rng.normal(size=(B, 2, D)).astype(np.float32)  # per id (unpooled multi-hot)
    return x, s, m, h, gx, gs, gm, gh


def _per_id(x, s, m, h, gx, gs, gm, gh):
    """Flattens the batch into (ids, per-id gradients) the way pooling defines them."""
    ids = [x, s.reshape(-1), m.reshape(-1), h.reshape(-1)]
    grads = [gx, np.repeat(gs, 3, axis=0)]
    cnt = np.maximum((m >= 0).sum(1, keepdims=True), 1)
    grads.append(np.repeat(gm / cnt, 2, axis=0))
    grads.append(gh.reshape(-1, D))
    return np.concatenate(ids), np.concatenate(grads)


@pytest.mark.parametrize("kind,n_dev", [("row_wise", 8), ("table_wise", 8), ("column_wise", 8),
                                        ("replicated", 8), ("row_wise", 1), ("column_wise", 2)])
def test_sparse_optimizers_match_dense_reference(kind, n_dev):
    tables, features = [], []
    for name, opt in OPTIMIZERS.items():
        tables.append(specs.TableSpec(name=name, rows=R, dim=D, sharding=kind, optimizer=opt))
        features += [specs.FeatureSpec(name=f"{name}.x", table=name),
                     specs.FeatureSpec(name=f"{name}.s", table=name, pooling="sum", max_ids=3),
                     specs.FeatureSpec(name=f"{name}.m", table=name, pooling="mean", max_ids=2),
                     specs.FeatureSpec(name=f"{name}.h", table=name, max_ids=2)]
    ec = collection.EmbeddingCollection(tables=tables, features=features, mesh=_mesh(n_dev))
    state = ec.init(jax.random.key(0))
    refs = {n: DenseReference(OPTIMIZERS[n], v) for n, v in ec.export_tables(state).items()}

    @jax.jit
    def update(state, ids, grads):
        return ec.apply_gradients(state, ids, grads)

    rng = np.random.RandomState(7)
    for _ in range(3):
        ids, grads = {}, {}
        for name in OPTIMIZERS:
            x, s, m, h, gx, gs, gm, gh = batch = _batch(rng)
            ids.update({f"{name}.x": x, f"{name}.s": s, f"{name}.m": m, f"{name}.h": h})
            grads.update({f"{name}.x": gx, f"{name}.s": gs, f"{name}.m": gm, f"{name}.h": gh})
            refs[name].step(*_per_id(*batch))
        state = update(state, ids, grads)
        jax.block_until_ready(state)
    got = ec.export_tables(state)
    for name, ref in refs.items():
        np.testing.assert_allclose(got[name], ref.table, rtol=2e-5, atol=2e-6,
                                   err_msg=f"{name} ({kind}, {n_dev} devices)")
    # untouched rows (ids only in 0..5 for x/s; m may hit any row) -- check slots too
    for name in ("adagrad", "adagrad_freq"):
        acc = np.asarray(state.slots[ec.plan.placements[name].storage]["acc"])
        base = ec.plan.placements[name].row_base
        np.testing.assert_allclose(acc[base:base + R], refs[name].acc, rtol=2e-5)
    step = np.asarray(state.slots[ec.plan.placements["adam"].storage]["step"])
    base = ec.plan.placements["adam"].row_base
    np.testing.assert_array_equal(step[base:base + R], refs["adam"].t)
    assert refs["adam"].t.max() == 3 and refs["adam"].t.min() < 3  # lazy: some rows skipped steps


def test_frequency_adaptive_lr_by_hand():
    """Row 0 seen 4x (lr 1/sqrt(4)), row 1 once (lr 1): SGD with lr 1, all-ones gradients."""
    ec = collection.EmbeddingCollection(
        tables=[specs.TableSpec(name="t", rows=4, dim=2, initializer="zeros",
                                optimizer=specs.SGD(learning_rate=1.0, frequency_adaptive=True))],
        features=[specs.FeatureSpec(name="f", table="t")], mesh=_mesh(2))
    st = ec.init(jax.random.key(0))
    ids = {"f": np.array([0, 0, 1, 0, 0, -1], np.int32)}
    st = ec.apply_gradients(st, ids, {"f": jnp.ones((6, 2))})
    # summed gradient of row 0 is 4, step 1/sqrt(4): -2; row 1: -1.
    np.testing.assert_allclose(ec.export_tables(st)["t"], [[-2, -2], [-1, -1], [0, 0], [0, 0]])
    np.testing.assert_array_equal(np.asarray(st.slots["t"]["count"]), [4, 1, 0, 0])


def test_row_adagrad_by_hand():
    """acc = 0.1 + mean(g^2); row -= lr * g / sqrt(acc)."""
    ec = collection.EmbeddingCollection(
        tables=[specs.TableSpec(name="t", rows=2, dim=2, initializer="zeros", sharding="column_wise",
                                optimizer=specs.RowAdagrad(learning_rate=1.0, eps=0.0))],
        features=[specs.FeatureSpec(name="f", table="t")], mesh=_mesh(2))
    st = ec.init(jax.random.key(0))
    # row 1 gets (1, 2) + (2, 2) = (3, 4): acc = 0.1 + (9 + 16) / 2 = 12.6
    st = ec.apply_gradients(st, {"f": np.array([1, 1], np.int32)}, {"f": jnp.array([[1., 2.], [2., 2.]])})
    np.testing.assert_allclose(ec.export_tables(st)["t"][1], -np.array([3., 4.]) / np.sqrt(12.6),
                               rtol=1e-6)
    np.testing.assert_allclose(np.asarray(st.slots["t"]["acc"]), [0.1, 12.6], rtol=1e-6)


def test_state_of_another_dtype_is_refused_by_the_update():
    """A bfloat16 slot in a float32 collection lost small updates without a word:
    acc = 1.0 + 10 x mean(0.01**2) stayed 1.0 (bfloat16 keeps 8 bits of mantissa)."""
    ec = collection.EmbeddingCollection(
        tables=[specs.TableSpec(name="t", rows=4, dim=2, initializer="zeros",
                                optimizer=specs.RowAdagrad(learning_rate=1.0, initial_accumulator=1.0))],
        features=[specs.FeatureSpec(name="f", table="t")], mesh=_mesh(2))
    st = ec.init(jax.random.key(0))
    ids, g = {"f": np.array([0, 1], np.int32)}, {"f": jnp.full((2, 2), 0.01)}
    bad_slot = collection.EmbeddingState(
        tables=st.tables, slots={"t": {"acc": st.slots["t"]["acc"].astype(jnp.bfloat16)}})
    with pytest.raises(ValueError, match=(
            r"storage 't' \(tables \['t'\]\): the dtype of its optimizer slot 'acc' is bfloat16 "
            r"but this collection uses float32 \(see state_shapes\(\)\)")):
        ec.apply_gradients(bad_slot, ids, g)
    bad_table = collection.EmbeddingState(
        tables={"t": st.tables["t"].astype(jnp.bfloat16)}, slots=st.slots)
    with pytest.raises(ValueError, match="the dtype of its values is bfloat16 but this collection uses float32"):
        ec.apply_gradients(bad_table, ids, g)
    # The collection's own dtypes: the increments are kept.
    for _ in range(10):
        st = ec.apply_gradients(st, ids, g)
    np.testing.assert_allclose(np.asarray(st.slots["t"]["acc"]), [1.001, 1.001, 1.0, 1.0], rtol=1e-6)
