"""Wire codec and shard geometry shared by the embedding server and its clients.

Numeric arrays cross the wire as raw little-endian bytes inside the protobuf
messages of ``serving/protos/embedding.proto``; this module is the one place
that turns them into NumPy arrays and back, and the one place that decides
which rows of a table live on which shard (contiguous ranges, shard i of S).

Imports NumPy and the NumPy-only ``jax_recsys.quant.rowwise`` (never JAX), so
the CPU embedding servers stay JAX-free.

Dimension legend: n ids in one request, D embedding dim, R table rows,
S shards.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

from jax_recsys.quant import rowwise

IDS_DTYPE = np.dtype("<i8")
VALUES_DTYPE = np.dtype("<f4")

SERVICE_NAME = "jax_recsys.serving.EmbeddingService"
LOOKUP_METHOD = f"/{SERVICE_NAME}/Lookup"
LOOKUP_STREAM_METHOD = f"/{SERVICE_NAME}/LookupStream"
INFO_METHOD = f"/{SERVICE_NAME}/Info"


class CodecError(ValueError):
    """A payload whose bytes do not form the array the contract promises."""


def int_array(what: str, values, *, scalar_ok: bool = False) -> np.ndarray:
    """``values`` as a 1-D integer array (ValueError naming ``what`` otherwise).

    Floats are refused rather than truncated, bools rather than read as 0/1, and
    other shapes rather than flattened; an empty array of any dtype passes.
    ``scalar_ok``: an integer scalar is also accepted, as an array of one.
    """
    arr = np.asarray(values)
    if scalar_ok and arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        shape = "an integer or a 1-D integer array" if scalar_ok else "a 1-D integer array"
        raise ValueError(f"{what} must be {shape}, got {arr.dtype} {np.shape(values)}")
    if arr.dtype == np.uint64 and arr.size and arr.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{what}: {int(arr.max())} does not fit in int64 (ids and rows "
                         "travel as little-endian int64)")
    return arr


def row_array(table: str, rows_n) -> np.ndarray:
    """``rows_n`` as an array, checked to be 1-D integers (ValueError naming ``table``)."""
    arr = np.asarray(rows_n)
    if arr.ndim == 1 and arr.dtype.kind == "i":  # the lookup path: nothing else to check
        return arr
    return int_array(f"table {table!r}: rows", arr)


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


class QuantizedRows(NamedTuple):
    """Rows of an INT4/INT8 table as stored: ``row = code * scale + bias`` (float32).

    Attributes:
      bits: 4 or 8.
      codes: uint8 [n, ceil(D / 2)] (bits 4, low nibble = even column) or [n, D]
        (bits 8); a memoryview of the same bytes when decoded from the wire.
      scale: float32 [n] (or its bytes).
      bias: float32 [n] (or its bytes).
    """

    bits: int
    codes: np.ndarray | memoryview
    scale: np.ndarray | memoryview
    bias: np.ndarray | memoryview


def decode_quantized(
    q: QuantizedRows, *, n: int, dim: int, what: str = "rows"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Checks and views the fields of quantized rows from the wire.

    Args:
      q: as returned by ``decode_lookup_response`` (memoryviews).
      n: rows expected.
      dim: embedding dim expected.
      what: name used in the error message.

    Returns:
      ``(codes uint8 [n, P], scale float32 [n], bias float32 [n])``, read-only views.

    Raises:
      CodecError: bits other than 4 or 8, or byte lengths that do not match.
    """
    if q.bits not in (4, 8):
        raise CodecError(f"{what}: quantized rows of {q.bits} bits (4 or 8 expected)")
    p = rowwise.packed_dim(dim, q.bits)
    if len(q.codes) != n * p:
        raise CodecError(
            f"{what}: got {len(q.codes)} bytes of codes, expected {n * p} "
            f"(= {n} rows * {p} bytes for {q.bits}-bit dim {dim})"
        )
    for name, field in (("scale", q.scale), ("bias", q.bias)):
        if len(field) != VALUES_DTYPE.itemsize * n:
            raise CodecError(
                f"{what}: got {len(field)} bytes of {name}, expected {4 * n} (= 4 * {n} rows)"
            )
    return (
        np.frombuffer(q.codes, dtype=np.uint8).reshape(n, p),
        np.frombuffer(q.scale, dtype=VALUES_DTYPE),
        np.frombuffer(q.bias, dtype=VALUES_DTYPE),
    )


