"""In-graph (JAX) gather + dequantize of row-wise quantized tables.

The jit-friendly twin of `jax_recsys.quant.rowwise.dequantize_rows`: same
layout (INT4 low nibble = even column), same arithmetic
(float32(code) * float32(scale) + float32(bias)), so with float16 scale/bias
it returns bit-identical values (the product is exact in float32, so fused or
unfused multiply-add agree).

Kept apart from `rowwise.py` because that module must stay NumPy-only for the
embedding server.

Dimension legend: R table rows, D embedding dim, P packed columns, n rows.
"""

from __future__ import annotations

import jax.numpy as jnp


def dequantize_rows_jax(codes, scale, bias, rows, *, dim: int, bits: int):
    """Gathers `rows` of a quantized table and dequantizes them.

    Args:
      codes: uint8 [R, ceil(D/2)] (bits=4), uint8 [R, D] (bits=8) or
        float32 [R, D] (bits=32, unquantized; scale and bias are ignored).
      scale: [R] per-row step (float16 or float32).
      bias: [R] per-row offset.
      rows: integer array of any shape with values in [0, R) (out-of-range
        ids are clamped by JAX's gather, not checked).
      dim: D (static).
      bits: 4, 8 or 32 (static).

    Returns:
      float32 rows.shape + (D,).
    """
    rows = jnp.asarray(rows)
    if bits == 32:
        return jnp.asarray(codes)[rows].astype(jnp.float32)
    g = jnp.asarray(codes)[rows]  # rows.shape + (P,)
    if bits == 4:
        g = jnp.stack([g & 0xF, g >> 4], axis=-1)
        g = g.reshape(*rows.shape, 2 * g.shape[-2])[..., :dim]  # not -1: no rows is size 0
    elif bits != 8:
        raise ValueError(f"bits must be 4, 8 or 32, got {bits}")
    s = jnp.asarray(scale)[rows].astype(jnp.float32)[..., None]
    b = jnp.asarray(bias)[rows].astype(jnp.float32)[..., None]
    return g.astype(jnp.float32) * s + b
