"""Specs, planner, padding, id checks, hashing and OOV of the embedding engine."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_recsys.embedding import collection, lookup, sharding, specs


def _mesh(n):
    return jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:n])


@pytest.mark.parametrize("field,value", [("dim", 0), ("dim", -3), ("rows", 0), ("rows", 2.5)])
def test_bad_table_sizes_raise(field, value):
    kw = dict(name="user", rows=10, dim=4)
    kw[field] = value
    with pytest.raises(ValueError, match=f"'user': {field} must be an int > 0"):
        specs.TableSpec(**kw)


def test_rows_beyond_int32_are_refused():
    # Ids are int32 inside jit: a table of 2**31 rows was accepted, then a direct lookup
    # failed with an OverflowError and rows beyond could never be looked up.
    assert specs.TableSpec(name="user", rows=2**31 - 1, dim=4).rows == 2**31 - 1
    for rows in (2**31, np.int64(3 * 2**31)):
        with pytest.raises(ValueError, match=(
                r"TableSpec 'user': rows must be <= 2\*\*31 - 1 = 2147483647 \(ids and rows are "
                rf"int32 inside jit: rows beyond could never be looked up\), got {rows}; ")):
            specs.TableSpec(name="user", rows=rows, dim=4)


def test_bad_spec_fields_raise():
    with pytest.raises(ValueError, match="unknown sharding 'diagonal'"):
        specs.TableSpec(name="t", rows=4, dim=4, sharding="diagonal")
    with pytest.raises(ValueError, match="unknown initializer"):
        specs.TableSpec(name="t", rows=4, dim=4, initializer="glorot")
    with pytest.raises(ValueError, match="optimizer must be"):
        specs.TableSpec(name="t", rows=4, dim=4, optimizer="adam")
    with pytest.raises(ValueError, match="pooling must be"):
        specs.FeatureSpec(name="f", table="t", pooling="max")
    with pytest.raises(ValueError, match="learning_rate"):
        specs.SGD(learning_rate=-1.0)
    for bad in (-0.1, float("nan"), True):
        with pytest.raises(ValueError, match=r"TableSpec 't'.init_scale must be a finite number"):
            specs.TableSpec(name="t", rows=4, dim=4, init_scale=bad)
    assert specs.TableSpec(name="t", rows=4, dim=4, init_scale=np.float32(0.5)).init_scale == 0.5
    with pytest.raises(TypeError):
        specs.TableSpec("t", 4, 4)  # keyword-only


def test_unknown_table_and_duplicates_raise():
    t = specs.TableSpec(name="user", rows=4, dim=2)
    with pytest.raises(ValueError, match="feature 'pin_id' reads unknown table 'pin'"):
        specs.validate_specs([t], [specs.FeatureSpec(name="pin_id", table="pin")])
    with pytest.raises(ValueError, match="duplicate table names"):
        specs.validate_specs([t, t], [])
    with pytest.raises(ValueError, match="unknown tables \\['item'\\]"):
        sharding.plan_shardings([t], num_shards=2, overrides={"item": "row_wise"})
    with pytest.raises(ValueError, match="axis 'model' is not one of them"):
        collection.EmbeddingCollection(tables=[t], features=[], mesh=_mesh(2), axis="model")


def test_plan_for_other_mesh_is_rejected():
    t = specs.TableSpec(name="user", rows=4, dim=2)
    plan = sharding.plan_shardings([t], num_shards=4)
    with pytest.raises(ValueError, match="plan is for 4 shards"):
        collection.EmbeddingCollection(tables=[t], features=[], mesh=_mesh(2), plan=plan)


def test_planner_picks_by_size_and_respects_overrides():
    small = specs.TableSpec(name="small", rows=10, dim=4)  # 160 B + 40 B acc
    medium = specs.TableSpec(name="medium", rows=1000, dim=8)
    big = specs.TableSpec(name="big", rows=100_000, dim=8)
    pinned = specs.TableSpec(name="pinned", rows=10, dim=4, sharding="column_wise")
    cfg = sharding.PlannerConfig(replicate_max_bytes=1000, table_wise_max_bytes=100_000)
    plan = sharding.plan_shardings([small, medium, big, pinned], num_shards=4, config=cfg,
                                   overrides={"big": "row_wise"})
    got = {k: p.sharding.value for k, p in plan.placements.items()}
    assert got == {"small": "replicated", "medium": "table_wise", "big": "row_wise",
                   "pinned": "column_wise"}
    plan = sharding.plan_shardings([big], num_shards=4, config=cfg, overrides={"big": "replicated"})
    assert plan.placements["big"].sharding == sharding.ShardingType.REPLICATED
    assert "big: replicated" in plan.describe()


def test_planner_memory_budget():
    big = specs.TableSpec(name="big", rows=1000, dim=16, optimizer=specs.LazyAdam())
    # values 64 KB + m, v 128 KB + step 4 KB = 196 KB total; 49 KB per device on 4.
    plan = sharding.plan_shardings([big], num_shards=4,
                                   config=sharding.PlannerConfig(memory_budget_bytes=50_000,
                                                                 replicate_max_bytes=0))
    assert sharding.storage_bytes_per_device(plan.storages["big"]) == 250 * 16 * 4 * 3 + 250 * 4
    with pytest.raises(ValueError, match="MiB per device"):
        sharding.plan_shardings([big], num_shards=2,
                                config=sharding.PlannerConfig(memory_budget_bytes=50_000,
                                                              replicate_max_bytes=0))


@pytest.mark.parametrize("field,value,low", [
    ("memory_budget_bytes", -1, 1), ("memory_budget_bytes", 0, 1),
    ("memory_budget_bytes", 1.5, 1), ("memory_budget_bytes", "1G", 1),
    ("replicate_max_bytes", -5, 0), ("replicate_max_bytes", None, 0),
    ("table_wise_max_bytes", True, 0),
])
def test_bad_planner_config_raises(field, value, low):
    # A negative budget said "the budget is -0.0 MiB" at planning; "1G" was a TypeError;
    # a negative replicate_max_bytes was accepted.
    none = " or None" if field == "memory_budget_bytes" else ""
    with pytest.raises(ValueError, match=re.escape(
            f"PlannerConfig.{field} must be an int >= {low} (bytes){none}, got {value!r}")):
        sharding.PlannerConfig(**{field: value})


def test_planner_config_accepts_numpy_ints_and_no_budget():
    cfg = sharding.PlannerConfig(memory_budget_bytes=np.int64(5), replicate_max_bytes=0)
    assert cfg.memory_budget_bytes == 5 and type(cfg.memory_budget_bytes) is int
    assert sharding.PlannerConfig(memory_budget_bytes=None).memory_budget_bytes is None


def test_table_wise_packs_tables_on_owners():
    ts = [specs.TableSpec(name=n, rows=r, dim=4, sharding="table_wise")
          for n, r in [("a", 30), ("b", 20), ("c", 10), ("d", 5)]]
    plan = sharding.plan_shardings(ts, num_shards=2)
    assert len(plan.storages) == 1
    st = next(iter(plan.storages.values()))
    owners = {n: plan.placements[n].owner for n in "abcd"}
    # largest first onto the least-loaded device (ties -> lowest index):
    # a(30)->0, b(20)->1, c(10)->1 (20 < 30), d(5)->0 (30 == 30): blocks of 35 and 30 rows.
    assert owners == {"a": 0, "b": 1, "c": 1, "d": 0}
    assert st.rows == 2 * 35 and st.local_rows == 35
    assert plan.placements["a"].row_base == 0
    assert plan.placements["b"].row_base == 35
    assert plan.placements["c"].row_base == 55
    assert plan.placements["d"].row_base == 30
    # each table's rows lie entirely inside its owner's block
    for n, t in zip("abcd", ts, strict=True):
        base = plan.placements[n].row_base
        assert base // 35 == owners[n] and (base + t.rows - 1) // 35 == owners[n]
    # a different dim goes to another group
    ts.append(specs.TableSpec(name="e", rows=5, dim=8, sharding="table_wise"))
    assert len(sharding.plan_shardings(ts, num_shards=2).storages) == 2


def test_table_named_like_a_table_wise_storage_keeps_its_own_storage():
    """A table named table_wise_0 shared its storage key with the packed group: the
    group's storage replaced the table's, which read and trained the group's rows."""
    ts = [specs.TableSpec(name="table_wise_0", rows=10, dim=2, sharding="row_wise",
                          initializer="ones"),
          specs.TableSpec(name="b", rows=3, dim=2, sharding="table_wise", initializer="zeros")]
    ec = collection.EmbeddingCollection(
        tables=ts, features=[specs.FeatureSpec(name="f", table="table_wise_0"),
                             specs.FeatureSpec(name="g", table="b")], mesh=_mesh(2))
    assert ec.plan.placements["b"].storage == "_table_wise_0"
    assert ec.plan.placements["table_wise_0"].storage == "table_wise_0"
    state = ec.init(jax.random.key(0))
    ids = {"f": np.array([0, 9], np.int32), "g": np.array([0, 2], np.int32)}
    np.testing.assert_array_equal(np.asarray(ec.lookup(state.tables, ids)["f"]), 1.0)
    state = ec.apply_gradients(state, ids, {"f": np.ones((2, 2), np.float32),
                                            "g": np.zeros((2, 2), np.float32)})
    vals = ec.export_tables(state)
    np.testing.assert_array_equal(vals["b"], 0.0)
    assert vals["table_wise_0"][0, 0] < 1.0 and vals["table_wise_0"][1, 0] == 1.0


