"""GGML's quantised block types, as GGUF files store them: the products read the blocks in place.

A row of W [N, K] is K / E blocks of E weights (E = 32, or 256 for the K-quants), each a fixed number
of bytes (GGML_BLOCKS); all numbers little-endian, d / m / dmin are fp16. Every type decodes a weight as

    w = a * level - f          (level a small integer from the block's bits; a, f per sub-block)

    type  bytes  layout (byte offset field)                     level of weight p         a, f
    Q8_0   34    0 d, 2 int8 q[32]                              q[p]                      d, 0
    Q4_0   18    0 d, 2 qs[16]                                  nibble(p)                 d, 8d
    Q4_1   20    0 d, 2 m, 4 qs[16]                             nibble(p)                 d, -m
    Q5_0   22    0 d, 2 qh (u32), 6 qs[16]                      nibble(p) + 16 qh bit p   d, 16d
    Q5_1   24    0 d, 2 m, 4 qh (u32), 8 qs[16]                 nibble(p) + 16 qh bit p   d, -m
    Q2_K   84    0 sc[16], 16 qs[64], 80 d, 82 dmin             2 bits                    d sc&15, dmin sc>>4
    Q3_K  110    0 hmask[32], 32 qs[64], 96 sc[12], 108 d       2 bits + 4 hmask bit      d (sc6 - 32), 4a
    Q4_K  144    0 d, 2 dmin, 4 sc[12], 16 qs[128]              nibble                    d sc6, dmin m6
    Q5_K  176    0 d, 2 dmin, 4 sc[12], 16 qh[32], 48 qs[128]   nibble + 16 qh bit        d sc6, dmin m6
    Q6_K  210    0 ql[128], 128 qh[64], 192 int8 sc[16], 208 d  nibble + 16 (2 qh bits)   d sc, 32a

    IQ4_NL  18    0 d, 2 qs[16]                                  iq4[nibble(p)]            d, 0
    MXFP4   17    0 e (E8M0), 1 qs[16]                           fp4[nibble(p)]            2^(e-128), 0
    IQ4_XS 136    0 d, 2 sc_h (u16), 4 sc_l[4], 8 qs[128]        iq4[nibble]               d (sc6 - 32), 0
    IQ2_XXS 66    0 d, 2 per sub-block: grid[4], u32 signs+sc    +-grid (8 per row)        d (1/2 + s) / 4, 0
    IQ2_XS  74    0 d, 2 u16 qs[32] (grid, signs), 66 sc[8]      +-grid (8 per row)        d (1/2 + s) / 4, 0
    IQ2_S   82    0 d, 2 qs[32], 34 signs[32], 66 qh[8], 74 sc   +-grid (8 per row)        d (1/2 + s) / 4, 0
    IQ3_XXS 98    0 d, 2 qs[64], 66 u32 signs+sc[8]              +-grid (4 per row)        d (1/2 + s) / 2, 0
    IQ3_S  110    0 d, 2 qs[64], 66 qh[8], 74 signs[32], 106 sc  +-grid (4 per row)        d (1 + 2s), 0

nibble(p) of a 32-weight block: low nibble of qs[p] for p < 16, high nibble of qs[p - 16] otherwise.
The K-quants have 8 sub-blocks of 32 (Q4_K, Q5_K: 6-bit scale and min packed in 12 bytes) or 16 of 16
(Q2_K, Q3_K: 6-bit signed scales packed in 12 bytes, Q6_K: int8 scales); exact bit positions in `_level`.
The codebook types look their level up: iq4 / fp4 in 16-entry tables (IQ4_LEVELS, MXFP4_LEVELS), the
i-quants (IQ2_*, IQ3_*: 8 sub-blocks of 32 in 256) a row of a grid (kernels/ggml_grids.py) per 8 or 4
weights, with a sign bit per weight (`_grid_level`): no longer small integers, but still integers.

One frame serves every type (`_blocks`): a row is walked 128 weights at a time, as four *columns* of 32
weights (four blocks of a 32-weight type, or a quarter of a K-quant block), each in two halves of 16; weight
32c + 16h + i is `_level(row, t, c, h, i)` scaled by `_scale_offset(row, t, c, h)`. The same loop computes
a row's dot product with x (decode, MoE experts) or writes its weights (prefill tiles for BLAS). Why this
shape (a fixed 16-lane loop, unsigned indices, the type a compile-time constant, consecutive columns), as
measured: docs/gguf-and-quantisation.md#the-float-kernels-one-frame-for-every-type. kernels/intdot.py's
integer dot products are the fast decode path for the types they cover, these the fallback and reference.
"""
from typing import NamedTuple

