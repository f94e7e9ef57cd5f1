"""Weight-only quantisation: int8 (8.5 bits a weight) and int4 (5 bits a weight), and the products.

Decoding a token reads every weight once, so it takes as long as moving the weights from DRAM:
fewer bytes per weight is more tokens per second. Both formats cut each row of W [N, K] into
blocks of 32 consecutive weights along K (K % 32 == 0) and store a few bits per weight plus one
or two fp16 numbers per block. Activations stay float32 between kernels; the int8 decode product
rounds x to int16 per block of 32 for an integer dot product (below), everything else is float32.

    int8:  w[n, 32b+i] ~= q[n, 32b+i] * scale[n, b]
           q int8 in [-127, 127], scale = max|block| / 127 (rounded up to fp16).
           Storage: q int8 [N, K], scales fp16 bits (np.int16) [N, K/32]: 34 bytes per block,
           numerically the Q8_0 of llama.cpp.
    int4:  w[n, e] ~= nibble(n, e) * scale[n, b] + min[n, b]          (b = e // 32)
           nibble in [0, 15], min = the block's minimum (rounded down to fp16),
           scale = (max - min) / 15 (rounded up to fp16). Storage: q uint8 [N, K/2] (two weights a
           byte), scales and mins fp16 bits (np.int16) [N, K/32]: 20 bytes per block, numerically
           the Q4_1 of llama.cpp. A block minimum beats a symmetric [-8, 7] grid at the same size:
           relative RMS error 7.8% vs 8.6% on Gaussian weights, 10% vs 13% on heavy-tailed ones.

fp16 block numbers (not float32) save 2 resp. 4 bytes a block, 6% resp. 17% of the traffic; the
rounding direction keeps every weight of a block inside the grid, so no nibble or byte clips.

int4 nibble order. Each row of q is read as little-endian uint32 words and cut into units of 64
weights (8 words = two blocks); if K % 64 == 32 the last unit has 32 weights (4 words). In a unit
of W words, weight e (0 <= e < 8W) is nibble r = e // W of word j = e % W, i.e. bits 4r..4r+3:

    byte 4j + r // 2 of the unit, low nibble for even r, high nibble for odd r.

So in a full unit, nibble r of the 8 words holds weights 8r .. 8r+7 -- one 8-lane vector -- and
nibbles 0-3 are the first block, 4-7 the second. The kernel gets nibble r of 8 words with one AND
(`word & 0xF << 4r`, no shift), converts it as (nibble * 16**r) and undoes the 16**r by reading x
pre-scaled by 16**-r (computed once per call, with the block sums of x that the min term needs):
measured 1.2-1.4x faster than nibbles in byte order (GGML's layout), which need shifts and
byte widening first. With 16-lane vectors (AVX-512) the kernel takes two units at once: their 16
words are contiguous, lane L < 8 holds weights of the first unit and lane L >= 8 of the second,
and x is pre-arranged in that lane order, so every load is one full vector (1.3-1.8x faster on
Zen 5 than one unit at a time; no change to the stored format).

Decode speed (bench/kernels.py). float32 math costs ~4 vector operations per 16 weights (widen,
convert, FMA), which makes these kernels compute-bound below the read bandwidth: measured on Zen 3
(AVX2) at ~55% (int8) and ~35% (int4) of it, and on Zen 5 (AVX-512) int8 at 45-75%. The int8 product
therefore multiplies in integers: x is rounded to int16 per block of 32 (x_scale = max|x| / 32767,
relative error <= 1.5e-5 of the block's largest |x|), and q * xq is summed in int32, which LLVM
emits as vpmaddwd / vpdpwssd (32 products an instruction): 1.0-2x faster, at the bandwidth on Zen 5.
"""
from typing import NamedTuple

import numpy as np
from numba import prange

from .dtypes import BF16, FP16, widen
from .jit import jit, pjit
from .matmul import TILE_FLOATS, matmul_tiled

BLOCK = 32  # weights per scale (per scale and min for int4)


class Int8Matrix(NamedTuple):
    """A weight matrix W [N, K] in the int8 format; what quantize_int8 returns, by name."""
    q: np.ndarray  # [N, K] int8
    scales: np.ndarray  # [N, K/32] fp16 bits (np.int16)

    @property
    def shape(self):  # the shape of W
        return self.q.shape


