"""Products with a weight matrix stored as bf16, fp16 or fp32: y = W x, one kernel per use.

Decoding one token (T = 1) reads every weight once and does two flops per weight, so it is bound by memory
bandwidth: `matvec` streams the stored 16-bit weights and widens them in registers, moving half the bytes of
an fp32 copy. Prefill (T > 1) reuses each weight T times, so it is bound by flops: `matmul` widens W a tile at
a time and lets BLAS do the multiplication. Up to a few hundred tokens (a prompt, an MoE expert's share of
one) `matmul_few` does better: it streams W once, like matvec, widening in registers, and multiplies 4 rows
by 4 tokens at a time with k in the vector lanes (linear.py's FEW_TOKENS says up to where).
"""
import numpy as np
from numba import prange

from .dtypes import FP32, to_float32, widen
from .jit import jit, pjit

TILE_FLOATS = 1 << 20  # prefill widens W in tiles of at most 4 MB of float32, whatever its shape


@jit
def float_row_dot(w_row, x):  # w_row: [K] bf16/fp16/fp32 bits, x: [K] float32 -> float32
    """sum_k w_row[k] x[k]"""
    # fastmath reorders this sum into 4 x 8 lanes of FMAs on widening loads (vpmovzxwd + vpslld / vcvtph2ps)
    acc = np.float32(0.0)
    for k in range(w_row.shape[0]):
        acc += widen(w_row[k]) * x[k]
    return acc


@pjit
def matvec(out, w, x):  # out: [N] float32, w: [N, K] bf16/fp16/fp32 bits, x: [K] float32
    """out[n] = sum_k w[n,k] x[k]"""
    # Numba hands each thread one contiguous block of rows, so each streams its own part of W.
    for n in prange(w.shape[0]):
        out[n] = float_row_dot(w[n], x)


@pjit
def matmul_few(out, x, w):  # out: [T, N] float32, x: [T, K] float32, w: [N, K] bf16/fp16/fp32 bits
    """out[t, n] = sum_k x[t,k] w[n,k]    (T up to a few hundred; matmul_reference is its reference)"""
    (T, K), N = x.shape, w.shape[0]
    Q, T4 = N // 4, T - T % 4
    for i in prange(Q + N % 4):  # each thread streams its own rows of W once, as in matvec
        # Rows a quarter of W apart: four streams the prefetcher follows; past Q, a row left over, four times.
        a, step = i + 3 * Q * (i >= Q), Q * (i < Q)
        b, c, d = a + step, a + 2 * step, a + 3 * step
        for t in range(0, T4, 4):  # by four tokens: each widened weight feeds four FMAs, each x element four
            a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = c0 = c1 = c2 = c3 = d0 = d1 = d2 = d3 = np.float32(0.0)
            for k in range(K):
                wa, wb, wc, wd = widen(w[a, k]), widen(w[b, k]), widen(w[c, k]), widen(w[d, k])
                x0, x1, x2, x3 = x[t, k], x[t + 1, k], x[t + 2, k], x[t + 3, k]
                a0, a1, a2, a3 = a0 + wa * x0, a1 + wa * x1, a2 + wa * x2, a3 + wa * x3
                b0, b1, b2, b3 = b0 + wb * x0, b1 + wb * x1, b2 + wb * x2, b3 + wb * x3
                c0, c1, c2, c3 = c0 + wc * x0, c1 + wc * x1, c2 + wc * x2, c3 + wc * x3
                d0, d1, d2, d3 = d0 + wd * x0, d1 + wd * x1, d2 + wd * x2, d3 + wd * x3
            out[t, a], out[t + 1, a], out[t + 2, a], out[t + 3, a] = a0, a1, a2, a3
            out[t, b], out[t + 1, b], out[t + 2, b], out[t + 3, b] = b0, b1, b2, b3
            out[t, c], out[t + 1, c], out[t + 2, c], out[t + 3, c] = c0, c1, c2, c3
            out[t, d], out[t + 1, d], out[t + 2, d], out[t + 3, d] = d0, d1, d2, d3
        for t in range(T4, T):  # the last T % 4 tokens, one at a time (the rows are in cache after the first)
            a0 = b0 = c0 = d0 = np.float32(0.0)
            for k in range(K):
                a0, b0 = a0 + widen(w[a, k]) * x[t, k], b0 + widen(w[b, k]) * x[t, k]
                c0, d0 = c0 + widen(w[c, k]) * x[t, k], d0 + widen(w[d, k]) * x[t, k]
            out[t, a], out[t, b], out[t, c], out[t, d] = a0, b0, c0, d0


@jit
def widen_rows(out_tile, w_rows):  # out_tile: [B, K] float32, w_rows: [B, K] any stored dtype
    """out_tile[b, k] = float32(w_rows[b, k])"""
    # Serial: between BLAS calls, Numba's spinning threads would fight BLAS's; widening is ~1/T of the work.
    B, K = w_rows.shape
    for b in range(B):
        for k in range(K):
            out_tile[b, k] = widen(w_rows[b, k])


def matmul_tiled(out, x, shape, float32_rows, tile_floats=TILE_FLOATS):  # out: [T, N] f32, x: [T, K] f32
    """out[t, n] = sum_k x[t,k] w[n,k]    (out = x @ w.T, for T > 1, W [N, K] = shape in any stored format):
    float32_rows(tile, r0, r1) widens (or dequantises) rows r0..r1-1 of W into tile[:r1 - r0], which BLAS
    multiplies into those columns of out; memory stays at one tile (at most 4 MB) whatever the shape of W."""
    N, K = shape
    rows = max(1, min(N, tile_floats // K))
    tile = np.empty((rows, K), dtype=np.float32)
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        float32_rows(tile[: r1 - r0], r0, r1)
        # np.matmul (unlike np.dot) writes into a column slice of out directly, still through BLAS sgemm.
        np.matmul(x, tile[: r1 - r0].T, out=out[:, r0:r1])


def matmul(out, x, w, tile_floats=TILE_FLOATS):  # out: [T, N] f32, x: [T, K] f32, w: [N, K] bf16/fp16/fp32
    """out[t, n] = sum_k x[t,k] w[n,k]    (out = x @ w.T, for T > 1)"""
    if w.dtype == FP32:
        np.matmul(x, w.T, out=out)  # BLAS sgemm, also when out is a column slice of a wider array
    else:
        matmul_tiled(out, x, w.shape, lambda tile, r0, r1: widen_rows(tile, w[r0:r1]), tile_floats)


def matvec_reference(w, x):  # [N, K] stored dtype, [K] -> [N] float64
    return to_float32(w).astype(np.float64) @ x.astype(np.float64)


def matmul_reference(x, w):  # [T, K], [N, K] stored dtype -> [T, N] float64
    return x.astype(np.float64) @ to_float32(w).astype(np.float64).T
