"""The codebook block types (IQ4_NL, IQ4_XS, MXFP4 and the i-quant grids) on their own: their constant
tables against gguf-py's, every type against the float64 reference and gguf-py on random blocks, the
extreme scales (fp16's largest and subnormal, MXFP4's every E8M0 byte). test_kernels_ggml.py runs them
through the products (matvec, prefill tiles, linear, MoE experts, embeddings) with the other types."""
import gguf
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_kernels_ggml import assert_close, column_scale, random_blocks, seeds

from minqwen.kernels import ggml_grids
from minqwen.kernels.ggml import (
    E8M0_HALF,
    GGML_BLOCKS,
    IQ2_S,
    IQ2_XS,
    IQ2_XXS,
    IQ3_S,
    IQ3_XXS,
    IQ4_LEVELS,
    IQ4_NL,
    IQ4_XS,
    KSIGNS,
    MXFP4,
    MXFP4_LEVELS,
    GgmlMatrix,
    dequantize_ggml,
    dequantize_ggml_reference,
    matvec_ggml,
    matvec_ggml_reference,
)

CODEBOOK_TYPES = [IQ4_NL, IQ4_XS, MXFP4, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S]
GRID_TYPES = {"IQ2_XXS": IQ2_XXS, "IQ2_XS": IQ2_XS, "IQ2_S": IQ2_S, "IQ3_XXS": IQ3_XXS, "IQ3_S": IQ3_S}


def theirs(data, t, K):  # gguf-py's dequantisation, [N, K] float32
    return gguf.quants.dequantize(data, t).reshape(data.shape[0], K)


def test_the_tables_are_ggmls():
    """kernels/ggml_grids.py was generated from gguf-py once; the small tables are written out in
    kernels/ggml.py: all against gguf-py (which transcribes ggml-common.h)."""
    for name, t in GRID_TYPES.items():
        cls = getattr(gguf.quants, name)
        cls.init_grid()
        grid = getattr(ggml_grids, f"{name}_GRID")
        assert grid.shape == cls.grid_shape
        np.testing.assert_array_equal(grid, cls.grid.reshape(cls.grid_shape), name)
    np.testing.assert_array_equal(KSIGNS, np.frombuffer(gguf.quants.IQ2_XXS.ksigns, np.uint8))
    np.testing.assert_array_equal(IQ4_LEVELS, gguf.quants.IQ4_NL.kvalues)
    np.testing.assert_array_equal(MXFP4_LEVELS, gguf.quants.MXFP4.kvalues)
    every_byte = np.arange(256, dtype=np.uint8)
    np.testing.assert_array_equal(E8M0_HALF, gguf.quants.MXFP4.e8m0_to_fp32_half(every_byte))


@pytest.mark.parametrize("t", CODEBOOK_TYPES)
@settings(deadline=None, max_examples=12)
@given(seed=seeds, N=st.sampled_from([1, 2, 5]), blocks=st.sampled_from([1, 2, 3, 5, 19]))
def test_codebook_types(t, seed, N, blocks):
    """Every weight against the float64 reference and gguf-py; the float kernels' matvec against the
    reference (IQ4_NL / IQ4_XS decode on integer dot products where the CPU has them: see
    test_kernels_simd.py)."""
    K = GGML_BLOCKS[t][0] * blocks
    rng = np.random.default_rng(seed)
    w = random_blocks(rng, N, K, t)
    ref = dequantize_ggml_reference(w.data, t, K)
    got = dequantize_ggml(w)
    assert_close(got, ref, 0.1 * column_scale(ref), f"dequantize_ggml type {t}")
    np.testing.assert_array_equal(got, theirs(w.data, t, K))  # the same float32 products, in gguf-py's order
    x = (rng.standard_normal(K) * rng.choice([1e-3, 1.0, 30.0])).astype(np.float32)
    out = np.full(N, np.nan, np.float32)
    matvec_ggml(out, w.data, t, x)
    terms = np.abs(ref) @ np.abs(x.astype(np.float64))
    assert_close(out, matvec_ggml_reference(w.data, t, x), terms.max(), f"matvec_ggml type {t}")


@pytest.mark.parametrize("t", sorted(set(CODEBOOK_TYPES) - {MXFP4}))
@settings(deadline=None, max_examples=8)
@given(seed=seeds, d=st.sampled_from([65504.0, -65504.0, 2.0**-24, -(2.0**-24), 6.1e-5, 0.0, -0.0]))
def test_extreme_fp16_scales(t, seed, d):
    """fp16's largest and smallest (subnormal) scales and both zeros in every block: what gguf-py
    computes, and the reference up to float32 rounding."""
    E, B = GGML_BLOCKS[t]
    data = np.random.default_rng(seed).integers(0, 256, (3, 4, B), dtype=np.uint8)
    data[..., :2] = np.array([d], np.float16).view(np.uint8)
    data = data.reshape(3, -1)
    got = dequantize_ggml(GgmlMatrix(data, t, 4 * E))
    ref = dequantize_ggml_reference(data, t, 4 * E)
    np.testing.assert_array_equal(got, theirs(data, t, 4 * E))
    assert np.all(np.abs(got - ref) <= 1e-6 * np.abs(ref)), f"type {t}, d = {d}"


def test_mxfp4_every_scale():
    """Every E8M0 byte with every level: 2^(e - 128) times the doubled E2M1 value, exactly; weights past
    float32's range (e >= 253 with the largest levels) are inf, as in gguf-py and llama.cpp."""
    e = np.repeat(np.arange(256, dtype=np.uint8), 2)  # two blocks per scale, each with all 16 levels
    qs = np.tile(np.arange(256, dtype=np.uint8).reshape(16, 16), (32, 1))  # low nibbles 0..15
    data = np.concatenate([e[:, None], qs], axis=1).reshape(1, -1)
    K = 512 * 32
    got = dequantize_ggml(GgmlMatrix(data, MXFP4, K))
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(got, theirs(data, MXFP4, K))
        np.testing.assert_array_equal(got, dequantize_ggml_reference(data, MXFP4, K).astype(np.float32))
    assert got[0, 1] == 2.0**-128 and np.isinf(got).any()  # e = 0 (float32 subnormal), e = 255