class Int4Matrix(NamedTuple):
    """A weight matrix W [N, K] in the int4 format; what quantize_int4 returns, by name."""
    q: np.ndarray  # [N, K/2] uint8, nibbles in the unit order above
    scales: np.ndarray  # [N, K/32] fp16 bits (np.int16)
    mins: np.ndarray  # [N, K/32] fp16 bits (np.int16)

    @property
    def shape(self):  # the shape of W
        return (self.q.shape[0], 2 * self.q.shape[1])


def _check_weights(w):  # the quantisers' input: [N, K], K a multiple of 32, all finite
    K = w.shape[1]
    if K % BLOCK:
        raise ValueError(f"quantised matrices need K % {BLOCK} == 0, got K = {K}")
    if w.dtype == BF16:  # raw bits: an all-ones exponent is inf or nan
        bad = np.any((w & 0x7F80) == 0x7F80)
    elif w.dtype == FP16:
        bad = np.any((w.view(np.uint16) & 0x7C00) == 0x7C00)
    else:
        bad = not np.isfinite(w).all()
    if bad:
        raise ValueError("cannot quantise a matrix with inf or nan weights")


def _fp16_up(a):  # float32 -> nearest fp16 >= a   (as float16; inf if too large, caught later)
    with np.errstate(over="ignore"):
        h = a.astype(np.float16)
    return np.where(h.astype(np.float32) < a, np.nextafter(h, np.float16(np.inf)), h)


def _fp16_down(a):  # float32 -> nearest fp16 <= a   (as float16)
    with np.errstate(over="ignore"):
        h = a.astype(np.float16)
    return np.where(h.astype(np.float32) > a, np.nextafter(h, np.float16(-np.inf)), h)


def _check_fp16_range(*arrays):
    for a in arrays:
        if not np.isfinite(a).all():
            raise ValueError("weights too large for fp16 block scales (|w| > ~65000)")


# ------------------------------------------------------------------------------------ int8 ----

