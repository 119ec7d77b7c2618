"""Sharded embedding tables with sparse row-wise optimizers.

specs (TableSpec, FeatureSpec, SGD/RowAdagrad/LazyAdam), sharding (planner and
layouts), lookup (shard_map kernels, hashing, id checks), optimizers (sparse
row updates), collection (EmbeddingCollection, EmbeddingState), train_step
(TrainState, make_train_step, make_eval_step).
"""

from jax_recsys.embedding.collection import EmbeddingCollection, EmbeddingState
from jax_recsys.embedding.sharding import PlannerConfig, ShardingType
from jax_recsys.embedding.specs import (
    SGD,
    FeatureSpec,
    LazyAdam,
    OptimizerSpec,
    RowAdagrad,
    TableSpec,
)

__all__ = [
    "SGD",
    "EmbeddingCollection",
    "EmbeddingState",
    "FeatureSpec",
    "LazyAdam",
    "OptimizerSpec",
    "PlannerConfig",
    "RowAdagrad",
    "ShardingType",
    "TableSpec",
]