def test_table_wise_groups_balance_their_own_rows_whatever_the_names():
    """A group costs its busiest device's rows x dim on every device: its tables are
    balanced by that group's rows, so renaming tables cannot double a group's block
    (placing by all groups' bytes put both dim-4 tables on one device, 300 000 bytes
    against 280 000, and refused a 290 000-byte budget)."""
    cfg = sharding.PlannerConfig(memory_budget_bytes=290_000)
    for big, s1, s2 in (("z_big", "a_small", "b_small"), ("a_big", "x_small", "y_small")):
        ts = [specs.TableSpec(name=big, rows=1000, dim=64, sharding="table_wise"),
              specs.TableSpec(name=s1, rows=1000, dim=4, sharding="table_wise"),
              specs.TableSpec(name=s2, rows=1000, dim=4, sharding="table_wise")]
        plan = sharding.plan_shardings(ts, num_shards=2, config=cfg)
        assert plan.placements[s1].owner != plan.placements[s2].owner
        assert sum(sharding.storage_bytes_per_device(st) for st in plan.storages.values()) \
            == 280_000


def test_rows_not_divisible_are_padded_with_zeros():
    t = specs.TableSpec(name="user", rows=37, dim=6, initializer="ones", sharding="row_wise")
    c = specs.TableSpec(name="col", rows=5, dim=6, initializer="ones", sharding="column_wise")
    ec = collection.EmbeddingCollection(tables=[t, c], features=[], mesh=_mesh(8))
    st = ec.init(jax.random.key(0))
    assert st.tables["user"].shape == (40, 6)
    assert st.tables["col"].shape == (5, 8)
    full = np.asarray(st.tables["user"])
    np.testing.assert_array_equal(full[:37], 1.0)
    np.testing.assert_array_equal(full[37:], 0.0)
    np.testing.assert_array_equal(np.asarray(st.tables["col"])[:, 6:], 0.0)
    assert st.slots["user"]["acc"].shape == (40,)
    assert st.tables["user"].sharding.spec == jax.sharding.PartitionSpec("data", None)
    np.testing.assert_array_equal(ec.export_tables(st)["user"], np.ones((37, 6)))


