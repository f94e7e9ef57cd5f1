"""Decode products of GGML-quantised weights with int8 activations, on the CPU's integer dot products.

The block formats store a row of W as small integers q with a float scale per block (GGML's layouts, see
kernels/ggml.py). Rounding x to int8 per block of 32 too (llama.cpp's Q8 activations),

    xq = round(x / xd),  xd = max|x in block| / 127        (x moves by at most xd / 2)

makes each block's product an integer dot product times two scales: for Q8_0 (w = d q)

    sum_i w_i x_i  ~=  d xd sum_i q_i xq_i

and sum q xq is 32 int8 products summed in int32 (simd.dot_s8: vpmaddubsw + vpmaddwd, or vpdpbusd):
~5 instructions per 32 weights where float math needs ~12. The other formats differ only in how q is
unpacked and in a constant term, summed once per row from per-block sums of x and xq:

    Q4_0   w = d (q - 8)                 q 4-bit          term  -8 d xd sum(xq)
    Q4_1   w = d q + m                   q 4-bit          term  m sum(x)
    Q4_K   w = d sc_j q - dmin m_j       q 4-bit          term  -dmin m_j sum(x)
                                         8 sub-blocks of 32 with 6-bit sc_j, m_j
    Q6_K   w = d sc_j (q - 32)           q 6-bit          term  -32 d sc_j xd sum(xq)
                                         16 sub-blocks of 16 with int8 sc_j

The rounding of x costs ~5e-3 of each product's size (tests/test_kernels_intdot.py measures it; the
float kernels of kernels/ggml.py keep x exact). Per row, the block scales are multiplied by xd and
widened to float32 first, into a small buffer: a fp16 conversion inside the loop would tie each block to
the accumulator through a false dependency (vpinsrw), measured 1.35-1.6x slower. Four accumulators and a
software prefetch 2 KB ahead (the hardware prefetcher alone left ~25% of the bandwidth unused on one
core) make the rest. The kernels use 32-byte vectors: AVX2, and with AVX512-VNNI / AVX-VNNI the same code
compiles dot_s8 / dot_u8s8 to vpdpbusd.
"""
import numpy as np
from numba import prange

from .dtypes import widen
from .jit import jit, pjit
from .simd import (
    dot_s8,
    dot_u8s8,
    field,
    fma,
    fzeros,
    hsum,
    izeros,
    join,
    load,
    nibbles,
    pair_splat,
    prefetch,
    splat,
    to_float,
)

# measured on Zen 3, one core: 1-4 KB ahead brings 0.85-0.98 of the bandwidth, 256 B nothing
PREFETCH_BYTES = 2048
Q8_0_BYTES, Q4_0_BYTES, Q4_1_BYTES, Q4_K_BYTES, Q6_K_BYTES = 34, 18, 20, 144, 210  # bytes per block


@jit
def fp16_at(row, off):  # the little-endian fp16 at row[off:off+2] -> float32
    return widen(np.int16(np.uint16(row[off]) | (np.uint16(row[off + 1]) << np.uint16(8))))


