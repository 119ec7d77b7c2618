"""EmbeddingCollection: table/feature specs + mesh + sharding plan -> init, lookup, sparse update.

The one object trainers hold. State lives outside it, in a pytree
``EmbeddingState(tables={storage: [R_pad, D_pad]}, slots={storage: {slot: ...}})``
so that it can be donated to jitted steps and checkpointed with Orbax.

Storage keys equal table names except for table-wise tables, which are packed
into shared ``table_wise_<i>`` storages (``_table_wise_<i>`` if a table has that
name; see ``sharding.py``). Read a table
with ``collection.table_value(tables, name)`` (inside or outside jit, returns
the unpadded [R, D]) or ``collection.export_tables(state)`` (host NumPy).

Lookups and updates run in one ``jax.shard_map`` over the mesh axis: ids,
results and row gradients are sharded by batch (B must be a multiple of S).
Invalid ids (-1 padding, and out-of-range ids of ``"direct"`` features inside
jit) give zero rows and are never updated; ``check_ids`` rejects out-of-range
ids on the host.

Dimension legend: B batch, L ids per example, D embedding dim, R rows, S shards.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from collections.abc import Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import shard_map
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jax_recsys.embedding import (
    lookup as lookup_lib,
    optimizers as opt_lib,
    sharding as sharding_lib,
    specs as specs_lib,
)

ShardingType = sharding_lib.ShardingType


@functools.partial(jax.tree_util.register_dataclass, data_fields=["tables", "slots"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class EmbeddingState:
    """All embedding values and sparse optimizer state (a pytree; donate it).

    Attributes:
      tables: storage key -> [R_pad, D_pad] value array (sharded per the plan).
      slots: storage key -> {slot name -> [R_pad] or [R_pad, D_pad]} optimizer state.
    """

    tables: dict[str, jax.Array]
    slots: dict[str, dict[str, jax.Array]]


def _table_key(key: jax.Array, name: str) -> jax.Array:
    # Per-table key from the name, so a table's init does not depend on the mesh or on other tables.
    return jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)


def _hash_u32(x: jax.Array) -> jax.Array:
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def _counter_uniform(seed: jax.Array, row: jax.Array, col: jax.Array, stream: int) -> jax.Array:
    """Uniform (0, 1) from a hash of (seed, row, col, stream): elementwise, so XLA fuses it."""
    h = _hash_u32(row.astype(jnp.uint32) * jnp.uint32(0x9E3779B1) + seed)
    h = _hash_u32(h ^ (col.astype(jnp.uint32) * jnp.uint32(0x27D4EB2F) + jnp.uint32(0x165667B1 * stream)))
    return ((h >> 8).astype(jnp.float32) + 0.5) * (1.0 / (1 << 24))


def _init_values(spec: specs_lib.TableSpec, key: jax.Array, shape: tuple[int, int]) -> jax.Array:
    """Initial values of one table laid out in ``shape`` (>= [R, D]; the padding is zero).

    Built-in initializers are counter-based (a hash of the table key, row and
    column): the value of (row, col) does not depend on the padding or the mesh,
    and the whole computation fuses into one pass that writes the table and
    nothing else -- a 40M-row table needs no temporary of its size.
    """
    dtype = jnp.dtype(spec.dtype)
    init = spec.initializer
    if callable(init):
        v = jnp.asarray(init(key, (spec.rows, spec.dim), dtype), dtype)
        if tuple(v.shape) != (spec.rows, spec.dim):
            raise ValueError(
                f"table {spec.name!r}: the callable initializer returned shape {tuple(v.shape)}, "
                f"expected (rows, dim) = {(spec.rows, spec.dim)}"
            )
        return jnp.pad(v, ((0, shape[0] - spec.rows), (0, shape[1] - spec.dim)))
    scale = spec.init_scale if spec.init_scale is not None else 1.0 / np.sqrt(spec.dim)
    row = jax.lax.broadcasted_iota(jnp.int32, shape, 0)
    col = jax.lax.broadcasted_iota(jnp.int32, shape, 1)
    inside = (row < spec.rows) & (col < spec.dim)
    if init in ("zeros", "ones"):
        v = jnp.full(shape, 0.0 if init == "zeros" else 1.0, jnp.float32)
    else:
        seed = jax.random.bits(key, (), jnp.uint32)
        u1 = _counter_uniform(seed, row, col, 1)
        if init == "uniform":
            v = scale * (2.0 * u1 - 1.0)
        else:  # Box-Muller
            u2 = _counter_uniform(seed, row, col, 2)
            v = scale * jnp.sqrt(-2.0 * jnp.log(u1)) * jnp.cos(2.0 * np.pi * u2)
    return jnp.where(inside, v, 0.0).astype(dtype)


def _check_plan(
    plan: sharding_lib.ShardingPlan,
    tables: Mapping[str, specs_lib.TableSpec],
    *,
    axis: str,
    num_shards: int,
) -> None:
    """Checks that a ready-made plan fits the table specs, the axis and its size.

    Raises:
      ValueError: naming the table (or storage) and the mismatch.
    """
    if plan.num_shards != num_shards or set(plan.placements) != set(tables):
        raise ValueError(
            f"sharding plan is for {plan.num_shards} shards and tables {sorted(plan.placements)}, "
            f"but the mesh axis has {num_shards} and the tables are {sorted(tables)}"
        )
    if plan.axis != axis:
        raise ValueError(
            f"sharding plan is for mesh axis {plan.axis!r} but the collection uses axis {axis!r}; "
            f"build the plan with plan_shardings(..., axis={axis!r})"
        )
    for key, st in plan.storages.items():
        if st.key != key or st.num_shards != num_shards:
            raise ValueError(
                f"sharding plan: storage {key!r} has key {st.key!r} and {st.num_shards} shard(s), "
                f"expected key {key!r} and {num_shards}"
            )
        for tname in st.tables:
            pl = plan.placements.get(tname)
            if pl is None or pl.storage != key:
                raise ValueError(
                    f"sharding plan: storage {key!r} lists table {tname!r}, whose placement is "
                    f"{None if pl is None else pl.storage!r}"
                )
    blocks: dict[str, list[tuple[int, int, str]]] = {}
    for name, t in tables.items():
        pl = plan.placements[name]

        def bad(what, pl=pl, name=name):
            return ValueError(
                f"sharding plan does not match table {name!r} ({pl.sharding.value}): {what}; "
                f"was the plan built for other TableSpecs? rebuild it with plan_shardings"
            )

        if pl.table != name:
            raise bad(f"its placement is for table {pl.table!r}")
        st = plan.storages.get(pl.storage)
        if st is None or name not in st.tables:
            raise bad(f"storage {pl.storage!r} is missing or does not list the table")
        if st.sharding != pl.sharding:
            raise bad(f"storage {pl.storage!r} is {st.sharding.value}")
        for field, want in (("dim", t.dim), ("dtype", t.dtype), ("optimizer", t.optimizer)):
            got = st.true_dim if field == "dim" else getattr(st, field)
            if got != want:
                raise bad(f"plan has {field}={got!r}, TableSpec has {field}={want!r}")
        if pl.sharding == ShardingType.TABLE_WISE:
            lo = pl.row_base
            if pl.owner is None or st.dim != t.dim or not (
                0 <= pl.owner < num_shards
                and pl.owner * st.local_rows <= lo
                and lo + t.rows <= (pl.owner + 1) * st.local_rows
            ):
                raise bad(
                    f"rows [{lo}, {lo + t.rows}) of storage {pl.storage!r} ([{st.rows}, {st.dim}]) "
                    f"are not inside owner {pl.owner}'s block of {st.local_rows} rows"
                )
            blocks.setdefault(pl.storage, []).append((lo, lo + t.rows, name))
            continue
        if pl.row_base != 0:
            raise bad(f"row_base is {pl.row_base}, expected 0")
        want_rows, want_dim = t.rows, t.dim
        if pl.sharding == ShardingType.ROW_WISE:
            want_rows = sharding_lib.round_up(t.rows, num_shards)
        elif pl.sharding == ShardingType.COLUMN_WISE:
            want_dim = sharding_lib.round_up(t.dim, num_shards)
        if (st.rows, st.dim) != (want_rows, want_dim):
            raise bad(f"storage shape is {(st.rows, st.dim)}, expected {(want_rows, want_dim)} "
                      f"for {t.rows} rows x {t.dim} dims over {num_shards} device(s)")
    for key, ranges in blocks.items():
        ranges.sort()
        for (_, end, a), (start, _, b) in zip(ranges, ranges[1:], strict=False):
            if start < end:
                raise ValueError(
                    f"sharding plan: tables {a!r} and {b!r} overlap in table-wise storage {key!r}"
                )


class EmbeddingCollection:
    """Specs + mesh + sharding plan: initializes, looks up and sparsely updates tables.

    Example::

        ec = EmbeddingCollection(tables=[TableSpec(name="user", rows=R, dim=D)],
                                 features=[FeatureSpec(name="user_id", table="user")],
                                 mesh=mesh)
        state = ec.init(jax.random.key(0))
        rows = ec.lookup(state.tables, batch.ids)            # inside jit
        state = ec.apply_gradients(state, batch.ids, grads)  # grads like rows
    """

    def __init__(
        self,
        *,
        tables: Sequence[specs_lib.TableSpec],
        features: Sequence[specs_lib.FeatureSpec],
        mesh: Mesh,
        axis: str = "data",
        planner: sharding_lib.PlannerConfig = sharding_lib.PlannerConfig(),
        overrides: Mapping[str, str] | None = None,
        plan: sharding_lib.ShardingPlan | None = None,
    ):
        """Builds the collection and its sharding plan.

        Args:
          tables: table specs.
          features: feature specs (several may share a table).
          mesh: a jax.sharding.Mesh containing ``axis``.
          axis: mesh axis that shards the batch and the tables.
          planner: planner thresholds / per-device memory budget.
          overrides: table name -> sharding type (beats TableSpec.sharding).
          plan: a ready-made plan (skips the planner).
        """
        specs_lib.validate_specs(tables, features)
        if axis not in mesh.axis_names:
            raise ValueError(f"mesh axes are {mesh.axis_names}; the embedding axis {axis!r} is not one of them")
        axis_type = mesh.axis_types[mesh.axis_names.index(axis)]
        if axis_type != jax.sharding.AxisType.Auto:
            raise ValueError(
                f"mesh axis {axis!r} has axis type {axis_type}, but the embedding collection needs "
                f"AxisType.Auto (jax.make_mesh defaults to Explicit); build the mesh with "
                f"jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto, ...))"
            )
        self.mesh = mesh
        self.axis = axis
        self.num_shards = int(mesh.shape[axis])
        self.tables = {t.name: t for t in tables}
        self.features = {f.name: f for f in features}
        if plan is None:
            plan = sharding_lib.plan_shardings(
                tables, num_shards=self.num_shards, axis=axis, config=planner, overrides=overrides
            )
        else:
            _check_plan(plan, self.tables, axis=axis, num_shards=self.num_shards)
        self.plan = plan
        # Jitted so that eager calls compile once; inside a caller's jit they are inlined.
        self._lookup_jit = jax.jit(self._lookup, static_argnames=("pooled",))
        self._apply_jit = jax.jit(self._apply_gradients, static_argnames=("frozen_tables",))

    # ------------------------------------------------------------------ state

    def _sharding(self, spec: P) -> NamedSharding:
        return NamedSharding(self.mesh, spec)

    def state_shapes(self) -> EmbeddingState:
        """ShapeDtypeStructs (with shardings) of the state: an Orbax restore target.

        Returns:
          EmbeddingState of jax.ShapeDtypeStruct leaves.
        """
        tables, slots = {}, {}
        for key, st in self.plan.storages.items():
            tables[key] = jax.ShapeDtypeStruct(
                (st.rows, st.dim), jnp.dtype(st.dtype), sharding=self._sharding(self.plan.table_pspec(key))
            )
            slots[key] = {}
            for name, (kind, _, dtype) in opt_lib.slot_layout(st.optimizer).items():
                if kind == "row":
                    shape, spec = (st.rows,), self.plan.row_slot_pspec(key)
                else:
                    shape, spec = (st.rows, st.dim), self.plan.table_pspec(key)
                slots[key][name] = jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=self._sharding(spec))
        return EmbeddingState(tables=tables, slots=slots)

    def state_shardings(self) -> EmbeddingState:
        """NamedShardings of the state (same tree as ``state_shapes``)."""
        return jax.tree.map(lambda s: s.sharding, self.state_shapes())

    def init(
        self, key: jax.Array, *, initial_values: Mapping[str, np.ndarray | jax.Array] | None = None
    ) -> EmbeddingState:
        """Creates tables and optimizer state directly in their shardings.

        Args:
          key: PRNG key; table ``t`` uses ``fold_in(key, crc32(t))`` and a
            counter-based hash per (row, column), so its values do not depend on
            the mesh, the padding or the other tables, and no table-sized
            temporary is created.
          initial_values: optional table name -> [R, D] values (e.g. pretrained
            facets) used instead of the initializer.

        Returns:
          EmbeddingState; padding rows/columns are zero.
        """
        initial_values = dict(initial_values or {})
        for name, v in initial_values.items():
            if name not in self.tables:
                raise ValueError(f"initial_values names unknown table {name!r}; tables are {sorted(self.tables)}")
            t = self.tables[name]
            if tuple(np.shape(v)) != (t.rows, t.dim):
                raise ValueError(
                    f"initial_values[{name!r}] has shape {tuple(np.shape(v))}, table wants {(t.rows, t.dim)}"
                )
        shapes = self.state_shapes()

        def build(key, given):
            tables = {}
            for skey, st in self.plan.storages.items():
                out = None
                for tname in st.tables:
                    t = self.tables[tname]
                    base = self.plan.placements[tname].row_base
                    shape = (t.rows, t.dim) if st.sharding == ShardingType.TABLE_WISE else (st.rows, st.dim)
                    if tname in given:
                        v = given[tname].astype(jnp.dtype(t.dtype))
                        v = jnp.pad(v, ((0, shape[0] - t.rows), (0, shape[1] - t.dim)))
                    else:
                        v = _init_values(t, _table_key(key, tname), shape)
                    if st.sharding == ShardingType.TABLE_WISE:
                        if out is None:
                            out = jnp.zeros((st.rows, st.dim), jnp.dtype(st.dtype))
                        out = jax.lax.dynamic_update_slice(out, v, (base, 0))
                    else:
                        out = v
                tables[skey] = out
            slots = {}
            for skey, st in self.plan.storages.items():
                slots[skey] = {}
                for name, (_, value, dtype) in opt_lib.slot_layout(st.optimizer).items():
                    shp = shapes.slots[skey][name]
                    slots[skey][name] = jnp.full(shp.shape, value, jnp.dtype(dtype))
            return EmbeddingState(tables=tables, slots=slots)

        out_shardings = jax.tree.map(lambda s: s.sharding, shapes)
        return jax.jit(build, out_shardings=out_shardings)(key, initial_values)

    # ------------------------------------------------------------------ ids

    def check_ids(self, ids: Mapping[str, np.ndarray]) -> None:
        """Host-side id validation (see ``lookup.check_ids``); raises ValueError."""
        lookup_lib.check_ids(ids, features=self.features, tables=self.tables)

    def storage_ids(self, feature: str, ids: jax.Array) -> jax.Array:
        """Raw ids of a feature -> rows of its storage array (-1 = padding/invalid).

        Args:
          feature: feature name.
          ids: int ids [B] or [B, L].

        Returns:
          int32 storage rows, same shape.

        Raises:
          ValueError: host (NumPy) ids that do not fit in int32 (see ``lookup.check_int32_ids``).
        """
        f = self._feature(feature)
        t = self.tables[f.table]
        lookup_lib.check_int32_ids(feature, ids, rows=t.rows)
        rows = lookup_lib.map_ids(jnp.asarray(ids), feature=f, rows=t.rows)
        base = self.plan.placements[t.name].row_base
        if base:
            rows = jnp.where(rows >= 0, rows + base, -1)
        return rows

    def _check_host_ids(self, ids: Mapping[str, jax.Array]) -> None:
        # Eager entry points: NumPy ids outside int32 would be truncated on the way to the device.
        for name, a in ids.items():
            if name in self.features:
                lookup_lib.check_int32_ids(name, a, rows=self.tables[self.features[name].table].rows)

    def _check_weights(self, ids: Mapping[str, jax.Array], weights: Mapping[str, jax.Array]) -> None:
        extra = sorted(set(weights) - set(ids))
        if extra:
            raise ValueError(
                f"weights given for feature(s) {extra} that have no ids in this call; "
                f"ids are for {sorted(ids)}"
            )
        for name, w in weights.items():
            a = ids[name]
            if self._feature(name).pooling == "none":
                raise ValueError(
                    f"weights given for feature {name!r}, which has pooling='none': pooling "
                    f"weights only apply to pooling='sum'/'mean' features"
                )
            if tuple(np.shape(w)) != tuple(np.shape(a)):
                raise ValueError(
                    f"feature {name!r}: weights have shape {tuple(np.shape(w))} but its ids have "
                    f"shape {tuple(np.shape(a))}; pooling weights are one per id ([B, L])"
                )

    def _feature(self, name: str) -> specs_lib.FeatureSpec:
        if name not in self.features:
            raise ValueError(f"unknown feature {name!r}; features are {sorted(self.features)}")
        return self.features[name]

    def _check_storage(
        self,
        tables: Mapping[str, jax.Array],
        keys: Iterable[str],
        slots: Mapping[str, Mapping[str, jax.Array]] | None = None,
    ) -> None:
        for k in keys:
            st = self.plan.storages[k]
            if k not in tables:
                raise ValueError(f"embedding state has no storage {k!r} (tables {list(st.tables)}); "
                                 f"it has {sorted(tables)}")
            if tuple(tables[k].shape) != (st.rows, st.dim):
                raise ValueError(
                    f"storage {k!r} (tables {list(st.tables)}) has shape {tuple(tables[k].shape)} but "
                    f"this collection's {st.sharding.value} plan over {st.num_shards} device(s) "
                    f"expects {(st.rows, st.dim)}: was the state made for another mesh or plan?"
                )
            layout = opt_lib.slot_layout(st.optimizer)
            want = sorted(layout)
            if slots is None:
                continue
            if sorted(slots.get(k, {})) != want:
                raise ValueError(
                    f"storage {k!r} (tables {list(st.tables)}) has optimizer slots "
                    f"{sorted(slots.get(k, {}))} but this collection's {st.optimizer} needs "
                    f"{want}: was the state made with another optimizer?"
                )
            # An update writes rows and slots back in the dtype it is given: a bfloat16
            # slot in a float32 collection silently lost small updates (acc += 1e-4 at 1.0).
            given = [("values", tables[k].dtype, jnp.dtype(st.dtype))] + [
                (f"optimizer slot {name!r}", slots[k][name].dtype, jnp.dtype(dt))
                for name, (_, _, dt) in layout.items()
            ]
            for what, have, dtype in given:
                if have != dtype:
                    raise ValueError(
                        f"storage {k!r} (tables {list(st.tables)}): the dtype of its {what} is "
                        f"{have} but this collection uses {dtype} (see state_shapes()); the "
                        f"update would keep {have} (losing precision or drifting from the spec): "
                        "cast the state or build the collection with the state's dtypes"
                    )

    def _check_batch(self, ids: Mapping[str, jax.Array]) -> None:
        for name, a in ids.items():
            f = self._feature(name)
            dtype = getattr(a, "dtype", None)
            if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
                # map_ids would truncate float ids (2.7 -> row 2) and read bools as rows 0/1
                raise ValueError(
                    f"feature {name!r}: ids must be an integer array, got "
                    f"{type(a).__name__ if dtype is None else f'dtype {dtype}'}"
                )
            if a.ndim not in (1, 2):
                raise ValueError(f"feature {name!r}: ids must be [B] or [B, L], got shape {a.shape}")
            if a.ndim == 2 and a.shape[1] != f.max_ids:
                raise ValueError(f"feature {name!r}: ids have L={a.shape[1]} but max_ids={f.max_ids}")
            if a.ndim == 1 and f.pooling != "none":
                raise ValueError(f"feature {name!r}: pooling={f.pooling!r} needs ids [B, L], got {a.shape}")
            if a.shape[0] % self.num_shards:
                raise ValueError(
                    f"feature {name!r}: batch size {a.shape[0]} is not a multiple of the "
                    f"{self.num_shards} devices on mesh axis {self.axis!r}"
                )

    # ------------------------------------------------------------------ lookup

    def _lookup(self, tables, ids, weights, *, pooled: bool):
        ids = dict(ids)
        self._check_batch(ids)
        weights = dict(weights or {})
        self._check_weights(ids, weights)
        sids = {name: self.storage_ids(name, a) for name, a in ids.items()}
        used = sorted({self.plan.placements[self.features[n].table].storage for n in ids})
        self._check_storage(tables, used)
        tabs = {k: tables[k] for k in used}
        bspec = P(self.axis)
        # An empty batch looks up nothing (and the collectives refuse zero-size operands).
        empty = {}
        for name in [n for n, s in sids.items() if s.shape[0] == 0]:
            t = self.tables[self.features[name].table]
            s = sids.pop(name)
            weights.pop(name, None)
            lead = s.shape[:1] if pooled and self.features[name].pooling != "none" else s.shape
            empty[name] = jnp.zeros(lead + (t.dim,), jnp.dtype(t.dtype))
        if not sids:
            return empty

        def body(tabs, sids, weights):
            out = {}
            for name, s in sids.items():
                f = self.features[name]
                layout = self.plan.storages[self.plan.placements[f.table].storage]
                pooling = f.pooling if pooled and s.ndim == 2 else "none"
                out[name] = lookup_lib.sharded_lookup(
                    tabs[layout.key], s, layout=layout, axis=self.axis, pooling=pooling,
                    weights_local=weights.get(name),
                )
            return out

        fn = shard_map(
            body,
            mesh=self.mesh,
            in_specs=({k: self.plan.table_pspec(k) for k in used}, {n: bspec for n in sids},
                      {n: bspec for n in weights}),
            out_specs={n: bspec for n in sids},
            check_vma=False,
        )
        return {**fn(tabs, sids, weights), **empty}

    def gather(
        self, tables: Mapping[str, jax.Array], ids: Mapping[str, jax.Array]
    ) -> dict[str, jax.Array]:
        """Unpooled rows of every feature in ``ids`` (sharded by batch).

        Args:
          tables: ``EmbeddingState.tables``.
          ids: feature -> int ids [B] or [B, L] (-1 padding).

        Returns:
          feature -> [B, D] (ids [B]) or [B, L, D] (ids [B, L]); zero rows for invalid ids.
        """
        self._check_host_ids(ids)
        return self._lookup_jit(dict(tables), dict(ids), None, pooled=False)

    def lookup(
        self,
        tables: Mapping[str, jax.Array],
        ids: Mapping[str, jax.Array],
        weights: Mapping[str, jax.Array] | None = None,
    ) -> dict[str, jax.Array]:
        """Rows pooled per FeatureSpec (pooling before the cross-device reduction).

        Args:
          tables: ``EmbeddingState.tables``.
          ids: feature -> int ids [B] or [B, L] (-1 padding).
          weights: optional feature -> float [B, L] per-id weights for pooling
            (same shape as the feature's ids; every key must be a feature of ``ids``).

        Returns:
          feature -> [B, D] for pooled features and single ids, [B, L, D] for
          ``pooling="none"`` multi-hot features.

        Raises:
          ValueError: bad ids (shape, batch size, NumPy ids outside int32) or
            weights for a feature not in ``ids`` or of another shape than its ids.
        """
        self._check_host_ids(ids)
        return self._lookup_jit(dict(tables), dict(ids), dict(weights or {}), pooled=True)

    def pool(
        self,
        rows: Mapping[str, jax.Array],
        ids: Mapping[str, jax.Array],
        weights: Mapping[str, jax.Array] | None = None,
    ) -> dict[str, jax.Array]:
        """Pools unpooled ``gather`` output per FeatureSpec (differentiable, no communication).

        Args:
          rows: feature -> [B, D] or [B, L, D] from ``gather``.
          ids: the same ids.
          weights: optional per-id weights.

        Returns:
          Same structure as ``lookup``.
        """
        weights = dict(weights or {})
        self._check_weights(ids, weights)
        out = {}
        for name, r in rows.items():
            f = self._feature(name)
            a = ids[name]
            if f.pooling == "none" or a.ndim == 1:
                out[name] = r
                continue
            valid = self.storage_ids(name, a) >= 0
            out[name] = lookup_lib.pool(r, valid, pooling=f.pooling, weights=weights.get(name))
        return out

    # ------------------------------------------------------------------ update

    def apply_gradients(
        self,
        state: EmbeddingState,
        ids: Mapping[str, jax.Array],
        grads: Mapping[str, jax.Array],
        *,
        weights: Mapping[str, jax.Array] | None = None,
        frozen_tables: Iterable[str] = (),
        lr_scale: jax.Array | float = 1.0,
    ) -> EmbeddingState:
        """Sparse optimizer step on the rows the batch touched.

        Args:
          state: the current EmbeddingState (donate it to the enclosing jit).
          ids: feature -> int ids, as given to ``lookup``/``gather``.
          grads: feature -> gradient w.r.t. that feature's ``gather`` output
            ([B, D] / [B, L, D]) or, for pooled features, w.r.t. its ``lookup``
            output [B, D] (spread back to the ids by the pooling weights). A
            ``pooling="none"`` multi-hot feature needs [B, L, D].
          weights: the pooling weights used in ``lookup`` (if any; keys must be
            features of ``ids``, each the shape of its ids).
          frozen_tables: tables that must not change (values and slots stay
            bit-identical; their gradients are ignored).
          lr_scale: multiplies every table's learning rate (schedules).

        Returns:
          The new EmbeddingState (untouched rows and storages unchanged).

        Raises:
          ValueError: bad ids, gradients of the wrong shape, bad weights, or a state
            whose values or optimizer slots do not have this collection's dtypes
            (``state_shapes()``: the update would keep them, e.g. a bfloat16 slot in a
            float32 collection would lose small updates).
        """
        self._check_host_ids(ids)
        return self._apply_jit(state, dict(ids), dict(grads), dict(weights or {}),
                               jnp.asarray(lr_scale, jnp.float32),
                               frozen_tables=tuple(sorted(set(frozen_tables))))

    def _apply_gradients(self, state, ids, grads, weights, lr_scale, *, frozen_tables):
        frozen = set(frozen_tables)
        unknown = sorted(frozen - set(self.tables))
        if unknown:
            raise ValueError(f"frozen_tables names unknown tables {unknown}; tables are {sorted(self.tables)}")
        weights = dict(weights or {})
        self._check_weights(ids, weights)
        feats = []
        for name, g in grads.items():
            f = self._feature(name)
            if name not in ids:
                raise ValueError(f"gradient for feature {name!r} but no ids for it")
            if f.table in frozen:
                continue
            a = ids[name]
            d = self.tables[f.table].dim
            if g.shape not in (a.shape + (d,), (a.shape[0], d)):
                raise ValueError(
                    f"feature {name!r}: gradient shape {g.shape} does not match ids {a.shape} and dim {d}"
                )
            if g.shape != a.shape + (d,) and f.pooling == "none":
                raise ValueError(
                    f"feature {name!r} has pooling='none': its lookup gives {a.shape + (d,)}, so the "
                    f"gradient must have that shape, got {g.shape} (a pooled [B, D] gradient only "
                    f"applies to pooling='sum'/'mean')"
                )
            feats.append(name)
        if not feats:
            return state
        self._check_batch({n: ids[n] for n in feats})
        sids = {n: self.storage_ids(n, ids[n]) for n in feats}
        gr = {n: grads[n] for n in feats}
        wts = {n: weights[n] for n in feats if n in weights}
        used = sorted({self.plan.placements[self.features[n].table].storage for n in feats})
        self._check_storage(state.tables, used, state.slots)
        axis = self.axis

        def body(tabs, slots, sids, gr, wts, lr_scale):
            by_storage: dict[str, tuple[list, list]] = {k: ([], []) for k in used}
            for name in feats:
                f = self.features[name]
                key = self.plan.placements[f.table].storage
                s, g = sids[name], gr[name]
                if s.ndim == 2 and g.ndim == 2:  # pooled gradient -> per-id gradient
                    pw = lookup_lib.pool_weights(s >= 0, pooling=f.pooling, weights=wts.get(name))
                    g = pw[..., None] * g[:, None, :].astype(jnp.float32)
                by_storage[key][0].append(s.reshape(-1))
                by_storage[key][1].append(g.reshape(-1, g.shape[-1]))
            new_tabs, new_slots = {}, {}
            for key in used:
                st = self.plan.storages[key]
                ids_n = jnp.concatenate(by_storage[key][0])
                g_nd = jnp.concatenate([x.astype(jnp.float32) for x in by_storage[key][1]])
                row_sum = lambda x: x  # noqa: E731
                if st.sharding == ShardingType.COLUMN_WISE:
                    ids_n = jax.lax.all_gather(ids_n, axis, axis=0, tiled=True)
                    g_nd = jnp.pad(g_nd, ((0, 0), (0, st.dim - g_nd.shape[1])))
                    g_nd = jax.lax.all_to_all(g_nd, axis, 1, 0, tiled=True)
                    row_sum = functools.partial(jax.lax.psum, axis_name=axis)
                else:
                    ids_n = jax.lax.all_gather(ids_n, axis, axis=0, tiled=True)
                    g_nd = jax.lax.all_gather(g_nd, axis, axis=0, tiled=True)
                if st.row_sharded:
                    lo = jax.lax.axis_index(axis) * st.local_rows
                    ids_n = jnp.where(ids_n >= 0, ids_n - lo, -1)
                new_tabs[key], new_slots[key] = opt_lib.sparse_update(
                    tabs[key], slots[key], ids_n, g_nd, optimizer=st.optimizer,
                    true_dim=st.true_dim, row_sum=row_sum, lr_scale=lr_scale,
                )
            return new_tabs, new_slots

        tspec = {k: self.plan.table_pspec(k) for k in used}
        sspec = {}
        for k in used:
            st = self.plan.storages[k]
            sspec[k] = {
                name: (self.plan.row_slot_pspec(k) if kind == "row" else self.plan.table_pspec(k))
                for name, (kind, _, _) in opt_lib.slot_layout(st.optimizer).items()
            }
        bspec = P(axis)
        fn = shard_map(
            body,
            mesh=self.mesh,
            in_specs=(tspec, sspec, {n: bspec for n in feats}, {n: bspec for n in feats},
                      {n: bspec for n in wts}, P()),
            out_specs=(tspec, sspec),
            check_vma=False,
        )
        new_tabs, new_slots = fn(
            {k: state.tables[k] for k in used}, {k: state.slots[k] for k in used}, sids, gr, wts,
            lr_scale,
        )
        tables = dict(state.tables)
        slots = dict(state.slots)
        tables.update(new_tabs)
        slots.update(new_slots)
        return EmbeddingState(tables=tables, slots=slots)

    # ------------------------------------------------------------------ reading tables

    def table_value(self, tables: Mapping[str, jax.Array], name: str) -> jax.Array:
        """The unpadded [R, D] values of one table (works inside and outside jit).

        Args:
          tables: ``EmbeddingState.tables``.
          name: table name.

        Returns:
          [R, D] array.
        """
        if name not in self.tables:
            raise ValueError(f"unknown table {name!r}; tables are {sorted(self.tables)}")
        t = self.tables[name]
        pl = self.plan.placements[name]
        return tables[pl.storage][pl.row_base : pl.row_base + t.rows, : t.dim]

    def export_tables(self, state: EmbeddingState) -> dict[str, np.ndarray]:
        """Host NumPy copies of every table, unpadded (single-process or fully addressable).

        Args:
          state: an EmbeddingState.

        Returns:
          table name -> np.ndarray [R, D].
        """
        host = {k: np.asarray(jax.device_get(v)) for k, v in state.tables.items()}
        out = {}
        for name, t in self.tables.items():
            pl = self.plan.placements[name]
            out[name] = np.ascontiguousarray(host[pl.storage][pl.row_base : pl.row_base + t.rows, : t.dim])
        return out

    def describe(self) -> str:
        """The sharding plan as text."""
        return self.plan.describe()