def test_init_does_not_depend_on_mesh_and_accepts_initial_values():
    t = specs.TableSpec(name="user", rows=37, dim=6)
    v1 = collection.EmbeddingCollection(tables=[t], features=[], mesh=_mesh(1)).init(jax.random.key(3))
    ec8 = collection.EmbeddingCollection(tables=[t], features=[], mesh=_mesh(8))
    v8 = ec8.init(jax.random.key(3))
    np.testing.assert_array_equal(np.asarray(v1.tables["user"]), ec8.export_tables(v8)["user"])
    assert 0.25 < float(np.std(np.asarray(v1.tables["user"]))) * np.sqrt(6) < 2.0
    given = np.arange(37 * 6, dtype=np.float32).reshape(37, 6)
    st = ec8.init(jax.random.key(0), initial_values={"user": given})
    np.testing.assert_array_equal(ec8.export_tables(st)["user"], given)
    with pytest.raises(ValueError, match="has shape \\(3, 6\\)"):
        ec8.init(jax.random.key(0), initial_values={"user": given[:3]})


def test_check_ids_names_feature_and_position():
    tabs = {"user": specs.TableSpec(name="user", rows=10, dim=2)}
    feats = {"u": specs.FeatureSpec(name="u", table="user", pooling="sum", max_ids=3),
             "h": specs.FeatureSpec(name="h", table="user", id_mode="hash")}
    ok = np.array([[0, 9, -1], [-1, -1, -1]])
    lookup.check_ids({"u": ok, "h": np.array([2**31 - 1, -5])}, features=feats, tables=tabs)
    with pytest.raises(ValueError, match=r"feature 'u': id 10 at position \(1, 2\).*'user' with 10 rows"):
        lookup.check_ids({"u": np.array([[0, 1, 2], [3, 4, 10]])}, features=feats, tables=tabs)
    with pytest.raises(ValueError, match="id -2 at position"):
        lookup.check_ids({"u": np.array([[0, -2, 2]])}, features=feats, tables=tabs)
    with pytest.raises(ValueError, match="L=2 per example but max_ids=3"):
        lookup.check_ids({"u": np.zeros((2, 2), int)}, features=feats, tables=tabs)
    with pytest.raises(ValueError, match="must be integers"):
        lookup.check_ids({"u": np.zeros((2, 3))}, features=feats, tables=tabs)
    with pytest.raises(ValueError, match="unknown feature 'x'"):
        lookup.check_ids({"x": np.zeros((2,), int)}, features=feats, tables=tabs)


