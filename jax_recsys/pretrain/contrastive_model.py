"""Dense part of the user–pin two-tower model (flax nnx).

The ID lookups live in the embedding engine (sharded tables, sparse row updates);
this module gets the gathered rows and applies, per tower, the optional light side
features (small categorical vocabularies, e.g. a pin's topic, summed onto the ID
row), the optional projection (one Linear, trained with optax at the dense learning
rate) and the L2 normalisation. Models return embeddings, never losses.

Legend: B batch, D embedding (table) dim, D' output dim.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True, kw_only=True)
class TowerConfig:
    """One tower's dense part.

    Attributes:
      project: apply a Linear(D, out_dim) after the ID row (plus side features).
      out_dim: output dim D' of the projection (None: same as D). Ignored when
        `project` is False.
      side_vocab_sizes: side feature name -> number of values; each gets a small
        dense nnx.Embed of width D summed onto the ID row. Values must be in
        [0, size); -1 means missing (contributes zero).
    """

    project: bool = True
    out_dim: int | None = None
    side_vocab_sizes: Mapping[str, int] = dataclasses.field(default_factory=dict)


def l2_normalize(x_bd: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Rows scaled to unit L2 norm (zero rows stay zero).

    Args:
      x_bd: [..., D] rows.
      eps: added under the square root.

    Returns:
      [..., D] normalised rows.
    """
    return x_bd * jax.lax.rsqrt(jnp.sum(x_bd * x_bd, axis=-1, keepdims=True) + eps)


class Tower(nnx.Module):
    """ID row (+ side features) -> optional projection -> L2 normalisation."""

    def __init__(self, *, dim: int, config: TowerConfig, rngs: nnx.Rngs):
        self.side = nnx.Dict({
            name: nnx.Embed(size, dim, embedding_init=nnx.initializers.normal(0.01), rngs=rngs)
            for name, size in sorted(config.side_vocab_sizes.items())
        })
        self.proj = (
            nnx.Linear(dim, config.out_dim or dim, use_bias=False, rngs=rngs)
            if config.project else None
        )

    def __call__(
        self, rows_bd: jax.Array, side_ids: Mapping[str, jax.Array] | None = None
    ) -> jax.Array:
        """Embeds a batch.

        Args:
          rows_bd: [B, D] gathered ID rows.
          side_ids: side feature name -> [B] int ids (-1 = missing); required for
            every configured side feature.

        Returns:
          [B, D'] unit-norm embeddings.
        """
        x_bd = rows_bd.astype(jnp.float32)
        for name, embed in self.side.items():
            if side_ids is None or name not in side_ids:
                raise ValueError(f"tower expects side feature {name!r}; got {sorted(side_ids or {})}")
            ids_b = side_ids[name]
            x_bd = x_bd + jnp.where((ids_b >= 0)[:, None], embed(jnp.maximum(ids_b, 0)), 0.0)
        if self.proj is not None:
            x_bd = self.proj(x_bd)
        return l2_normalize(x_bd)


class TwoTower(nnx.Module):
    """User tower and pin tower over rows gathered from the `user` and `pin` tables."""

    def __init__(
        self, *, dim: int, user: TowerConfig, pin: TowerConfig, rngs: nnx.Rngs
    ):
        self.user = Tower(dim=dim, config=user, rngs=rngs)
        self.pin = Tower(dim=dim, config=pin, rngs=rngs)

    def __call__(
        self,
        *,
        user_rows_bd: jax.Array,
        pin_rows_bd: jax.Array,
        user_side: Mapping[str, jax.Array] | None = None,
        pin_side: Mapping[str, jax.Array] | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """Embeds users and pins.

        Args:
          user_rows_bd: [B, D] user table rows.
          pin_rows_bd: [B', D] pin table rows (B' may differ from B).
          user_side, pin_side: side feature ids per tower ([B] / [B']).

        Returns:
          ([B, D'] users, [B', D'] pins), unit norm.
        """
        return self.user(user_rows_bd, user_side), self.pin(pin_rows_bd, pin_side)
