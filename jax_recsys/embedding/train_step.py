"""The one train-step shape every trainer uses: sparse tables + dense optax parameters.

``make_train_step`` returns ``step(state, batch) -> (state, metrics)``, jitted
with the state donated, which

1. looks up the batch's rows: ``rows = collection.lookup(state.emb.tables, ids)``
   (feature -> [B, D] for single ids and pooled features, [B, L, D] for
   ``pooling="none"`` multi-hot features -- i.e. ``collection.gather`` pooled
   per FeatureSpec);
2. calls ``loss_fn(*, rows, params, batch) -> (loss, aux_metrics)`` and takes
   gradients w.r.t. ``rows`` (the sparse path, never a table-shaped gradient)
   and ``params`` (the dense path);
3. updates the dense parameters with optax and the touched rows with
   ``collection.apply_gradients`` (frozen tables untouched, bit-identical).

Only features of ``batch.ids`` that the collection knows are looked up, so a
batch may carry other id columns. If the batch has a ``weights`` mapping
(feature -> [B, L]) it is used for pooling.

Dimension legend: B batch, L ids per example, D embedding dim.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jax_recsys.embedding import collection as collection_lib, lookup as lookup_lib

EmbeddingState = collection_lib.EmbeddingState


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["emb", "params", "opt_state", "step"],
    meta_fields=[],
)
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything a training step changes (a pytree; donated to the step).

    Attributes:
      emb: the EmbeddingState (tables + sparse optimizer slots).
      params: dense parameters: the ``nnx.State`` of an nnx model (from
        ``nnx.split(model, nnx.Param, ...)``) or any pytree of arrays.
      opt_state: optax state of ``params``.
      step: int32 scalar step counter.
    """

    emb: EmbeddingState
    params: Any
    opt_state: Any
    step: jax.Array


def init_train_state(
    *,
    collection: collection_lib.EmbeddingCollection,
    key: jax.Array,
    params: Any,
    dense_tx: optax.GradientTransformation,
    initial_values: Mapping[str, Any] | None = None,
) -> TrainState:
    """Builds a TrainState: sharded tables + optimizer slots, dense params + optax state.

    The dense params, their optax state and the step are committed replicated on the
    collection's mesh, where the train step returns them: left on one device (optax
    counters, the step), the second step would see new input shardings and compile
    every program again. Several processes: each passes the same ``params``.

    Args:
      collection: the EmbeddingCollection.
      key: PRNG key for the tables.
      params: dense parameters (nnx.State or pytree).
      dense_tx: optax transformation for ``params``.
      initial_values: optional table name -> [R, D] starting values.

    Returns:
      The TrainState with step 0.
    """
    emb = collection.init(key, initial_values=initial_values)
    replicated = NamedSharding(collection.mesh, P())
    params = jax.device_put(params, replicated)
    opt_state, step = jax.device_put(
        (dense_tx.init(params), jnp.zeros((), jnp.int32)), replicated
    )
    return TrainState(emb=emb, params=params, opt_state=opt_state, step=step)


def shard_batch(batch: Any, *, mesh: Mesh, axis: str = "data") -> Any:
    """Places every array of a (host) batch on the mesh, sharded along its leading (batch) dim.

    Works with several processes: each process passes its own examples.

    Args:
      batch: pytree of host arrays with a leading batch dim (e.g. a ``Batch``).
      mesh: the mesh.
      axis: the batch axis.

    Returns:
      The same pytree of global jax.Arrays.

    Raises:
      ValueError: an integer array (e.g. int64 ids) with values outside int32
        while ``jax_enable_x64`` is off -- JAX would silently truncate them;
        hash 64-bit ids on the host with ``lookup.hash_ids_np`` first.
    """
    sharding = NamedSharding(mesh, P(axis))
    x64 = jax.config.jax_enable_x64

    def put(path, x):
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        if not x64 and not isinstance(x, jax.Array):
            lookup_lib.check_int32_ids(jax.tree_util.keystr(path), x, kind="batch array")
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree_util.tree_map_with_path(put, batch)