def test_hashing_is_deterministic_in_range_and_host_matches_device():
    raw = np.array([0, 1, 2, 12345, 2**31 - 1, 7, 7, -1, -9], dtype=np.int64)
    h = lookup.hash_ids_np(raw, rows=101)
    assert h.dtype == np.int32
    assert h[7] == -1 and h[8] == 100  # padding stays, other negatives -> OOV row R-1
    assert np.all((h[:7] >= 0) & (h[:7] < 100))
    assert h[5] == h[6]
    dev = np.asarray(lookup.hash_ids(jnp.asarray(raw.astype(np.int32)), rows=101))
    np.testing.assert_array_equal(dev, h)
    # ids beyond int32 on the host still land in range
    big = lookup.hash_ids_np(np.array([2**40, 2**40 + 1, 3 * 2**33]), rows=101)
    assert np.all((big >= 0) & (big < 100))
    # spreads: 10k ids over 100 buckets, no bucket is empty or holds > 3x the mean
    counts = np.bincount(lookup.hash_ids_np(np.arange(10_000) * 1000, rows=101), minlength=101)
    assert counts[:100].min() > 0 and counts[:100].max() < 300 and counts[100] == 0


def test_oov_and_direct_id_modes():
    t = specs.TableSpec(name="user", rows=5, dim=2)
    f_oov = specs.FeatureSpec(name="u", table="user", id_mode="oov")
    f_dir = specs.FeatureSpec(name="d", table="user")
    ids = jnp.array([0, 3, 4, 5, 100, -1, -7])
    np.testing.assert_array_equal(lookup.map_ids(ids, feature=f_oov, rows=t.rows),
                                  [0, 3, 4, 4, 4, -1, 4])
    np.testing.assert_array_equal(lookup.map_ids(ids, feature=f_dir, rows=t.rows),
                                  [0, 3, 4, -1, -1, -1, -1])
    with pytest.raises(ValueError, match="at least 2 rows"):
        specs.validate_specs([specs.TableSpec(name="one", rows=1, dim=2)],
                             [specs.FeatureSpec(name="o", table="one", id_mode="oov")])


