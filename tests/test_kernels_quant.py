"""int8 / int4 quantisation: the formats' promises, and every kernel against its float64 reference."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minqwen.kernels.dtypes import BF16, FP16, FP32, bf16_bits, to_float32
from minqwen.kernels.quant import (
    dequantize_int4,
    dequantize_int8,
    int4_nibbles,
    matmul_int4,
    matmul_int4_reference,
    matmul_int8,
    matmul_int8_reference,
    matvec_int4,
    matvec_int4_reference,
    matvec_int8,
    matvec_int8_reference,
    quantize_int4,
    quantize_int8,
)

TOL = 1e-5  # fp32 math against float64, relative to the size of the terms summed (max_n sum_k |w x|)
seeds = st.integers(0, 2**32 - 1)
# K/32 = 1 .. 9 covers every remainder of the 4-block steps and odd/half int4 units; 896 and 4864
# are Qwen2.5-0.5B's widths.
widths = st.sampled_from([32, 64, 96, 128, 160, 192, 224, 288, 896, 4864])
kinds = st.sampled_from(["gauss", "zero_blocks", "outliers", "tiny", "offset"])


def weights(rng, N, K, kind):  # float32 [N, K] test matrices, incl. the awkward ones
    w = rng.standard_normal((N, K)).astype(np.float32) * 0.05
    if kind == "zero_blocks":  # whole blocks of zeros (and a constant block) -> scale 0
        blocks = w.reshape(N, K // 32, 32)
        blocks[rng.random((N, K // 32)) < 0.4] = 0.0
        blocks[0, 0] = 0.25
    elif kind == "outliers":  # a few weights 100x the rest, as in real LLM matrices
        idx = rng.integers(0, N * K, size=max(1, N * K // 50))
        w.reshape(-1)[idx] *= 100.0
    elif kind == "tiny":  # block scales in fp16's subnormal range
        w *= 1e-4
    elif kind == "offset":  # all-positive blocks: the int4 min is far from zero
        w = np.abs(w) + 1.0
    return w


def store(w, dtype):  # float32 -> the stored bits the loader would hand over
    if dtype == BF16:
        return bf16_bits(w)
    if dtype == FP16:
        return w.astype(np.float16).view(np.int16)
    return w


def assert_close(got, ref, scale, tol=TOL, what=""):
    diff = np.abs(got.astype(np.float64) - ref)
    scale = max(scale, 1e-30)
    assert np.all(np.isfinite(got)) and diff.max() <= tol * scale, (
        f"{what}: max|diff| {diff.max():.3g}, mean|diff| {diff.mean():.3g}, scale {scale:.3g}"
    )


def fp16(bits):
    return bits.view(np.float16).astype(np.float64)


def fp16_ulp(a):  # spacing of fp16 numbers at |a| (subnormal spacing near zero)
    return np.spacing(np.abs(a).astype(np.float16)).astype(np.float64)


# ---- the formats ----

@settings(deadline=None, max_examples=30)
@given(seed=seeds, N=st.integers(1, 20), K=widths, kind=kinds, dtype=st.sampled_from([FP32, BF16, FP16]))
def test_quantize_int8_format(seed, N, K, kind, dtype):
    w = to_float32(store(weights(np.random.default_rng(seed), N, K, kind), dtype)).astype(np.float64)
    q, scales = quantize_int8(store(w.astype(np.float32), dtype))
    assert q.dtype == np.int8 and q.shape == (N, K) and scales.dtype == FP16 and scales.shape == (N, K // 32)
    s = fp16(scales)
    absmax = np.abs(w).reshape(N, K // 32, 32).max(axis=2)
    # scale = absmax / 127 rounded *up* to fp16: not below it, and at most one fp16 step above
    assert np.all(s * 127 >= absmax * (1 - 1e-7))
    assert np.all(s <= absmax / 127 + fp16_ulp(absmax / 127))
    assert np.all(np.abs(q.astype(np.int32)) <= 127)
    assert np.all(q.reshape(N, K // 32, 32)[absmax == 0] == 0)
    # round to nearest: each weight within half a step of its grid point
    err = np.abs(dequantize_int8(q, scales) - w)
    assert np.all(err <= np.repeat(s, 32, axis=1) * (0.5 + 1e-5)), f"max err {err.max():.3g}"


@settings(deadline=None, max_examples=30)
@given(seed=seeds, N=st.integers(1, 20), K=widths, kind=kinds, dtype=st.sampled_from([FP32, BF16, FP16]))
def test_quantize_int4_format(seed, N, K, kind, dtype):
    w = to_float32(store(weights(np.random.default_rng(seed), N, K, kind), dtype)).astype(np.float64)
    q, scales, mins = quantize_int4(store(w.astype(np.float32), dtype))
    assert q.dtype == np.uint8 and q.shape == (N, K // 2)
    assert scales.dtype == mins.dtype == FP16 and scales.shape == mins.shape == (N, K // 32)
    s, m = fp16(scales), fp16(mins)
    blocks = w.reshape(N, K // 32, 32)
    lo, hi = blocks.min(axis=2), blocks.max(axis=2)
    # min rounded down, scale rounded up: the grid m + 0..15 s spans the block, tightly
    assert np.all(m <= lo) and np.all(m >= lo - fp16_ulp(lo))
    assert np.all(m + 15 * s >= hi - 1e-6 * np.abs(hi))
    assert np.all(s <= (hi - m) / 15 + fp16_ulp((hi - m) / 15))
    err = np.abs(dequantize_int4(q, scales, mins) - w)
    assert np.all(err <= np.repeat(s, 32, axis=1) * (0.5 + 1e-5) + 1e-6 * np.abs(w)), (
        f"max err {err.max():.3g}"
    )


def test_int4_nibble_order_is_the_documented_one():
    # Written from the module docstring, element by element: in a unit of W words, weight e is
    # nibble r = e // W of word j = e % W, i.e. byte 4j + r//2 of the unit, low nibble if r is even.
    rng = np.random.default_rng(0)
    for K in (32, 64, 96, 160, 896):
        q = rng.integers(0, 256, size=(3, K // 2), dtype=np.uint8)
        expected = np.empty((3, K), np.uint8)
        for n in range(3):
            for e in range(K):
                u, local = divmod(e, 64)
                W = 8 if 64 * u + 64 <= K else 4
                r, j = divmod(local, W)
                byte = q[n, 32 * u + 4 * j + r // 2]
                expected[n, e] = byte & 15 if r % 2 == 0 else byte >> 4
        np.testing.assert_array_equal(int4_nibbles(q), expected)


def test_quantisation_error_on_gaussian_weights():
    w = np.random.default_rng(1).standard_normal((256, 1024)).astype(np.float32)

    def rel(d):
        return np.sqrt(((d - w) ** 2).sum() / (w.astype(np.float64) ** 2).sum())

    e8 = rel(dequantize_int8(*quantize_int8(w)))
    e4 = rel(dequantize_int4(*quantize_int4(w)))
    # measured 0.53% and 7.8%; a symmetric [-8, 7] int4 grid would give 8.6%
    assert e8 < 0.006, e8
    assert e4 < 0.080, e4


def test_half_width_input_quantises_like_its_float32_value():
    w = weights(np.random.default_rng(2), 9, 160, "outliers")
    for dtype in (BF16, FP16):
        bits = store(w, dtype)
        for a, b in zip(quantize_int8(bits), quantize_int8(to_float32(bits))):
            np.testing.assert_array_equal(a, b)
        for a, b in zip(quantize_int4(bits), quantize_int4(to_float32(bits))):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("quantize", [quantize_int8, quantize_int4])
def test_quantize_rejects_bad_input(quantize):
    with pytest.raises(ValueError, match="K % 32"):
        quantize(np.zeros((2, 48), np.float32))
    for bad in (np.nan, np.inf):
        w = np.zeros((2, 64), np.float32)
        w[1, 5] = bad
        with pytest.raises(ValueError, match="inf or nan"):
            quantize(w)
        with pytest.raises(ValueError, match="inf or nan"):
            quantize(bf16_bits(w))
    with pytest.raises(ValueError, match="fp16"):
        quantize(np.full((2, 64), 1e9, np.float32))


# ---- the products ----

def term_scale(w, x):  # max_n sum_k |w[n,k] x[k]|: the size float32 rounding is relative to
    return float((np.abs(w) @ np.abs(x.astype(np.float64).T)).max())


@settings(deadline=None, max_examples=40)
@given(seed=seeds, N=st.integers(1, 70), K=widths, kind=kinds)
def test_matvec_int8(seed, N, K, kind):
    rng = np.random.default_rng(seed)
    q, scales = quantize_int8(weights(rng, N, K, kind))
    x = (rng.standard_normal(K) * rng.choice([1e-3, 1.0, 30.0])).astype(np.float32)
    out = np.full(N, np.nan, np.float32)
    matvec_int8(out, q, scales, x)
    w = dequantize_int8(q, scales)
    # float32 rounding, plus rounding x to int16 per block: each x moves by <= max|x in block| / 65534
    block_max = np.repeat(np.abs(x.astype(np.float64)).reshape(-1, 32).max(axis=1), 32)
    activation_error = float((np.abs(w) @ block_max).max()) / 65534
    assert_close(out, matvec_int8_reference(q, scales, x), term_scale(w, x) + activation_error / TOL)


def test_matvec_int8_activation_rounding_is_bounded_not_free():  # the bound above is tight, not vacuous
    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 896)).astype(np.float32)
    q, scales = quantize_int8(w)
    x = rng.standard_normal(896).astype(np.float32)
    out = np.empty(64, np.float32)
    matvec_int8(out, q, scales, x)
    error = (np.abs(out - matvec_int8_reference(q, scales, x)).max()
             / term_scale(dequantize_int8(q, scales), x))
    assert 1e-7 < error < 2e-5  # larger than float32 rounding alone, far below int8 weight rounding


@settings(deadline=None, max_examples=40)
@given(seed=seeds, N=st.integers(1, 70), K=widths, kind=kinds)
def test_matvec_int4(seed, N, K, kind):
    rng = np.random.default_rng(seed)
    q, scales, mins = quantize_int4(weights(rng, N, K, kind))
    x = (rng.standard_normal(K) * rng.choice([1e-3, 1.0, 30.0])).astype(np.float32)
    out = np.full(N, np.nan, np.float32)
    matvec_int4(out, q, scales, mins, x)
    assert_close(out, matvec_int4_reference(q, scales, mins, x),
                 term_scale(dequantize_int4(q, scales, mins), x))


def test_matvec_int4_any_nibbles():  # every bit pattern, not only what the quantiser produces
    rng = np.random.default_rng(3)
    for K in (64, 96, 896):
        q = rng.integers(0, 256, size=(37, K // 2), dtype=np.uint8)
        scales = store(rng.random((37, K // 32)).astype(np.float32), FP16)
        mins = store(-rng.random((37, K // 32)).astype(np.float32) * 8, FP16)
        x = rng.standard_normal(K).astype(np.float32)
        out = np.full(37, np.nan, np.float32)
        matvec_int4(out, q, scales, mins, x)
        assert_close(out, matvec_int4_reference(q, scales, mins, x),
                     term_scale(dequantize_int4(q, scales, mins), x))


@settings(deadline=None, max_examples=25)
@given(seed=seeds, T=st.integers(1, 9), N=st.integers(1, 70), K=widths, kind=kinds,
       tile_floats=st.sampled_from([1, 300, 1 << 20]), column_slice=st.booleans())
def test_matmul_int8(seed, T, N, K, kind, tile_floats, column_slice):
    rng = np.random.default_rng(seed)
    q, scales = quantize_int8(weights(rng, N, K, kind))
    x = rng.standard_normal((T, K)).astype(np.float32)
    # the model writes q, k and v into column slices of one wider output
    wide = np.full((T, N + 5), np.nan, np.float32)
    out = wide[:, 2:2 + N] if column_slice else np.full((T, N), np.nan, np.float32)
    matmul_int8(out, x, q, scales, tile_floats=tile_floats)
    assert_close(out, matmul_int8_reference(x, q, scales), term_scale(dequantize_int8(q, scales), x))
    if column_slice:
        assert np.isnan(wide[:, :2]).all() and np.isnan(wide[:, 2 + N:]).all()


@settings(deadline=None, max_examples=25)
@given(seed=seeds, T=st.integers(1, 9), N=st.integers(1, 70), K=widths, kind=kinds,
       tile_floats=st.sampled_from([1, 300, 1 << 20]), column_slice=st.booleans())
def test_matmul_int4(seed, T, N, K, kind, tile_floats, column_slice):
    rng = np.random.default_rng(seed)
    q, scales, mins = quantize_int4(weights(rng, N, K, kind))
    x = rng.standard_normal((T, K)).astype(np.float32)
    wide = np.full((T, N + 5), np.nan, np.float32)
    out = wide[:, 2:2 + N] if column_slice else np.full((T, N), np.nan, np.float32)
    matmul_int4(out, x, q, scales, mins, tile_floats=tile_floats)
    assert_close(out, matmul_int4_reference(x, q, scales, mins),
                 term_scale(dequantize_int4(q, scales, mins), x))
    if column_slice:
        assert np.isnan(wide[:, :2]).all() and np.isnan(wide[:, 2 + N:]).all()
