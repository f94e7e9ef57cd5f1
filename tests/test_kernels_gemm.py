"""The prefill micro-kernels (kernels/gemm.py) and the intrinsics they add to kernels/simd.py, against
float64 references: every stored format the engine multiplies (bf16, fp16, FP8 blocks, every GGML type),
partial panels and token tiles (matmul_bf16's remainders of 4 rows and 4 tokens), a strided output; the
float kernel to float32 rounding, the int16, int8 and bf16 ones to the product of both operands rounded as
they round them, and to the bound that rounding keeps to. matmul_amx runs on AMX where the CPU grants it, and
everywhere on emulated tiles (tests/amx_emulation.py)."""
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_kernels_ggml import random_blocks

from minqwen.kernels import isa
from minqwen.kernels.dtypes import BF16, FP16, from_float32, to_float32
from minqwen.kernels.fp8 import Fp8Matrix, dequantize_fp8
from minqwen.kernels.ggml import GGML_BLOCKS, dequantize_ggml
from minqwen.kernels.jit import jit
from minqwen.kernels.linear import FEW_TOKENS, linear
from minqwen.kernels.simd import abs_max, load, round16, splat32, store

pytestmark = pytest.mark.skipif(isa.ISA == "generic", reason="the CPU has no AVX2: this kernel is never used")
if isa.ISA != "generic":
    from minqwen.kernels.gemm import (
        INT8_LEVELS,
        INT16_LEVELS,
        LANES,
        OFFSET,
        PAIRS,
        QUADS,
        TINY,
        XTYPES,
        matmul_amx,
        matmul_bf16,
        matmul_bf16_reference,
        matmul_integer_reference,
        matmul_panels,
        matmul_panels_reference,
    )

seeds = st.integers(0, 2**32 - 1)
FORMATS = ["bf16", "fp16", "fp8"] + sorted(GGML_BLOCKS)


