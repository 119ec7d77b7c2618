"""Row-wise INT4 / INT8 post-training quantization of embedding tables (NumPy only).

Each row r of a float table is stored as unsigned codes plus one scale and one
bias per row (asymmetric min/max quantization):

    x[r, d] ~= code[r, d] * scale[r] + bias[r],   code in [0, 2**bits - 1]

INT4 codes are packed two per byte ([R, ceil(D/2)] uint8, the low nibble holds
the even column); INT8 codes are [R, D] uint8. Scale and bias are float16 by
default (`scale_dtype`). The codes are derived from the *stored* (rounded)
scale and bias: the bias is rounded down and the scale up to the storage dtype
so the row's [min, max] stays inside the representable range, and every
element is within half a quantization step (`scale[r] / 2`) of its original
value. A constant row whose value the storage dtype holds exactly (zero rows,
for instance) gets scale 0 and comes back exactly.

`bits=32` is accepted as "not quantized": `codes` then holds the float32 rows
and `scale`/`bias` are None, so the serving path handles fp32 tables too.

This module must import only NumPy and the standard library: the gRPC
embedding server imports it and never imports JAX. The JAX twin of
`dequantize_rows` is `jax_recsys.quant.rowwise_jax.dequantize_rows_jax`.

Dimension legend: R table rows, D embedding dim, P packed columns
(ceil(D/2) for INT4), n requested rows.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import pathlib

import numpy as np

SUPPORTED_BITS = (4, 8, 32)
WIDTH_NAMES = {4: "INT4", 8: "INT8", 32: "float32"}  # how labels name rows of these bits
_FP16_MAX = float(np.finfo(np.float16).max)


@dataclasses.dataclass(frozen=True)
class QuantizedTable:
    """A row-wise quantized table.

    Attributes:
      codes: uint8 [R, ceil(D/2)] (bits=4, low nibble = even column) or uint8
        [R, D] (bits=8); float32 [R, D] when bits=32 (unquantized).
      scale: [R] per-row step (float16 by default); None when bits=32.
      bias: [R] per-row offset (the row minimum, rounded down); None when bits=32.
      dim: D, the embedding dimension (needed to unpack odd INT4 dims).
      bits: 4, 8 or 32.
    """

    codes: np.ndarray
    scale: np.ndarray | None
    bias: np.ndarray | None
    dim: int
    bits: int

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.codes.ndim != 2:
            raise ValueError(f"codes must be 2-D [R, *], got shape {self.codes.shape}")
        want = packed_dim(self.dim, self.bits)
        if self.codes.shape[1] != want:
            raise ValueError(
                f"codes has {self.codes.shape[1]} columns, expected {want} for "
                f"dim={self.dim} bits={self.bits}"
            )
        if self.bits == 32:
            if self.scale is not None or self.bias is not None:
                raise ValueError("bits=32 tables carry no scale/bias")
            return
        if self.codes.dtype != np.uint8:
            raise ValueError(f"codes must be uint8, got {self.codes.dtype}")
        rows = self.codes.shape[0]
        for name, arr in (("scale", self.scale), ("bias", self.bias)):
            if arr is None or arr.shape != (rows,):
                shape = None if arr is None else arr.shape
                raise ValueError(f"{name} must have shape ({rows},), got {shape}")

    @property
    def num_rows(self) -> int:
        """R, the number of rows."""
        return int(self.codes.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes of codes + scale + bias."""
        n = self.codes.nbytes
        if self.scale is not None:
            n += self.scale.nbytes + self.bias.nbytes
        return int(n)


def packed_dim(dim: int, bits: int) -> int:
    """Columns of the codes array for `dim` values at `bits` bits."""
    return (dim + 1) // 2 if bits == 4 else dim