def test_state_from_another_mesh_is_rejected():
    t = specs.TableSpec(name="user", rows=37, dim=4, sharding="row_wise")
    f = specs.FeatureSpec(name="u", table="user")
    st1 = collection.EmbeddingCollection(tables=[t], features=[f], mesh=_mesh(1)).init(jax.random.key(0))
    ec8 = collection.EmbeddingCollection(tables=[t], features=[f], mesh=_mesh(8))
    ids = {"u": np.zeros((8,), np.int32)}
    with pytest.raises(ValueError, match=r"storage 'user' .* has shape \(37, 4\) .* expects \(40, 4\)"):
        ec8.lookup(st1.tables, ids)
    with pytest.raises(ValueError, match="was the state made for another mesh"):
        ec8.apply_gradients(st1, ids, {"u": jnp.ones((8, 4))})


def test_state_made_with_another_optimizer_is_rejected():
    """Its slots did not fit the shard_map in_specs: a multi-line 'pytree structure
    error' about in_specs[1]['user'] that named neither the optimizer nor the slots."""
    def make(optimizer):
        return collection.EmbeddingCollection(
            tables=[specs.TableSpec(name="user", rows=16, dim=4, optimizer=optimizer)],
            features=[specs.FeatureSpec(name="u", table="user")], mesh=_mesh(8))

    st = make(specs.RowAdagrad()).init(jax.random.key(0))
    ids, grads = {"u": np.zeros((8,), np.int32)}, {"u": jnp.ones((8, 4))}
    with pytest.raises(ValueError, match=r"storage 'user' \(tables \['user'\]\) has optimizer "
                                         r"slots \['acc'\] but this collection's LazyAdam.* needs "
                                         r"\['m', 'step', 'v'\]"):
        make(specs.LazyAdam()).apply_gradients(st, ids, grads)
    with pytest.raises(ValueError, match=r"slots \['acc'\] .* needs \['acc', 'count'\]"):
        make(specs.RowAdagrad(frequency_adaptive=True)).apply_gradients(st, ids, grads)


# --------------------------------------------------------------------------- review fixes


RAW64 = np.array([2**31 + 5, 2**32 - 1, 2**32 + 3, 2**40 + 7], np.int64)


@pytest.mark.parametrize("id_mode", ["direct", "oov", "hash"])
def test_ids_beyond_int32_are_rejected_on_the_host(id_mode):
    t = specs.TableSpec(name="user", rows=11, dim=2, sharding="replicated")
    f = specs.FeatureSpec(name="h", table="user", id_mode=id_mode)
    ec = collection.EmbeddingCollection(tables=[t], features=[f], mesh=_mesh(2))
    st = ec.init(jax.random.key(0))
    ids = np.array([3, 2**32 + 3])
    msg = r"feature 'h': id 4294967299 at position \(1,\) does not fit in int32.*hash_ids_np"
    with pytest.raises(ValueError, match=msg):
        ec.check_ids({"h": ids})
    with pytest.raises(ValueError, match=msg):
        ec.storage_ids("h", ids)
    with pytest.raises(ValueError, match=msg):
        ec.lookup(st.tables, {"h": ids})
    with pytest.raises(ValueError, match=msg):
        ec.apply_gradients(st, {"h": ids}, {"h": jnp.ones((2, 2))})
    with pytest.raises(ValueError, match="does not fit in int32"):
        ec.check_ids({"h": np.array([0, -(2**31) - 1])})
    # int64 ids that fit are fine (and equal their int32 twins)
    ok = np.array([3, 10 if id_mode == "direct" else 2**31 - 1], np.int64)
    ec.check_ids({"h": ok})
    np.testing.assert_array_equal(np.asarray(ec.storage_ids("h", ok)),
                                  np.asarray(ec.storage_ids("h", ok.astype(np.int32))))