@jit
def quantize_activations(xq, xd, xsum, xq16, x):
    # xq: [K] int8, xd, xsum: [K/32] float32, xq16: [K/16] int32 (outputs), x: [K] float32
    """xd[b] = max|x in block b| / 127,  xq = round(x / xd),  xsum[b] = sum of block b of x,
    xq16[g] = sum of xq over group g of 16"""
    for b in range(x.shape[0] // 32):
        m = np.float32(0.0)
        total = np.float32(0.0)
        for i in range(32 * b, 32 * b + 32):
            m = max(m, abs(x[i]))
            total += x[i]
        d = m / np.float32(127.0)
        inverse = np.float32(1.0) / d if d > 0 else np.float32(0.0)
        for g in range(2 * b, 2 * b + 2):
            s = 0
            for i in range(16 * g, 16 * g + 16):
                q = np.int8(round(x[i] * inverse))
                xq[i] = q
                s += q
            xq16[g] = s
        xd[b], xsum[b] = d, total


@jit
def _q8_0_block(acc, row, block, xq):  # acc + (32 products of block `block`) in 8 lanes, unscaled
    return dot_s8(acc, load(row, Q8_0_BYTES * block + 2, 32), load(xq, 32 * block, 32))


@pjit
def matvec_q8_0(out, data, xq, xd):  # out: [N] float32, data: [N, K/32 * 34] uint8 Q8_0 blocks
    """out[n] = sum_b d[n, b] xd[b] sum_{i<32} q[n, 32b+i] xq[32b+i]"""
    nb = xd.shape[0]
    for n in prange(data.shape[0]):
        row = data[n]
        ds = np.empty(nb, np.float32)
        for b in range(nb):
            ds[b] = fp16_at(row, Q8_0_BYTES * b) * xd[b]
        a0, a1, a2, a3 = fzeros(8), fzeros(8), fzeros(8), fzeros(8)
        b = 0
        while b + 4 <= nb:
            prefetch(row, Q8_0_BYTES * b + PREFETCH_BYTES)
            prefetch(row, Q8_0_BYTES * b + PREFETCH_BYTES + 64)
            a0 = fma(to_float(_q8_0_block(izeros(8), row, b, xq)), splat(ds[b], 8), a0)
            a1 = fma(to_float(_q8_0_block(izeros(8), row, b + 1, xq)), splat(ds[b + 1], 8), a1)
            a2 = fma(to_float(_q8_0_block(izeros(8), row, b + 2, xq)), splat(ds[b + 2], 8), a2)
            a3 = fma(to_float(_q8_0_block(izeros(8), row, b + 3, xq)), splat(ds[b + 3], 8), a3)
            b += 4
        for c in range(b, nb):
            a0 = fma(to_float(_q8_0_block(izeros(8), row, c, xq)), splat(ds[c], 8), a0)
        out[n] = hsum((a0 + a1) + (a2 + a3))


@jit
def _q4_block(acc, row, block, block_bytes, xq):  # acc + nibbles (at byte block_bytes - 16) . xq, unscaled
    return dot_u8s8(acc, nibbles(row, block_bytes * block + block_bytes - 16, 32), load(xq, 32 * block, 32))


@pjit
def matvec_q4(out, data, xq, xd, xsum, xq16, with_min):  # data: [N, K/32 * (18 or 20)] Q4_0 / Q4_1 blocks
    """Q4_0 (with_min False): out[n] = sum_b d xd (sum_i q xq - 8 sum_i xq)
    Q4_1 (with_min True):  out[n] = sum_b d xd sum_i q xq + m sum_i x"""
    nb = xd.shape[0]
    block_bytes = Q4_1_BYTES if with_min else Q4_0_BYTES
    for n in prange(data.shape[0]):
        row = data[n]
        ds = np.empty(nb, np.float32)
        constant = np.float32(0.0)
        for b in range(nb):
            ds[b] = fp16_at(row, block_bytes * b) * xd[b]
            if with_min:
                constant += fp16_at(row, block_bytes * b + 2) * xsum[b]
            else:
                constant -= np.float32(8.0) * ds[b] * np.float32(xq16[2 * b] + xq16[2 * b + 1])
        a0, a1 = fzeros(8), fzeros(8)
        b = 0
        while b + 2 <= nb:
            prefetch(row, block_bytes * b + PREFETCH_BYTES)
            a0 = fma(to_float(_q4_block(izeros(8), row, b, block_bytes, xq)), splat(ds[b], 8), a0)
            a1 = fma(to_float(_q4_block(izeros(8), row, b + 1, block_bytes, xq)), splat(ds[b + 1], 8), a1)
            b += 2
        if b < nb:
            a0 = fma(to_float(_q4_block(izeros(8), row, b, block_bytes, xq)), splat(ds[b], 8), a0)
        out[n] = hsum(a0 + a1) + constant


@jit
def k_scale_min(scales, j):  # Q4_K / Q5_K: the 6-bit scale and min of sub-block j from 12 packed bytes
    if j < 4:
        return scales[j] & 63, scales[j + 4] & 63
    return (scales[j + 4] & 15) | ((scales[j - 4] >> 6) << 4), (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4)


@pjit
def matvec_q4_k(out, data, xq, xd, xsum):  # data: [N, K/256 * 144] Q4_K blocks
    """out[n] = sum_j d sc_j xd_j sum_{i<32} q xq - dmin m_j sum_i x     (j over sub-blocks of 32)"""
    nb = xd.shape[0]
    for n in prange(data.shape[0]):
        row = data[n]
        ds = np.empty(nb, np.float32)
        constant = np.float32(0.0)
        for s in range(nb // 8):  # super-blocks of 256: d, dmin, 12 bytes of scales, 128 bytes of nibbles
            o = Q4_K_BYTES * s
            d, dmin = fp16_at(row, o), fp16_at(row, o + 2)
            for j in range(8):
                sc, m = k_scale_min(row[o + 4:o + 16], j)
                ds[8 * s + j] = d * np.float32(sc) * xd[8 * s + j]
                constant -= dmin * np.float32(m) * xsum[8 * s + j]
        a0, a1 = fzeros(8), fzeros(8)
        for s in range(nb // 8):
            prefetch(row, Q4_K_BYTES * s + PREFETCH_BYTES)
            for c in range(4):  # 32 bytes: low nibbles are sub-block 2c, high nibbles sub-block 2c + 1
                packed = load(row, Q4_K_BYTES * s + 16 + 32 * c, 32)
                j = 8 * s + 2 * c
                a0 = fma(to_float(dot_u8s8(izeros(8), field(packed, 0, 15), load(xq, 32 * j, 32))),
                         splat(ds[j], 8), a0)
                a1 = fma(to_float(dot_u8s8(izeros(8), field(packed, 4, 15), load(xq, 32 * j + 32, 32))),
                         splat(ds[j + 1], 8), a1)
        out[n] = hsum(a0 + a1) + constant


@pjit
def matvec_q6_k(out, data, xq, xd, xq16):  # data: [N, K/256 * 210] Q6_K blocks
    """out[n] = sum_g d sc_g xd_g (sum_{i<16} q xq - 32 sum_i xq)     (g over sub-blocks of 16)"""
    nb = xd.shape[0]
    for n in prange(data.shape[0]):
        row = data[n]
        ds = np.empty(2 * nb, np.float32)  # per sub-block of 16
        constant = np.float32(0.0)
        for s in range(nb // 8):  # super-blocks: ql[128] (low 4 bits), qh[64] (high 2), int8 scales[16], d
            o = Q6_K_BYTES * s
            d = fp16_at(row, o + 208)
            for g in range(16):
                ds[16 * s + g] = d * np.float32(np.int8(row[o + 192 + g])) * xd[(16 * s + g) // 2]
                constant -= np.float32(32.0) * ds[16 * s + g] * np.float32(xq16[16 * s + g])
        a0, a1 = fzeros(8), fzeros(8)
        for s in range(nb // 8):
            prefetch(row, Q6_K_BYTES * s + PREFETCH_BYTES)
            for half in range(2):  # 128 weights from ql[64 half:], qh[32 half:]
                o = Q6_K_BYTES * s + 64 * half
                low0, low1 = load(row, o, 32), load(row, o + 32, 32)
                high = load(row, Q6_K_BYTES * s + 128 + 32 * half, 32)
                e = 256 * s + 128 * half  # first weight; its sub-block of 16 is e // 16
                for k in range(4):  # weights e + 32k ..: low bits from low0/low1, high bits from high >> 2k
                    low = field(low0 if k % 2 == 0 else low1, 4 * (k // 2), 15)
                    q = join(low, field(high, 2 * k, 3), 4)
                    p = to_float(dot_u8s8(izeros(8), q, load(xq, e + 32 * k, 32)))
                    if k % 2 == 0:  # lanes 0-3 are one sub-block of 16, lanes 4-7 the next
                        a0 = fma(p, pair_splat(ds, (e + 32 * k) // 16, 8), a0)
                    else:
                        a1 = fma(p, pair_splat(ds, (e + 32 * k) // 16, 8), a1)
        out[n] = hsum(a0 + a1) + constant
