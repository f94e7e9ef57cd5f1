"""Prefill with bf16 weights: out = x @ W^T for many tokens, on a register-blocked micro-kernel.

Prefill reuses each weight T times, so it is bound by floating-point throughput: the best a kernel can do
is keep the FMA units busy with operands already in registers. The micro-kernel holds a tile of 6 tokens x
16 output columns of `out` in 12 vector registers (8 float32 lanes each) and walks K:

    per k:  16 weights W[c..c+16, k] (one 32-byte load, widened in registers: 2 instructions)
            6 x values x[t..t+6, k] (broadcast)           ->  12 FMAs into the tile

so every weight loaded feeds 6 FMAs and every x value 2. The weights come from a panel: W's rows c..c+16
repacked per call, k by k, into 8 words of two bf16 each (word j of k holds W[c+j, k] low and W[c+8+j, k]
high), so one load yields both 8-lane halves (kernels/simd.py's bf16_pair). Packing reads W once per call
(1/T of the work) and needs no float32 copy of W: the panel (K x 32 bytes) stays in L1/L2 for all tokens.
Each thread takes whole panels. A remainder of T % 6 tokens runs one token at a time.

Against widening tiles of W to float32 for BLAS (matmul.matmul), this reads W's 2 bytes a weight once,
not 4 bytes T/tile times, and keeps BLAS's thread pool from fighting Numba's for the cores.
"""
import numpy as np
from numba import prange

from .jit import jit, pjit
from .matmul import matmul_reference
from .simd import bf16_pair, fma, fzeros, splat_at, store

TILE_TOKENS = 6


@jit
def pack_panel(panel, w, first_row):  # panel: [K, 8] uint32 out, w: [N, K] bf16 bits (uint16)
    """panel[k, j] = W[first_row + j, k] | W[first_row + 8 + j, k] << 16   (rows past N: 0)"""
    N, K = w.shape
    for j in range(8):
        low = first_row + j
        high = first_row + 8 + j
        for k in range(K):
            word = np.uint32(w[low, k]) if low < N else np.uint32(0)
            if high < N:
                word |= np.uint32(w[high, k]) << np.uint32(16)
            panel[k, j] = word


@jit
def tile_6x16(out, row_stride, x, t0, panel, c):  # out (flat offsets), x: [T, K] C-contiguous
    """out[t0 + i, c + j] = sum_k x[t0 + i, k] W[c + j, k]   for i < 6, j < 16"""
    K = x.shape[1]
    a0, b0, a1, b1, a2, b2 = fzeros(8), fzeros(8), fzeros(8), fzeros(8), fzeros(8), fzeros(8)
    a3, b3, a4, b4, a5, b5 = fzeros(8), fzeros(8), fzeros(8), fzeros(8), fzeros(8), fzeros(8)
    flat = x.reshape(-1)
    for k in range(K):
        low, high = bf16_pair(panel, 8 * k)
        o = t0 * K + k
        v = splat_at(flat, o, 8)
        a0, b0 = fma(v, low, a0), fma(v, high, b0)
        v = splat_at(flat, o + K, 8)
        a1, b1 = fma(v, low, a1), fma(v, high, b1)
        v = splat_at(flat, o + 2 * K, 8)
        a2, b2 = fma(v, low, a2), fma(v, high, b2)
        v = splat_at(flat, o + 3 * K, 8)
        a3, b3 = fma(v, low, a3), fma(v, high, b3)
        v = splat_at(flat, o + 4 * K, 8)
        a4, b4 = fma(v, low, a4), fma(v, high, b4)
        v = splat_at(flat, o + 5 * K, 8)
        a5, b5 = fma(v, low, a5), fma(v, high, b5)
    o = t0 * row_stride + c
    store(out, o, a0)
    store(out, o + 8, b0)
    store(out, o + row_stride, a1)
    store(out, o + row_stride + 8, b1)
    store(out, o + 2 * row_stride, a2)
    store(out, o + 2 * row_stride + 8, b2)
    store(out, o + 3 * row_stride, a3)
    store(out, o + 3 * row_stride + 8, b3)
    store(out, o + 4 * row_stride, a4)
    store(out, o + 4 * row_stride + 8, b4)
    store(out, o + 5 * row_stride, a5)
    store(out, o + 5 * row_stride + 8, b5)


@jit
def tile_1x16(out, row_stride, x, t, panel, c):
    """out[t, c + j] = sum_k x[t, k] W[c + j, k]   for j < 16"""
    K = x.shape[1]
    a, b = fzeros(8), fzeros(8)
    flat = x.reshape(-1)
    for k in range(K):
        low, high = bf16_pair(panel, 8 * k)
        v = splat_at(flat, t * K + k, 8)
        a, b = fma(v, low, a), fma(v, high, b)
    store(out, t * row_stride + c, a)
    store(out, t * row_stride + c + 8, b)


@jit
def panel_product(out, row_stride, x, panel, c):  # every token of x times one panel, into out[:, c:c+16]
    T = x.shape[0]
    full = T - T % TILE_TOKENS
    for t0 in range(0, full, TILE_TOKENS):
        tile_6x16(out, row_stride, x, t0, panel, c)
    for t in range(full, T):
        tile_1x16(out, row_stride, x, t, panel, c)


@pjit
def matmul_bf16(out, x, w):  # out: [T, N] f32 (rows may be strided), x: [T, K] C-contiguous, w: [N, K] bf16
    """out[t, n] = sum_k x[t, k] w[n, k]"""
    T, K = x.shape
    N = w.shape[0]
    for p in prange((N + 15) // 16):
        panel = np.empty((K, 8), np.uint32)
        pack_panel(panel, w, 16 * p)
        if 16 * p + 16 <= N:
            panel_product(out, out.strides[0] // 4, x, panel, 16 * p)
        else:  # the last, partial panel: through a scratch tile, then the columns that exist
            scratch = np.empty((T, 16), np.float32)
            panel_product(scratch, 16, x, panel, 0)
            out[:, 16 * p:] = scratch[:, :N - 16 * p]


matmul_bf16_reference = matmul_reference  # x @ W^T in float64, W widened exactly: the product of matmul.py
