"""Decode products of GGML-quantised weights on the CPU's integer dot products (one token, or a few).

The block formats store a row of W as small integers q with float scales per block (GGML's layouts, see
kernels/ggml.py). Rounding x per block of 32 too, to int16 (L = 32767) or int8 (L = 127, opt-in),

    xq = round(x / xd),  xd = max|x in block| / L          (x moves by at most xd / 2)

makes each block's product an integer dot product times two scales: for Q8_0 (w = d q)

    sum_i w_i x_i  ~=  d xd sum_i q_i xq_i

and sum q xq is products of integers summed in int32 (`_dot`): int16 pairs (simd.dot_s16: vpmaddwd, or
vpdpwssd with VNNI), or int8 quads (dot_u8s8: one vpdpbusd per 32 weights, the weights' levels its unsigned
operand). The formats differ in how q is unpacked (`_levels`; levels a format stores a constant too high are
set right where the dot starts, _offsets) and in a minimum term from per-block sums of x:

    Q8_0   w = d q                    q int8 (for int8 xq stored + 128 as vpdpbusd reads it)
    Q4_0   w = d (q - 8)              q 4-bit
    Q5_0   w = d (q - 16)             q 4-bit + a fifth bit from 32 bits per block
    Q4_1   w = d q + m                q 4-bit                          term  m sum(x)
    Q5_1   w = d q + m                q 5-bit as Q5_0
    Q4_K   w = d sc_j q - dmin m_j    q 4-bit, 8 sub-blocks of 32       term  -dmin m_j sum(x)
    Q5_K   w = d sc_j q - dmin m_j    q 5-bit, the fifth bits in 32 bytes per super-block
    Q6_K   w = d sc_g (q - 32)        q 6-bit, 16 sub-blocks of 16
    IQ4_NL w = d iq4[q]               q 4-bit indexing a 16-entry codebook (kernels/ggml.py's IQ4_LEVELS)
    IQ4_XS w = d (sc_j - 32) iq4[q]   as IQ4_NL, 8 sub-blocks of 32 with 6-bit scales

Why int16 activations by default, not llama.cpp's int8 (Q8): int8 moves each product by up to 1/254 of its
terms (int16: 1/65534), enough to swap SmolLM2-135M's two best first tokens. MINQWEN_DECODE=int8 opts in.

Everything stays in vector registers, 32-byte ones (AVX2; Q6_K's 512-bit on avx512: WORDS); a few tokens go
four at a time (_in_fours), each part of a row unpacked once for all; types not in INTEGER_TYPES take
ggml.py's float kernel. Why, and what it measured: docs/gguf-and-quantisation.md#the-integer-kernels.
"""
import numpy as np
from numba import prange
from numba.extending import overload

from . import isa
from .ggml import (
    BLOCK_BYTES,
    IQ4_LEVELS,
    IQ4_NL,
    IQ4_XS,
    Q4_0,
    Q4_1,
    Q4_K,
    Q5_0,
    Q5_1,
    Q5_K,
    Q6_K,
    Q8_0,
    dequantize_ggml_reference,
)
from .jit import ijit, jit, pjit
from .simd import (
    Vector,
    abs_max,
    as_bytes,
    bit_words,
    bytes_of,
    bytes_to_float,
    dot_s16,
    dot_u8s8,
    field,
    fma,
    fp16_splat,
    fzeros,
    hsum,
    izeros,
    join,
    lane,
    load,
    lookup16,
    prefetch,
    quads,
    round16,
    splat,
    splat_at,
    store,
    to_float,
    u32_at,
    widen16,
    words,
)