def random_matrix(rng, fmt, N, K):  # -> (the stored matrix, W as float32)
    if fmt in ("bf16", "fp16"):
        w = from_float32(rng.standard_normal((N, K)).astype(np.float32), BF16 if fmt == "bf16" else FP16)
        return w, to_float32(w)
    if fmt == "fp8":
        w = Fp8Matrix(rng.integers(0, 256, (N, K), dtype=np.uint8) & 0xF7,  # no NaN (0x7f / 0xff)
                      rng.uniform(1e-3, 1.0, (-(-N // 128), -(-K // 128))).astype(np.float32), 128)
        return w, dequantize_fp8(w)
    w = random_blocks(rng, N, K, fmt)
    return w, dequantize_ggml(w)


shapes = dict(seed=seeds, fmt=st.sampled_from(FORMATS), T=st.sampled_from([1, 5, 6, 7, 13, 130]),
              N=st.sampled_from([1, 15, 16, 17, 40]), blocks=st.sampled_from([1, 2, 3, 7]),
              strided=st.booleans())


def prefill(seed, fmt, T, N, blocks, strided, mode):  # -> x, W dequantised, out (and all of it, wide)
    rng = np.random.default_rng(seed)
    K = blocks * (GGML_BLOCKS[fmt][0] if fmt in GGML_BLOCKS else 32)
    w, dense = random_matrix(rng, fmt, N, K)
    x = (rng.standard_normal((T, K)) * rng.choice([1e-3, 1.0, 50.0])).astype(np.float32)
    x[:, rng.random(K) < 0.1] = 0  # a block may be all zero
    wide = np.full((T, N + 5), np.nan, np.float32)
    out = wide[:, 2:N + 2] if strided else wide[:, :N]
    if mode in ("bf16", "amx"):
        (matmul_bf16 if mode == "bf16" else matmul_amx)(out, x, w)
    else:
        matmul_panels(out, x, w, XTYPES[mode])
    untouched = np.delete(wide, np.s_[2:N + 2] if strided else np.s_[:N], axis=1)
    assert np.isnan(untouched).all()  # nothing else written
    return x, dense, out


@settings(deadline=None, max_examples=40)
@given(**shapes)
def test_the_float_kernel_is_the_product(seed, fmt, T, N, blocks, strided):
    """To float32 rounding against x W^T in float64, W dequantised (every format's own tests hold that)."""
    x, dense, out = prefill(seed, fmt, T, N, blocks, strided, "float")
    terms = np.abs(x.astype(np.float64)) @ np.abs(dense.astype(np.float64)).T
    diff = np.abs(out - matmul_panels_reference(x, dense))
    assert diff.max() <= 1e-5 * terms.max(), f"{fmt}: max|diff| {diff.max():.3g}, mean {diff.mean():.3g}"


INTEGER_PREFILLS = {"int16": INT16_LEVELS, "int8": INT8_LEVELS}
RUNS = [p for p in INTEGER_PREFILLS if p in isa.PREFILLS]  # int8 needs VNNI at the prefill's width


def half_step(a, levels):  # half the rounding step of each element's block (all of it, where it rounds to 0)
    m = np.abs(a).reshape(a.shape[0], -1, 32).max(axis=2)
    return np.repeat(np.where(m < TINY, m, m / (2 * levels)), 32, axis=1)


@pytest.mark.parametrize("mode", RUNS)
@settings(deadline=None, max_examples=60)
@given(**shapes)
def test_the_integer_kernels_are_the_product_of_both_rounded(mode, seed, fmt, T, N, blocks, strided):
    """To float rounding against the product of x and W rounded to int16 / int8 per block
    (matmul_integer_reference); against the exact x W^T within what the rounding moves: each operand by half
    a step of its block."""
    x, dense, out = prefill(seed, fmt, T, N, blocks, strided, mode)
    levels = INTEGER_PREFILLS[mode]
    x64, w64 = x.astype(np.float64), dense.astype(np.float64)
    terms = np.abs(x64) @ np.abs(w64).T
    diff = np.abs(out - matmul_integer_reference(x, dense, levels))
    assert diff.max() <= 1e-5 * terms.max(), f"{fmt}: max|diff| {diff.max():.3g}, mean {diff.mean():.3g}"
    x_moves, w_moves = half_step(x64, levels), half_step(w64, levels)
    bound = x_moves @ np.abs(w64).T + np.abs(x64) @ w_moves.T + x_moves @ w_moves.T
    assert np.all(np.abs(out - x64 @ w64.T) <= bound + 1e-5 * terms.max()), fmt


def assert_bf16_product(seed, fmt, T, N, blocks, strided, mode):  # mode: "bf16" (vdpbf16ps) or "amx"
    x, dense, out = prefill(seed, fmt, T, N, blocks, strided, mode)
    x64, w64 = x.astype(np.float64), dense.astype(np.float64)
    terms = np.abs(x64) @ np.abs(w64).T
    diff = np.abs(out - matmul_bf16_reference(x, dense))
    assert diff.max() <= 1e-5 * terms.max(), f"{fmt}: max|diff| {diff.max():.3g}, mean {diff.mean():.3g}"
    assert np.all(np.abs(out - x64 @ w64.T) <= (2.0**-7 + 2.0**-16) * terms + 1e-5 * terms.max()), fmt


# the bf16 kernels this CPU runs: matmul_bf16 on AVX512-BF16, matmul_amx where isa.py has AMX granted
BF16_RUNS = ["bf16"] * (isa.ISA == "avx512" and "avx512bf16" in isa.FEATURES) + ["amx"] * isa.AMX


@pytest.mark.parametrize("mode", BF16_RUNS)
@settings(deadline=None, max_examples=60)
@given(**shapes)
def test_the_bf16_kernels_are_the_product_of_both_rounded(mode, seed, fmt, T, N, blocks, strided):
    """To float32 rounding against the product of x and W rounded to bf16 (matmul_bf16_reference: vdpbf16ps'
    and tdpbf16ps' products are exact in float32); against the exact x W^T within 2^-7 (+ 2^-16) of the terms
    (bf16 has 8 significant bits: rounding to nearest moves each operand by at most 2^-8 of itself)."""
    assert_bf16_product(seed, fmt, T, N, blocks, strided, mode)


EMULATED_AMX = """
import amx_emulation  # noqa: F401  (gemm's tile instructions emulated, before matmul_amx compiles)
from hypothesis import given, settings
from test_kernels_gemm import assert_bf16_product, shapes

@settings(deadline=None, max_examples=40)
@given(**shapes)
def amx(seed, fmt, T, N, blocks, strided):
    assert_bf16_product(seed, fmt, T, N, blocks, strided, "amx")

amx()
print("held")
"""


@pytest.mark.skipif(isa.ISA != "avx512", reason="matmul_amx runs on the avx512 path (every AMX CPU has it)")
def test_the_amx_kernel_on_emulated_tiles_is_the_product_of_both_rounded(tmp_path):
    """matmul_amx's own code (its tiles, offsets and strides, the panels' layout) with each AMX instruction
    emulated as Intel's manual defines it (tests/amx_emulation.py), on the shapes and formats above: this CPU
    need not have AMX. On a CPU that has it, the test above runs the instructions themselves."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path), "NUMBA_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", EMULATED_AMX], cwd=os.path.dirname(__file__), env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0 and result.stdout.strip() == "held", result.stderr[-3000:]


@pytest.mark.skipif("bf16" not in isa.PREFILLS, reason="no AVX512-BF16: isa.py refuses MINQWEN_PREFILL=bf16")
@pytest.mark.parametrize("fmt", ["bf16", "fp16", "fp8"])
@pytest.mark.parametrize("T", [2, 5, FEW_TOKENS + 3])
def test_linear_sends_the_bf16_mode_to_a_bf16_kernel(monkeypatch, fmt, T):
    """With MINQWEN_PREFILL=bf16, linear multiplies every product of 2 tokens or more with x and W rounded to
    bf16 (matmul_bf16, matmul_amx where isa.AMX), also past FEW_TOKENS and into a column slice of out: the
    bf16 product to float32 rounding (the exact product lies 4e-4 to 1.4e-3 of the largest term from it here;
    without the mode all nine cases fail)."""
    monkeypatch.setattr(isa, "PREFILL", "bf16")
    rng = np.random.default_rng(T)
    N, K = 37, 96
    w, dense = random_matrix(rng, fmt, N, K)
    x = rng.standard_normal((T, K)).astype(np.float32)
    wide = np.full((T, N + 5), np.nan, np.float32)
    linear(wide[:, 2:N + 2], x, w)
    terms = np.abs(x.astype(np.float64)) @ np.abs(dense.astype(np.float64)).T
    assert np.abs(wide[:, 2:N + 2] - matmul_bf16_reference(x, dense)).max() <= 1e-5 * terms.max(), fmt
    assert np.isnan(wide[:, :2]).all() and np.isnan(wide[:, N + 2:]).all()


def extreme_rows(rng, rows, K):  # row i: blocks of kind i % 8
    a = rng.standard_normal((rows, K)).astype(np.float32)
    signs = np.where(rng.random(K) < 0.5, -1, 1).astype(np.float32)
    for i in range(rows):
        a[i] = [0 * signs,  # all zero
                a[i] * (TINY / 8),  # below TINY: rounds to zero
                TINY * signs,  # at TINY: every value the block's largest, +-levels
                a[i] * np.float32(1e15),  # large (products near 1e32)
                np.where(np.arange(K) % 32 == 5, -3.0, 0),  # one value among zeros
                rng.integers(-127, 128, K) * np.float32(0.5),  # int8 levels exactly, steps of 0.5
                np.where(np.arange(K) % 32 == 0, 127, np.arange(K) % 32 - 15.5),  # int8: ties (d = 1)
                a[i]][i % 8]
    return a


@pytest.mark.parametrize("mode", RUNS)
def test_the_integer_kernels_at_the_extremes(mode):
    """Rows of blocks all zero, below TINY (rounded to zero), at TINY, of large values, one value among zeros,
    on int8's levels, rounding to ties, every pairing of them in x and W: the reference to float rounding,
    products below float32's range (TINY^2) aside (the int8 kernel's + OFFSET and its start at
    -OFFSET sum wq cancel exactly, whatever the levels)."""
    rng = np.random.default_rng(7)
    K, T, N = 4 * 32, 13, 2 * LANES + 3
    x, w = extreme_rows(rng, T, K), extreme_rows(rng, N, K)
    out = np.full((T, N), np.nan, np.float32)
    matmul_panels(out, x, w, XTYPES[mode])
    terms = np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64)).T
    diff = np.abs(out - matmul_integer_reference(x, w, INTEGER_PREFILLS[mode]))
    worst = np.unravel_index(np.argmax(diff / (terms + 1e-35)), diff.shape)
    assert np.all(diff <= 1e-5 * terms + 1e-35), f"kinds {worst[0] % 8}, {worst[1] % 8}"


@jit
def intrinsic_ops(values, pairs, quads, out16, out8):
    # round16 and abs_max of a vector of values; splat32 of pairs[2:4] and of quads[4:8]
    v = load(values, 0, LANES)
    store(out16, 0, round16(v))
    store(out16, LANES, splat32(pairs, 2, PAIRS))
    store(out8, 0, splat32(quads, 4, QUADS))
    return abs_max(v)


@settings(deadline=None, max_examples=30)
@given(seed=seeds)
def test_round16_abs_max_and_splat32(seed):
    """round16 rounds to the nearest integer with ties to even (np.rint), abs_max is max|v|, splat32 repeats
    one int16 pair, or four bytes, in every 32-bit lane."""
    rng = np.random.default_rng(seed)
    values = (rng.standard_normal(LANES) * 1000).astype(np.float32)
    values[: LANES // 4] = rng.integers(-100, 100, LANES // 4) + 0.5  # ties
    pairs = rng.integers(-32768, 32768, 4).astype(np.int16)
    quads = rng.integers(0, 256, 9).astype(np.uint8)
    out16, out8 = np.zeros(3 * LANES, np.int16), np.zeros(QUADS, np.uint8)
    assert intrinsic_ops(values, pairs, quads, out16, out8) == np.abs(values).max()
    np.testing.assert_array_equal(out16[:LANES], np.rint(values).astype(np.int16))
    np.testing.assert_array_equal(out16[LANES:3 * LANES], np.tile(pairs[2:4], LANES))
    np.testing.assert_array_equal(out8, np.tile(quads[4:8], LANES))


def test_levels_keep_a_blocks_products_in_int32():
    """32 products of two extreme levels, the most a block's dot product sums in one int32 lane (int8: x's
    bytes + OFFSET, up to 255, and the start at -OFFSET sum wq)."""
    assert 32 * int(INT16_LEVELS) ** 2 < 2**31
    assert 32 * 255 * int(INT8_LEVELS) + OFFSET * 32 * int(INT8_LEVELS) < 2**31
