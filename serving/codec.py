"""Wire codec and shard geometry shared by the embedding server and its clients.

Numeric arrays cross the wire as raw little-endian bytes inside the protobuf
messages of ``serving/protos/embedding.proto``; this module is the one place
that turns them into NumPy arrays and back, and the one place that decides
which rows of a table live on which shard (contiguous ranges, shard i of S).

Imports NumPy and the generated protobuf code only (never JAX), so the
CPU embedding servers stay JAX-free.

Dimension legend: n ids in one request, D embedding dim, R table rows,
S shards.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import numpy as np

IDS_DTYPE = np.dtype("<i8")
VALUES_DTYPE = np.dtype("<f4")

SERVICE_NAME = "jax_recsys.serving.EmbeddingService"
LOOKUP_METHOD = f"/{SERVICE_NAME}/Lookup"
INFO_METHOD = f"/{SERVICE_NAME}/Info"


class CodecError(ValueError):
    """A payload whose bytes do not form the array the contract promises."""


def encode_ids(rows_n: np.ndarray) -> bytes:
    """Encodes table rows as little-endian int64 bytes.

    Args:
      rows_n: integer array [n] (any integer dtype; must fit in int64).

    Returns:
      8 * n bytes.
    """
    rows_n = np.asarray(rows_n)
    if rows_n.ndim != 1:
        raise CodecError(f"ids must be 1-D, got shape {rows_n.shape}")
    if rows_n.size and not np.issubdtype(rows_n.dtype, np.integer):
        raise CodecError(f"ids must be integers, got dtype {rows_n.dtype}")
    return rows_n.astype(IDS_DTYPE, copy=False).tobytes()


def decode_ids(payload: bytes, *, what: str = "ids") -> np.ndarray:
    """Decodes little-endian int64 bytes into an int64 array [n] (read-only view).

    Args:
      payload: the bytes field.
      what: name used in the error message (e.g. ``"ids of table 'user'"``).

    Returns:
      int64 [n], a zero-copy view of ``payload``.

    Raises:
      CodecError: when the length is not a multiple of 8.
    """
    if len(payload) % IDS_DTYPE.itemsize:
        raise CodecError(
            f"{what}: {len(payload)} bytes is not a multiple of 8 (little-endian int64 expected)"
        )
    return np.frombuffer(payload, dtype=IDS_DTYPE)


def encode_values(values_nd: np.ndarray) -> bytes:
    """Encodes rows as little-endian float32 bytes.

    Args:
      values_nd: float array [n, D].

    Returns:
      4 * n * D bytes, row-major.
    """
    return np.ascontiguousarray(values_nd, dtype=VALUES_DTYPE).tobytes()


def decode_values(payload: bytes, *, n: int, dim: int, what: str = "values") -> np.ndarray:
    """Decodes little-endian float32 bytes into an array [n, dim] (read-only view).

    Args:
      payload: the bytes field.
      n: rows expected.
      dim: embedding dim expected.
      what: name used in the error message.

    Returns:
      float32 [n, dim].

    Raises:
      CodecError: when the byte length is not ``4 * n * dim``.
    """
    expected = VALUES_DTYPE.itemsize * n * dim
    if len(payload) != expected:
        raise CodecError(
            f"{what}: got {len(payload)} bytes, expected {expected} (= 4 * {n} rows * {dim} dims)"
        )
    return np.frombuffer(payload, dtype=VALUES_DTYPE).reshape(n, dim)


def shard_range(rows: int, shard: int, num_shards: int) -> tuple[int, int]:
    """The contiguous row range ``[lo, hi)`` of one shard of a table.

    Rows are split as evenly as possible: shard i holds
    ``[rows * i // S, rows * (i + 1) // S)``.

    Args:
      rows: R, rows of the whole table.
      shard: i in ``[0, S)``.
      num_shards: S >= 1.

    Returns:
      ``(lo, hi)`` with ``0 <= lo <= hi <= rows``.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard must be in [0, {num_shards}), got {shard}")
    if rows < 0:
        raise ValueError(f"rows must be >= 0, got {rows}")
    return rows * shard // num_shards, rows * (shard + 1) // num_shards


def read_manifest(artifact_dir: str | os.PathLike) -> dict:
    """Reads ``manifest.json`` of a serving artifact (stdlib only, no verification).

    Args:
      artifact_dir: the artifact folder.

    Returns:
      The manifest as a dict (``version``, ``tables: {name: {rows, dim, dtype, ...}}``).
    """
    path = os.path.join(os.fspath(artifact_dir), "manifest.json")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no manifest.json, not a serving artifact") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON: {e}") from None
    if "version" not in manifest or "tables" not in manifest:
        raise ValueError(f"{path}: manifest lacks 'version' or 'tables'")
    return manifest


def table_ranges(
    table_rows: Mapping[str, int], num_shards: int
) -> list[dict[str, tuple[int, int]]]:
    """Row ranges of every table on every shard.

    Args:
      table_rows: table name -> R.
      num_shards: S.

    Returns:
      A list of S dicts, ``ranges[i][table] = (lo, hi)``.
    """
    return [
        {name: shard_range(int(rows), i, num_shards) for name, rows in table_rows.items()}
        for i in range(num_shards)
    ]