def test_hash_ids_np_handles_64_bit_ids_like_the_in_jit_hash():
    # uint32 ids >= 2**31 reach the in-jit hash untruncated: same rows as the host hash
    u32 = np.array([2**31 + 5, 2**32 - 1, 7], np.uint32)
    np.testing.assert_array_equal(np.asarray(lookup.hash_ids(jnp.asarray(u32), rows=11)),
                                  lookup.hash_ids_np(u32, rows=11))
    # < 2**32: folding is the identity, so int64 and uint32 give the same rows
    np.testing.assert_array_equal(lookup.hash_ids_np(u32.astype(np.int64), rows=11),
                                  lookup.hash_ids_np(u32, rows=11))
    h = lookup.hash_ids_np(RAW64, rows=11)
    assert h.dtype == np.int32 and np.all((h >= 0) & (h < 10))
    np.testing.assert_array_equal(lookup.hash_ids_np(RAW64.astype(np.uint64), rows=11), h)
    # with x64 on, int64 ids inside jit are folded exactly like the host hash
    with jax.enable_x64(True):
        dev = np.asarray(jax.jit(lambda x: lookup.hash_ids(x, rows=11))(jnp.asarray(RAW64)))
        f = specs.FeatureSpec(name="o", table="user", id_mode="oov")
        oov = np.asarray(lookup.map_ids(jnp.asarray(np.append(RAW64, [3, -1])), feature=f, rows=11))
    np.testing.assert_array_equal(dev, h)
    np.testing.assert_array_equal(oov, [10, 10, 10, 10, 3, -1])
    # uint32 ids beyond int32 are OOV / invalid in jit, never a truncated valid row
    f_oov = specs.FeatureSpec(name="o", table="user", id_mode="oov")
    f_dir = specs.FeatureSpec(name="d", table="user")
    u = jnp.asarray(np.array([2**32 - 1, 2**31 + 3, 3], np.uint32))
    np.testing.assert_array_equal(lookup.map_ids(u, feature=f_oov, rows=11), [10, 10, 3])
    np.testing.assert_array_equal(lookup.map_ids(u, feature=f_dir, rows=11), [-1, -1, 3])
    with pytest.raises(ValueError, match="must be integers"):
        lookup.hash_ids_np(np.array([1.5]), rows=11)


def test_plan_for_other_axis_or_other_specs_is_rejected():
    auto = jax.sharding.AxisType.Auto
    mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(auto, auto), devices=jax.devices()[:4])
    t = specs.TableSpec(name="user", rows=8, dim=2, sharding="row_wise")
    f = specs.FeatureSpec(name="u", table="user")
    plan = sharding.plan_shardings([t], num_shards=2)  # axis "data"
    with pytest.raises(ValueError, match="plan is for mesh axis 'data' but the collection uses axis 'model'"):
        collection.EmbeddingCollection(tables=[t], features=[f], mesh=mesh, axis="model", plan=plan)
    collection.EmbeddingCollection(tables=[t], features=[f], mesh=mesh, axis="data", plan=plan)
    m2 = _mesh(2)
    for other, what in [
        (dataclasses.replace(t, rows=40), r"table 'user' \(row_wise\): storage shape is \(8, 2\), "
                                          r"expected \(40, 2\)"),
        (dataclasses.replace(t, dim=4), "table 'user' .*plan has dim=2, TableSpec has dim=4"),
        (dataclasses.replace(t, dtype="bfloat16"), "table 'user' .*dtype='float32'.*dtype='bfloat16'"),
        (dataclasses.replace(t, optimizer=specs.SGD()), "table 'user' .*plan has optimizer=RowAdagrad"),
    ]:
        with pytest.raises(ValueError, match=what):
            collection.EmbeddingCollection(tables=[other], features=[f], mesh=m2, plan=plan)
    # table-wise: a table grown past its owner's block
    tw = [specs.TableSpec(name=n, rows=r, dim=2, sharding="table_wise") for n, r in [("a", 6), ("b", 4)]]
    plan = sharding.plan_shardings(tw, num_shards=2)
    collection.EmbeddingCollection(tables=tw, features=[], mesh=m2, plan=plan)
    grown = [tw[0], dataclasses.replace(tw[1], rows=9)]
    with pytest.raises(ValueError, match="table 'b' \\(table_wise\\): rows \\[6, 15\\) .* owner 1"):
        collection.EmbeddingCollection(tables=grown, features=[], mesh=m2, plan=plan)


