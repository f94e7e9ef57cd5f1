"""Products with a weight matrix stored as bf16, fp16 or fp32: y = W x, one kernel per use.

Decoding one token (T = 1) reads every weight once and does two flops per weight, so it is
bound by memory bandwidth: `matvec` streams the stored 16-bit weights and widens them in
registers, moving half the bytes of an fp32 copy. Prefill (T > 1) reuses each weight T times, so
it is bound by flops: `matmul` widens W a tile at a time and lets BLAS do the multiplication.
In between, a few tokens (a short chat turn, an MoE expert chosen by a handful of a prompt's
tokens) are served by `matmul_few`: widening all of W for so few products costs more than the
products, so it streams W once, like matvec, and multiplies each row by every token.
"""
import numpy as np
from numba import prange

from .dtypes import FP32, to_float32, widen
from .jit import jit, pjit

TILE_FLOATS = 1 << 20  # prefill widens W in tiles of at most 4 MB of float32, whatever its shape


@jit
def float_row_dot(w_row, x):  # w_row: [K] bf16/fp16/fp32 bits, x: [K] float32 -> float32
    """sum_k w_row[k] x[k]"""
    # A plain scalar sum: fastmath allows LLVM to reorder it, so it becomes 4 x 8 float32 lanes of
    # FMAs fed by widening loads (vpmovzxwd + vpslld for bf16, vcvtph2ps for fp16).
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
    """out[t, n] = sum_k x[t,k] w[n,k]    (for a few tokens T; the same product as matmul, whose
    matmul_reference is its reference too)"""
    T, K = x.shape
    N = w.shape[0]
    T4 = T - T % 4
    for pair in prange((N + 1) // 2):  # each thread streams its own rows of W once, as in matvec
        n = 2 * pair
        single_from, rows_end = 0, n + 1  # an odd last row takes every token one at a time
        if n + 1 < N:
            # Two rows by four tokens: each widened weight feeds four FMAs and each x element two,
            # in eight accumulators; both rows (a few KB) stay in L1 for the next four tokens.
            for t in range(0, T4, 4):
                a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = np.float32(0.0)
                for k in range(K):
                    wa, wb = widen(w[n, k]), widen(w[n + 1, k])
                    x0, x1, x2, x3 = x[t, k], x[t + 1, k], x[t + 2, k], x[t + 3, k]
                    a0, a1, a2, a3 = a0 + wa * x0, a1 + wa * x1, a2 + wa * x2, a3 + wa * x3
                    b0, b1, b2, b3 = b0 + wb * x0, b1 + wb * x1, b2 + wb * x2, b3 + wb * x3
                out[t, n], out[t + 1, n], out[t + 2, n], out[t + 3, n] = a0, a1, a2, a3
                out[t, n + 1], out[t + 1, n + 1], out[t + 2, n + 1], out[t + 3, n + 1] = b0, b1, b2, b3
            single_from, rows_end = T4, n + 2
        for m in range(n, rows_end):  # the last T % 4 tokens
            for t in range(single_from, T):
                acc = np.float32(0.0)
                for k in range(K):
                    acc += widen(w[m, k]) * x[t, k]
                out[t, m] = acc


@jit
def widen_rows(out_tile, w_rows):  # out_tile: [B, K] float32, w_rows: [B, K] any stored dtype
    """out_tile[b, k] = float32(w_rows[b, k])"""
    # Serial on purpose: it alternates with BLAS calls, and after a parallel region Numba's
    # OpenMP threads keep spinning and fight OpenBLAS's threads for the cores (measured 3-8x
    # slower prefill matmuls on 2 cores). Widening is ~1/T of the tile's multiply anyway.
    B, K = w_rows.shape
    for b in range(B):
        for k in range(K):
            out_tile[b, k] = widen(w_rows[b, k])


def matmul_tiled(out, x, shape, float32_rows, tile_floats=TILE_FLOATS):
    # out: [T, N] float32, x: [T, K] float32, shape: (N, K) of W; float32_rows(tile, r0, r1) writes rows
    # r0..r1-1 of W, as float32, into tile[:r1 - r0]
    """out[t, n] = sum_k x[t,k] w[n,k]    (out = x @ w.T, for T > 1, W in any stored format): a block of
    rows of W widened (or dequantised) into a float32 tile at a time, which BLAS multiplies into the
    matching columns of out; memory stays at one tile (at most 4 MB) whatever the shape of W."""
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
