"""The kernels of the instruction layer: integer dot-product decode (kernels/intdot.py), the bf16 prefill
micro-kernel (kernels/gemm.py), and the layer itself (kernels/simd.py).

Every path the test machine's CPU has runs here against float64 references; the AVX-512 path, which this
machine may lack, is compiled (never run) for a Zen 4 target in a child process, and its machine code
must hold the instructions it is for and no call (a misspelt intrinsic compiles to a call to nowhere).
"""
import subprocess
import sys

import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType as GGML
from gguf.quants import dequantize, quantize
from hypothesis import given, settings
from hypothesis import strategies as st

from minqwen.kernels import isa
from minqwen.kernels.dtypes import bf16_bits, to_float32
from minqwen.kernels.jit import jit
from minqwen.kernels.simd import dot_s8, dot_u8s8, field, fp16s, hsum, izeros, join, load, nibbles, to_float

pytestmark = pytest.mark.skipif(isa.ISA == "generic",
                                reason="the CPU has no AVX2: these kernels are never used")
if isa.ISA != "generic":  # imported only where the CPU has the instructions, as the engine does
    from minqwen.kernels.gemm import matmul_bf16
    from minqwen.kernels.intdot import matvec_q4, matvec_q4_k, matvec_q6_k, matvec_q8_0, quantize_activations

seeds = st.integers(0, 2**32 - 1)
BYTES = {GGML.Q8_0: 34, GGML.Q4_0: 18, GGML.Q4_1: 20, GGML.Q4_K: 144, GGML.Q6_K: 210}
SCALE_AT = {GGML.Q4_K: (0, 2), GGML.Q6_K: (208,)}  # byte offsets of the fp16 scales in a K-quant block


