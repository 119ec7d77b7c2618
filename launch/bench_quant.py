r"""Quantization benchmark: chunked INT4 export from disk, memory, gather + dequantize.

  python -m launch.bench_quant                       # 10M x 64 fp32 source (2.56 GB on disk)
  python -m launch.bench_quant --rows=200000         # smoke (a few seconds)

Writes a float32 [rows, dim] source table as a .npy file in a temp dir (plain
sequential writes, then evicted from the page cache where the OS allows, so
the export really reads from disk), quantizes it with
`jax_recsys.quant.rowwise.quantize_table_chunked` and times gathering +
dequantizing `--batch` random rows with NumPy (`dequantize_rows`, the embedding
server's hot path) and with jitted JAX (`dequantize_rows_jax`), next to a plain
fp32 gather from the source memmap. One JSON line per measurement:

  {"bench": "quant", "kind": "quantize", "rows_per_s", "mb_per_s", "peak_rss_mb",
   "rss_growth_mb", "rss_growth_vs_source", ...}
  {"bench": "quant", "kind": "size", "bytes_per_row", "ratio_vs_fp32", "ratio_vs_fp16"}
  {"bench": "quant", "kind": "gather_dequant", "impl": "numpy"|"jax"|"numpy_fp32_gather",
   "p50_ms", "rows_per_s", "vs_fp32_gather"}
  {"bench": "quant", "kind": "check", "max_err_over_half_step", "jax_equals_numpy"}

Measured on the shared (heavily loaded) 2-core dev box: export ~0.4M rows/s
(~100 MB/s of fp32 source; 10M rows in roughly 25 s); peak RSS grows by
~80-90 MB at chunk_rows=131072 whatever the table size (0.16x the source at
2M rows, so ~0.03x at 10M: memory is bounded by the chunk, not the table);
INT4 dim 64 = 36 bytes/row = 14.06% of fp32, 28.1% of fp16; a 4096-row
gather + dequantize takes ~1 ms in NumPy and in jitted JAX on CPU, within
~1.1x of a plain fp32 row gather (`vs_fp32_gather`). Run time: about
3x the export time (writing the source dominates the rest).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import tempfile
import time

import numpy as np
from absl import flags

from jax_recsys.quant import rowwise
from launch import common

_ROWS = flags.DEFINE_integer("rows", 10_000_000, "Rows of the fp32 source table.", lower_bound=1)
_DIM = flags.DEFINE_integer("dim", 64, "Embedding dim.", lower_bound=1)
_BITS = flags.DEFINE_enum("bits", "4", ["4", "8"], "Quantization bits.")
_CHUNK = flags.DEFINE_integer("chunk_rows", 131072, "Rows per quantization chunk.", lower_bound=1)
_BATCH = flags.DEFINE_integer("batch", 4096, "Rows per gather + dequantize.", lower_bound=1)
_REPEATS = flags.DEFINE_integer(
    "repeats", 50, "Timed gather repeats (median reported).", lower_bound=1
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Scratch folder (default: a temp dir, removed).")


def _emit(**kw) -> None:
    print(json.dumps({"bench": "quant", **kw}, sort_keys=True), flush=True)


def _rss_mb() -> float:
    """Peak resident set size of this process so far (Linux: ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # pragma: no cover - non-Linux
        return float("nan")


def _write_source(path: str, rows: int, dim: int, chunk: int) -> None:
    """fp32 [rows, dim] .npy written sequentially (bounded memory), then evicted from cache."""
    rng = np.random.default_rng(0)
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
              "fortran_order": False, "shape": (rows, dim)}
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        for a in range(0, rows, chunk):
            n = min(chunk, rows - a)
            scale = rng.uniform(0.01, 1.0, (n, 1)).astype(np.float32)
            f.write((rng.standard_normal((n, dim), np.float32) * scale).tobytes())
        f.flush()
        os.fsync(f.fileno())
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def _time_ms(fn, repeats: int) -> float:
    fn()  # warm-up (compiles JAX, touches pages)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def main(argv):
    del argv
    rows, dim, bits, batch = _ROWS.value, _DIM.value, int(_BITS.value), _BATCH.value
    work = _WORKDIR.value or tempfile.mkdtemp(prefix="bench_quant_")
    os.makedirs(work, exist_ok=True)
    src_path = os.path.join(work, "source.npy")
    try:
        _write_source(src_path, rows, dim, _CHUNK.value)
        src = np.load(src_path, mmap_mode="r", allow_pickle=False)
        source_mb = rows * dim * 4 / 2**20
        rss0 = _current_rss_mb()
        t0 = time.perf_counter()
        paths = rowwise.quantize_table_chunked(
            src, os.path.join(work, "tables"), "item", bits=bits, chunk_rows=_CHUNK.value
        )
        secs = time.perf_counter() - t0
        peak1 = _rss_mb()
        out_mb = sum(os.path.getsize(p) for p in paths.values()) / 2**20
        _emit(kind="quantize", rows=rows, dim=dim, bits=bits, chunk_rows=_CHUNK.value,
              seconds=round(secs, 3), rows_per_s=round(rows / secs), mb_per_s=round(source_mb / secs, 1),
              source_mb=round(source_mb, 1), output_mb=round(out_mb, 1),
              rss_before_mb=round(rss0, 1), peak_rss_mb=round(peak1, 1),
              rss_growth_mb=round(max(0.0, peak1 - rss0), 1),
              rss_growth_vs_source=round(max(0.0, peak1 - rss0) / source_mb, 4))
        bpr = rowwise.bytes_per_row(dim, bits)
        _emit(kind="size", dim=dim, bits=bits, bytes_per_row=bpr,
              ratio_vs_fp32=round(bpr / (4 * dim), 5), ratio_vs_fp16=round(bpr / (2 * dim), 5))

        q = rowwise.QuantizedTable(
            codes=np.load(paths["codes"], mmap_mode="r"), scale=np.load(paths["scale"], mmap_mode="r"),
            bias=np.load(paths["bias"], mmap_mode="r"), dim=dim, bits=bits)
        rng = np.random.default_rng(1)
        ids_sets = [rng.integers(0, rows, batch) for _ in range(8)]
        it = iter(range(10**9))

        def np_dequant():
            return rowwise.dequantize_rows(q, ids_sets[next(it) % 8])

        def np_fp32():
            return np.asarray(src[np.sort(ids_sets[next(it) % 8])], np.float32)

        fp32_ms = _time_ms(np_fp32, _REPEATS.value)
        np_ms = _time_ms(np_dequant, _REPEATS.value)

        import jax
        import jax.numpy as jnp

        from jax_recsys.quant import rowwise_jax

        codes_d, scale_d, bias_d = (jnp.asarray(np.asarray(a)) for a in (q.codes, q.scale, q.bias))
        fn = jax.jit(rowwise_jax.dequantize_rows_jax, static_argnames=("dim", "bits"))
        ids_d = [jnp.asarray(i, jnp.int32) for i in ids_sets]

        def jax_dequant():
            return fn(codes_d, scale_d, bias_d, ids_d[next(it) % 8], dim=dim, bits=bits).block_until_ready()

        jax_ms = _time_ms(jax_dequant, _REPEATS.value)
        for impl, ms in (("numpy_fp32_gather", fp32_ms), ("numpy", np_ms), ("jax", jax_ms)):
            _emit(kind="gather_dequant", impl=impl, batch=batch, dim=dim, bits=bits,
                  p50_ms=round(ms, 4), rows_per_s=round(batch / ms * 1e3),
                  vs_fp32_gather=round(ms / fp32_ms, 3),
                  device=str(jax.devices()[0].platform) if impl == "jax" else "cpu")

        ids = ids_sets[0]
        want = rowwise.dequantize_rows(q, ids)
        got = np.asarray(fn(codes_d, scale_d, bias_d, ids_d[0], dim=dim, bits=bits))
        err = np.abs(want.astype(np.float64) - np.asarray(src[ids], np.float64))
        half = np.asarray(q.scale[ids], np.float64)[:, None] / 2
        _emit(kind="check", max_err_over_half_step=round(float((err / np.maximum(half, 1e-30)).max()), 6),
              jax_equals_numpy=bool(np.array_equal(want, got)), jax_backend=jax.default_backend())
    finally:
        if not _WORKDIR.value:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    common.run(main)