import numpy as np
from numba import prange

from .dtypes import to_float32, widen
from .ggml_grids import IQ2_S_GRID, IQ2_XS_GRID, IQ2_XXS_GRID, IQ3_S_GRID, IQ3_XXS_GRID
from .jit import ijit, jit, pjit
from .matmul import TILE_FLOATS, matmul_tiled

Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K = 2, 3, 6, 7, 8, 10, 11, 12, 13, 14
IQ2_XXS, IQ2_XS, IQ3_XXS, IQ4_NL, IQ3_S, IQ2_S, IQ4_XS, MXFP4 = 16, 17, 18, 20, 21, 22, 23, 39
GGML_BLOCKS = {  # type id: (weights, bytes) per block
    Q4_0: (32, 18), Q4_1: (32, 20), Q5_0: (32, 22), Q5_1: (32, 24), Q8_0: (32, 34), IQ4_NL: (32, 18),
    MXFP4: (32, 17), Q2_K: (256, 84), Q3_K: (256, 110), Q4_K: (256, 144), Q5_K: (256, 176), Q6_K: (256, 210),
    IQ2_XXS: (256, 66), IQ2_XS: (256, 74), IQ2_S: (256, 82), IQ3_XXS: (256, 98), IQ3_S: (256, 110),
    IQ4_XS: (256, 136)}
BLOCK_BYTES = tuple(GGML_BLOCKS.get(t, (0, 0))[1] for t in range(max(GGML_BLOCKS) + 1))  # by type id, 0: none

# The codebooks: IQ4_NL / IQ4_XS levels (kvalues_iq4nl), MXFP4's E2M1 values doubled (kvalues_mxfp4; the
# scale is halved to match, as gguf-py and llama.cpp do), E8M0 scale byte e -> 2^(e - 128) (that halved
# scale, ggml_e8m0_to_fp32_half), and the i-quants' sign bytes: 7 sign bits k and their parity as bit 7
# (ksigns_iq2xs, an even number of minus signs per group of 8).
IQ4_LEVELS = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int8)
MXFP4_LEVELS = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], np.int8)
E8M0_HALF = np.ldexp(np.float32(1.0), np.arange(256) - 128).astype(np.float32)
KSIGNS = np.array([k | (bin(k).count("1") & 1) << 7 for k in range(128)], np.uint8)


class GgmlMatrix(NamedTuple):
    """A weight matrix W [N, K] in one GGML block type, as the GGUF reader hands it over."""
    data: np.ndarray  # [N, K / E * bytes] uint8, a view of the mapped file: row n's blocks are data[n]
    ggml_type: int  # a key of GGML_BLOCKS
    cols: int  # K

    @property
    def shape(self):  # the shape of W
        return (self.data.shape[0], self.cols)

    @property
    def nbytes(self):  # the bytes it takes, as an array's nbytes
        return self.data.nbytes


# ------------------------------------------------------------------------------ decoding ----

@jit
def _u(i):  # an index Numba does not check for negative values (checks turn loads into gathers)
    return np.uint64(i)


@jit
def _byte(row, o):
    return np.int32(row[_u(o)])


@jit
def _fp16(row, o):  # the fp16 at bytes o, o + 1 -> float32
    return widen(np.int16(_byte(row, o) | (_byte(row, o + 1) << 8)))


@jit
def _u32(row, o):  # the little-endian uint32 at bytes o .. o + 3, as int64
    return (np.int64(_byte(row, o)) | np.int64(_byte(row, o + 1)) << 8 | np.int64(_byte(row, o + 2)) << 16
            | np.int64(_byte(row, o + 3)) << 24)


@jit
def _k4_scale_min(row, o, j):  # Q4_K / Q5_K: 6-bit scale and min of sub-block j, 12 bytes at o
    """j < 4: sc = s[j] & 63, m = s[j+4] & 63;  else sc = s[j+4] & 15 | (s[j-4] >> 6) << 4,
    m = s[j+4] >> 4 | (s[j] >> 6) << 4"""
    if j < 4:
        return _byte(row, o + j) & 63, _byte(row, o + j + 4) & 63
    return ((_byte(row, o + j + 4) & 15) | ((_byte(row, o + j - 4) >> 6) << 4),
            (_byte(row, o + j + 4) >> 4) | ((_byte(row, o + j) >> 6) << 4))