def random_blocks(rng, N, K, kind):
    """Q8_0 / Q4_0 / Q4_1 as gguf quantises Gaussian weights; K-quants as random bytes with valid fp16
    super-block scales (every bit pattern of the rest is a valid block)."""
    if kind in SCALE_AT:
        data = rng.integers(0, 256, (N, K // 256 * BYTES[kind]), dtype=np.uint8)
        blocks = data.reshape(N, K // 256, BYTES[kind])
        for at in SCALE_AT[kind]:
            blocks[:, :, at:at + 2] = (rng.uniform(1e-4, 2e-2, (N, K // 256)).astype(np.float16)
                                       .view(np.uint8).reshape(N, K // 256, 2))
        return data
    return quantize((rng.standard_normal((N, K)) * 0.05).astype(np.float32), kind).reshape(N, -1)


def run(kind, data, x):
    K = x.shape[0]
    xq, xd, xsum = np.empty(K, np.int8), np.empty(K // 32, np.float32), np.empty(K // 32, np.float32)
    xq16 = np.empty(K // 16, np.int32)
    quantize_activations(xq, xd, xsum, xq16, x)
    out = np.full(data.shape[0], np.nan, np.float32)
    if kind == GGML.Q8_0:
        matvec_q8_0(out, data, xq, xd)
    elif kind in (GGML.Q4_0, GGML.Q4_1):
        matvec_q4(out, data, xq, xd, xsum, xq16, kind == GGML.Q4_1)
    elif kind == GGML.Q4_K:
        matvec_q4_k(out, data, xq, xd, xsum)
    else:
        matvec_q6_k(out, data, xq, xd, xq16)
    step = np.repeat(xd.astype(np.float64), 32)  # xd of each element's block
    return out, xq.astype(np.float64) * step, step


def minimum_term(kind, data, K):
    """The part of each weight that does not scale with q (Q4_1's m, Q4_K's -dmin m_j), per weight:
    the weights of the same blocks with every q set to zero."""
    zero = data.copy().reshape(data.shape[0], -1, BYTES[kind])
    if kind == GGML.Q4_1:
        zero[:, :, 4:] = 0
    elif kind == GGML.Q4_K:
        zero[:, :, 16:] = 0
    else:
        return np.zeros((data.shape[0], K))
    return dequantize(zero.reshape(data.shape[0], -1), kind).reshape(data.shape[0], K).astype(np.float64)


@settings(deadline=None, max_examples=30)
@given(seed=seeds, N=st.sampled_from([1, 3, 17, 64]), blocks=st.sampled_from([1, 2, 3, 5, 7]),
       kind=st.sampled_from(sorted(BYTES)))
def test_integer_matvec_is_the_product_with_int8_activations(seed, N, blocks, kind):
    """Exact to float rounding against the product with the same int8-rounded x (the minimum terms use
    exact block sums of x, as the kernels do), and within the rounding of x of the exact product."""
    rng = np.random.default_rng(seed)
    K = blocks * (256 if kind in SCALE_AT else 32)
    data = random_blocks(rng, N, K, kind)
    x = (rng.standard_normal(K) * rng.choice([0.01, 1.0, 30.0])).astype(np.float32)
    out, x_rounded, x_step = run(kind, data, x)
    w = dequantize(data, kind).reshape(N, K).astype(np.float64)
    floor = minimum_term(kind, data, K)
    same_x = (w - floor) @ x_rounded + floor @ x.astype(np.float64)
    terms = np.abs(w) @ np.abs(x.astype(np.float64))
    diff = np.abs(out - same_x)
    assert diff.max() <= 1e-5 * terms.max(), (f"{kind.name}: max|diff| {diff.max():.3g}, "
                                              f"mean {diff.mean():.3g}")
    # x rounded to int8 per block (steps of xd) moves each product by at most sum |w - floor| xd / 2
    bound = np.abs(w - floor) @ (x_step / 2)
    assert np.all(np.abs(out - w @ x.astype(np.float64)) <= bound + 1e-5 * terms.max())


@jit
def lane_ops(a, b, packed, halves):  # every vector intrinsic once, reduced to scalars
    s8 = hsum(to_float(dot_s8(izeros(8), load(a, 0, 32), load(b, 0, 32))))
    u8 = hsum(to_float(dot_u8s8(izeros(8), nibbles(packed, 0, 32), load(b, 0, 32))))
    six_bit = join(field(load(packed, 0, 32), 4, 15), field(load(packed, 0, 32), 0, 3), 4)
    six = hsum(to_float(dot_u8s8(izeros(8), six_bit, load(b, 0, 32))))
    return s8, u8, six, hsum(fp16s(halves, 0, 4))


def test_vector_intrinsics():
    rng = np.random.default_rng(0)
    a, b = (rng.integers(-127, 128, 32).astype(np.int8) for _ in range(2))
    packed = rng.integers(0, 256, 32, dtype=np.uint8)
    halves = rng.standard_normal(16).astype(np.float16)
    s8, u8, six, fp = lane_ops(a, b, packed, halves.view(np.uint8))
    wide = b.astype(np.int64)
    assert s8 == a.astype(np.int64) @ wide
    assert u8 == np.concatenate([packed[:16] & 15, packed[:16] >> 4]).astype(np.int64) @ wide
    assert six == ((packed >> 4) | ((packed & 3) << 4)).astype(np.int64) @ wide
    assert fp == pytest.approx(float(halves[::2].astype(np.float64).sum()), rel=1e-6)


AVX512_PROBE = """
import numpy as np
from minqwen.kernels.intdot import matvec_q4_k, matvec_q8_0
from numba import njit
from minqwen.kernels.simd import dot_s8, dot_u8s8, izeros, load, to_float, hsum

@njit  # not kernels.jit's: a function defined in -c code cannot be cached
def probe(a, b):
    return hsum(to_float(dot_u8s8(dot_s8(izeros(8), load(a, 0, 32), load(b, 0, 32)), load(a, 32, 32),
                                  load(b, 0, 32))))

q, xq = np.zeros((2, 34 * 8), np.uint8), np.zeros(256, np.int8)
xd, out = np.ones(8, np.float32), np.empty(2, np.float32)
for kernel, args in ((probe, (q[0], xq)), (matvec_q8_0, (out, q, xq, xd)),
                     (matvec_q4_k, (out, np.zeros((2, 144), np.uint8), xq, xd, xd))):
    kernel.compile(tuple(kernel.typeof_pyval(a) for a in args))
print("".join(probe.inspect_asm().values()))
"""


def test_avx512_path_compiles_to_vnni(tmp_path):
    """On a Zen 4 target (AVX-512 with VNNI) the same kernels compile each dot product to one vpdpbusd."""
    features = ("+sse4.2,+popcnt,+avx,+avx2,+fma,+f16c,+bmi2,"
                "+avx512f,+avx512bw,+avx512vl,+avx512dq,+avx512vnni")
    env = {"NUMBA_CPU_NAME": "znver4", "NUMBA_CPU_FEATURES": features, "NUMBA_CACHE_DIR": str(tmp_path),
           "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", AVX512_PROBE], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    native = result.stdout.split(".Lfunc_end0")[0]  # the probe itself (Numba's Python wrapper follows)
    assert native.count("vpdpbusd") == 2 and "vpmaddubsw" not in native
    assert "call" not in native  # a misspelt intrinsic would be a call to nowhere


@settings(deadline=None, max_examples=25)
@given(seed=seeds, T=st.sampled_from([1, 5, 6, 7, 65, 130]), N=st.sampled_from([1, 15, 16, 17, 40, 300]),
       K=st.sampled_from([1, 3, 64, 200]), strided=st.booleans())
def test_bf16_gemm_micro_kernel(seed, T, N, K, strided):
    """Tiles of 6 tokens and the token remainder, whole and partial panels of 16 columns, into a column
    slice of a wider array."""
    rng = np.random.default_rng(seed)
    w = bf16_bits(rng.standard_normal((N, K)).astype(np.float32))
    x = rng.standard_normal((T, K)).astype(np.float32)
    wide = np.full((T, N + 5), np.nan, np.float32)
    out = wide[:, 2:N + 2] if strided else wide[:, :N]
    matmul_bf16(out, x, w)
    ref = x.astype(np.float64) @ to_float32(w).astype(np.float64).T
    terms = np.abs(x.astype(np.float64)) @ np.abs(to_float32(w).astype(np.float64)).T
    diff = np.abs(out - ref)
    assert diff.max() <= 1e-5 * terms.max(), f"max|diff| {diff.max():.3g}, mean {diff.mean():.3g}"
    untouched = np.delete(wide, np.s_[2:N + 2] if strided else np.s_[:N], axis=1)
    assert np.isnan(untouched).all()  # nothing else written
