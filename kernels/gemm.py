"""Prefill: out = x @ W^T for many tokens, W in any stored format, on register-blocked micro-kernels.

Prefill reuses each weight T times, so it is bound by arithmetic: keep the vector units busy with operands
already in registers. W is taken a panel of LANES rows (one vector's lanes) at a time, dequantised to float32
(ggml.py, fp8.py, dtypes.py: one kernel serves every format) and laid out k by k; TILE_TOKENS tokens x
LANES rows of out stay in registers while k walks, so each weight feeds 6 products:

    float (default)   per k: one load of the panel, then per token one FMA with x[t, k] broadcast
    int16 (opt-in)    per k-pair: one load, then per token one dot_s16 with (xq[t, k], xq[t, k + 1]);
    int8 (opt-in)     per k-quad: one load, then per token one dot_u8s8 with xq[t, k : k + 4] + OFFSET;
                      both per block of 32: per token to_float, times the two scales, one FMA

The integer kernels round both operands per block of 32 along k, x[t, k] ~= xd[t, b] xq[t, k] and W[n, k] ~=
wd[n, b] wq[n, k] with |xq|, |wq| <= levels: INT16_LEVELS = 8191, the most that keeps a block's 32 products in
int32 (32 * 8191^2 < 2^31), for vpdpwssd's 2x an FMA's multiply-adds; INT8_LEVELS = 127 (llama.cpp's q8_0
activations) for vpdpbusd's 4x. vpdpbusd takes x's bytes unsigned: x is stored xq + OFFSET, and each block's
sums start at wsum = -OFFSET sum_k wq[n, k] (per row, when the panel is packed). Each value moves by up to
1/16382 (int16) or 1/254 (int8) of its block's largest, which the tests' random hybrids amplify past their
bars (isa.PREFILL): options, not the default, as is bf16 (vdpbf16ps: 2x an FMA's multiply-adds, its products
exact in float32), which rounds both to 8 significant bits. Each thread takes whole panels (L1 / L2). bf16
needs none: `matmul_bf16` keeps 4 rows x 4 tokens of out in registers with k-pairs in the lanes, as
matmul_few does (matmul.py), and reads W's rows as stored where they are bf16. Where the CPU has AMX,
`matmul_amx` multiplies the same bf16 operands on tiles (tdpbf16ps: 16 tokens x 16 rows x 32 k, 256
vdpbf16ps' multiply-adds), W's panels laid out k-pair by k-pair (by_k), as a tile of B must be.
"""
import numpy as np
from numba import prange, types
from numba.extending import overload

from .dtypes import bf16_bits, bf16_rounded, to_float32
from .fp8 import Fp8Matrix, dequantize_fp8_rows
from .ggml import GgmlMatrix, dequantize_ggml_rows
from .isa import ISA
from .jit import jit, pjit
from .matmul import matmul_reference, widen_rows
from .simd import (
    abs_max,
    dot_bf16,
    dot_s16,
    dot_u8s8,
    fma,
    fzeros,
    hsum,
    load,
    round16,
    splat,
    splat32,
    splat_at,
    store,
    tile_dot_bf16,
    tile_load,
    tile_store,
    tile_zero,
    tiles,
    to_float,
    transpose32,
)

LANES = 16 if ISA == "avx512" else 8  # rows of a panel: the int32 lanes of one vector
PAIRS, QUADS = 2 * LANES, 4 * LANES  # its int16, int8 lanes (a global is a constant to Numba, 2 * LANES not)
TILE_TOKENS = 6
XTYPES = {"float": np.float32, "int16": np.int16, "int8": np.uint8}  # isa.PREFILL -> x
INT16_LEVELS, INT8_LEVELS = np.float32(8191.0), np.float32(127.0)
OFFSET = 128  # int8 x is stored as unsigned bytes xq + OFFSET, vpdpbusd's unsigned operand
TINY = np.float32(2.0**-100)  # a block whose largest |value| is below this rounds to zero: LEVELS / max
# would overflow float32 (and max / LEVELS be subnormal) near 2^-113; its products, < 2^-100 |x|, are noise