def bytes_per_row(dim: int, bits: int, scale_dtype=np.float16) -> int:
    """Storage bytes per row: codes plus one scale and one bias.

    Args:
      dim: D.
      bits: 4, 8 or 32 (32 = plain float32 row, no scale/bias).
      scale_dtype: dtype of scale and bias.

    Returns:
      Bytes per row, e.g. 36 for dim 64 INT4 with float16 scale/bias (vs 256 fp32).
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if bits == 32:
        return 4 * dim
    return packed_dim(dim, bits) + 2 * np.dtype(scale_dtype).itemsize


def pack_int4(codes: np.ndarray) -> np.ndarray:
    """Packs 4-bit codes two per byte.

    Args:
      codes: integer [R, D] with values in [0, 15].

    Returns:
      uint8 [R, ceil(D/2)]; column j holds codes[:, 2j] in the low nibble and
      codes[:, 2j+1] in the high nibble (0 for the pad of an odd D).
    """
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"pack_int4 expects [R, D], got shape {codes.shape}")
    if codes.size and (codes.min() < 0 or codes.max() > 15):
        raise ValueError("pack_int4: codes must lie in [0, 15]")
    codes = codes.astype(np.uint8, copy=False)
    r, d = codes.shape
    if d % 2:
        codes = np.concatenate([codes, np.zeros((r, 1), np.uint8)], axis=1)
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_int4(packed: np.ndarray, dim: int) -> np.ndarray:
    """Inverse of `pack_int4`.

    Args:
      packed: uint8 [R, ceil(dim/2)].
      dim: D, the number of 4-bit values per row.

    Returns:
      uint8 [R, D] with values in [0, 15].
    """
    packed = np.asarray(packed, dtype=np.uint8)
    if packed.ndim != 2 or packed.shape[1] != (dim + 1) // 2:
        raise ValueError(f"unpack_int4: shape {packed.shape} does not hold dim={dim}")
    out = np.empty((packed.shape[0], packed.shape[1], 2), np.uint8)
    out[..., 0] = packed & 0xF
    out[..., 1] = packed >> 4
    return out.reshape(packed.shape[0], -1)[:, :dim]


def _row_params(lo: np.ndarray, hi: np.ndarray, bits: int, scale_dtype) -> tuple:
    """Stored (rounded) scale and bias for rows with min `lo` and max `hi`.

    The bias is rounded *down* and the scale *up* in `scale_dtype`, so that
    bias <= lo and bias + levels * scale >= hi hold for the stored values.
    """
    levels = 2**bits - 1
    sdt = np.dtype(scale_dtype)
    lo64 = lo.astype(np.float64)
    hi64 = hi.astype(np.float64)
    bias = lo64.astype(sdt)
    too_high = bias.astype(np.float64) > lo64
    bias[too_high] = np.nextafter(bias[too_high], sdt.type(-np.inf))
    step = (hi64 - bias.astype(np.float64)) / levels
    scale = step.astype(sdt)
    too_low = scale.astype(np.float64) < step
    scale[too_low] = np.nextafter(scale[too_low], sdt.type(np.inf))
    # float64 rounding of `step` could still leave the top of the row uncovered.
    short = bias.astype(np.float64) + levels * scale.astype(np.float64) < hi64
    scale[short] = np.nextafter(scale[short], sdt.type(np.inf))
    return scale, bias


def _quantize_block(x: np.ndarray, bits: int, scale_dtype, first_row: int = 0):
    """Quantizes a float [n, D] block; returns (codes_unpacked uint8, scale, bias)."""
    x = np.asarray(x, dtype=np.float32)
    if x.size == 0:  # no rows, or rows of no values (nothing to take a min or max of)
        sdt = np.dtype(scale_dtype)
        return np.zeros(x.shape, np.uint8), np.zeros(x.shape[0], sdt), np.zeros(x.shape[0], sdt)
    lo = x.min(axis=1)
    hi = x.max(axis=1)
    bad = ~(np.isfinite(lo) & np.isfinite(hi))
    if bad.any():
        r = first_row + int(np.flatnonzero(bad)[0])
        raise ValueError(f"row {r} holds a non-finite value (NaN or inf); cannot quantize")
    if np.dtype(scale_dtype) == np.float16:
        big = np.maximum(-lo, hi) > _FP16_MAX
        if big.any():
            r = first_row + int(np.flatnonzero(big)[0])
            raise ValueError(
                f"row {r} has |x| > {_FP16_MAX} which float16 bias cannot hold; "
                "use scale_dtype float32"
            )
    scale, bias = _row_params(lo, hi, bits, scale_dtype)
    scale32 = scale.astype(np.float32)
    bias32 = bias.astype(np.float32)
    with np.errstate(over="ignore"):  # dequantization computes code * scale in float32
        top = np.float32(2**bits - 1) * scale32
    bad = ~(np.isfinite(top) & np.isfinite(bias32))
    if bad.any():  # max - min beyond float32, for rows near +-3.4e38
        r = first_row + int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"row {r}: its range max - min overflows the {np.dtype(scale_dtype).name} scale; "
            "cannot quantize (rescale the table)"
        )
    # Rows with scale 0 are constant and equal to bias: code 0.
    safe = np.where(scale32 > 0, scale32, np.float32(1))
    q = x - bias32[:, None]
    q /= safe[:, None]
    np.rint(q, out=q)
    np.clip(q, 0, 2**bits - 1, out=q)
    return q.astype(np.uint8), scale, bias


def quantize_rows(x: np.ndarray, *, bits: int = 4, scale_dtype=np.float16) -> QuantizedTable:
    """Quantizes a whole in-memory table row by row.

    Args:
      x: float [R, D].
      bits: 4 or 8 (32 returns an unquantized float32 copy).
      scale_dtype: storage dtype of scale and bias (float16 or float32).

    Returns:
      QuantizedTable with |x - dequantize_rows(q)| <= scale / 2 per element.
    """
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"quantize_rows expects [R, D], got shape {x.shape}")
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    dim = x.shape[1]
    if bits == 32:
        return QuantizedTable(
            codes=np.array(x, np.float32), scale=None, bias=None, dim=dim, bits=32
        )
    codes, scale, bias = _quantize_block(x, bits, scale_dtype)
    if bits == 4:
        codes = pack_int4(codes)
    return QuantizedTable(codes=codes, scale=scale, bias=bias, dim=dim, bits=bits)


def _nibble_pairs() -> np.ndarray:
    """uint64 [256]: byte b -> float32 (b & 0xF, b >> 4) as one 8-byte word."""
    pairs = np.empty((256, 2), np.float32)
    pairs[:, 0] = np.arange(256) & 0xF
    pairs[:, 1] = np.arange(256) >> 4
    return pairs.view(np.uint64).reshape(256)


_NIBBLE_PAIRS = _nibble_pairs()


def dequantize_rows(q: QuantizedTable, rows=None, *, checked: bool = True) -> np.ndarray:
    """Gathers rows and dequantizes only those (the embedding server's hot path).

    Args:
      q: the quantized table (arrays may be read-only memmaps).
      rows: integer array of any shape with values in [0, R); None = all rows.
      checked: raise ValueError for rows outside [0, R). Only callers that
        have already checked the range (the embedding server) pass False;
        rows outside the range then silently clip to the first or last row.

    Returns:
      float32 rows.shape + (D,) ([R, D] when rows is None).
    """
    if rows is None:
        codes, scale, bias = q.codes, q.scale, q.bias
        lead = (q.num_rows,)
    else:
        rows = np.asarray(rows)
        if rows.dtype.kind not in "iu":
            raise ValueError(f"rows must be integers, got dtype {rows.dtype}")
        lead = rows.shape
        rows = rows.reshape(-1)
        if checked and rows.size and (rows.min() < 0 or rows.max() >= q.num_rows):
            raise ValueError(
                f"row ids must lie in [0, {q.num_rows}); got range "
                f"[{rows.min()}, {rows.max()}]"
            )
        # np.take is far faster than fancy indexing for row gathers (also on memmaps).
        # mode="clip" skips NumPy's buffered bounds check; rows are in range here
        # (checked above, or by the caller when checked=False).
        codes = q.codes.take(rows, axis=0, mode="clip")
        scale = None if q.scale is None else q.scale.take(rows, mode="clip")
        bias = None if q.bias is None else q.bias.take(rows, mode="clip")
    n = codes.shape[0]
    if q.bits == 32:
        out = np.array(codes, np.float32, copy=True if rows is None else None)
        return out.reshape(*lead, q.dim)
    if q.bits == 4:
        # One table lookup per byte gives both nibbles as float32 (8 bytes).
        # [n, 2P] (not reshape(n, -1): that fails for n = 0)
        vals = _NIBBLE_PAIRS.take(codes, mode="clip").view(np.float32).reshape(n, 2 * codes.shape[1])
        if vals.shape[1] != q.dim:
            vals = np.ascontiguousarray(vals[:, : q.dim])
    else:
        vals = codes.astype(np.float32)  # [n, D]
    vals *= np.asarray(scale, np.float32)[:, None]
    vals += np.asarray(bias, np.float32)[:, None]
    return vals.reshape(*lead, q.dim)


def slice_rows(q: QuantizedTable, lo: int, hi: int) -> QuantizedTable:
    """Rows [lo, hi) of every per-row array of ``q`` (views: stays mmap'd).

    The views are plain ndarrays over the same mapping: gathers from a
    ``np.memmap`` return memmap objects, whose bookkeeping costs more than the
    gather of a few hundred rows (the embedding server's and the monolithic
    ranker's lookups).
    """
    rows = q.codes.shape[0]
    changes = {}
    for field in dataclasses.fields(q):
        value = getattr(q, field.name)
        if isinstance(value, np.ndarray) and value.ndim >= 1 and value.shape[0] == rows:
            changes[field.name] = np.asarray(value[lo:hi])
    return dataclasses.replace(q, **changes)


def _mmap_of(arr):
    """The mmap behind a np.memmap (or None), for releasing pages early."""
    while arr is not None:
        mm = getattr(arr, "_mmap", None)
        if isinstance(mm, mmap.mmap):
            return mm
        arr = getattr(arr, "base", None)
    return None


def _release_pages(block: np.ndarray, mm) -> None:
    """Drops a processed block's pages from this process's resident set.

    Best effort: file-backed pages of shared mappings keep their data (Linux
    writes dirty ones back), so this only stops RSS from growing with the
    table size. Anything that fails here is ignored.
    """
    if mm is None or not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return
    try:
        start_addr = np.frombuffer(mm, np.uint8).ctypes.data
        start = block.ctypes.data - start_addr
        page = mmap.PAGESIZE
        lo = start - start % page
        hi = min(len(mm), start + block.nbytes)
        if 0 <= lo < hi:
            mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
    except (ValueError, OSError, TypeError, BufferError):
        pass


def table_file_names(name: str, bits: int) -> dict[str, str]:
    """File names of a table's arrays: {"codes": "<name>.codes.npy", ...}."""
    if bits == 32:
        return {"codes": f"{name}.codes.npy"}
    return {k: f"{name}.{k}.npy" for k in ("codes", "scale", "bias")}


def quantize_table_chunked(
    src,
    out_dir: str | os.PathLike,
    name: str,
    *,
    bits: int = 4,
    chunk_rows: int = 65536,
    scale_dtype=np.float16,
) -> dict[str, pathlib.Path]:
    """Quantizes a table chunk by chunk into .npy files, in bounded memory.

    The source is never materialised: it is read `chunk_rows` rows at a time
    and the outputs are written through `np.lib.format.open_memmap`, so tables
    larger than RAM work. Results equal `quantize_rows(src)` exactly. The files
    are written under temporary names and renamed into place once complete: a
    failure (e.g. a non-finite row) leaves earlier outputs of the same name as
    they were and no partial file behind.

    Args:
      src: [R, D] array-like (np.ndarray, np.memmap, or a path to a .npy file,
        which is opened with mmap_mode="r").
      out_dir: folder for the outputs (created if missing).
      name: the files' stem (one path component, no '/'): files are `<name>.codes.npy`,
        `.scale.npy`, `.bias.npy`.
      bits: 4, 8 or 32 (32 copies the rows as float32, only `codes`).
      chunk_rows: rows per chunk.
      scale_dtype: storage dtype of scale and bias.

    Returns:
      {"codes": path, "scale": path, "bias": path} (only "codes" for bits=32).
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if chunk_rows <= 0:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
    if not name or any(sep and sep in name for sep in ("/", os.sep, os.altsep)):
        raise ValueError(f"table file name {name!r} must be one path component, without '/' "
                         "(map table names to file names with jax_recsys.fsutil.file_stems)")
    if isinstance(src, (str, os.PathLike)):
        src = np.load(src, mmap_mode="r", allow_pickle=False)
    if getattr(src, "ndim", None) != 2:
        raise ValueError(f"table {name!r}: expected a 2-D [R, D] source, got {getattr(src, 'shape', None)}")
    rows, dim = (int(s) for s in src.shape)
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = table_file_names(name, bits)
    paths = {k: out_dir / v for k, v in names.items()}
    tag = os.urandom(4).hex()
    tmps = {k: out_dir / f".{v}.tmp-{tag}.npy" for k, v in names.items()}
    fmt = np.lib.format
    outs = {}
    try:
        if bits == 32:
            outs["codes"] = fmt.open_memmap(
                tmps["codes"], mode="w+", dtype=np.float32, shape=(rows, dim)
            )
        else:
            sdt = np.dtype(scale_dtype)
            outs["codes"] = fmt.open_memmap(
                tmps["codes"], mode="w+", dtype=np.uint8, shape=(rows, packed_dim(dim, bits))
            )
            outs["scale"] = fmt.open_memmap(tmps["scale"], mode="w+", dtype=sdt, shape=(rows,))
            outs["bias"] = fmt.open_memmap(tmps["bias"], mode="w+", dtype=sdt, shape=(rows,))
        _fill_chunked(src, outs, bits=bits, chunk_rows=chunk_rows, scale_dtype=scale_dtype)
        outs.clear()  # unmaps the outputs before they are renamed
        for k, tmp in tmps.items():
            os.replace(tmp, paths[k])
    except BaseException:
        outs.clear()
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)
        raise
    return paths


def _fill_chunked(src, outs: dict, *, bits: int, chunk_rows: int, scale_dtype) -> None:
    """Writes the quantized rows of ``src`` into the open output memmaps ``outs``."""
    rows = int(src.shape[0])
    src_mm = _mmap_of(src)
    out_mm = {k: _mmap_of(v) for k, v in outs.items()}
    for a in range(0, rows, chunk_rows):
        b = min(rows, a + chunk_rows)
        src_block = src[a:b]
        if bits == 32:
            outs["codes"][a:b] = np.asarray(src_block, np.float32)
        else:
            codes, scale, bias = _quantize_block(src_block, bits, scale_dtype, first_row=a)
            outs["codes"][a:b] = pack_int4(codes) if bits == 4 else codes
            outs["scale"][a:b] = scale
            outs["bias"][a:b] = bias
        if isinstance(src_block, np.ndarray):
            _release_pages(src_block, src_mm)
        for k, arr in outs.items():
            _release_pages(arr[a:b], out_mm[k])
    for arr in outs.values():
        arr.flush()
