"""The INT4 export's setting rules and the names of the ablation rows it adds, without
JAX (NumPy only, through `rowwise`).

`jax_recsys.quant.export` (which imports JAX through the ranker) applies them and
re-exports them; run_pipeline's own process, which runs every stage in a child, uses
them from here: its up-front check of the export section (`launch.pipeline_stages.check`)
and its report's labels of the served rows.
"""

from __future__ import annotations

import math

from jax_recsys.quant import rowwise

INT4_ROW = "cl_kg_int4"
INT4_LABEL = "+ both facets, INT4 served"

# ExportConfig's rules for its settings, name -> (accepts(value), the rule as messages
# state it: "must be <rule>"). run_pipeline checks its export section with them before
# any stage runs (`launch.pipeline_stages.check`), in the same words.
SETTING_RULES = {
    "bits": (lambda v: v in rowwise.SUPPORTED_BITS,
             ", ".join(map(str, rowwise.SUPPORTED_BITS[:-1])) + f" or {rowwise.SUPPORTED_BITS[-1]}"),
    "scale_dtype": (lambda v: v in ("float16", "float32"), "float16 or float32"),
    "chunk_rows": (lambda v: v > 0, "positive"),
    "max_auc_drop": (lambda v: math.isfinite(v), "finite"),
    "auc_noise_z": (lambda v: math.isfinite(v) and v >= 0, ">= 0 (0: strict)"),
}


def setting_violations(**settings) -> list[tuple[str, object, str]]:
    """The ExportConfig settings (keywords named as in `SETTING_RULES`) that break their rule.

    Returns:
      [(name, value, rule)] in the order given; empty when all are accepted.
    """
    return [(name, value, SETTING_RULES[name][1]) for name, value in settings.items()
            if not SETTING_RULES[name][0](value)]


_ROW_SUFFIX = {4: "int4", 8: "int8", 32: "fp32"}  # bits -> the served row's id suffix


def served_width(bits: int) -> str:
    """How labels name tables served with `bits`-bit rows: "INT4", "INT8" or "float32".

    Raises:
      ValueError: `bits` is not 4, 8 or 32.
    """
    if bits not in rowwise.WIDTH_NAMES:
        raise ValueError(f"bits must be one of {sorted(rowwise.WIDTH_NAMES)}, got {bits!r}")
    return rowwise.WIDTH_NAMES[bits]


def int4_row_name(source_variant: str, bits: int = 4) -> tuple[str, str]:
    """(row id, label) of the row of ``source_variant``'s rankers served at ``bits``.

    Args:
      source_variant: the ablation variant whose rankers are re-scored.
      bits: 4 (default), 8 or 32.

    Returns:
      4 bits: (`INT4_ROW`, `INT4_LABEL`) = ("cl_kg_int4", "+ both facets, INT4 served")
      for "cl_kg", else ("<variant>_int4", "<variant>, INT4 served"); 8 and 32 bits name
      their width instead: "_int8" / "INT8 served", "_fp32" / "float32 served".

    Raises:
      ValueError: `bits` is not 4, 8 or 32.
    """
    width = served_width(bits)
    suffix = _ROW_SUFFIX[bits]
    if source_variant == "cl_kg":
        return f"cl_kg_{suffix}", INT4_LABEL.replace("INT4", width)
    return f"{source_variant}_{suffix}", f"{source_variant}, {width} served"
