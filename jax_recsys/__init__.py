"""jax_recsys: multi-faceted large embedding tables for ads ranking in JAX/Flax."""

__version__ = "0.1.0"