@pjit
def _block_absmax(out, w):  # out: [N, K/32] float32, w: [N, K] bf16/fp16/fp32 bits or float64
    """out[n, b] = max_i |w[n, 32b+i]|"""
    N, K = w.shape
    for n in prange(N):
        for b in range(K // 32):
            m = np.float32(0.0)
            for i in range(32 * b, 32 * b + 32):
                m = max(m, abs(widen(w[n, i])))
            out[n, b] = m


@pjit
def _quantize_int8_rows(q, w, scales):  # q: [N, K] int8 out, w: [N, K] any, scales: [N, K/32] fp16
    """q[n, 32b+i] = rint(w[n, 32b+i] / scale[n, b])   (0 where the scale is 0)"""
    N, K = w.shape
    for n in prange(N):
        for b in range(K // 32):
            s = widen(scales[n, b])
            inv = np.float32(0.0) if s == 0 else np.float32(1.0) / s
            for i in range(32 * b, 32 * b + 32):
                # The scale was rounded up, so |w| * inv <= 127; the clip only guards rounding.
                q[n, i] = np.int8(min(127.0, max(-127.0, np.rint(widen(w[n, i]) * inv))))


def quantize_int8(w) -> Int8Matrix:  # w: [N, K] float32/float64 or bf16/fp16 bits
    """scale[n, b] = max|w[n, block b]| / 127 (rounded up to fp16),  q = rint(w / scale)"""
    N, K = w.shape
    _check_weights(w)
    absmax = np.empty((N, K // BLOCK), np.float32)
    _block_absmax(absmax, w)
    scales16 = _fp16_up(absmax / np.float32(127.0))
    _check_fp16_range(scales16)
    scales = scales16.view(FP16)
    q = np.empty((N, K), np.int8)
    _quantize_int8_rows(q, w, scales)
    return Int8Matrix(q, scales)


def dequantize_int8(q, scales):  # [N, K] int8, [N, K/32] fp16 bits -> [N, K] float64
    s = scales.view(np.float16).astype(np.float64)
    return q.astype(np.float64) * np.repeat(s, BLOCK, axis=1)


@jit
def quantize_activations(xq, x_scales, x):  # xq: [K] int16 out, x_scales: [K/32] float32 out, x: [K] float32
    """x_scale[b] = max_{i in b} |x[i]| / 32767  (1 for an all-zero block),
    xq[i] = round(x[i] / x_scale[b])"""
    for b in range(x.shape[0] // 32):
        m = np.float32(0.0)
        for i in range(32 * b, 32 * b + 32):
            m = max(m, abs(x[i]))
        scale = m / np.float32(32767.0) if m > 0 else np.float32(1.0)
        inverse = np.float32(1.0) / scale
        for i in range(32 * b, 32 * b + 32):
            xq[i] = np.int16(round(x[i] * inverse))
        x_scales[b] = scale


@pjit
def matvec_int8(out, q, scales, x):  # out: [N] float32, q: [N, K] int8, scales: [N, K/32] fp16 bits, x: [K]
    """out[n] = sum_b scale[n,b] x_scale[b] sum_{i<32} q[n, 32b+i] xq[32b+i]     (x ~= xq x_scale, see
    quantize_activations: each x[i] moves by at most x_scale[b] / 2 = max|x in its block| / 65534)"""
    N, K = q.shape
    nb = K // 32
    xq = np.empty(K, np.int16)
    x_scales = np.empty(nb, np.float32)
    quantize_activations(xq, x_scales, x)
    for n in prange(N):
        qn = q[n]
        total = np.float32(0.0)
        b = 0
        while b + 4 <= nb:
            # Four blocks a step, one int32 sum each (|sum| <= 32 * 127 * 32767 < 2**31). Numba
            # widens int32 arithmetic to int64; truncating each partial sum back to int32 lets LLVM
            # see 16-bit products summed in 32 bits: vpmaddwd (vpdpwssd with VNNI), 32 weights an
            # instruction, where float32 needs two conversions and two FMAs per 16 weights.
            o0, o1, o2, o3 = 32 * b, 32 * b + 32, 32 * b + 64, 32 * b + 96
            t0 = np.int32(0)
            t1 = np.int32(0)
            t2 = np.int32(0)
            t3 = np.int32(0)
            for i in range(32):
                t0 = np.int32(t0 + np.int32(qn[o0 + i]) * np.int32(xq[o0 + i]))
                t1 = np.int32(t1 + np.int32(qn[o1 + i]) * np.int32(xq[o1 + i]))
                t2 = np.int32(t2 + np.int32(qn[o2 + i]) * np.int32(xq[o2 + i]))
                t3 = np.int32(t3 + np.int32(qn[o3 + i]) * np.int32(xq[o3 + i]))
            total += ((widen(scales[n, b]) * x_scales[b] * np.float32(t0)
                       + widen(scales[n, b + 1]) * x_scales[b + 1] * np.float32(t1))
                      + (widen(scales[n, b + 2]) * x_scales[b + 2] * np.float32(t2)
                         + widen(scales[n, b + 3]) * x_scales[b + 3] * np.float32(t3)))
            b += 4
        for b in range(b, nb):  # the last K/32 % 4 blocks (none for Qwen's shapes)
            t0 = np.int32(0)
            for i in range(32 * b, 32 * b + 32):
                t0 = np.int32(t0 + np.int32(qn[i]) * np.int32(xq[i]))
            total += widen(scales[n, b]) * x_scales[b] * np.float32(t0)
        out[n] = total


def matvec_int8_reference(q, scales, x):  # [N, K], [N, K/32], [K] -> [N] float64
    return dequantize_int8(q, scales) @ x.astype(np.float64)


@jit
def dequantize_int8_rows(tile, q, scales):  # tile: [R, K] float32 out, q: [R, K] int8, scales: [R, K/32]
    """tile[r, k] = q[r, k] * scale[r, k // 32]"""
    # Serial on purpose, like matmul.widen_rows: it alternates with BLAS calls, and after a parallel
    # region Numba's OpenMP threads keep spinning and fight OpenBLAS's threads for the cores.
    R, K = q.shape
    for r in range(R):
        tile_r, q_r = tile[r], q[r]  # 1-D rows: LLVM vectorises these loops, not the 2-D indexing
        for b in range(K // 32):
            s = widen(scales[r, b])
            for i in range(32 * b, 32 * b + 32):
                tile_r[i] = np.float32(q_r[i]) * s


def matmul_int8(out, x, q, scales, tile_floats=TILE_FLOATS):  # out: [T, N] f32, x: [T, K] f32, q: [N, K]
    """out[t, n] = sum_k x[t, k] w[n, k],  w = dequantize_int8(q, scales)   (out = x @ w.T, T > 1)"""
    matmul_tiled(out, x, q.shape, lambda tile, r0, r1: dequantize_int8_rows(tile, q[r0:r1], scales[r0:r1]),
                 tile_floats)


def matmul_int8_reference(x, q, scales):  # [T, K], [N, K], [N, K/32] -> [T, N] float64
    return x.astype(np.float64) @ dequantize_int8(q, scales).T


# ------------------------------------------------------------------------------------ int4 ----

@pjit
def _block_minmax(lo, hi, w):  # lo, hi: [N, K/32] float32 out, w: [N, K] any stored dtype
    """lo[n, b] = min w[n, block b],  hi[n, b] = max w[n, block b]"""
    N, K = w.shape
    for n in prange(N):
        for b in range(K // 32):
            a = widen(w[n, 32 * b])
            z = a
            for i in range(32 * b + 1, 32 * b + 32):
                v = widen(w[n, i])
                a = min(a, v)
                z = max(z, v)
            lo[n, b] = a
            hi[n, b] = z


@jit
def _unit_words(u, K):  # words in unit u of a row of K weights: 8, or 4 for a final half unit
    return 8 if 64 * u + 64 <= K else 4


@pjit
def _quantize_int4_rows(words, w, scales, mins):  # words: [N, K/8] uint32 out, w: [N, K] any
    """nibble(n, e) = rint((w[n, e] - min[n, b]) / scale[n, b]),  b = e // 32, packed as documented"""
    N, K = w.shape
    for n in prange(N):
        for u in range((K + 63) // 64):
            W = _unit_words(u, K)
            for j in range(W):
                word = np.uint32(0)
                for r in range(8):
                    e = 64 * u + W * r + j
                    s = widen(scales[n, e // 32])
                    inv = np.float32(0.0) if s == 0 else np.float32(1.0) / s
                    # min and scale were rounded outwards, so this is in [0, 15] but for rounding
                    nib = min(15.0, max(0.0, np.rint((widen(w[n, e]) - widen(mins[n, e // 32])) * inv)))
                    word |= np.uint32(nib) << np.uint32(4 * r)
                words[n, 8 * u + j] = word


def quantize_int4(w) -> Int4Matrix:  # w: [N, K] float32/float64 or bf16/fp16 bits
    """min = block minimum (rounded down to fp16), scale = (max - min) / 15 (rounded up to fp16),
    nibble = rint((w - min) / scale), packed in the unit order of the module docstring"""
    N, K = w.shape
    _check_weights(w)
    lo = np.empty((N, K // BLOCK), np.float32)
    hi = np.empty((N, K // BLOCK), np.float32)
    _block_minmax(lo, hi, w)
    mins16 = _fp16_down(lo)
    # Rounding the min down and the scale up keeps max inside [min, min + 15 scale].
    scales16 = _fp16_up((hi - mins16.astype(np.float32)) / np.float32(15.0))
    _check_fp16_range(mins16, scales16)
    scales, mins = scales16.view(FP16), mins16.view(FP16)
    words = np.empty((N, K // 8), np.uint32)
    _quantize_int4_rows(words, w, scales, mins)
    return Int4Matrix(words.view(np.uint8), scales, mins)


def int4_nibbles(q):  # [N, K/2] uint8 -> [N, K] uint8 nibble values in weight order (NumPy, for tests/tools)
    N, K = q.shape[0], 2 * q.shape[1]
    words = q.view(np.uint32)
    shifts = 4 * np.arange(8, dtype=np.uint32)
    full = K // 64 * 64
    # Full units: [N, unit, j, r] nibbles; weight 8r + j -> transpose to [N, unit, r, j].
    nib = (words[:, : full // 8].reshape(N, -1, 8)[..., None] >> shifts) & 15
    parts = [nib.transpose(0, 1, 3, 2).reshape(N, full)]
    if K > full:  # half unit: weight 4r + j is nibble r of word j, j < 4
        half = (words[:, full // 8:][..., None] >> shifts) & 15  # [N, j, r]
        parts.append(half.transpose(0, 2, 1).reshape(N, K - full))
    return np.concatenate(parts, axis=1).astype(np.uint8)


def dequantize_int4(q, scales, mins):  # [N, K/2] uint8, [N, K/32], [N, K/32] fp16 bits -> [N, K] float64
    s = np.repeat(scales.view(np.float16).astype(np.float64), BLOCK, axis=1)
    m = np.repeat(mins.view(np.float16).astype(np.float64), BLOCK, axis=1)
    return int4_nibbles(q) * s + m


@jit
def _prepare_int4_activations(xs, xsum, x):  # xs: [K] out, xsum: [K/32] out, x: [K] float32
    """xsum[b] = sum of block b of x;  xs = x scaled by 16**-r for nibble r (r < 7) and put in the order
    matvec_int4 reads it: for a pair of units p, xs[128p + 16r + L] = x[128p + 64(L // 8) + 8r + L % 8]."""
    K = x.shape[0]
    for b in range(K // 32):
        t = np.float32(0.0)
        for e in range(32 * b, 32 * b + 32):
            t += x[e]
        xsum[b] = t
    for e in range(K):  # the tail (a last single or half unit) keeps x's own order
        xs[e] = x[e]
    for p in range(K // 128):
        f = np.float32(1.0)
        for r in range(8):
            g = f if r < 7 else np.float32(1.0)  # nibble 7 is shifted down, not masked: 16**0
            for L in range(16):
                xs[128 * p + 16 * r + L] = x[128 * p + 64 * (L // 8) + 8 * r + L % 8] * g
            f *= np.float32(1.0 / 16.0)
    if K % 128 >= 64:  # a last single full unit: nibble r of its word j is weight 8r + j
        o = 128 * (K // 128)
        f = np.float32(1.0)
        for r in range(7):
            for j in range(8):
                xs[o + 8 * r + j] = x[o + 8 * r + j] * f
            f *= np.float32(1.0 / 16.0)


@jit
def _in_place(word, mask):  # the nibble under mask (bits 4r..4r+3, r < 7), unshifted: nibble * 16**r
    return np.float32(np.int32(word & mask))


@pjit
def matvec_int4(out, q, scales, mins, x):
    # out: [N] f32, q: [N, K/2] uint8, scales, mins: [N, K/32] fp16, x: [K]
    """out[n] = sum_b scale[n,b] sum_{e in b} nibble(n,e) x[e]  +  sum_b min[n,b] sum_{e in b} x[e]"""
    N, K = q.shape[0], 2 * q.shape[1]
    nb = K // 32
    words = q.view(np.uint32)  # [N, K/8]
    # The min term needs only the block sums of x; the nibble term reads x pre-scaled by 16**-r.
    xs = np.empty(K, np.float32)
    xsum = np.empty(nb, np.float32)
    _prepare_int4_activations(xs, xsum, x)
    for n in prange(N):
        wn = words[n]
        total = np.float32(0.0)
        for p in range(K // 128):
            # Two units (four blocks) a step, as 16 lanes: lane L reads word 16p + L, whose nibbles
            # 0-3 belong to block 4p (L < 8) or 4p + 2 (L >= 8), nibbles 4-7 to the block after.
            # Masking nibble r in place gives nibble * 16**r exactly (at most 28 bits); xs carries
            # the 16**-r. The per-lane choice of scale is a blend of two broadcasts.
            o = 128 * p
            s0, s1 = widen(scales[n, 4 * p]), widen(scales[n, 4 * p + 1])
            s2, s3 = widen(scales[n, 4 * p + 2]), widen(scales[n, 4 * p + 3])
            t = np.float32(0.0)
            for L in range(16):
                v = wn[16 * p + L]
                lo = ((_in_place(v, 0xF) * xs[o + L] + _in_place(v, 0xF0) * xs[o + 16 + L])
                      + (_in_place(v, 0xF00) * xs[o + 32 + L] + _in_place(v, 0xF000) * xs[o + 48 + L]))
                hi = ((_in_place(v, 0xF0000) * xs[o + 64 + L] + _in_place(v, 0xF00000) * xs[o + 80 + L])
                      + (_in_place(v, 0xF000000) * xs[o + 96 + L]
                         + np.float32(np.int32(v >> 28)) * xs[o + 112 + L]))
                t += (s0 if L < 8 else s2) * lo + (s1 if L < 8 else s3) * hi
            total += t
        if K % 128 >= 64:  # a last single unit (two blocks), 8 lanes: nibble r of word j is weight 8r + j
            u = 2 * (K // 128)
            o = 64 * u
            t0 = np.float32(0.0)
            t1 = np.float32(0.0)
            for j in range(8):
                v = wn[8 * u + j]
                t0 += ((_in_place(v, 0xF) * xs[o + j] + _in_place(v, 0xF0) * xs[o + 8 + j])
                       + (_in_place(v, 0xF00) * xs[o + 16 + j] + _in_place(v, 0xF000) * xs[o + 24 + j]))
                t1 += ((_in_place(v, 0xF0000) * xs[o + 32 + j] + _in_place(v, 0xF00000) * xs[o + 40 + j])
                       + (_in_place(v, 0xF000000) * xs[o + 48 + j]
                          + np.float32(np.int32(v >> 28)) * xs[o + 56 + j]))
            total += widen(scales[n, 2 * u]) * t0 + widen(scales[n, 2 * u + 1]) * t1
        for b in range(nb):
            total += widen(mins[n, b]) * xsum[b]
        if K % 64:  # a final half unit (none for Qwen's shapes): weight 4r + j is nibble r of word j
            t0 = np.float32(0.0)
            for j in range(4):
                v = wn[K // 8 - 4 + j]
                for r in range(8):
                    t0 += np.float32((v >> np.uint32(4 * r)) & np.uint32(15)) * x[K - 32 + 4 * r + j]
            total += widen(scales[n, nb - 1]) * t0
        out[n] = total


def matvec_int4_reference(q, scales, mins, x):  # [N, K/2], [N, K/32] x2, [K] -> [N] float64
    return dequantize_int4(q, scales, mins) @ x.astype(np.float64)


@jit
def dequantize_int4_rows(tile, q, scales, mins):  # tile: [R, K] float32 out, q: [R, K/2] uint8, scales, mins
    """tile[r, e] = nibble(r, e) * scale[r, e // 32] + min[r, e // 32]"""
    R, K = q.shape[0], 2 * q.shape[1]
    words = q.view(np.uint32)
    for r in range(R):  # serial: see dequantize_int8_rows
        tile_r, words_r = tile[r], words[r]
        for u in range((K + 63) // 64):
            W = _unit_words(u, K)
            if W == 4:  # the final half unit: one block, weight 4k + j is nibble k of word j
                s, m = widen(scales[r, 2 * u]), widen(mins[r, 2 * u])
                for j in range(4):
                    v = words_r[8 * u + j]
                    for k in range(8):
                        tile_r[64 * u + 4 * k + j] = (np.float32((v >> np.uint32(4 * k)) & np.uint32(15))
                                                      * s + m)
                continue
            s0, m0 = widen(scales[r, 2 * u]), widen(mins[r, 2 * u])
            s1, m1 = widen(scales[r, 2 * u + 1]), widen(mins[r, 2 * u + 1])
            o = 64 * u
            for j in range(8):  # nibble k of word j is weight 8k + j; nibbles 0-3 are block 2u
                v = words_r[8 * u + j]
                tile_r[o + j] = np.float32(v & 15) * s0 + m0
                tile_r[o + 8 + j] = np.float32((v >> 4) & 15) * s0 + m0
                tile_r[o + 16 + j] = np.float32((v >> 8) & 15) * s0 + m0
                tile_r[o + 24 + j] = np.float32((v >> 12) & 15) * s0 + m0
                tile_r[o + 32 + j] = np.float32((v >> 16) & 15) * s1 + m1
                tile_r[o + 40 + j] = np.float32((v >> 20) & 15) * s1 + m1
                tile_r[o + 48 + j] = np.float32((v >> 24) & 15) * s1 + m1
                tile_r[o + 56 + j] = np.float32(v >> 28) * s1 + m1


def matmul_int4(out, x, q, scales, mins, tile_floats=TILE_FLOATS):
    # out: [T, N] f32, x: [T, K] f32, q: [N, K/2]
    """out[t, n] = sum_k x[t, k] w[n, k],  w = dequantize_int4(q, scales, mins)   (out = x @ w.T, T > 1)"""
    matmul_tiled(out, x, (q.shape[0], 2 * q.shape[1]),
                 lambda tile, r0, r1: dequantize_int4_rows(tile, q[r0:r1], scales[r0:r1], mins[r0:r1]),
                 tile_floats)


def matmul_int4_reference(x, q, scales, mins):  # [T, K], [N, K/2], [N, K/32] x2 -> [T, N] float64
    return x.astype(np.float64) @ dequantize_int4(q, scales, mins).T