@jit
def quantize_blocks(q, d, values, levels):  # q: [K] int16, d: [K/32] float32 (outputs), values: [K] float32
    """d[b] = max|values in block b| / levels,  q = round(values / d)   (0 and 0 below TINY)"""
    for b in range(values.shape[0] // 32):
        m = abs_max(load(values, 32 * b, 32))  # the block as one vector: LLVM compares its parts lane-wise
        d[b] = m / levels if m >= TINY else np.float32(0.0)
        inverse = splat(levels / m if m >= TINY else np.float32(0.0), LANES)
        for i in range(32 * b, 32 * b + 32, LANES):
            store(q, i, round16(load(values, i, LANES) * inverse))


@jit
def pack_panel(panel, wd, wsum, rows, levels):
    # panel: [>= K LANES] int16 or (int8 bytes) uint8, wd / wsum: [K/32, LANES] float32 / int32 (out; wsum
    # written for int8 only); rows: [LANES, >= K] float32
    """rows rounded per block, a word (k-pair or k-quad) at a time: panel[k LANES + s r + k % s] = wq[r, k]
    (s = 4 / itemsize), wd[b, r] = its scale, wsum[b, r] = -OFFSET sum_{k in b} wq[r, k] (int8)"""
    K = wd.shape[0] * 32
    q = np.zeros((LANES, (K + 63) // 64 * 64), np.int16)  # words in whole LANES x LANES blocks (by_k)
    for r in range(LANES):
        quantize_blocks(q[r], wd[:, r], rows[r, :K], levels)
        for b in range(K // 32 if panel.itemsize == 1 else 0):  # int8 only (a loop: sum(axis=) is 4x slower)
            wsum[b, r] = -OFFSET * q[r, 32 * b:32 * b + 32].sum()
    words = q.astype(panel.dtype).reshape(-1).view(np.uint32)  # int8 levels: their two's complement bytes
    by_k(panel.view(np.uint32), words, words.size // LANES)


@jit
def by_k(panel, rows, K):  # panel: [K * LANES] 32-bit words (out), rows: [LANES * S] 32-bit words, S >= K
    """panel[k LANES + r] = rows[r S + k]: LANES rows laid out k by k"""
    for c in range(0, K, LANES):  # K is a multiple of LANES (of 32 weights, or of their 16 pairs)
        transpose32(panel, c * LANES, rows, c, rows.shape[0] // LANES, LANES)


@jit
def tile_floats(result, panel, x, t0):  # result: [TILE_TOKENS, LANES] float32 out; x: [T, K] float32
    """result[i, r] = sum_k x[t0 + i, k] W[r, k]   (i < 6; panel[k LANES + r] = W[r, k])"""
    K, flat = x.shape[1], x.reshape(-1)
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


def tile_tokens(result, panel, wd, wsum, xs, xd, t0):  # result: [TILE_TOKENS, LANES] float32 out; xs: [T, K]
    """result[i, r] = sum_k xs[t0 + i, k] W[r, k]   (i < 6): tile_floats, or tile_integers for xs int16 or
    uint8 (int8 + OFFSET)"""


@overload(tile_tokens, inline="always")
def _tile_tokens(result, panel, wd, wsum, xs, xd, t0):
    if xs.dtype == types.float32:
        return lambda result, panel, wd, wsum, xs, xd, t0: tile_floats(result, panel, xs, t0)
    lanes, dot = (PAIRS, dot_s16) if xs.dtype.bitwidth == 16 else (QUADS, dot_u8s8)  # constants to Numba

    def tile_integers(result, panel, wd, wsum, xs, xd, t0):
        """result[i, r] = sum_b xd[t0 + i, b] wd[b, r] (wsum[b, r] + sum_{k in b} xs[t0 + i, k] wq[r, k])"""
        K, x = xs.shape[1], xs.reshape(-1)
        f0 = f1 = f2 = f3 = f4 = f5 = fzeros(LANES)
        for b in range(K // 32):
            i0 = i1 = i2 = i3 = i4 = i5 = load(wsum, b * LANES, LANES)
            for k in range(32 * b, 32 * b + 32, lanes // LANES):  # a word of each row: a k-pair or k-quad
                w, o = load(panel, k * LANES, lanes), t0 * K + k  # dot: x first, vpdpbusd's unsigned bytes
                i0, i1 = dot(i0, splat32(x, o, lanes), w), dot(i1, splat32(x, o + K, lanes), w)
                i2, i3 = dot(i2, splat32(x, o + 2 * K, lanes), w), dot(i3, splat32(x, o + 3 * K, lanes), w)
                i4, i5 = dot(i4, splat32(x, o + 4 * K, lanes), w), dot(i5, splat32(x, o + 5 * K, lanes), w)
            scales = load(wd, b * LANES, LANES)
            f0 = fma(to_float(i0), scales * splat(xd[t0, b], LANES), f0)
            f1 = fma(to_float(i1), scales * splat(xd[t0 + 1, b], LANES), f1)
            f2 = fma(to_float(i2), scales * splat(xd[t0 + 2, b], LANES), f2)
            f3 = fma(to_float(i3), scales * splat(xd[t0 + 3, b], LANES), f3)
            f4 = fma(to_float(i4), scales * splat(xd[t0 + 4, b], LANES), f4)
            f5 = fma(to_float(i5), scales * splat(xd[t0 + 5, b], LANES), f5)
        store_tile(result, f0, f1, f2, f3, f4, f5)
    return tile_integers


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
def matmul_panels(out, x, w, xtype):
    # out: [T, N] float32 (rows may be strided), x: [T, K] float32, K % 32 == 0,
    # w: [N, K] bf16 / fp16 / fp32 bits, Fp8Matrix or GgmlMatrix; xtype: XTYPES[isa.PREFILL] (not bf16)
    """out[t, n] = sum_k x[t, k] W[n, k]   (xtype int16 / uint8: both rounded to int16 / int8 per block)"""
    (T, K), N = x.shape, out.shape[1]
    padded = (T + TILE_TOKENS - 1) // TILE_TOKENS * TILE_TOKENS  # the last tile's missing tokens are zero
    xs, xd = np.zeros((padded, K), xtype), np.zeros((padded, K // 32), np.float32)  # x as the kernel reads it
    levels = INT16_LEVELS if xs.itemsize == 2 else INT8_LEVELS
    for t in prange(T):
        if xs.itemsize == 4:
            xs[t] = x[t]
        else:
            q = np.empty(K, np.int16)
            quantize_blocks(q, xd[t], x[t], levels)
            xs[t] = q + (OFFSET if xs.itemsize == 1 else 0)
    for p in prange((N + LANES - 1) // LANES):
        first, rows = LANES * p, min(LANES, N - LANES * p)
        panel = np.empty(K * LANES, np.float32).view(xtype)
        wd, wsum = np.empty((K // 32, LANES), np.float32), np.zeros((K // 32, LANES), np.int32)  # int16: 0
        weights = np.zeros(LANES * (K + LANES), np.float32)  # rows past N: zero. K + LANES apart: rows
        for r in range(rows):  # 4 KB apart share L1 sets, and by_k's loads of them ran 2.6x slower
            float32_rows(weights[r * (K + LANES):r * (K + LANES) + K].reshape(1, K), w, first + r)
        if xs.itemsize == 4:
            by_k(panel.view(np.uint32), weights.view(np.uint32), K)
        else:
            pack_panel(panel, wd, wsum, weights.reshape(LANES, K + LANES), levels)
        result = np.empty((TILE_TOKENS, LANES), np.float32)
        for t0 in range(0, T, TILE_TOKENS):
            tile_tokens(result, panel, wd, wsum, xs, xd, t0)
            out[t0:t0 + TILE_TOKENS, first:first + rows] = result[:min(TILE_TOKENS, T - t0), :rows]


def bf16_rows(w, i, Q, K):  # -> indices and bits ([K] uint16 each) of the 4 rows matmul_bf16's step i reads
    """W's rows in bf16: its own bits where it is stored as bf16, else dequantised and rounded"""
    raise NotImplementedError("bf16_rows is only callable from compiled kernels")


@overload(bf16_rows, inline="always")
def _bf16_rows(w, i, Q, K):
    def stored(w, i, Q, K):  # a quarter of W apart: four streams from memory the prefetcher follows
        a, step = i + 3 * Q * (i >= Q), Q * (i < Q)  # (neighbouring rows left it waiting: matmul_few)
        rows = a, a + step, a + 2 * step, a + 3 * step
        return rows + (w[rows[0]], w[rows[1]], w[rows[2]], w[rows[3]])
    def rounded(w, i, Q, K):  # neighbours, dequantised together (rows a quarter apart waited on memory)
        a, step = (4 * i, 1) if i < Q else (3 * Q + i, 0)
        floats = np.empty((1 + 3 * step, K), np.float32)
        float32_rows(floats, w, a)
        bits = bf16_rounded(floats.reshape(-1)).reshape(-1, K)
        return (a, a + step, a + 2 * step, a + 3 * step, bits[0], bits[step], bits[2 * step], bits[3 * step])
    return stored if isinstance(w, types.Array) and w.dtype == types.uint16 else rounded


@pjit
def matmul_bf16(out, x, w):  # out: [T, N] float32 (strided ok), x: [T, K] float32, K % 32 == 0, W: any format
    """out[t, n] = sum_k bf16(x[t, k]) bf16(W[n, k])   (vdpbf16ps, MINQWEN_PREFILL=bf16)"""
    def dots(f, xv, wv):  # f[j] + the products of xv and wv[j], summed per k-pair into 16 lanes, for j < 4
        return (dot_bf16(f[0], xv, wv[0]), dot_bf16(f[1], xv, wv[1]),
                dot_bf16(f[2], xv, wv[2]), dot_bf16(f[3], xv, wv[3]))
    (T, K), Q = x.shape, out.shape[1] // 4
    xs = np.empty((T, K), np.uint16)
    for t in prange(T):
        xs[t] = bf16_rounded(x[t])
    for i in prange(Q + out.shape[1] % 4):  # 4 rows of W at a time (Q = N // 4; the rest from i = Q, 4 times)
        a, b, c, d, wa, wb, wc, wd = bf16_rows(w, i, Q, K)
        for t in range(0, T, 4):  # by four tokens; past T, the last one again (its sums land in its place)
            tokens = t, min(t + 1, T - 1), min(t + 2, T - 1), min(t + 3, T - 1)
            xa, xb, xc, xd = xs[tokens[0]], xs[tokens[1]], xs[tokens[2]], xs[tokens[3]]
            f0 = f1 = f2 = f3 = (fzeros(LANES), fzeros(LANES), fzeros(LANES), fzeros(LANES))  # 4 rows a token
            for k in range(0, K, PAIRS):  # a vector of each row: 16 k-pairs
                wk = load(wa, k, PAIRS), load(wb, k, PAIRS), load(wc, k, PAIRS), load(wd, k, PAIRS)
                f0, f1 = dots(f0, load(xa, k, PAIRS), wk), dots(f1, load(xb, k, PAIRS), wk)
                f2, f3 = dots(f2, load(xc, k, PAIRS), wk), dots(f3, load(xd, k, PAIRS), wk)
            for f, s in zip((f0, f1, f2, f3), tokens):
                out[s, a], out[s, b], out[s, c], out[s, d] = hsum(f[0]), hsum(f[1]), hsum(f[2]), hsum(f[3])


@pjit
def matmul_amx(out, x, w):  # out: [T, N] float32 (strided ok), x: [T, K] float32, K % 32 == 0, W: any format
    """out[t, n] = sum_k bf16(x[t, k]) bf16(W[n, k])   on AMX tiles (tdpbf16ps: MINQWEN_PREFILL=bf16 where
    isa.AMX): tiles 0-3 hold 32 tokens x 32 rows of out, 4-5 the tokens' next 32 k, 6-7 two panels' k-pairs"""
    (T, K), N = x.shape, out.shape[1]
    xs = np.zeros(((T + 31) // 32 * 32, K), np.uint16)  # a tile's tokens past T: zero
    for t in prange(T):
        xs[t] = bf16_rounded(x[t])
    for p in prange((N + 31) // 32):  # 32 rows of W: two panels of 16, each K / 2 k-pairs by 16 rows
        first, rows = 32 * p, min(32, N - 32 * p)
        floats, panels = np.zeros((32, K), np.float32), np.empty(16 * K, np.uint32)
        float32_rows(floats[:rows], w, first)
        pairs = bf16_rounded(floats.reshape(-1)).view(np.uint32)  # row r's k-pair j: pairs[r K / 2 + j]
        by_k(panels[:8 * K], pairs[:8 * K], K // 2)  # panels[j 16 + r] = pair j of row r: a B tile's rows
        by_k(panels[8 * K:], pairs[8 * K:], K // 2)
        result = np.empty((32, 32), np.float32)
        tiles(True)
        for t0 in range(0, T, 32):
            tile_zero(0), tile_zero(1), tile_zero(2), tile_zero(3)
            for k in range(0, K, 32):
                tile_load(4, xs, t0 * K + k, K), tile_load(5, xs, (t0 + 16) * K + k, K)
                tile_load(6, panels, 8 * k, 16), tile_load(7, panels, 8 * K + 8 * k, 16)
                tile_dot_bf16(0, 4, 6), tile_dot_bf16(1, 4, 7), tile_dot_bf16(2, 5, 6), tile_dot_bf16(3, 5, 7)
            tile_store(0, result, 0, 32), tile_store(1, result, 16, 32)
            tile_store(2, result, 512, 32), tile_store(3, result, 528, 32)
            out[t0:t0 + 32, first:first + rows] = result[:min(32, T - t0), :rows]
        tiles(False)


def matmul_integer_reference(x, w, levels):  # [T, K], [N, K] float32 (W dequantised) -> [T, N] float64
    """x @ w.T in float64 of x and w rounded to levels per block of 32 as matmul_panels' integer kernels round
    them (the scales in float32, as there)"""
    def rounded(a):  # -> levels, scales per block
        blocks = a.astype(np.float32).reshape(a.shape[0], -1, 32)
        m = np.abs(blocks).max(axis=2, keepdims=True)
        m[m < TINY] = 0
        inverse = np.divide(np.float32(levels), m, out=np.zeros_like(m), where=m > 0)
        return (np.rint(blocks * inverse) * (m / np.float32(levels)).astype(np.float64)).reshape(a.shape)
    return rounded(x) @ rounded(w).T


def matmul_bf16_reference(x, w):  # [T, K], [N, K] float32 (W dequantised) -> [T, N] float64
    """x @ w.T in float64 of x and w rounded to bf16, as matmul_bf16 reads them"""
    return to_float32(bf16_bits(x)).astype(np.float64) @ to_float32(bf16_bits(w)).T


matmul_panels_reference = matmul_reference  # the float kernel: x @ W^T in float64 (matmul.py)