@pytest.mark.parametrize("cls,field,value", [
    (specs.SGD, "learning_rate", float("inf")),
    (specs.SGD, "learning_rate", float("nan")),
    (specs.SGD, "learning_rate", True),
    (specs.SGD, "learning_rate", "0.1"),
    (specs.LazyAdam, "b1", 1.0),
    (specs.LazyAdam, "b1", -0.1),
    (specs.LazyAdam, "b2", 1.5),
    (specs.LazyAdam, "eps", 0.0),
    (specs.RowAdagrad, "initial_accumulator", -1.0),
    (specs.RowAdagrad, "eps", -1e-8),
    (specs.RowAdagrad, "learning_rate", np.float32("inf")),
])
def test_bad_optimizer_constants_raise(cls, field, value):
    with pytest.raises(ValueError, match=f"{cls.__name__}.{field} must be a finite number"):
        cls(**{field: value})


def test_numpy_scalars_are_accepted_in_specs():
    opt = specs.LazyAdam(learning_rate=np.float32(0.5), b1=np.float64(0.8), b2=np.float32(0.5))
    assert opt.learning_rate == 0.5 and type(opt.learning_rate) is float and opt.b1 == 0.8
    assert specs.RowAdagrad(initial_accumulator=np.int64(0)).initial_accumulator == 0.0
    f = specs.FeatureSpec(name="f", table="t", max_ids=np.int64(3))
    assert f.max_ids == 3 and type(f.max_ids) is int
    with pytest.raises(ValueError, match="max_ids must be an int >= 1"):
        specs.FeatureSpec(name="f", table="t", max_ids=True)
    # RowAdagrad divides by sqrt(acc) + eps: one of the two may be 0, not both
    specs.RowAdagrad(initial_accumulator=0.0)
    specs.RowAdagrad(eps=0.0)
    with pytest.raises(ValueError, match="initial_accumulator and eps are both 0"):
        specs.RowAdagrad(initial_accumulator=0.0, eps=0.0)


def test_callable_initializer_of_wrong_shape_raises():
    t = specs.TableSpec(name="user", rows=5, dim=3, sharding="row_wise",
                        initializer=lambda k, shape, dtype: jax.random.normal(k, shape[::-1], dtype))
    ec = collection.EmbeddingCollection(tables=[t], features=[], mesh=_mesh(2))
    with pytest.raises(ValueError, match=r"table 'user': the callable initializer returned shape "
                                         r"\(3, 5\), expected \(rows, dim\) = \(5, 3\)"):
        ec.init(jax.random.key(0))
    ok = dataclasses.replace(t, initializer=lambda k, shape, dtype: jnp.full(shape, 2.0, dtype))
    ec = collection.EmbeddingCollection(tables=[ok], features=[], mesh=_mesh(2))
    np.testing.assert_array_equal(ec.export_tables(ec.init(jax.random.key(0)))["user"], 2.0)


def test_explicit_mesh_axis_is_rejected_at_construction():
    t = specs.TableSpec(name="user", rows=8, dim=2)
    mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,),
                         devices=jax.devices()[:2])
    with pytest.raises(ValueError, match="mesh axis 'data' has axis type .*Explicit.*AxisType.Auto"):
        collection.EmbeddingCollection(tables=[t], features=[], mesh=mesh)
