"""GGML block kernels on random blocks, against the float64 reference and gguf-py's dequantisation."""
import gguf
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numba.typed import List

from minqwen.kernels.dtypes import BF16, FP16, FP32, bf16_bits, from_float32, to_float32
from minqwen.kernels.embedding import embed
from minqwen.kernels.ggml import (
    GGML_BLOCKS,
    MXFP4,
    Q4_1,
    Q8_0,
    GgmlMatrix,
    dequantize_ggml,
    dequantize_ggml_reference,
    matmul_ggml,
    matvec_ggml,
    matvec_ggml_reference,
    quantize_q4_1,
    quantize_q8_0,
)
from minqwen.kernels.linear import INTEGER_TOKENS, INTEGER_TYPES, linear
from minqwen.kernels.moe import moe_by_expert, moe_one_token, moe_one_token_reference

TOL = 1e-5  # fp32 sums against float64, relative to the size of the terms summed (max_n sum_k |w x|)
seeds = st.integers(0, 2**32 - 1)
types = st.sampled_from(sorted(GGML_BLOCKS))
FP16_AT = {2: [0], 3: [0, 2], 6: [0], 7: [0, 2], 8: [0], 10: [80, 82], 11: [108], 12: [0, 2], 13: [0, 2],
           14: [208], 16: [0], 17: [0], 18: [0], 20: [0], 21: [0], 22: [0], 23: [0],
           39: []}  # byte offsets of each type's fp16 numbers in its block (MXFP4: an E8M0 byte at 0)


@st.composite
def shapes(draw, ggml_type=None):  # (type, N, K): K around the 128-weight steps, Qwen's 896 and 4864
    t = draw(types) if ggml_type is None else ggml_type
    blocks = [1, 2, 3, 4, 5, 7, 18, 28, 152] if GGML_BLOCKS[t][0] == 32 else [1, 2, 3, 19]
    return t, draw(st.sampled_from([1, 2, 3, 7])), GGML_BLOCKS[t][0] * draw(st.sampled_from(blocks))


