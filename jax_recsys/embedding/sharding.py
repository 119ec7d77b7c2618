"""All table-sharding logic: sharding types, the planner, storage layouts, PartitionSpecs.

A table is stored in a *storage* array that lives on a 1-D mesh axis (default
``"data"``; other mesh axes replicate it). The batch is sharded over the same
axis (data parallel + model parallel tables on the same devices, TorchRec style).

Sharding types and their storage (S = size of the axis):

* ``row_wise``: [R_pad, D] with PartitionSpec(axis, None); R_pad = R rounded up
  to a multiple of S, device s holds rows [s*R_pad/S, (s+1)*R_pad/S). The pad
  rows are zero and never receive ids. Default for big tables.
* ``column_wise``: [R, D_pad] with PartitionSpec(None, axis); D_pad = D rounded
  up to a multiple of S, device s holds columns [s*D_pad/S, (s+1)*D_pad/S) of
  every row. Pad columns are zero and sliced off on lookup.
* ``replicated``: [R, D] with PartitionSpec(); every device has the whole table
  (small tables: no communication for lookups).
* ``table_wise``: the whole table on one owner device. SPMD needs equal shard
  shapes, so table-wise tables with the same dim, dtype and optimizer are
  *packed* into one row-sharded group storage ``[S * R_blk, D]``: the planner
  gives each table an owner device (largest first, least loaded device) and an
  offset inside the owner's block of R_blk rows (R_blk = the fullest device's
  rows). Row i of table t is storage row ``owner_t * R_blk + offset_t + i``;
  all of t's rows (and optimizer state) live on its owner. With one table-wise
  table per device this is TorchRec's table-wise sharding; a lone table-wise
  table costs R rows on every device (its block size), which the plan log shows.

Optimizer slots are either per row ([R_pad], sharded like the table's rows, or
replicated for column-wise/replicated) or per element (like the table).

Dimension legend: R rows, D embedding dim, S shards (devices on the axis).
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from collections.abc import Mapping, Sequence

import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jax_recsys.embedding import specs as specs_lib


class ShardingType(enum.StrEnum):
    """How one table is spread over the devices of the mesh axis."""

    ROW_WISE = "row_wise"
    TABLE_WISE = "table_wise"
    COLUMN_WISE = "column_wise"
    REPLICATED = "replicated"


@dataclasses.dataclass(frozen=True, kw_only=True)
class PlannerConfig:
    """Knobs of the sharding planner.

    Attributes:
      memory_budget_bytes: per-device bytes for tables + optimizer state (an int
        > 0); None means unlimited. A plan that does not fit raises a ValueError.
      replicate_max_bytes: tables (values + slots) at most this big are replicated
        (an int >= 0; 0 replicates none).
      table_wise_max_bytes: tables above ``replicate_max_bytes`` and at most this
        big are table-wise; bigger ones are row-wise (an int >= 0). 0 disables
        table-wise.
    """

    memory_budget_bytes: int | None = None
    replicate_max_bytes: int = 1 << 20
    table_wise_max_bytes: int = 0

    def __post_init__(self):
        for field, low in (("memory_budget_bytes", 1), ("replicate_max_bytes", 0),
                           ("table_wise_max_bytes", 0)):
            value = getattr(self, field)
            if value is None and field == "memory_budget_bytes":
                continue
            if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < low:
                raise ValueError(
                    f"PlannerConfig.{field} must be an int >= {low} (bytes)"
                    f"{' or None' if field == 'memory_budget_bytes' else ''}, got {value!r}"
                )
            object.__setattr__(self, field, int(value))  # NumPy ints -> int (frozen)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TablePlacement:
    """Where one table lives.

    Attributes:
      table: table name.
      sharding: its ShardingType.
      storage: key of the storage array holding it (== table name except for
        table-wise tables, which share a packed group storage).
      row_base: storage row of the table's row 0 (0 except for table-wise).
      owner: owning device index on the axis (table-wise only).
    """

    table: str
    sharding: ShardingType
    storage: str
    row_base: int = 0
    owner: int | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class StorageLayout:
    """Shape and sharding of one storage array (one table, or a table-wise group).

    Attributes:
      key: key in ``EmbeddingState.tables`` / ``.slots``.
      sharding: ShardingType of the storage.
      rows: global rows (padded), dim: global columns (padded).
      true_dim: D of the tables stored here (before column padding).
      dtype: storage dtype name.
      optimizer: the sparse optimizer spec shared by all tables in the storage.
      tables: names of the tables stored here.
      num_shards: S.
    """

    key: str
    sharding: ShardingType
    rows: int
    dim: int
    true_dim: int
    dtype: str
    optimizer: specs_lib.OptimizerSpec
    tables: tuple[str, ...]
    num_shards: int

    @property
    def row_sharded(self) -> bool:
        return self.sharding in (ShardingType.ROW_WISE, ShardingType.TABLE_WISE)

    @property
    def local_rows(self) -> int:
        return self.rows // self.num_shards if self.row_sharded else self.rows

    @property
    def local_dim(self) -> int:
        if self.sharding == ShardingType.COLUMN_WISE:
            return self.dim // self.num_shards
        return self.dim


@dataclasses.dataclass(frozen=True, kw_only=True)
class ShardingPlan:
    """The sharding of every table: placements per table, layouts per storage."""

    placements: Mapping[str, TablePlacement]
    storages: Mapping[str, StorageLayout]
    num_shards: int
    axis: str

    def table_pspec(self, storage: str) -> P:
        """PartitionSpec of a storage's value array [rows, dim]."""
        return _value_pspec(self.storages[storage].sharding, self.axis)

    def row_slot_pspec(self, storage: str) -> P:
        """PartitionSpec of a per-row slot [rows]."""
        if self.storages[storage].row_sharded:
            return P(self.axis)
        return P()

    def describe(self) -> str:
        """A human-readable table of the plan (one line per table)."""
        lines = [f"embedding plan over {self.num_shards} device(s) on axis {self.axis!r}:"]
        for name in sorted(self.placements):
            pl = self.placements[name]
            st = self.storages[pl.storage]
            per_dev = storage_bytes_per_device(st)
            where = f" owner=dev{pl.owner} storage={pl.storage}" if pl.owner is not None else ""
            lines.append(
                f"  {name}: {pl.sharding.value}{where} storage=[{st.rows},{st.dim}] {st.dtype} "
                f"{type(st.optimizer).__name__} ~{per_dev / 2**20:.2f} MiB/device (storage)"
            )
        return "\n".join(lines)


