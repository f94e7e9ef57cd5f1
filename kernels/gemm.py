"""Prefill: out = x @ W^T for many tokens, W in any stored format, on register-blocked micro-kernels.

Prefill reuses each weight T times, so it is bound by arithmetic: keep the vector units busy with operands
already in registers. W is taken a panel of LANES rows (one vector's lanes) at a time, dequantised to
float32 (ggml.py, fp8.py, dtypes.py: one kernel serves every format) and laid out k by k; TILE_TOKENS
tokens x LANES rows of out stay in registers while k walks, so every weight loaded feeds 6 multiply-adds:

    float (default)   per k: one load of the panel, then per token one FMA with x[t, k] broadcast
    int16 (opt-in)    per k-pair: one load, then per token one dot_s16 with (xq[t, k], xq[t, k + 1]);
                      per block of 32: per token to_float, times the two scales, one FMA

The int16 kernel rounds both operands per block of 32 along k, x[t, k] ~= xd[t, b] xq[t, k] and
W[n, k] ~= wd[n, b] wq[n, k] with |xq|, |wq| <= LEVELS, for vpdpwssd's twice the multiply-adds of an FMA.
LEVELS = 8191 is the most that keeps a block's 32 products in int32 (32 * 8191^2 < 2^31); it moves each
value by up to 1/16382 of its block's largest, which the tests' random hybrids amplify past their bars
(isa.PREFILL): an option, not the default. Each thread takes whole panels, which stay in L1 / L2.
"""
import numpy as np
from numba import prange, types
from numba.extending import overload

from .fp8 import Fp8Matrix, dequantize_fp8_rows
from .ggml import GgmlMatrix, dequantize_ggml_rows
from .isa import ISA
from .jit import jit, pjit
from .matmul import matmul_reference, widen_rows
from .simd import (
    abs_max,
    dot_s16,
    fma,
    fzeros,
    izeros,
    load,
    round16,
    splat,
    splat32,
    splat_at,
    store,
    to_float,
    transpose32,
)

LANES = 16 if ISA == "avx512" else 8  # rows of a panel: the int32 lanes of one vector
PAIRS = 2 * LANES  # its int16 lanes (Numba takes a global as a compile-time constant, not an expression)
TILE_TOKENS = 6
LEVELS = np.float32(8191.0)
TINY = np.float32(2.0**-100)  # a block whose largest |value| is below this rounds to zero: LEVELS / max
# would overflow float32 (and max / LEVELS be subnormal) near 2^-113; its products, < 2^-100 |x|, are noise