def worth_deduplicating(n: int, repeats: int) -> bool:
    """Whether a lookup of ``n`` rows, ``repeats`` of them repeats, should go unique first.

    Removing repeats costs a unique-with-inverse and a re-gather; it pays
    when it shrinks the work and the bytes on the wire by a quarter or more
    (measured: with a few repeats in 512 rows the unique pass costs more than
    the rows it saves; dequantizing a repeated row is cheap, it is cached).
    The client and the shard server both follow this rule.

    Args:
      n: rows asked for.
      repeats: rows equal to an earlier one (n minus the distinct count).

    Returns:
      True to deduplicate.
    """
    return repeats * 4 >= n and repeats > 0


# ---- hand-written protobuf wire format of the lookup messages ----
#
# Lookups are the serving hot path and their payload is one large bytes field
# per table. The generated protobuf code copies such a field three times on
# the way out (tobytes, into the message, SerializeToString) and twice on the
# way in (parse, field access); the functions below write the same bytes with
# one copy and read them with none (memoryview slices of the received
# buffer). They produce exactly what ``SerializeToString`` produces
# (tests/test_serving_proto.py) and parse what the generated code would
# (unknown fields and fields of the wrong wire type skipped, last scalar wins;
# only the deprecated group wire types are refused), so either side of the
# wire may use either.


_ONE_BYTE = tuple(bytes((i,)) for i in range(0x80))


def _varint(value: int) -> bytes:
    if value < 0x80:
        return _ONE_BYTE[value]
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _len_field(tag: int, size: int) -> bytes:
    """Key and length of a length-delimited field (wire type 2)."""
    return _varint(tag << 3 | 2) + _varint(size)


def _string_field(tag: int, text: str) -> bytes:
    if not text:  # proto3 leaves default values out
        return b""
    raw = text.encode()
    return _len_field(tag, len(raw)) + raw


def encode_lookup_request(
    tables: Sequence[tuple[str, np.ndarray]],
    *,
    expected_version: str = "",
    request_id: str = "",
    quantized: bool = False,
) -> bytes:
    """A serialized ``LookupRequest`` (same bytes as the generated code).

    Args:
      tables: ``(table, rows)`` pairs, rows already int64-compatible [n].
      expected_version: the pinned version ("" for none).
      request_id: echoed back by the server.
      quantized: ask for INT4/INT8 rows as stored (``QuantizedRows``).

    Returns:
      The message bytes.
    """
    parts = []
    for table, rows_n in tables:
        ids = encode_ids(rows_n)
        inner = _string_field(1, table) + (_len_field(2, len(ids)) if ids else b"")
        parts += [_len_field(1, len(inner) + len(ids)), inner, ids]
    parts += [_string_field(2, expected_version), _string_field(3, request_id)]
    if quantized:
        parts.append(_QUANTIZED_TRUE)
    return b"".join(parts)


_QUANTIZED_TRUE = _varint(4 << 3) + _varint(1)  # LookupRequest.quantized = true