def random_blocks(rng, N, K, ggml_type):
    """Random bytes, with the fp16 numbers (scales, mins) finite and of varied magnitude: some zero,
    some subnormal, the rest anywhere in fp16's normal range up to 2**8, either sign. MXFP4's scale
    2^(e - 128) likewise: e = 0 and 1 (subnormal in float32) and 2^-30 .. 2^8 (tests/test_kernels_iquants.py
    takes every e, up to the ones whose weights overflow float32)."""
    E, B = GGML_BLOCKS[ggml_type]
    data = rng.integers(0, 256, (N, K // E, B), dtype=np.uint8)
    if ggml_type == MXFP4:
        data[..., 0] = np.where(rng.random((N, K // E)) < 0.1, rng.integers(0, 2, (N, K // E)),
                                rng.integers(128 - 30, 128 + 9, (N, K // E)))
    for o in FP16_AT[ggml_type]:
        exponent = rng.integers(0, 24, (N, K // E))  # biased: 0 is zero / subnormal, 23 is 2**8
        bits = (rng.integers(0, 2, (N, K // E)) << 15) | (exponent << 10) | rng.integers(0, 1024, (N, K // E))
        bits[rng.random((N, K // E)) < 0.1] = 0
        data[..., o:o + 2] = bits.astype(np.uint16).view(np.uint8).reshape(N, K // E, 2)
    return GgmlMatrix(data.reshape(N, -1), ggml_type, K)


def assert_close(got, ref, scale, what=""):
    diff = np.abs(got.astype(np.float64) - ref)
    assert np.isfinite(got).all() and np.all(diff <= TOL * np.maximum(scale, 1e-30)), (
        f"{what}: max|diff| {diff.max():.3g}, mean|diff| {diff.mean():.3g}, scale {np.max(scale):.3g}")


def column_scale(w):  # [N, K] -> max |w| over each run of 32 weights, per weight (the rounding's size)
    N, K = w.shape
    return np.repeat(np.abs(w).reshape(N, K // 32, 32).max(axis=-1), 32, axis=-1)


def test_the_block_table_is_ggmls():
    """GGML_BLOCKS, the one table of block sizes (the GGUF reader takes its sizes of these types from it),
    against gguf-py's GGML_QUANT_SIZES, written independently from ggml's own."""
    for t, (weights, nbytes) in GGML_BLOCKS.items():
        assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(t)] == (weights, nbytes), t


@settings(deadline=None, max_examples=60)
@given(seed=seeds, shape=shapes())
def test_dequantize_ggml(seed, shape):
    """Every weight: the kernels' frame against the float64 reference and against gguf-py."""
    t, N, K = shape
    w = random_blocks(np.random.default_rng(seed), N, K, t)
    ref = dequantize_ggml_reference(w.data, t, K)
    got = dequantize_ggml(w)
    assert got.shape == w.shape == (N, K) and got.dtype == np.float32
    assert_close(got, ref, 0.1 * column_scale(ref), f"dequantize_ggml type {t}")
    theirs = gguf.quants.dequantize(w.data, t).reshape(N, K)
    assert_close(theirs, ref, 0.1 * column_scale(ref), f"gguf-py type {t}")


@settings(deadline=None, max_examples=60)
@given(seed=seeds, shape=shapes())
def test_matvec_ggml(seed, shape):
    t, N, K = shape
    rng = np.random.default_rng(seed)
    w = random_blocks(rng, N, K, t)
    x = (rng.standard_normal(K) * rng.choice([1e-3, 1.0, 30.0])).astype(np.float32)
    out = np.full(N, np.nan, np.float32)
    matvec_ggml(out, w.data, t, x)
    terms = np.abs(dequantize_ggml_reference(w.data, t, K)) @ np.abs(x.astype(np.float64))
    assert_close(out, matvec_ggml_reference(w.data, t, x), terms.max(), f"matvec_ggml type {t}")


@settings(deadline=None, max_examples=30)
@given(seed=seeds, shape=shapes(), T=st.sampled_from([2, 3, 64, 65]),
       tile_floats=st.sampled_from([1, 300, 1 << 20]))
def test_matmul_ggml_and_linear(seed, shape, T, tile_floats):
    """Prefill: dequantised tiles through BLAS, tile edges anywhere, into a column slice of a wider
    output (as q, k and v share one); `linear` picks matvec_ggml for one token, matmul_ggml for more."""
    t, N, K = shape
    rng = np.random.default_rng(seed)
    w = random_blocks(rng, N, K, t)
    x = rng.standard_normal((T, K)).astype(np.float32)
    dense = dequantize_ggml_reference(w.data, t, K)
    ref, terms = x.astype(np.float64) @ dense.T, np.abs(x.astype(np.float64)) @ np.abs(dense).T
    wide = np.full((T, N + 5), np.nan, np.float32)
    matmul_ggml(wide[:, 2:N + 2], x, w, tile_floats)
    assert_close(wide[:, 2:N + 2], ref, terms.max(), f"matmul_ggml type {t}")
    assert np.isnan(wide[:, :2]).all() and np.isnan(wide[:, N + 2:]).all()
    for rows in (slice(0, 1), slice(0, T)):
        wide[:] = np.nan
        linear(wide[rows, 2:N + 2], x[rows], w)
        if rows.stop <= INTEGER_TOKENS and t in INTEGER_TYPES:  # x rounded to int16 per block of 32 (intdot)
            for i in range(rows.stop):
                step = np.repeat(np.abs(x[i].astype(np.float64)).reshape(-1, 32).max(1) / 32767, 32)
                bound = np.abs(dense) @ (step / 2) + 1e-5 * terms.max()
                assert np.all(np.abs(wide[i, 2:N + 2] - ref[i]) <= bound), f"linear type {t}, integer path"
        else:
            assert_close(wide[rows, 2:N + 2], ref[rows], terms.max(), f"linear type {t}")


@settings(deadline=None, max_examples=15)
@given(seed=seeds, t=types, k=st.integers(1, 3), T=st.sampled_from([1, 5]))
def test_moe_with_ggml_experts(seed, t, k, T):
    """Experts as GGUF stores them: stacked 3-D tensors, handed over as per-expert 2-D views; read row
    by row (moe_one_token, through linear.row_dot) or grouped by expert (moe_by_expert, through linear)."""
    rng = np.random.default_rng(seed)
    E, D, F = 4, 256, 512  # D and F: whole blocks of every type
    stacked = [random_blocks(rng, E * rows, cols, t) for rows, cols in ((F, D), (F, D), (D, F))]
    gate, up, down = ([GgmlMatrix(m.data.reshape(E, -1, m.data.shape[1])[e], t, m.cols) for e in range(E)]
                      for m in stacked)
    x = (0.1 * rng.standard_normal((T, D))).astype(np.float32)
    experts = np.stack([rng.permutation(E)[:k] for _ in range(T)]).astype(np.int64)
    weights = rng.random((T, k)).astype(np.float32)
    dense = [[dequantize_ggml_reference(m.data, t, m.cols) for m in ms] for ms in (gate, up, down)]
    ref = np.stack([moe_one_token_reference(x[t_], *dense, experts[t_], weights[t_]) for t_ in range(T)])
    got = np.empty((T, D), np.float32)
    for t_ in range(T):
        moe_one_token(got[t_], np.empty((k, F), np.float32), x[t_], List(gate), List(up), List(down),
                      experts[t_], weights[t_])
    scale = np.abs(ref).max()  # (measured <= 5e-7 of it)
    assert_close(got, ref, scale, f"moe_one_token, type {t} experts")
    moe_by_expert(got, x, gate, up, down, experts, weights)
    if t in INTEGER_TYPES:  # an expert chosen by one token decodes it: x rounded to int16 (intdot.py)
        scale = scale * 3e-2 / TOL  # measured up to 1.1e-2 of the output's range on these random blocks
    assert_close(got, ref, scale, f"moe_by_expert, type {t} experts")


# ---- minqwen's quantisers: GGML's bytes ----

def weights(rng, N, K, kind):  # float32 [N, K]: N(0, 0.05), or with one of the cases quantisers trip on
    w = rng.normal(0.0, 0.05, (N, K)).astype(np.float32)
    blocks = w.reshape(N, K // 32, 32)
    if kind == "zero_blocks":  # all-zero blocks (d = 0) and a constant one (Q4_1: max = min)
        blocks[rng.random(blocks.shape[:2]) < 0.4] = 0.0
        blocks[0, 0] = 0.25
    elif kind == "outliers":  # one weight in 50 a hundred times the rest, as in trained matrices
        w.flat[rng.integers(0, N * K, N * K // 50 + 1)] *= 100.0
    elif kind == "tiny":  # block scales in fp16's subnormal range
        w *= 1e-4
    elif kind == "halves":  # w / d lands on .5 exactly: roundf's ties (away from zero) decide
        w[:] = rng.integers(-254, 255, (N, K)) / 2
        w[:, ::32] = 127.0
    return w


@settings(deadline=None, max_examples=40)
@given(seed=seeds, N=st.integers(1, 9), K=st.sampled_from([32, 64, 96, 160, 896]),
       kind=st.sampled_from(["gauss", "zero_blocks", "outliers", "tiny", "halves"]),
       dtype=st.sampled_from([FP32, np.dtype(np.float64), BF16, FP16]))
def test_quantizers_write_ggml_bytes(seed, N, K, kind, dtype):
    """quantize_q8_0 / quantize_q4_1 write byte for byte what gguf-py (llama.cpp's reference) writes
    for the same float32 weights; half-width input is its float32 value."""
    w = weights(np.random.default_rng(seed), N, K, kind)
    stored = w.astype(np.float64) if dtype == np.float64 else from_float32(w, dtype)
    as_float32 = to_float32(stored)
    for quantize, t in ((quantize_q8_0, Q8_0), (quantize_q4_1, Q4_1)):
        m = quantize(stored)
        assert m.ggml_type == t and m.shape == (N, K) and m.data.dtype == np.uint8
        np.testing.assert_array_equal(m.data, gguf.quants.quantize(as_float32, t))


def test_quantisation_error_on_gaussian_weights():
    w = np.random.default_rng(1).standard_normal((64, 1024)).astype(np.float32)
    for quantize, bound in ((quantize_q8_0, 0.006), (quantize_q4_1, 0.08)):  # measured 0.53%, 7.8%
        d = dequantize_ggml(quantize(w)) - w
        assert np.sqrt((d.astype(np.float64) ** 2).sum() / (w.astype(np.float64) ** 2).sum()) < bound


@pytest.mark.parametrize("quantize", [quantize_q8_0, quantize_q4_1])
def test_quantize_rejects_bad_input(quantize):
    with pytest.raises(ValueError, match="K % 32"):
        quantize(np.zeros((2, 48), np.float32))
    for bad in (np.nan, np.inf):
        w = np.zeros((2, 64), np.float32)
        w[1, 5] = bad
        for stored in (w, bf16_bits(w), w.astype(np.float16).view(np.int16)):
            with pytest.raises(ValueError, match="inf or nan"):
                quantize(stored)
    with pytest.raises(ValueError, match="fp16"):
        quantize(np.full((2, 64), 1e9, np.float32))


@settings(deadline=None, max_examples=10)
@given(seed=seeds, t=types)
def test_embedding_rows_of_blocks(seed, t):
    """GGUF files quantise their embedding tables too (SmolLM2's is Q8_0): a token's row, dequantised."""
    rng = np.random.default_rng(seed)
    table = random_blocks(rng, 50, 256, t)
    ids = rng.integers(0, 50, 7)
    out = np.full((7, 256), np.nan, np.float32)
    embed(out, table, ids)
    np.testing.assert_array_equal(out, dequantize_ggml_reference(table.data, t, 256)[ids].astype(np.float32))