@jit
def quantize_blocks(q, d, values):  # q: [K] int16, d: [K/32] float32 (outputs), values: [K] float32
    """d[b] = max|values in block b| / LEVELS,  q = round(values / d)   (0 and 0 below TINY)"""
    for b in range(values.shape[0] // 32):
        m = np.float32(0.0)
        for i in range(32 * b, 32 * b + 32, LANES):
            m = max(m, abs_max(load(values, i, LANES)))
        d[b] = m / LEVELS if m >= TINY else np.float32(0.0)
        inverse = splat(LEVELS / m if m >= TINY else np.float32(0.0), LANES)
        for i in range(32 * b, 32 * b + 32, LANES):
            store(q, i, round16(load(values, i, LANES) * inverse))


@jit
def pack_panel(panel, wd, rows):  # panel: [K LANES] int16, wd: [K/32, LANES] float32 (out); rows: [LANES, K]
    """rows rounded per block, k-pair by k-pair: panel[(k/2) 2 LANES + 2 r + k % 2] = wq[r, k],
    wd[b, r] = its scale"""
    K = rows.shape[1]
    q, d = np.empty((LANES, K), np.int16), np.empty((LANES, K // 32), np.float32)
    for r in range(LANES):
        quantize_blocks(q[r], d[r], rows[r])
    wd[:] = d.T
    by_k(panel.view(np.uint32), q.reshape(-1).view(np.uint32), K // 2)  # a k-pair of a row is one word


@jit
def by_k(panel, rows, K):  # panel: [K * LANES] 32-bit words (out), rows: [LANES * K] 32-bit words
    """panel[k LANES + r] = rows[r K + k]: LANES rows laid out k by k"""
    for c in range(0, K, LANES):  # K is a multiple of LANES (of 32 weights, or of their 16 pairs)
        transpose32(panel, c * LANES, rows, c, K, LANES)


@jit
def tile_floats(result, panel, x, t0):  # result: [TILE_TOKENS, LANES] float32 out; x: [T, K] float32
    """result[i, r] = sum_k x[t0 + i, k] W[r, k]   (i < 6; panel[k LANES + r] = W[r, k])"""
    K = x.shape[1]
    flat = x.reshape(-1)
    f0 = f1 = f2 = f3 = f4 = f5 = fzeros(LANES)
    for k in range(K):
        w, o = load(panel, k * LANES, LANES), t0 * K + k
        f0, f1 = fma(splat_at(flat, o, LANES), w, f0), fma(splat_at(flat, o + K, LANES), w, f1)
        f2, f3 = fma(splat_at(flat, o + 2 * K, LANES), w, f2), fma(splat_at(flat, o + 3 * K, LANES), w, f3)
        f4, f5 = fma(splat_at(flat, o + 4 * K, LANES), w, f4), fma(splat_at(flat, o + 5 * K, LANES), w, f5)
    store_tile(result, f0, f1, f2, f3, f4, f5)


@jit
def store_tile(result, f0, f1, f2, f3, f4, f5):  # result: [TILE_TOKENS, LANES] float32
    out = result.reshape(-1)
    for i, f in enumerate((f0, f1, f2, f3, f4, f5)):
        store(out, i * LANES, f)


@jit
def tile_tokens(result, panel, wd, xq, xd, t0):  # result: [TILE_TOKENS, LANES] float32 out; xq: [T, K] int16
    """result[i, r] = sum_b xd[t0 + i, b] wd[b, r] sum_{k in b} xq[t0 + i, k] wq[r, k]   (i < 6)"""
    K = xq.shape[1]
    x = xq.reshape(-1)
    f0 = f1 = f2 = f3 = f4 = f5 = fzeros(LANES)
    for b in range(K // 32):
        i0 = i1 = i2 = i3 = i4 = i5 = izeros(LANES)
        for k in range(32 * b, 32 * b + 32, 2):
            w, o = load(panel, k * LANES, PAIRS), t0 * K + k
            i0 = dot_s16(i0, w, splat32(x, o, PAIRS))
            i1 = dot_s16(i1, w, splat32(x, o + K, PAIRS))
            i2 = dot_s16(i2, w, splat32(x, o + 2 * K, PAIRS))
            i3 = dot_s16(i3, w, splat32(x, o + 3 * K, PAIRS))
            i4 = dot_s16(i4, w, splat32(x, o + 4 * K, PAIRS))
            i5 = dot_s16(i5, w, splat32(x, o + 5 * K, PAIRS))
        scales = load(wd, b * LANES, LANES)
        f0 = fma(to_float(i0), scales * splat(xd[t0, b], LANES), f0)
        f1 = fma(to_float(i1), scales * splat(xd[t0 + 1, b], LANES), f1)
        f2 = fma(to_float(i2), scales * splat(xd[t0 + 2, b], LANES), f2)
        f3 = fma(to_float(i3), scales * splat(xd[t0 + 3, b], LANES), f3)
        f4 = fma(to_float(i4), scales * splat(xd[t0 + 4, b], LANES), f4)
        f5 = fma(to_float(i5), scales * splat(xd[t0 + 5, b], LANES), f5)
    store_tile(result, f0, f1, f2, f3, f4, f5)


def float32_rows(tile, w, first):
    """tile[r, k] = W[first + r, k] as float32, W in any stored format (callable from compiled kernels)"""
    raise NotImplementedError("float32_rows is only callable from compiled kernels")


@overload(float32_rows, inline="always")
def _float32_rows(tile, w, first):
    if isinstance(w, types.Array):
        return lambda tile, w, first: widen_rows(tile, w[first:first + tile.shape[0]])
    if isinstance(w, types.BaseNamedTuple) and w.instance_class is Fp8Matrix:
        return lambda tile, w, first: dequantize_fp8_rows(tile, w.q[first:first + tile.shape[0]], w.scales,
                                                          first, w.block_rows)
    if isinstance(w, types.BaseNamedTuple) and w.instance_class is GgmlMatrix:
        return lambda tile, w, first: dequantize_ggml_rows(tile, w.data[first:first + tile.shape[0]],
                                                           w.ggml_type)
    return None


@pjit
def matmul_panels(out, x, w, integer):
    # out: [T, N] float32 (rows may be strided), x: [T, K] float32, K % 32 == 0,
    # w: [N, K] bf16 / fp16 / fp32 bits, Fp8Matrix or GgmlMatrix; integer: the int16 kernel, else float
    """out[t, n] = sum_k x[t, k] W[n, k]   (integer: both rounded to int16 per block of 32)"""
    T, K = x.shape
    N = out.shape[1]
    padded = (T + TILE_TOKENS - 1) // TILE_TOKENS * TILE_TOKENS  # the last tile's missing tokens are zero
    quantized, floats = (padded, 0) if integer else (0, padded)  # tokens in the one form the kernel reads
    xq, xd = np.zeros((quantized, K), np.int16), np.zeros((quantized, K // 32), np.float32)
    xf = np.zeros((floats, K), np.float32)
    for t in prange(T):
        if integer:
            quantize_blocks(xq[t], xd[t], x[t])
        else:
            xf[t] = x[t]
    for p in prange((N + LANES - 1) // LANES):
        first, rows = LANES * p, min(LANES, N - LANES * p)
        weights = np.zeros((LANES, K), np.float32)  # rows past N: zero
        float32_rows(weights[:rows], w, first)
        panel, wd = np.empty(K * LANES, np.float32), np.empty((K // 32, LANES), np.float32)
        if integer:
            pack_panel(panel.view(np.int16)[:K * LANES], wd, weights)
        else:
            by_k(panel.view(np.uint32), weights.reshape(-1).view(np.uint32), K)
        result = np.empty((TILE_TOKENS, LANES), np.float32)
        for t0 in range(0, T, TILE_TOKENS):
            if integer:
                tile_tokens(result, panel.view(np.int16), wd, xq, xd, t0)
            else:
                tile_floats(result, panel, xf, t0)
            out[t0:t0 + TILE_TOKENS, first:first + rows] = result[:min(TILE_TOKENS, T - t0), :rows]


def matmul_int16_reference(x, w):  # [T, K] float32, [N, K] float32 (W dequantised) -> [T, N] float64
    """x @ w.T in float64 of x and w rounded as matmul_panels' int16 kernel rounds them (the scales in
    float32, as there)"""
    def rounded(a):  # -> levels, scales per block
        blocks = a.astype(np.float32).reshape(a.shape[0], -1, 32)
        m = np.abs(blocks).max(axis=2, keepdims=True)
        m[m < TINY] = 0
        inverse = np.divide(LEVELS, m, out=np.zeros_like(m), where=m > 0)
        return (np.rint(blocks * inverse) * (m / LEVELS).astype(np.float64)).reshape(a.shape)
    return rounded(x) @ rounded(w).T


matmul_panels_reference = matmul_reference  # the float kernel: x @ W^T in float64 (matmul.py)