@jit
def _q3_scale(row, o, v):  # Q3_K: signed 6-bit scale of sub-block v (0..15), 12 bytes at o
    """low 4 bits: s[v] & 15 (v < 8) or s[v-8] >> 4;  high 2 bits: s[8 + v%4] >> 2(v//4);  minus 32"""
    low = _byte(row, o + v) & 15 if v < 8 else _byte(row, o + v - 8) >> 4
    return (low | ((_byte(row, o + 8 + v % 4) >> (2 * (v // 4))) & 3) << 4) - 32


@jit
def _per_32(t):  # blocks of 32 weights (else super-blocks of 256)
    return t < Q2_K or t == IQ4_NL or t == MXFP4


@jit
def _block(t, c):  # column c (32 weights) of a row of type t -> (byte offset of its block, slot in it)
    return (c * BLOCK_BYTES[t], 0) if _per_32(t) else ((c >> 3) * BLOCK_BYTES[t], c & 7)


@jit
def _level(row, t, c, h, i):  # the integer level of weight 32c + 16h + i of the row
    o, u = _block(t, c)  # u = 4n + j: quarter j of half n of a K-quant block
    n, j, p = u >> 2, u & 3, 16 * h + i
    if t == Q8_0:
        return np.int32(np.int8(row[_u(o + 2 + p)]))
    if t == Q4_0 or t == Q4_1 or t == Q5_0 or t == Q5_1:
        qs = 2 if t == Q4_0 else 4 if t == Q4_1 else 6 if t == Q5_0 else 8
        level = (_byte(row, o + qs + i) >> (4 * h)) & 15
        if t == Q5_0 or t == Q5_1:  # bit p of the little-endian u32 qh is the fifth bit
            level |= 16 if _u32(row, o + 2 if t == Q5_0 else o + 4) & (1 << p) else 0
        return np.int32(level)
    if t == IQ4_NL or t == IQ4_XS:  # IQ4_XS: sub-block u's 16 bytes of qs as IQ4_NL's
        qs = o + 2 if t == IQ4_NL else o + 8 + 16 * u
        return np.int32(IQ4_LEVELS[_u((_byte(row, qs + i) >> (4 * h)) & 15)])
    if t == MXFP4:
        return np.int32(MXFP4_LEVELS[_u((_byte(row, o + 1 + i) >> (4 * h)) & 15)])
    if t == IQ2_XXS or t == IQ2_XS or t == IQ2_S or t == IQ3_XXS or t == IQ3_S:  # the grid codebooks
        return _grid_level(row, t, o, u, h, i)
    if t == Q2_K:
        return np.int32((_byte(row, o + 16 + 32 * n + p) >> (2 * j)) & 3)
    if t == Q3_K:  # the hmask bit set means +4 (f = 4a subtracts it back)
        high = 4 if _byte(row, o + p) & (1 << u) else 0
        return np.int32(((_byte(row, o + 32 + 32 * n + p) >> (2 * j)) & 3) | high)
    if t == Q4_K or t == Q5_K:  # sub-block u: nibble u % 2 of qs[32 (u // 2) + p]
        level = (_byte(row, o + (16 if t == Q4_K else 48) + 32 * (u >> 1) + p) >> (4 * (u & 1))) & 15
        if t == Q5_K:
            level |= 16 if _byte(row, o + 16 + p) & (1 << u) else 0
        return np.int32(level)
    # Q6_K: low 4 bits from ql, nibble j // 2 of ql[64n + 32 (j % 2) + p]; high 2 from qh[32n + p] >> 2j
    low = (_byte(row, o + 64 * n + 32 * (j & 1) + p) >> (4 * (j >> 1))) & 15
    return np.int32(low | (((_byte(row, o + 128 + 32 * n + p) >> (2 * j)) & 3) << 4))


@jit
def _grid_level(row, t, o, u, h, i):  # the signed grid value of weight 32u + 16h + i of the block at o
    """g = 2h + i // 8: its group of 8 weights in sub-block u (and f = 4h + i // 4 its group of 4);
    level = grid[index][j] * (-1 if sign bit j else 1), j its place in the grid's row:
    IQ2_XXS  index qs8[8u + g],                   signs ksigns[aux >> 7g & 127], aux = u32 at qs8[8u + 4]
    IQ2_XS   index q & 511, q = u16 qs[4u + g],   signs ksigns[q >> 9]
    IQ2_S    index qs[4u + g] | (qh[u] >> 2g & 3) << 8,   signs[4u + g]
    IQ3_XXS  index qs[8u + f] (rows of 4),        signs ksigns[aux >> 7g & 127], aux = u32 sas[u]
    IQ3_S    index qs[8u + f] | (qh[u] >> f & 1) << 8,    signs[4u + g]"""
    g, f = 2 * h + (i >> 3), 4 * h + (i >> 2)
    if t == IQ2_XXS:
        index, signs = _byte(row, o + 2 + 8 * u + g), KSIGNS[_u((_u32(row, o + 6 + 8 * u) >> (7 * g)) & 127)]
        magnitude = IQ2_XXS_GRID[_u(index), _u(i & 7)]
    elif t == IQ2_XS:
        q = _byte(row, o + 2 + 8 * u + 2 * g) | _byte(row, o + 3 + 8 * u + 2 * g) << 8
        magnitude, signs = IQ2_XS_GRID[_u(q & 511), _u(i & 7)], KSIGNS[_u(q >> 9)]
    elif t == IQ2_S:
        index = _byte(row, o + 2 + 4 * u + g) | ((_byte(row, o + 66 + u) >> (2 * g)) & 3) << 8
        magnitude, signs = IQ2_S_GRID[_u(index), _u(i & 7)], _byte(row, o + 34 + 4 * u + g)
    elif t == IQ3_XXS:
        index, signs = _byte(row, o + 2 + 8 * u + f), KSIGNS[_u((_u32(row, o + 66 + 4 * u) >> (7 * g)) & 127)]
        magnitude = IQ3_XXS_GRID[_u(index), _u(i & 3)]
    else:  # IQ3_S
        index = _byte(row, o + 2 + 8 * u + f) | ((_byte(row, o + 66 + u) >> f) & 1) << 8
        magnitude, signs = IQ3_S_GRID[_u(index), _u(i & 3)], _byte(row, o + 74 + 4 * u + g)
    level = np.int32(magnitude)
    return -level if np.int32(signs) & (1 << (i & 7)) else level


@jit
def _scale_offset(row, t, c, h):  # (a, f) of the sub-block holding weights 32c + 16h .. +15: w = a level - f
    o, u = _block(t, c)
    if t == Q8_0 or t == IQ4_NL:
        return _fp16(row, o), np.float32(0.0)
    if t == Q4_0 or t == Q5_0:  # levels centred on 8 resp. 16
        d = _fp16(row, o)
        return d, d * np.float32(8.0 if t == Q4_0 else 16.0)
    if t == Q4_1 or t == Q5_1:
        return _fp16(row, o), -_fp16(row, o + 2)
    if t == MXFP4:
        return E8M0_HALF[_u(_byte(row, o))], np.float32(0.0)
    if t == IQ4_XS:  # 6-bit scale of sub-block u: 4 bits from scales_l[u / 2], 2 from the u16 scales_h
        high = ((_byte(row, o + 2) | _byte(row, o + 3) << 8) >> (2 * u)) & 3
        return _fp16(row, o) * np.float32((((_byte(row, o + 4 + (u >> 1)) >> (4 * (u & 1))) & 15) | high << 4)
                                          - 32), np.float32(0.0)
    if t == IQ2_XXS or t == IQ3_XXS:  # 4-bit scale s: the top of sub-block u's u32; d (1/2 + s) / 4 resp. / 2
        s = _byte(row, o + (9 + 8 * u if t == IQ2_XXS else 69 + 4 * u)) >> 4
        a = _fp16(row, o) * (np.float32(0.5) + np.float32(s)) * np.float32(0.25 if t == IQ2_XXS else 0.5)
        return a, np.float32(0.0)
    if t == IQ2_XS or t == IQ2_S:  # 4-bit scale s per half sub-block: d (1/2 + s) / 4
        s = (_byte(row, o + (66 if t == IQ2_XS else 74) + u) >> (4 * h)) & 15
        return _fp16(row, o) * (np.float32(0.5) + np.float32(s)) * np.float32(0.25), np.float32(0.0)
    if t == IQ3_S:  # 4-bit scale s per sub-block: d (1 + 2s)
        s = (_byte(row, o + 106 + (u >> 1)) >> (4 * (u & 1))) & 15
        return _fp16(row, o) * np.float32(1 + 2 * s), np.float32(0.0)
    if t == Q2_K:  # sub-block of 16: scale byte 2u + h, low nibble scale, high nibble min
        sc = _byte(row, o + 2 * u + h)
        return _fp16(row, o + 80) * np.float32(sc & 15), _fp16(row, o + 82) * np.float32(sc >> 4)
    if t == Q3_K:
        a = _fp16(row, o + 108) * np.float32(_q3_scale(row, o + 96, 2 * u + h))
        return a, np.float32(4.0) * a
    if t == Q4_K or t == Q5_K:
        sc, m = _k4_scale_min(row, o + 4, u)
        return _fp16(row, o) * np.float32(sc), _fp16(row, o + 2) * np.float32(m)
    a = _fp16(row, o + 208) * np.float32(np.int8(row[_u(o + 192 + 2 * u + h)]))  # Q6_K: int8 scales
    return a, np.float32(32.0) * a


@jit
def _column_scales(row, t, c):  # (a, f) of each half of column c
    return _scale_offset(row, t, c, 0), _scale_offset(row, t, c, 1)


@jit
def _column_weights(row, t, c, i, s):  # weights 32c + i and 32c + 16 + i, s: (a, f) of the column's halves
    return (s[0][0] * np.float32(_level(row, t, c, 0, i)) - s[0][1],
            s[1][0] * np.float32(_level(row, t, c, 1, i)) - s[1][1])


@jit
def _column_dot(row, t, c, i, s, x):  # the two weights above times x
    w0, w1 = _column_weights(row, t, c, i, s)
    return w0 * x[_u(32 * c + i)] + w1 * x[_u(32 * c + 16 + i)]


@ijit
def _step(row, t, x, out, c0, last):  # columns c0 .. c0 + 3, those past the row's last column repeating it
    c1, c2, c3 = min(c0 + 1, last), min(c0 + 2, last), min(c0 + 3, last)
    s0, s1 = _column_scales(row, t, c0), _column_scales(row, t, c1)
    s2, s3 = _column_scales(row, t, c2), _column_scales(row, t, c3)
    total = np.float32(0.0)  # (Numba drops the branch whose argument is None: one kernel per use)
    if x is not None:  # one sum per column: independent chains of FMAs for the CPU to overlap
        zero = ((np.float32(0.0), np.float32(0.0)), (np.float32(0.0), np.float32(0.0)))
        s1, s2, s3 = s1 if c1 > c0 else zero, s2 if c2 > c1 else zero, s3 if c3 > c2 else zero
        acc0 = acc1 = acc2 = acc3 = np.float32(0.0)
        for i in range(16):
            acc0 += _column_dot(row, t, c0, i, s0, x)
            acc1 += _column_dot(row, t, c1, i, s1, x)
            acc2 += _column_dot(row, t, c2, i, s2, x)
            acc3 += _column_dot(row, t, c3, i, s3, x)
        total = (acc0 + acc1) + (acc2 + acc3)
    if out is not None:  # (columns past the end write the last column again)
        for i in range(16):
            out[_u(32 * c0 + i)], out[_u(32 * c0 + 16 + i)] = _column_weights(row, t, c0, i, s0)
            out[_u(32 * c1 + i)], out[_u(32 * c1 + 16 + i)] = _column_weights(row, t, c1, i, s1)
            out[_u(32 * c2 + i)], out[_u(32 * c2 + 16 + i)] = _column_weights(row, t, c2, i, s2)
            out[_u(32 * c3 + i)], out[_u(32 * c3 + 16 + i)] = _column_weights(row, t, c3, i, s3)
    return total


@jit
def _blocks(row, t, x, out):  # row: [bytes] uint8 of type t; x, out: [K] float32 or None
    """x given: returns sum_k w[k] x[k];   out given: out[k] = w[k]"""
    K = row.shape[0] // BLOCK_BYTES[t] * (32 if _per_32(t) else 256)
    total = np.float32(0.0)
    for q in range(K // 128):  # whole steps (all of a K-quant row)
        total += _step(row, t, x, out, 4 * q, 4 * q + 3)
    if _per_32(t) and K % 128:
        total += _step(row, t, x, out, K // 128 * 4, K // 32 - 1)
    return total


@jit
def ggml_blocks(row, ggml_type, x, out):  # _blocks with the type made a compile-time constant
    """_blocks for a row of ggml_type: the one switch over the types (a type's own kernel would go here)"""
    t = ggml_type
    if not 0 <= t < len(BLOCK_BYTES) or BLOCK_BYTES[t] == 0:
        raise ValueError("not a GGML block type")
    return (_blocks(row, Q8_0, x, out) if t == Q8_0
            else _blocks(row, Q4_0, x, out) if t == Q4_0
            else _blocks(row, Q4_1, x, out) if t == Q4_1
            else _blocks(row, Q5_0, x, out) if t == Q5_0
            else _blocks(row, Q5_1, x, out) if t == Q5_1
            else _blocks(row, Q2_K, x, out) if t == Q2_K
            else _blocks(row, Q3_K, x, out) if t == Q3_K
            else _blocks(row, Q4_K, x, out) if t == Q4_K
            else _blocks(row, Q5_K, x, out) if t == Q5_K
            else _blocks(row, Q6_K, x, out) if t == Q6_K
            else _blocks(row, IQ4_NL, x, out) if t == IQ4_NL
            else _blocks(row, IQ4_XS, x, out) if t == IQ4_XS
            else _blocks(row, MXFP4, x, out) if t == MXFP4
            else _blocks(row, IQ2_XXS, x, out) if t == IQ2_XXS
            else _blocks(row, IQ2_XS, x, out) if t == IQ2_XS
            else _blocks(row, IQ2_S, x, out) if t == IQ2_S
            else _blocks(row, IQ3_XXS, x, out) if t == IQ3_XXS
            else _blocks(row, IQ3_S, x, out))


@jit
def ggml_row_dot(row, ggml_type, x):  # row: one row's blocks, uint8; x: [K] float32 -> float32
    """sum_k W[k] x[k]"""
    return ggml_blocks(row, ggml_type, x, None)


@pjit
def matvec_ggml(out, data, ggml_type, x):  # out: [N] float32, data: [N, bytes] uint8, x: [K] float32
    """out[n] = sum_k W[n, k] x[k]"""
    for n in prange(data.shape[0]):
        out[n] = ggml_row_dot(data[n], ggml_type, x)


@jit
def dequantize_ggml_rows(tile, rows, ggml_type):  # tile: [R, K] float32 out, rows: [R, bytes] uint8
    """tile[r, k] = W[r, k]"""
    # Serial, like matmul.widen_rows: it alternates with BLAS calls, whose threads need the cores.
    for r in range(rows.shape[0]):
        ggml_blocks(rows[r], ggml_type, None, tile[r])


def matmul_ggml(out, x, w: GgmlMatrix, tile_floats=TILE_FLOATS):  # out: [T, N] f32, x: [T, K] f32
    """out[t, n] = sum_k x[t, k] W[n, k]   (out = x @ W.T, for T > 1: tiles dequantised for BLAS)"""
    matmul_tiled(out, x, w.shape, lambda tile, r0, r1: dequantize_ggml_rows(tile, w.data[r0:r1], w.ggml_type),
                 tile_floats)


def dequantize_ggml(w: GgmlMatrix) -> np.ndarray:  # -> [N, K] float32
    tile = np.empty(w.shape, np.float32)
    dequantize_ggml_rows(tile, w.data, w.ggml_type)
    return tile


# ------------------------------------------------------------------- minqwen's quantisers ----
# --quantize int8 / int4 write Q8_0 / Q4_1, byte for byte what gguf-py's (and llama.cpp's) reference
# quantisers write for the same float32 weights; NumPy, a chunk of rows at a time (bounded memory).

def _quantize(w, ggml_type, encode) -> GgmlMatrix:  # w: [N, K] float32/float64 or bf16/fp16 bits
    N, K = w.shape
    if K % 32:
        raise ValueError(f"quantised matrices need K % 32 == 0, got K = {K}")
    data = np.empty((N, K // 32 * GGML_BLOCKS[ggml_type][1]), np.uint8)
    rows = max(1, (1 << 20) // K)
    for r0 in range(0, N, rows):
        blocks = to_float32(w[r0:r0 + rows]).reshape(-1, K // 32, 32)
        if not np.isfinite(blocks).all():
            raise ValueError("cannot quantise a matrix with inf or nan weights")
        with np.errstate(divide="ignore", over="ignore"):
            parts = encode(blocks)  # fp16 numbers, then quants
        if not all(np.isfinite(p).all() for p in parts if p.dtype == np.float16):
            raise ValueError("weights too large for fp16 block scales (|w| > ~65000)")
        joined = np.concatenate([p.view(np.uint8) for p in parts], axis=-1)  # [n, K/32, bytes]
        data[r0:r0 + rows] = joined.reshape(len(blocks), -1)
    return GgmlMatrix(data, ggml_type, K)


def quantize_q8_0(w) -> GgmlMatrix:  # w: [N, K] float32/float64 or bf16/fp16 bits, K % 32 == 0
    """d = max|block| / 127,  q = round(w / d)  (halves away from zero)"""
    def encode(blocks):  # [n, nb, 32] float32 -> d fp16 [n, nb, 1], q int8 [n, nb, 32]
        d = np.abs(blocks).max(axis=-1, keepdims=True) / np.float32(127)
        scaled = blocks * np.where(d == 0, np.float32(0), np.float32(1) / d)
        magnitude = np.abs(scaled)  # roundf: halves away from zero
        q = np.sign(scaled) * (np.floor(magnitude) + (magnitude - np.floor(magnitude) >= 0.5))
        return d.astype(np.float16), q.astype(np.int8)
    return _quantize(w, Q8_0, encode)


def quantize_q4_1(w) -> GgmlMatrix:  # w: [N, K] float32/float64 or bf16/fp16 bits, K % 32 == 0
    """m = min(block),  d = (max - m) / 15,  q = trunc((w - m) / d + 1/2) clipped to 0..15"""
    def encode(blocks):  # [n, nb, 32] float32 -> d, m fp16 [n, nb, 1], qs uint8 [n, nb, 16]
        lo, hi = blocks.min(axis=-1, keepdims=True), blocks.max(axis=-1, keepdims=True)
        d = (hi - lo) / np.float32(15)
        q = np.trunc((blocks - lo) * np.where(d == 0, np.float32(0), np.float32(1) / d) + np.float32(0.5))
        q = np.clip(q, 0, 15).astype(np.uint8)
        return d.astype(np.float16), lo.astype(np.float16), q[..., :16] | (q[..., 16:] << 4)
    return _quantize(w, Q4_1, encode)


# ---------------------------------------------------------------------------- references ----
# float64 NumPy, written from the block layouts (ggml-quants.c's dequantize_row_*), not from the frame.

def dequantize_ggml_reference(data, ggml_type, K):  # [N, bytes] uint8 -> [N, K] float64
    (E, B), N, t = GGML_BLOCKS[ggml_type], data.shape[0], ggml_type
    raw = np.ascontiguousarray(data).reshape(N, K // E, B)
    b = raw.astype(np.int64)

    def fp16(o):  # [N, blocks, 1]
        return raw[..., o:o + 2].copy().view(np.float16).astype(np.float64)

    def per_sub(values, size):  # [N, blocks, E / size] -> [N, blocks, E]
        return np.repeat(np.asarray(values, np.float64), size, axis=-1)

    if t == Q8_0:
        w = fp16(0) * raw[..., 2:].view(np.int8)
    elif t in (Q4_0, Q4_1, Q5_0, Q5_1):
        qs = b[..., B - 16:]
        level = np.concatenate([qs & 15, qs >> 4], axis=-1)
        if t in (Q5_0, Q5_1):  # weight p's fifth bit: bit p of the u32 qh, bit p % 8 of its byte p // 8
            qh = b[..., 2:6] if t == Q5_0 else b[..., 4:8]
            level = level + 16 * ((qh[..., None] >> np.arange(8)) & 1).reshape(N, -1, 32)
        w = (fp16(0) * (level - {Q4_0: 8, Q5_0: 16}[t]) if t in (Q4_0, Q5_0) else fp16(0) * level + fp16(2))
    elif t in (Q2_K, Q3_K):  # 16 sub-blocks of 16; qs byte 32n + l holds weight 128n + 32j + l at bits 2j
        qs = (b[..., 16:80] if t == Q2_K else b[..., 32:96]).reshape(N, -1, 2, 1, 32)
        level = ((qs >> 2 * np.arange(4)[:, None]) & 3).reshape(N, -1, 256)
        if t == Q2_K:
            sc = b[..., :16]
            w = fp16(80) * per_sub(sc & 15, 16) * level - fp16(82) * per_sub(sc >> 4, 16)
        else:
            hmask = b[..., None, None, :32]  # bit 4n + j of byte l: weight 128n + 32j + l
            high = ((hmask >> np.arange(8).reshape(2, 4, 1)) & 1).reshape(N, -1, 256)
            s, v = b[..., 96:108], np.arange(16)
            low = np.where(v < 8, s[..., v % 8] & 15, s[..., v % 8] >> 4)
            sc = (low | ((s[..., 8 + v % 4] >> (2 * (v // 4))) & 3) << 4) - 32
            w = fp16(108) * per_sub(sc, 16) * (level - 4 * (1 - high))
    elif t in (Q4_K, Q5_K):  # 8 sub-blocks of 32: qs[32g + l] low nibble -> 64g + l, high -> 64g + 32 + l
        s, j = b[..., 4:16], np.arange(8)
        first, second, third = s[..., j % 4], s[..., 4 + j % 4], s[..., 8 + j % 4]  # the 3 rows of 4 bytes
        sc = np.where(j < 4, first & 63, (third & 15) | ((first >> 6) << 4))
        m = np.where(j < 4, second & 63, (third >> 4) | ((second >> 6) << 4))
        qs = b[..., B - 128:].reshape(N, -1, 4, 1, 32)
        level = np.concatenate([qs & 15, qs >> 4], axis=-2).reshape(N, -1, 256)
        if t == Q5_K:
            level = level + 16 * ((b[..., None, 16:48] >> j[:, None]) & 1).reshape(N, -1, 256)
        w = fp16(0) * per_sub(sc, 32) * level - fp16(2) * per_sub(m, 32)
    elif t in (IQ4_NL, MXFP4, IQ4_XS):  # a codebook level per nibble, as Q4_0's (per sub-block for IQ4_XS)
        qs = b[..., B - 16:] if t != IQ4_XS else b[..., 8:].reshape(N, -1, 8, 16)
        level = np.concatenate([qs & 15, qs >> 4], axis=-1).reshape(N, -1, E)
        if t == IQ4_NL:
            w = fp16(0) * IQ4_LEVELS[level]
        elif t == MXFP4:
            w = 2.0 ** (b[..., :1] - 128) * MXFP4_LEVELS[level]
        else:
            u, scales_h = np.arange(8), b[..., 2:3] | b[..., 3:4] << 8
            sc = ((b[..., 4 + u // 2] >> (4 * (u % 2))) & 15) | ((scales_h >> (2 * u)) & 3) << 4
            w = fp16(0) * per_sub(sc - 32, 32) * IQ4_LEVELS[level]
    elif t == Q6_K:  # for each half n, weight 128n + 32k + l from ql / qh as in dequantize_row_q6_K
        ql, qh = b[..., :128].reshape(N, -1, 2, 2, 32), b[..., 128:192].reshape(N, -1, 2, 1, 32)
        low = np.concatenate([ql & 15, ql >> 4], axis=-2)  # k = 0..3: ql[l], ql[l + 32], ql[l] >> 4, ...
        level = (low | ((qh >> (2 * np.arange(4)[:, None])) & 3) << 4) - 32
        w = fp16(208) * per_sub(raw[..., 192:208].view(np.int8), 16) * level.reshape(N, -1, 256)
    else:  # the grid codebooks: rows `index` of the grid (8 or 4 weights each), a sign byte per 8 weights
        w = fp16(0) * _grid_blocks_reference(b, t).reshape(N, -1, 256)
    return w.reshape(N, K)


def _grid_blocks_reference(b, t):  # [N, blocks, bytes] int64 of a grid type -> w / d [N, blocks, 256]
    N, nb = b.shape[:2]

    def u32(x):  # [..., 4n] bytes -> [..., n] little-endian words: byte i shifted by 8i, summed
        return (x.reshape(*x.shape[:-1], -1, 4) << np.arange(0, 32, 8)).sum(axis=-1)

    def fields(x, bits, n):  # [..., m] -> [..., m * n]: n fields of `bits` bits each, lowest first
        return ((x[..., None] >> (bits * np.arange(n))) & ((1 << bits) - 1)).reshape(*x.shape[:-1], -1)

    if t in (IQ2_XXS, IQ3_XXS):  # a u32 per sub-block: 4 x 7 sign indices, a 4-bit scale on top
        if t == IQ2_XXS:  # per sub-block 8 bytes: 4 indices, the u32
            sub = b[..., 2:].reshape(N, nb, 8, 8)
            index, aux = sub[..., :4].reshape(N, nb, 32), u32(sub[..., 4:]).reshape(N, nb, 8)
        else:  # 64 indices, then the 8 u32
            index, aux = b[..., 2:66], u32(b[..., 66:98])
        signs = KSIGNS[fields(aux, 7, 4)]
        scale = np.repeat((0.5 + (aux >> 28)) * (0.25 if t == IQ2_XXS else 0.5), 32, axis=-1)
    elif t == IQ2_XS:
        q = b[..., 2:66:2] | b[..., 3:66:2] << 8
        index, signs = q & 511, KSIGNS[q >> 9]
        scale = np.repeat((0.5 + fields(b[..., 66:74], 4, 2)) * 0.25, 16, axis=-1)  # nibbles, low first
    elif t == IQ2_S:
        index, signs = b[..., 2:34] | fields(b[..., 66:74], 2, 4) << 8, b[..., 34:66]
        scale = np.repeat((0.5 + fields(b[..., 74:82], 4, 2)) * 0.25, 16, axis=-1)
    else:  # IQ3_S
        index, signs = b[..., 2:66] | fields(b[..., 66:74], 1, 8) << 8, b[..., 74:106]
        scale = np.repeat(1.0 + 2 * fields(b[..., 106:110], 4, 2), 32, axis=-1)
    grid = {IQ2_XXS: IQ2_XXS_GRID, IQ2_XS: IQ2_XS_GRID, IQ2_S: IQ2_S_GRID, IQ3_XXS: IQ3_XXS_GRID,
            IQ3_S: IQ3_S_GRID}[t]
    magnitude = grid[index].reshape(N, nb, 256)
    return scale * magnitude * (1 - 2 * fields(signs, 1, 8))


def matvec_ggml_reference(data, ggml_type, x):  # [N, bytes], [K] -> [N] float64
    return dequantize_ggml_reference(data, ggml_type, x.shape[0]) @ x.astype(np.float64)