INTEGER_TYPES = (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS)  # the types with a kernel
# the IQ4 codebook + 127 (unsigned, entry 0 is 0) in both 128-bit halves of a register, for lookup16
IQ4_TABLE = np.tile(IQ4_LEVELS.astype(np.int16) + 127, 2).astype(np.uint8)
PREFETCH_BYTES = 2048  # Zen 3, one core: 1-4 KB ahead brings 0.85-0.98 of the bandwidth, 256 B nothing
# the largest |xq| L and 1 / L: xd = m / L and 1 / xd as fastmath computes them (m times the constant 1 / L,
# L / m), written so that the reference does the same float32 steps and x / xd rounds there as here (ties too)
INT8, INT16 = (np.float32(127.0), np.float32(1.0 / 127.0)), (np.float32(32767.0), np.float32(1.0 / 32767.0))
# Q4_K / Q5_K scales: 12 bytes = words w0, w1, w2; sub-block j < 4: scale w0 byte j & 63, min w1 byte j & 63;
# j >= 4: the low 4 bits in w2's bytes (scale low nibble, min high nibble), the top 2 in w0 / w1's bits 6-7
LOW6, LOW4, TOP2 = 0x3F3F3F3F, 0x0F0F0F0F, 0x30303030
# where a block's level bits begin, in the types with a minimum term (others: centred _levels, or _offsets)
LEVEL_BITS_AT = {Q4_1: 4, Q5_1: 4, Q4_K: 16, Q5_K: 16}
WORDS, FLOATS = (32, 16) if isa.ISA == "avx512" else (16, 8)  # int16 / float32 lanes at the path's width
# The order _matmul_q6_k reads a super-block's xq in: position q is lane m of a vector of WORDS, p = 0 / 1 the
# even / odd bytes, of nibble k, of part u (ql bytes 32 (u % 2).. of half u // 2; with WORDS = 32 the upper 16
# lanes are the other half's): weight 32 (2k + u % 2) + (2 m + p) % 32 + 128 (u // 2 + m // 16)
_q = np.arange(256)
_m, _p, _k, _u = _q % WORDS, _q // WORDS % 2, _q // (2 * WORDS) % 2, _q // (4 * WORDS)
EVEN_ODD = _q // 32 * 32 + np.tile(np.r_[0:32:2, 1:32:2], 8)  # each 32 weights' even ones, then the odd
Q6_K_ORDER = 32 * (2 * _k + _u % 2) + 2 * (_m % 16) + _p + 128 * (_u // 2 + _m // 16)
_r16, _rw = _q % 32, _q % (2 * WORDS)  # int8 dots the bytes where int16 dots n even ones, then n odd
ORDERS = np.array([[_q, _q - _r16 + _r16 % 2 * 16 + _r16 // 2], [_q, _q],  # [32-weight types, Q8_0, K-quants,
                   [EVEN_ODD, _q], [Q6_K_ORDER, Q6_K_ORDER[_q - _rw + _rw % 2 * WORDS + _rw // 2]]])  # Q6_K]
REORDERED = (ORDERS != _q).any(axis=2)  # whether xq is put in ORDERS' order


@jit
def quantize_activations(xq, xd, xsum, x):  # xq: [K] int16/int8, xd, xsum: [K/32] f32 (outputs), x: [K] f32
    """xd[b] = max|x in block b| / L,  xq = round(x / xd),  xsum[b] = sum of block b of x  (L: INT16, INT8)"""
    top, step = INT8 if xq.itemsize == 1 else INT16
    for b in range(x.shape[0] // 32):  # vectors (round16 rounds ties to even, as round did): 2-4x the loop
        m, total = np.float32(0.0), fzeros(FLOATS)
        for i in range(32 * b, 32 * b + 32, FLOATS):
            m, total = max(m, abs_max(load(x, i, FLOATS))), total + load(x, i, FLOATS)
        inverse = splat(top / m if m > 0 else np.float32(0.0), FLOATS)
        for i in range(32 * b, 32 * b + 32, FLOATS):
            store(xq, i, round16(load(x, i, FLOATS) * inverse))
        xd[b], xsum[b] = m * step, hsum(total)


def _dot(start, levels, xq, e):
    """start + levels . xq[e:] in int32 lanes. levels: two int16 vectors (weights 0-15, 16-31 of 32), one
    whose int16 lanes hold two levels (int16 xq: the low bytes' n, then the high bytes'), or bytes. For int8
    xq (in the order of the bytes) all are bytes (0..255) of one vector: one vpdpbusd; int16: two vpdpwssd"""


@overload(_dot)
def _dot_for(start, levels, xq, e):
    paired, int8 = isinstance(levels, Vector), xq.dtype.bitwidth == 8
    n = levels.lanes if paired else levels.dtype.lanes  # a compile-time constant (the lambdas' free
    if paired and levels.kind == "i8":  # variables are; expressions in them are not)
        return lambda start, levels, xq, e: dot_u8s8(start, levels, load(xq, e, n))
    if paired and int8:
        return lambda start, levels, xq, e: _dot(start, as_bytes(levels), xq, e)
    if paired:
        return lambda start, levels, xq, e: _dot(start, (field(levels, 0, 255), field(levels, 8, 255)), xq, e)
    if int8:
        return lambda start, levels, xq, e: _dot(start, join(levels[0], levels[1], 8), xq, e)
    return lambda start, levels, xq, e: dot_s16(dot_s16(start, levels[0], load(xq, e, n)), levels[1],
                                                load(xq, e + n, n))


@jit
def _excess(t, xq):  # how far above their levels t stores them, with xq's width (_offsets)
    return (127 if t == IQ4_NL or t == IQ4_XS else 8 if t == Q4_0 else 16 if t == Q5_0 else 32 if t == Q6_K
            else 128 if t == Q8_0 and np.iinfo(xq.dtype).bits == 8 else 0)  # (as _offsets' s)


@jit
def _offsets(offset, xq, lanes, excess):  # offset: [K/4] int32 (output), xq: [K] int16 or int8
    """offset[e/4 + l] = -excess sum_{j<4} xq[e + (j // s) s lanes + s l + j % s]  (s = 4 / xq's bytes, e = 4
    lanes c): what lane l of a dot into `lanes` int32 lanes (_dot) gains from levels stored `excess` too high
    (_excess: IQ4_TABLE's + 127, Q6_K's + 32, ...): a dot started there is theirs"""
    s = 32 // np.iinfo(xq.dtype).bits  # 2 / 4 xq in a lane (a compile-time constant, as xq.itemsize is not)
    for e in range(0, xq.shape[0], 4 * lanes):
        for lane_ in range(lanes):
            four = np.int32(0)
            for j in range(4):
                four += np.int32(xq[e + j // s * s * lanes + s * lane_ + j % s])
            offset[e // 4 + lane_] = -excess * four


@jit
def _iq4_levels(row, o):  # the 32 IQ4 levels + 127 of the 16 bytes of nibbles at row[o:], two int16 vectors
    packed, table = widen16(row, o, False), load(IQ4_TABLE, 0, 32)  # weights 0-15 low nibbles, 16-31 high
    return lookup16(table, field(packed, 0, 15)), lookup16(table, field(packed, 4, 15))


def _levels(row, o, t, xq):
    """the 32 levels of the block at row[o:] (a 32-weight type t): for int16 xq two int16 vectors (weights
    0-15, 16-31); for int8 xq bytes in xq's order (ORDERS): Q8_0's q + 128, others' l, 16 + l at 2l, 2l + 1"""


@overload(_levels)
def _levels_for(row, o, t, xq):
    return (lambda row, o, t, xq: _byte_levels(row, o, t)) if xq.dtype.bitwidth == 8 else (
        lambda row, o, t, xq: _word_levels(row, o, t))


@jit
def _byte_levels(row, o, t):
    if t == Q8_0:
        return load(row, o + 2, 32) - 128
    if t == Q4_0 or t == Q4_1:
        packed = widen16(row, o + BLOCK_BYTES[t] - 16, False)
        return as_bytes(field(join(packed, packed, 4), 0, 0x0F0F))
    low, high = _word_levels(row, o, t)
    return as_bytes(join(low, high, 8))


@jit
def _word_levels(row, o, t):
    if t == Q8_0:  # d, qs[32]
        return widen16(row, o + 2, True), widen16(row, o + 18, True)
    if t == IQ4_NL:  # d, qs[16]: the nibbles index the codebook
        return _iq4_levels(row, o + 2)
    packed = widen16(row, o + BLOCK_BYTES[t] - 16, False)  # qs[16]: weights 0-15 low nibbles, 16-31 high
    low, high = field(packed, 0, 15), field(packed, 4, 15)
    if t == Q4_0 or t == Q4_1:  # d, (m,) qs[16]; Q4_0's - 8 is in the offset its dot starts from
        return low, high
    fifth = o + (2 if t == Q5_0 else 4)  # Q5_0: d, qh[4], qs[16] (its - 16 in the offset); Q5_1: d, m, qh, qs
    return low + bit_words(row, fifth, 16), high + bit_words(row, fifth + 2, 16)


@jit
def _block_part(a, t, xq, xd, eighths, offset, c, levels, d, m):  # a + block c's (flat: B i + b) product
    start = load(offset, 8 * c, 8) if _excess(t, xq) else izeros(8)  # levels stored too high
    a = fma(to_float(_dot(start, levels, xq, 32 * c)), d * splat_at(xd, c, 8), a)  # d xd
    return fma(m, splat_at(eighths, c, 8), a) if t == Q4_1 or t == Q5_1 else a


@ijit
def _block_tokens(out, row, n, args, i, g):  # tokens i .. i + g - 1 (g <= 4) of row n
    t, xq, xd, eighths, offset = args
    a0 = a1 = b0 = b1 = c0 = c1 = d0 = d1 = fzeros(8)  # each token's sums of even and of odd blocks
    i1, i2, i3, B = min(i + 1, i + g - 1), min(i + 2, i + g - 1), min(i + 3, i + g - 1), xd.shape[1]
    for b in range(B):
        o = BLOCK_BYTES[t] * b
        if b % 2 == 0:
            prefetch(row, o + PREFETCH_BYTES)
        levels, d, m = _levels(row, o, t, xq), fp16_splat(row, o, 8), fp16_splat(row, o + 2, 8)
        a0 = _block_part(a0, t, xq, xd, eighths, offset, B * i + b, levels, d, m)
        b0 = _block_part(b0, t, xq, xd, eighths, offset, B * i1 + b, levels, d, m) if g > 1 else b0
        c0 = _block_part(c0, t, xq, xd, eighths, offset, B * i2 + b, levels, d, m) if g > 2 else c0
        d0 = _block_part(d0, t, xq, xd, eighths, offset, B * i3 + b, levels, d, m) if g > 3 else d0
        a0, a1, b0, b1, c0, c1, d0, d1 = a1, a0, b1, b0, c1, c0, d1, d0  # the next block into the other sums
    out[i3, n], out[i2, n], out[i1, n], out[i, n] = hsum(d0 + d1), hsum(c0 + c1), hsum(b0 + b1), hsum(a0 + a1)


@ijit
def _in_fours(tokens, out, data, n, T, args):  # tokens(out, row n, n, args, i, g): T tokens four at a time,
    for i in range(0, T - T % 4, 4):  # the rest two and one at a time (each g compiles its own code; a
        tokens(out, data[n], n, args, i, 4)  # kernel's tokens past g are i + g - 1, whose sum it writes last)
    if T % 4 > 1:
        tokens(out, data[n], n, args, T - T % 4, 2)
    if T % 2:
        tokens(out, data[n], n, args, T - 1, 1)


@pjit
def _matmul_blocks(out, data, t, xq, xd, eighths, offset):  # t: a 32-weight type; eighths: xsum / 8
    """out[i, n] = sum_b d_b xd_ib (q_b . xq_ib)  [+ m_b xsum_ib]     (b over blocks of 32)"""
    for n in prange(data.shape[0]):  # the row is read from memory once
        _in_fours(_block_tokens, out, data, n, xq.shape[0], (t, xq, xd, eighths, offset))


@jit
def _k_part(a, b, xq, f, levels, ds, j):  # (a, b) + the dots of sub-blocks j, j + 1 with xq (flat) from f
    a = fma(to_float(_dot(izeros(8), levels[0], xq, f)), lane(ds, j), a)
    return a, fma(to_float(_dot(izeros(8), levels[1], xq, f + 32)), lane(ds, j + 1), b)


@ijit
def _k_tokens(out, row, n, args, i, g):  # tokens i .. i + g - 1 (g <= 4) of row n
    t, xq, xd, negated = args  # negated: -xsum
    a0 = a1 = b0 = b1 = c0 = c1 = d0 = d1 = fzeros(8)  # each token's two sums (a0.. with the minimum terms)
    i1, i2, i3 = min(i + 1, i + g - 1), min(i + 2, i + g - 1), min(i + 3, i + g - 1)
    size, qs, K, B = BLOCK_BYTES[t], 48 if t == Q5_K else 16, xq.shape[1], xd.shape[1]
    for s in range(B // 8):
        o = size * s
        for line in range(0, size, 64):
            prefetch(row, o + line + PREFETCH_BYTES)
        w0, w1, w2 = u32_at(row, o + 4), u32_at(row, o + 8), u32_at(row, o + 12)
        scales = bytes_to_float(bytes_of(w0 & LOW6, (w2 & LOW4) | ((w0 >> 2) & TOP2)), False)
        ms = bytes_to_float(bytes_of(w1 & LOW6, (w2 >> 4 & LOW4) | (w1 >> 2 & TOP2)), False)
        scales, ms = fp16_splat(row, o, 8) * scales, fp16_splat(row, o + 2, 8) * ms
        ds0, ds1 = scales * load(xd, B * i + 8 * s, 8), scales * load(xd, B * i1 + 8 * s, 8)  # d sc_j xd_j
        ds2, ds3 = scales * load(xd, B * i2 + 8 * s, 8), scales * load(xd, B * i3 + 8 * s, 8)
        a0, b0 = fma(ms, load(negated, B * i + 8 * s, 8), a0), fma(ms, load(negated, B * i1 + 8 * s, 8), b0)
        c0, d0 = fma(ms, load(negated, B * i2 + 8 * s, 8), c0), fma(ms, load(negated, B * i3 + 8 * s, 8), d0)
        for c in range(4):  # 32 bytes: low nibbles are sub-block 2c, high 2c + 1; as Q6_K, a word's 2 levels
            q, e = words(row, o + qs + 32 * c, 0, 16), 256 * s + 64 * c  # at once (Q5_K: 1.06-1.1x)
            levels = (field(q, 0, 0x0F0F), field(q, 4, 0x0F0F))
            if t == Q5_K:  # fifth bits 2c (low), 2c + 1 (high) of qh
                fifth = words(row, o + 16, 0, 16)
                levels = (join(levels[0], field(fifth, 2 * c, 0x0101), 4),
                          join(levels[1], field(fifth, 2 * c + 1, 0x0101), 4))
            a0, a1 = _k_part(a0, a1, xq, K * i + e, levels, ds0, 2 * c)
            b0, b1 = _k_part(b0, b1, xq, K * i1 + e, levels, ds1, 2 * c) if g > 1 else (b0, b1)
            c0, c1 = _k_part(c0, c1, xq, K * i2 + e, levels, ds2, 2 * c) if g > 2 else (c0, c1)
            d0, d1 = _k_part(d0, d1, xq, K * i3 + e, levels, ds3, 2 * c) if g > 3 else (d0, d1)
    out[i3, n], out[i2, n], out[i1, n], out[i, n] = hsum(d0 + d1), hsum(c0 + c1), hsum(b0 + b1), hsum(a0 + a1)


@pjit
def _matmul_k(out, data, t, xq, xd, negated):  # Q4_K: d, dmin, scales[12], qs[128]; Q5_K: .. qh[32], qs[128]
    """out[i, n] = sum_j d sc_j xd_ij (q_j . xq_ij) - dmin m_j xsum_ij      (j over sub-blocks of 32)"""
    for n in prange(data.shape[0]):
        _in_fours(_k_tokens, out, data, n, xq.shape[0], (t, xq, xd, negated))


@jit
def _q6_k_part(a, b, xq, offset, f, ds, levels):  # (a, b) + the levels' dot with xq (flat) from f, scaled
    pair, k, j = levels  # k = 0 / 1: the low / high nibbles, summed in a / b; j: their scales in ds
    p = fma(to_float(_dot(load(offset, f // 4, FLOATS), pair, xq, f)), quads(ds, j), a if k == 0 else b)
    return (p, b) if k == 0 else (a, p)


@ijit
def _q6_k_tokens(out, row, n, args, i, g):  # tokens i .. i + g - 1 (g <= 4) of row n
    xq, xd16, offset = args
    a0 = a1 = b0 = b1 = c0 = c1 = d0 = d1 = fzeros(FLOATS)  # each token's two sums in registers
    i1, i2, i3, K = min(i + 1, i + g - 1), min(i + 2, i + g - 1), min(i + 3, i + g - 1), xq.shape[1]
    for s in range(xd16.shape[1] // 16):
        o = BLOCK_BYTES[Q6_K] * s
        for line in range(0, BLOCK_BYTES[Q6_K], 64):
            prefetch(row, o + line + PREFETCH_BYTES)
        for h in range(0, 2, WORDS // 16):  # half h: ql[64h:], qh[32h:], sub-blocks 8h..; 32 WORDS: 2
            dsc = fp16_splat(row, o + 208, FLOATS) * bytes_to_float(load(row, o + 192 + 8 * h, FLOATS), True)
            qh, x = words(row, o + 128 + 32 * h, 32, WORDS), 16 * s + 8 * h
            ds0, ds1 = dsc * load(xd16[i], x, FLOATS), dsc * load(xd16[i1], x, FLOATS)  # d sc_g xd_g
            ds2, ds3 = dsc * load(xd16[i2], x, FLOATS), dsc * load(xd16[i3], x, FLOATS)
            for c in range(2):  # ql bytes 32c.. (and the other half's): groups of 32 c and c + 2
                ql = words(row, o + 64 * h + 32 * c, 64, WORDS)
                e = 256 * s + 128 * h + 4 * WORDS * c  # where this part's 4 WORDS weights sit in xq
                for k in range(2):  # low / high nibbles (group c + 2k): the even, odd bytes' levels,
                    at = e + 2 * WORDS * k  # a word's two at once, apart for int16 (each alone: 1.06-1.11x)
                    pair = join(field(ql, 4 * k, 0x0F0F), field(qh, 2 * c + 4 * k, 0x0303), 4)
                    levels = (pair, k, 2 * c + 4 * k)
                    a0, a1 = _q6_k_part(a0, a1, xq, offset, K * i + at, ds0, levels)
                    b0, b1 = _q6_k_part(b0, b1, xq, offset, K * i1 + at, ds1, levels) if g > 1 else (b0, b1)
                    c0, c1 = _q6_k_part(c0, c1, xq, offset, K * i2 + at, ds2, levels) if g > 2 else (c0, c1)
                    d0, d1 = _q6_k_part(d0, d1, xq, offset, K * i3 + at, ds3, levels) if g > 3 else (d0, d1)
    out[i3, n], out[i2, n], out[i1, n], out[i, n] = hsum(d0 + d1), hsum(c0 + c1), hsum(b0 + b1), hsum(a0 + a1)


@pjit
def _matmul_q6_k(out, data, xq, xd16, offset):  # Q6_K: ql[128] (low 4 bits), qh[64] (high 2), int8 sc[16], d
    """out[i, n] = sum_g d sc_g xd_ig (q_g - 32) . xq_ig      (g over sub-blocks of 16; xq in Q6_K_ORDER)"""
    for n in prange(data.shape[0]):
        _in_fours(_q6_k_tokens, out, data, n, xq.shape[0], (xq, xd16, offset))


@pjit
def _matmul_iq4_xs(out, data, xq, xd, offset):  # IQ4_XS: d, scales_h (u16), scales_l[4], qs[128]
    """out[i, n] = sum_j d (sc_j - 32) xd_ij (iq4[q_j] . xq_ij)      (j over sub-blocks of 32)"""
    size = BLOCK_BYTES[IQ4_XS]
    for n in prange(data.shape[0]):
        row = data[n]
        for i in range(xq.shape[0]):  # tokens: the row is read from memory once, then from the cache
            a0, a1 = fzeros(8), fzeros(8)
            for s in range(xd.shape[1] // 8):
                o = size * s
                for line in range(0, size, 64):
                    prefetch(row, o + line + PREFETCH_BYTES)
                # sc_j - 32 as 8 signed bytes: low 4 bits nibble j of scales_l, high 2 bits 2j of scales_h
                high, low = np.int64(row[o + 2]) | np.int64(row[o + 3]) << 8, np.int64(u32_at(row, o + 4))
                w0, w1 = np.int64(0), np.int64(0)
                for j in range(4):
                    w0 |= ((((low >> 4 * j) & 15) | ((high >> 2 * j) & 3) << 4) - 32 & 255) << 8 * j
                    w1 |= ((((low >> 4 * j + 16) & 15) | ((high >> 2 * j + 8) & 3) << 4) - 32 & 255) << 8 * j
                ds = fp16_splat(row, o, 8) * bytes_to_float(bytes_of(w0, w1), True) * load(xd[i], 8 * s, 8)
                for j in range(0, 8, 2):
                    low0, high0 = _iq4_levels(row, o + 8 + 16 * j)
                    low1, high1 = _iq4_levels(row, o + 24 + 16 * j)
                    e = 256 * s + 32 * j
                    start0, start1 = load(offset[i], e // 4, 8), load(offset[i], e // 4 + 8, 8)  # + 127's
                    a0 = fma(to_float(_dot(start0, (low0, high0), xq[i], e)), lane(ds, j), a0)
                    a1 = fma(to_float(_dot(start1, (low1, high1), xq[i], e + 32)), lane(ds, j + 1), a1)
            out[i, n] = hsum(a0 + a1)


@jit
def matmul_integer(out, data, ggml_type, x, activations):
    # out: [T, N] float32, data: [N, bytes] uint8 blocks of ggml_type (in INTEGER_TYPES), x: [T, K] float32,
    # activations: np.dtype(np.int16) or (where isa.VNNI_BITS has 256: vpdpbusd) np.dtype(np.int8)
    """out[i, n] = sum_k w[n, k] x[i, k] on integer dot products, x rounded to `activations` per block of 32,
    for one token or a few (W read once for all); the one switch over the types, a kernel per branch."""
    T, K = x.shape
    x = np.ascontiguousarray(x)  # quantize_activations loads its rows as vectors
    xq = np.empty((T, K), activations)
    xd, xsum = np.empty((T, K // 32), np.float32), np.empty((T, K // 32), np.float32)
    t, int8 = ggml_type, int(xq.itemsize == 1)
    kind, excess = 3 if t == Q6_K else 2 if t == Q4_K or t == Q5_K else int(t == Q8_0), _excess(t, xq)
    offset = np.empty((T, K // 4 if excess else 0), np.int32)
    for i in range(T):
        quantize_activations(xq[i], xd[i], xsum[i], x[i])
        if REORDERED[kind, int8]:  # into its order from a copy (a gather in place allocated twice per 256)
            natural, order = xq[i].copy(), ORDERS[kind, int8]
            for e in range(K):
                xq[i, e] = natural[e // 256 * 256 + order[e % 256]]
        if excess:  # Q6_K's on its vectors of WORDS int16 lanes, in its order
            _offsets(offset[i], xq[i], WORDS // 2 if t == Q6_K else 8, excess)
    eighths = xsum * np.float32(0.125)  # a block's minimum term goes to all 8 lanes of a sum, 1/8 in each
    (_matmul_blocks(out, data, Q8_0, xq, xd, eighths, offset) if t == Q8_0
     else _matmul_blocks(out, data, Q4_0, xq, xd, eighths, offset) if t == Q4_0
     else _matmul_blocks(out, data, Q4_1, xq, xd, eighths, offset) if t == Q4_1
     else _matmul_blocks(out, data, Q5_0, xq, xd, eighths, offset) if t == Q5_0
     else _matmul_blocks(out, data, Q5_1, xq, xd, eighths, offset) if t == Q5_1
     else _matmul_k(out, data, Q4_K, xq, xd, -xsum) if t == Q4_K
     else _matmul_k(out, data, Q5_K, xq, xd, -xsum) if t == Q5_K
     else _matmul_blocks(out, data, IQ4_NL, xq, xd, eighths, offset) if t == IQ4_NL
     else _matmul_iq4_xs(out, data, xq, xd, offset) if t == IQ4_XS
     else _matmul_q6_k(out, data, xq, np.repeat(xd, 2).reshape(T, K // 16), offset))  # Q6_K: xd per 16


def matmul_integer_reference(data, ggml_type, x, activations):  # [N, bytes] uint8, [T, K] float32 -> [T, N]
    """matmul_integer's math in float64: x rounded as quantize_activations rounds it (xd and x / xd in
    float32, as there, so that the same elements round the same way) times the weights' level terms, plus
    their minimum terms (the part of w that does not scale with the level: Q4_1 / Q5_1's m, Q4_K / Q5_K's
    -dmin m_j) times the exact x, as the block sums xsum give them. matmul_integer agrees with this to float32
    rounding; with the exact x W^T only to within sum_k |w - minimum| xd / 2 (how far x moved)."""
    T, K = x.shape
    blocks = x.reshape(T, K // 32, 32)
    m = np.abs(blocks).max(axis=2, keepdims=True)
    top, step = INT8 if activations == np.int8 else INT16
    xd, inverse = m * step, np.divide(top, m, out=np.zeros_like(m), where=m > 0)
    x_rounded = (np.round(blocks * inverse) * xd.astype(np.float64)).reshape(T, K)
    w = dequantize_ggml_reference(data, ggml_type, K)
    minimum = np.zeros_like(w)
    if ggml_type in LEVEL_BITS_AT:  # the same blocks with every level bit zero weigh the minimum terms alone
        zeroed = data.reshape(data.shape[0], -1, BLOCK_BYTES[ggml_type]).copy()
        zeroed[..., LEVEL_BITS_AT[ggml_type]:] = 0
        minimum = dequantize_ggml_reference(zeroed.reshape(data.shape[0], -1), ggml_type, K)
    return x_rounded @ (w - minimum).T + x.astype(np.float64) @ minimum.T