def _value_pspec(sharding: ShardingType, axis: str) -> P:
    if sharding in (ShardingType.ROW_WISE, ShardingType.TABLE_WISE):
        return P(axis, None)
    if sharding == ShardingType.COLUMN_WISE:
        return P(None, axis)
    return P()


def round_up(x: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= x."""
    return -(-int(x) // int(multiple)) * int(multiple)


def slot_bytes_per_row(optimizer: specs_lib.OptimizerSpec, dim: int) -> int:
    """float32 optimizer-state bytes per table row."""
    b = 4 if optimizer.frequency_adaptive else 0
    if isinstance(optimizer, specs_lib.RowAdagrad):
        b += 4
    elif isinstance(optimizer, specs_lib.LazyAdam):
        b += 2 * 4 * dim + 4
    return b


def table_bytes_with_slots(table: specs_lib.TableSpec) -> int:
    """Bytes of a table's values plus its optimizer state (unsharded, unpadded)."""
    return table.bytes + table.rows * slot_bytes_per_row(table.optimizer, table.dim)


def storage_bytes_per_device(st: StorageLayout) -> int:
    """Bytes of a storage (values + slots) held by each device."""
    item = jnp.dtype(st.dtype).itemsize
    values = st.local_rows * st.local_dim * item
    per_row = 4 if st.optimizer.frequency_adaptive else 0
    if isinstance(st.optimizer, specs_lib.RowAdagrad):
        per_row += 4
    matrix = 0
    if isinstance(st.optimizer, specs_lib.LazyAdam):
        per_row += 4
        matrix = 2 * st.local_rows * st.local_dim * 4
    return values + st.local_rows * per_row + matrix


def plan_shardings(
    tables: Sequence[specs_lib.TableSpec],
    *,
    num_shards: int,
    axis: str = "data",
    config: PlannerConfig = PlannerConfig(),
    overrides: Mapping[str, str | ShardingType] | None = None,
) -> ShardingPlan:
    """Chooses a sharding per table and lays out the storage arrays.

    Precedence per table: ``overrides[name]``, then ``TableSpec.sharding``,
    then the size rule of ``config`` (replicated if small, table-wise if medium
    and enabled, else row-wise). The plan is logged at INFO level.

    Args:
      tables: table specs.
      num_shards: S, the size of the mesh axis.
      axis: mesh axis name the tables are sharded over.
      config: planner thresholds and per-device memory budget.
      overrides: table name -> sharding type, beating everything else.

    Returns:
      The ShardingPlan.

    Raises:
      ValueError: unknown table in overrides, unknown sharding name, or a plan
        that does not fit ``config.memory_budget_bytes``.
    """
    overrides = dict(overrides or {})
    names = {t.name for t in tables}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"sharding overrides name unknown tables {unknown}; tables are {sorted(names)}")
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")

    choice: dict[str, ShardingType] = {}
    for t in sorted(tables, key=lambda t: t.name):
        requested = overrides.get(t.name, t.sharding)
        if requested is not None:
            try:
                choice[t.name] = ShardingType(requested)
            except ValueError:
                raise ValueError(
                    f"table {t.name!r}: unknown sharding {requested!r}; "
                    f"use one of {[s.value for s in ShardingType]}"
                ) from None
            continue
        size = table_bytes_with_slots(t)
        if size <= config.replicate_max_bytes:
            choice[t.name] = ShardingType.REPLICATED
        elif size <= config.table_wise_max_bytes:
            choice[t.name] = ShardingType.TABLE_WISE
        else:
            choice[t.name] = ShardingType.ROW_WISE

    by_name = {t.name: t for t in tables}
    placements: dict[str, TablePlacement] = {}
    storages: dict[str, StorageLayout] = {}
    load = [0] * num_shards  # bytes per device, for table-wise owner choice
    for name, st in choice.items():
        t = by_name[name]
        if st == ShardingType.TABLE_WISE:
            continue
        rows, dim = t.rows, t.dim
        if st == ShardingType.ROW_WISE:
            rows = round_up(rows, num_shards)
        elif st == ShardingType.COLUMN_WISE:
            dim = round_up(dim, num_shards)
        layout = StorageLayout(
            key=name, sharding=st, rows=rows, dim=dim, true_dim=t.dim, dtype=t.dtype,
            optimizer=t.optimizer, tables=(name,), num_shards=num_shards,
        )
        storages[name] = layout
        placements[name] = TablePlacement(table=name, sharding=st, storage=name)
        per_dev = storage_bytes_per_device(layout)
        load = [x + per_dev for x in load]

    # Table-wise: group by (dim, dtype, optimizer); in each group, tables largest first
    # to the device with the fewest rows of that group (greedy bin packing).
    groups: dict[tuple, list[specs_lib.TableSpec]] = {}
    for name, st in choice.items():
        if st == ShardingType.TABLE_WISE:
            t = by_name[name]
            groups.setdefault((t.dim, t.dtype, t.optimizer), []).append(t)
    for gi, (key, members) in enumerate(sorted(groups.items(), key=lambda kv: kv[1][0].name)):
        dim, dtype, optimizer = key
        members = sorted(members, key=lambda t: (-t.rows, t.name))
        rows_on = [0] * num_shards
        owner_of: dict[str, tuple[int, int]] = {}
        for t in members:
            # A group costs max(rows_on) x dim on every device: balance its own rows
            # (other groups' bytes, equal on all devices, only break ties).
            owner = min(range(num_shards), key=lambda s: (rows_on[s], load[s], s))
            owner_of[t.name] = (owner, rows_on[owner])
            rows_on[owner] += t.rows
            load[owner] += table_bytes_with_slots(t)
        blk = max(max(rows_on), 1)
        skey = f"table_wise_{gi}"
        while skey in names or skey in storages:  # a table may be named table_wise_0
            skey = "_" + skey
        storages[skey] = StorageLayout(
            key=skey, sharding=ShardingType.TABLE_WISE, rows=blk * num_shards, dim=dim,
            true_dim=dim, dtype=dtype, optimizer=optimizer,
            tables=tuple(sorted(t.name for t in members)), num_shards=num_shards,
        )
        for t in members:
            owner, offset = owner_of[t.name]
            placements[t.name] = TablePlacement(
                table=t.name, sharding=ShardingType.TABLE_WISE, storage=skey,
                row_base=owner * blk + offset, owner=owner,
            )

    plan = ShardingPlan(placements=placements, storages=storages, num_shards=num_shards, axis=axis)
    budget = config.memory_budget_bytes
    if budget is not None:
        per_device = sum(storage_bytes_per_device(s) for s in storages.values())
        if per_device > budget:
            raise ValueError(
                f"embedding tables need ~{per_device / 2**20:.1f} MiB per device (values + optimizer "
                f"state) but the budget is {budget / 2**20:.1f} MiB; use more devices, row_wise "
                f"sharding for big tables, or a smaller optimizer.\n{plan.describe()}"
            )
    logging.info("%s", plan.describe())
    return plan