def _rows_and_weights(collection, batch):
    ids = {k: v for k, v in batch.ids.items() if k in collection.features}
    weights = getattr(batch, "weights", None)
    weights = {k: v for k, v in (weights or {}).items() if k in ids}
    return ids, weights


def make_train_step(
    *,
    collection: collection_lib.EmbeddingCollection,
    loss_fn: Callable[..., tuple[jax.Array, dict[str, jax.Array]]],
    dense_tx: optax.GradientTransformation,
    model_graphdef: Any = None,
    frozen_tables: Iterable[str] = (),
    mesh: Mesh | None = None,
    donate: bool = True,
    emb_lr_scale_fn: Callable[[jax.Array], jax.Array] | None = None,
) -> Callable[[TrainState, Any], tuple[TrainState, dict[str, jax.Array]]]:
    """Builds the jitted training step.

    Args:
      collection: the EmbeddingCollection.
      loss_fn: ``loss_fn(*, rows, params, batch) -> (loss, aux)``; ``rows`` is
        ``collection.lookup`` output, ``params`` the dense params, or the merged
        nnx module ``nnx.merge(model_graphdef, params)`` if a graphdef is given;
        ``aux`` is a dict of scalar metrics.
      dense_tx: optax transformation for the dense params.
      model_graphdef: optional nnx GraphDef of the dense model.
      frozen_tables: tables neither updated nor with optimizer state touched.
      mesh: the mesh (defaults to ``collection.mesh``); only used to check it matches.
      donate: donate the TrainState (needed for in-place, table-size-flat updates).
      emb_lr_scale_fn: optional ``step -> scale`` multiplying the sparse learning rates.

    Returns:
      ``step(state, batch) -> (new_state, metrics)``; metrics has ``loss`` plus aux.
      Loops should block on each step's metrics.
    """
    if mesh is not None and mesh != collection.mesh:
        raise ValueError("make_train_step: mesh differs from the collection's mesh")
    frozen = tuple(sorted(set(frozen_tables)))
    unknown = sorted(set(frozen) - set(collection.tables))
    if unknown:
        raise ValueError(f"frozen_tables names unknown tables {unknown}; tables are {sorted(collection.tables)}")

    def step(state: TrainState, batch):
        ids, weights = _rows_and_weights(collection, batch)
        rows = collection.lookup(state.emb.tables, ids, weights)

        def objective(rows, params):
            p = nnx.merge(model_graphdef, params) if model_graphdef is not None else params
            loss, aux = loss_fn(rows=rows, params=p, batch=batch)
            return loss, aux

        (loss, aux), (g_rows, g_params) = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)(
            rows, state.params
        )
        updates, opt_state = dense_tx.update(g_params, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        lr_scale = emb_lr_scale_fn(state.step) if emb_lr_scale_fn is not None else 1.0
        emb = collection.apply_gradients(
            state.emb, ids, g_rows, weights=weights, frozen_tables=frozen, lr_scale=lr_scale
        )
        metrics = {"loss": loss, **aux}
        return TrainState(emb=emb, params=params, opt_state=opt_state, step=state.step + 1), metrics

    return jax.jit(step, donate_argnums=(0,) if donate else ())


def make_eval_step(
    *,
    collection: collection_lib.EmbeddingCollection,
    eval_fn: Callable[..., Any],
    model_graphdef: Any = None,
) -> Callable[[TrainState, Any], Any]:
    """Builds a jitted step without updates (evaluation / prediction).

    Args:
      collection: the EmbeddingCollection.
      eval_fn: ``eval_fn(*, rows, params, batch) -> anything`` (e.g. the
        ``loss_fn`` above, or a function returning logits).
      model_graphdef: optional nnx GraphDef (as in ``make_train_step``).

    Returns:
      ``step(state, batch) -> eval_fn's output``.
    """

    def step(state: TrainState, batch):
        ids, weights = _rows_and_weights(collection, batch)
        rows = collection.lookup(state.emb.tables, ids, weights)
        p = nnx.merge(model_graphdef, state.params) if model_graphdef is not None else state.params
        return eval_fn(rows=rows, params=p, batch=batch)

    return jax.jit(step)