def encode_lookup_response(
    tables: Sequence[tuple[str, int, np.ndarray]], *, version: str, request_id: str = ""
) -> bytes:
    """A serialized ``LookupResponse`` (same bytes as the generated code), one copy of the rows.

    Args:
      tables: ``(table, dim, rows)`` in the request's table order; rows are
        float32 values [n, dim] or ``QuantizedRows`` (NumPy arrays).
      version: the artifact version that produced the rows.
      request_id: the request's id.

    Returns:
      The message bytes.
    """
    parts = []
    for table, dim, rows in tables:
        head = _string_field(1, table)
        if dim:
            head += _varint(2 << 3) + _varint(dim)
        if isinstance(rows, QuantizedRows):
            arrays = [
                np.ascontiguousarray(rows.codes, dtype=np.uint8),
                np.ascontiguousarray(rows.scale, dtype=VALUES_DTYPE),
                np.ascontiguousarray(rows.bias, dtype=VALUES_DTYPE),
            ]
            head += _varint(4 << 3) + _varint(rows.bits)
            body, size = [], 0  # fields 5, 6, 7: codes, scale, bias (proto3 leaves empty ones out)
            for tag, arr in zip((5, 6, 7), arrays, strict=True):
                if arr.nbytes:
                    key = _len_field(tag, arr.nbytes)
                    body += [key, memoryview(arr).cast("B")]
                    size += len(key) + arr.nbytes
            parts += [_len_field(1, len(head) + size), head, *body]
            continue
        values = np.ascontiguousarray(rows, dtype=VALUES_DTYPE)
        size = values.nbytes
        if size:
            head += _len_field(3, size)
        parts += [_len_field(1, len(head) + size), head]
        if size:
            parts.append(memoryview(values).cast("B"))
    parts += [_string_field(2, version), _string_field(3, request_id)]
    return b"".join(parts)


def _read_varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while pos < end:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise CodecError("malformed protobuf: varint longer than 10 bytes")
    raise CodecError("malformed protobuf: truncated varint")


def _fields(buf: memoryview, pos: int, end: int):
    """Yields ``(field, wire_type, value_or_start, end)`` of one message in buf[pos:end]."""
    while pos < end:
        key, pos = _read_varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if not 0 < field < 1 << 29:
            raise CodecError(f"malformed protobuf: field number {field}")
        if wire == 0:
            value, pos = _read_varint(buf, pos, end)
            yield field, wire, value, pos
        elif wire == 2:
            size, pos = _read_varint(buf, pos, end)
            if size > end - pos:
                raise CodecError("malformed protobuf: length-delimited field past the end")
            yield field, wire, pos, pos + size
            pos += size
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
            if pos > end:
                raise CodecError("malformed protobuf: fixed-width field past the end")
        else:
            raise CodecError(f"malformed protobuf: unsupported wire type {wire}")


def _int32(varint: int) -> int:
    """An int32 field's value from its varint: the low 32 bits, signed."""
    value = varint & 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def _text(buf: memoryview, start: int, end: int, what: str) -> str:
    try:
        return str(buf[start:end], "utf-8")
    except UnicodeDecodeError:
        raise CodecError(f"{what} is not UTF-8") from None


def decode_lookup_response(
    raw: bytes,
) -> tuple[str, str, list[tuple[str, int, memoryview | QuantizedRows]]]:
    """Parses a serialized ``LookupResponse`` without copying the rows.

    Args:
      raw: the message bytes.

    Returns:
      ``(version, request_id, [(table, dim, rows), ...])`` with ``rows`` a
      memoryview into ``raw`` (decode it with ``decode_values``), or, when the
      table's ``bits`` is set, ``QuantizedRows`` of memoryviews (decode it with
      ``decode_quantized``).

    Raises:
      CodecError: bytes that are not a valid ``LookupResponse``.
    """
    buf = memoryview(raw)
    version = request_id = ""
    tables = []
    for field, wire, a, b in _fields(buf, 0, len(buf)):
        if field == 1 and wire == 2:
            table, dim, bits, values = "", 0, 0, buf[a:a]
            quant = [buf[a:a]] * 3  # codes, scale, bias
            for f2, w2, a2, b2 in _fields(buf, a, b):
                if f2 == 1 and w2 == 2:
                    table = _text(buf, a2, b2, "table name")
                elif f2 == 2 and w2 == 0:
                    dim = _int32(a2)
                elif f2 == 3 and w2 == 2:
                    values = buf[a2:b2]
                elif f2 == 4 and w2 == 0:
                    bits = _int32(a2)
                elif 5 <= f2 <= 7 and w2 == 2:
                    quant[f2 - 5] = buf[a2:b2]
            tables.append((table, dim, QuantizedRows(bits, *quant) if bits else values))
        elif field == 2 and wire == 2:
            version = _text(buf, a, b, "version")
        elif field == 3 and wire == 2:
            request_id = _text(buf, a, b, "request_id")
    return version, request_id, tables


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
