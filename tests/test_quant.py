"""Tests for jax_recsys.quant.rowwise (NumPy) and rowwise_jax (JAX twin)."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from jax_recsys.quant import rowwise, rowwise_jax


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(
        np.uint8,
        hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=9),
        elements=st.integers(0, 15),
    )
)
def test_pack_unpack_int4_roundtrip(codes):
    packed = rowwise.pack_int4(codes)
    assert packed.shape == (codes.shape[0], (codes.shape[1] + 1) // 2)
    np.testing.assert_array_equal(rowwise.unpack_int4(packed, codes.shape[1]), codes)


def test_pack_int4_layout_low_nibble_is_even_column():
    packed = rowwise.pack_int4(np.array([[1, 2, 3]], np.uint8))
    np.testing.assert_array_equal(packed, [[0x21, 0x03]])
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        rowwise.pack_int4(np.array([[16]]))


def test_hand_computed_int4_row():
    # Row 0..15: min 0, max 15 -> scale 1 exactly, codes = values.
    x = np.arange(16, dtype=np.float32)[None]
    q = rowwise.quantize_rows(x, bits=4)
    assert float(q.scale[0]) == 1.0 and float(q.bias[0]) == 0.0
    np.testing.assert_array_equal(rowwise.unpack_int4(q.codes, 16), x.astype(np.uint8))
    np.testing.assert_array_equal(rowwise.dequantize_rows(q), x)


def test_constant_and_zero_rows_exact():
    x = np.array([[0.0, 0.0, 0.0], [0.5, 0.5, 0.5], [-3.0, -3.0, -3.0]], np.float32)
    for bits in (4, 8):
        q = rowwise.quantize_rows(x, bits=bits)
        np.testing.assert_array_equal(q.scale, 0)
        np.testing.assert_array_equal(rowwise.dequantize_rows(q), x)


def _check_half_step(x, q):
    deq = rowwise.dequantize_rows(q)
    err = np.abs(deq.astype(np.float64) - x.astype(np.float64))
    half = q.scale.astype(np.float64)[:, None] / 2
    # Slack only for float32 rounding in (x - bias) / scale and code*scale+bias.
    slack = 1e-6 * (np.abs(x).max(axis=1, keepdims=True) + 1.0)
    assert np.all(err <= half + slack), float((err - half).max())
    # The bias is never above the row minimum and the top code covers the maximum.
    levels = 2**q.bits - 1
    b = q.bias.astype(np.float64)
    s = q.scale.astype(np.float64)
    assert np.all(b <= x.min(axis=1))
    assert np.all(b + levels * s >= x.max(axis=1))


@settings(max_examples=40, deadline=None)
@given(
    x=hnp.arrays(
        np.float32,
        st.tuples(st.integers(1, 6), st.integers(1, 11)),
        elements=st.floats(-1000, 1000, width=32),
    ),
    bits=st.sampled_from([4, 8]),
)
def test_error_within_half_step_of_stored_scale(x, bits):
    q = rowwise.quantize_rows(x, bits=bits)
    _check_half_step(x, q)


def test_error_bound_random_tables_and_odd_dim():
    rng = np.random.default_rng(0)
    for dim in (1, 7, 64):
        x = (rng.standard_normal((300, dim)) * rng.uniform(1e-4, 50, (300, 1))).astype(np.float32)
        for bits in (4, 8):
            q = rowwise.quantize_rows(x, bits=bits)
            assert q.codes.shape == (300, rowwise.packed_dim(dim, bits))
            _check_half_step(x, q)


def test_float32_scale_dtype_and_fp16_overflow():
    x = np.array([[1e6, -2e6, 3.0]], np.float32)
    with pytest.raises(ValueError, match="row 0.*float32"):
        rowwise.quantize_rows(x)
    q = rowwise.quantize_rows(x, bits=8, scale_dtype=np.float32)
    assert q.scale.dtype == np.float32
    _check_half_step(x, q)
    # A range beyond float32 (max - min = 6e38) is refused, not stored as inf.
    huge = np.array([[0.0, 1.0], [-3e38, 3e38]], np.float32)
    with pytest.raises(ValueError, match="row 1: its range max - min overflows the float32"):
        rowwise.quantize_rows(huge, bits=4, scale_dtype=np.float32)


def test_non_finite_rows_refused_with_row_index():
    x = np.zeros((4, 3), np.float32)
    x[2, 1] = np.nan
    with pytest.raises(ValueError, match="row 2"):
        rowwise.quantize_rows(x)


def test_size_arithmetic():
    assert rowwise.bytes_per_row(64, 4) == 36
    assert 36 / 256 <= 0.141
    assert rowwise.bytes_per_row(64, 8) == 68
    assert rowwise.bytes_per_row(7, 4) == 4 + 4
    assert rowwise.bytes_per_row(64, 4, np.float32) == 40
    assert rowwise.bytes_per_row(64, 32) == 256
    q = rowwise.quantize_rows(np.ones((10, 64), np.float32), bits=4)
    assert q.nbytes == 10 * 36
    # INT4 vs fp16 rows: 36 / 128 = 28%, the paper's "~40% of fp16" regime or better.
    assert rowwise.bytes_per_row(64, 4) / (64 * 2) == pytest.approx(0.28125)


def test_dequantize_gathers_requested_rows_any_shape():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((50, 9)).astype(np.float32)
    q = rowwise.quantize_rows(x, bits=4)
    full = rowwise.dequantize_rows(q)
    rows = np.array([[3, 3, 49], [0, 7, 1]])
    got = rowwise.dequantize_rows(q, rows)
    assert got.shape == (2, 3, 9) and got.dtype == np.float32
    np.testing.assert_array_equal(got, full[rows])
    with pytest.raises(ValueError, match=r"\[0, 50\)"):
        rowwise.dequantize_rows(q, np.array([50]))
    with pytest.raises(ValueError, match=r"\[0, 50\)"):
        rowwise.dequantize_rows(q, np.array([-1]))
    for bits in (4, 8):  # no rows asked for: [0, D]
        q = rowwise.quantize_rows(x, bits=bits)
        assert rowwise.dequantize_rows(q, np.array([], np.int64)).shape == (0, 9)


@pytest.mark.parametrize("bits", [4, 8])
def test_rows_of_no_values(tmp_path, bits):
    # [R, 0] ended in NumPy's 'zero-size array to reduction operation minimum which has
    # no identity' (bits=32 already gave [R, 0] back).
    q = rowwise.quantize_rows(np.zeros((3, 0), np.float32), bits=bits)
    assert (q.codes.shape, q.scale.shape, q.bias.shape) == ((3, 0), (3,), (3,))
    assert rowwise.dequantize_rows(q, np.array([2, 0])).shape == (2, 0)
    paths = rowwise.quantize_table_chunked(np.zeros((3, 0), np.float32), tmp_path, "t", bits=bits)
    assert np.load(paths["codes"]).shape == (3, 0) and np.load(paths["scale"]).tolist() == [0, 0, 0]


def test_bits32_is_plain_float():
    x = np.random.default_rng(2).standard_normal((5, 3)).astype(np.float32)
    q = rowwise.quantize_rows(x, bits=32)
    np.testing.assert_array_equal(rowwise.dequantize_rows(q, np.array([4, 0])), x[[4, 0]])


@pytest.mark.parametrize("bits", [4, 8, 32])
def test_chunked_memmap_equals_one_shot(tmp_path, bits):
    rng = np.random.default_rng(3)
    rows, dim = 1003, 13
    src = np.lib.format.open_memmap(tmp_path / "src.npy", mode="w+", dtype=np.float32, shape=(rows, dim))
    src[:] = rng.standard_normal((rows, dim)) * rng.uniform(0.01, 10, (rows, 1))
    src.flush()
    src = np.load(tmp_path / "src.npy", mmap_mode="r")
    paths = rowwise.quantize_table_chunked(src, tmp_path / "out", "user", bits=bits, chunk_rows=100)
    ref = rowwise.quantize_rows(np.asarray(src), bits=bits)
    codes = np.load(paths["codes"], allow_pickle=False)
    np.testing.assert_array_equal(codes, ref.codes)
    if bits != 32:
        np.testing.assert_array_equal(np.load(paths["scale"]), ref.scale)
        np.testing.assert_array_equal(np.load(paths["bias"]), ref.bias)
        assert np.load(paths["scale"]).dtype == np.float16
    # A path to a .npy source works too.
    paths2 = rowwise.quantize_table_chunked(tmp_path / "src.npy", tmp_path / "out2", "user", bits=bits, chunk_rows=999)
    np.testing.assert_array_equal(np.load(paths2["codes"]), ref.codes)


def test_chunked_reports_bad_row_globally(tmp_path):
    x = np.zeros((10, 2), np.float32)
    x[7, 0] = np.inf
    with pytest.raises(ValueError, match="row 7"):
        rowwise.quantize_table_chunked(x, tmp_path, "t", bits=4, chunk_rows=3)
    assert list(tmp_path.iterdir()) == []  # no partial file (zero scale = zero rows)


@pytest.mark.parametrize("name", ["a/b", "../x", ""])
def test_chunked_refuses_a_name_that_is_not_one_path_component(tmp_path, name):
    # The files were built from the name: 'a/b' and '../x' failed with a
    # FileNotFoundError on their temporary file; a table name goes through
    # fsutil.file_stems first.
    with pytest.raises(ValueError, match="must be one path component"):
        rowwise.quantize_table_chunked(np.zeros((2, 2), np.float32), tmp_path / "out", name)
    assert list(tmp_path.iterdir()) == []


def test_chunked_failure_keeps_earlier_outputs(tmp_path):
    rng = np.random.default_rng(0)
    good = rng.standard_normal((10, 4)).astype(np.float32)
    paths = rowwise.quantize_table_chunked(good, tmp_path, "t", bits=4, chunk_rows=3)
    before = {k: p.read_bytes() for k, p in paths.items()}
    bad = good.copy()
    bad[8, 1] = np.nan
    with pytest.raises(ValueError, match="row 8"):
        rowwise.quantize_table_chunked(bad, tmp_path, "t", bits=4, chunk_rows=3)
    assert {k: p.read_bytes() for k, p in paths.items()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths.values())


@pytest.mark.parametrize("bits,dim", [(4, 8), (4, 7), (8, 5), (32, 4)])
def test_jax_dequant_equals_numpy(bits, dim):
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((40, dim)) * 3).astype(np.float32)
    q = rowwise.quantize_rows(x, bits=bits)
    rows = np.array([[0, 39, 5], [5, 5, 12]], np.int32)
    want = rowwise.dequantize_rows(q, rows)
    scale = q.scale if q.scale is not None else np.zeros(40, np.float16)
    bias = q.bias if q.bias is not None else np.zeros(40, np.float16)
    fn = jax.jit(rowwise_jax.dequantize_rows_jax, static_argnames=("dim", "bits"))
    got = fn(jnp.asarray(q.codes), jnp.asarray(scale), jnp.asarray(bias), rows, dim=dim, bits=bits)
    assert got.shape == (2, 3, dim) and got.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got), want)
    # No rows (an empty request): INT4's reshape(..., -1) was a ZeroDivisionError.
    for rows in (np.zeros(0, np.int32), np.zeros((2, 0), np.int32)):
        got = fn(jnp.asarray(q.codes), jnp.asarray(scale), jnp.asarray(bias), rows, dim=dim, bits=bits)
        assert got.shape == (*rows.shape, dim) and got.dtype == jnp.float32


def test_numpy_modules_do_not_import_jax():
    code = (
        "import sys; import jax_recsys.quant.rowwise, jax_recsys.quant.artifact; "
        "assert 'jax' not in sys.modules, sorted(m for m in sys.modules if 'jax' == m[:3])"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
