"""FP8 weights as Qwen's official FP8 checkpoints store them: one e4m3 byte a weight, one scale a block.

    W[i, j] = e4m3(q[i, j]) * scale[i // bn, j // bk]          (bn = bk = 128 in every published one)

e4m3 ("float8_e4m3fn"): a sign bit, 4 exponent bits (bias 7) and 3 mantissa bits; no infinities, the
bytes 0x7F / 0xFF are NaN, the largest value is 448, and exponent 0 holds subnormals m/8 * 2**-6.
The scale (stored as `weight_scale_inv`, a float32, bf16 or fp16 grid of ceil(N/bn) x ceil(K/bk)) is
multiplied, despite its name; blocks at the right and bottom edges may be partial.

Decoding a byte in registers: moved into the exponent and mantissa bits of an fp16, an e4m3 byte is an
fp16 worth exactly 2**-8 of its value, subnormals included (fp16's bias is 8 more than e4m3's):

    h = (b & 0x7F) << 7 | (b & 0x80) << 8          e4m3(b) = fp16(h) * 2**8

computed as (int16(int8(b)) << 7) & 0xBF80: sign-extending the byte fills bits 8..15 with the sign,
and the shift moves the sign to bit 15 and the rest into place; the mask clears the copy in bit 14.
fp16 -> fp32 is then one instruction (vcvtph2ps), and the 2**8 is applied once per row, not per weight.
Decode reads 1 byte a weight (+ 4 bytes per 16k weights of scales), the same traffic as int8.
"""
from typing import NamedTuple

import numpy as np
from numba import prange

from .dtypes import widen
from .jit import jit, pjit
from .matmul import TILE_FLOATS, matmul_tiled

FP8_TO_FP16_SCALE = np.float32(256.0)  # e4m3(b) = fp16(h) * 2**8 (see the module docstring)
BLOCK_COLS = 128  # the column block of every published FP8 checkpoint; the kernels' loops are built for it


class Fp8Matrix(NamedTuple):
    """A weight matrix W [N, K] in the FP8 block format."""
    q: np.ndarray  # [N, K] uint8: e4m3 bits, as stored
    scales: np.ndarray  # [ceil(N / block_rows), ceil(K / 128)] float32
    block_rows: int  # 128 in every published checkpoint; any size works

    @property
    def shape(self):  # the shape of W
        return self.q.shape


@jit
def e4m3_over_256(byte):  # uint8 -> float32
    """e4m3(byte) / 2**8, exactly"""
    return widen(np.int16((np.int16(np.int8(byte)) << np.int16(7)) & np.int16(-0x4080)))  # 0xBF80


@jit
def fp8_row_dot(q_row, scale_row, x):  # q_row: [K] uint8, scale_row: [ceil(K/128)] float32, x: [K] float32
    """sum_k e4m3(q_row[k]) scale_row[k // 128] x[k]"""
    # A fixed 128-iteration inner loop: LLVM vectorises it (16 bytes -> two fp16 -> fp32 vectors); with a
    # variable trip count the same loop ran ~10x slower. A partial last block takes the plain loop.
    K = q_row.shape[0]
    full, total = K // BLOCK_COLS, np.float32(0.0)
    for b in range(full):
        s = np.float32(0.0)
        for i in range(BLOCK_COLS):
            s += e4m3_over_256(q_row[BLOCK_COLS * b + i]) * x[BLOCK_COLS * b + i]
        total += s * scale_row[b]
    if K > BLOCK_COLS * full:
        s = np.float32(0.0)
        for k in range(BLOCK_COLS * full, K):
            s += e4m3_over_256(q_row[k]) * x[k]
        total += s * scale_row[full]
    return total * FP8_TO_FP16_SCALE


@pjit
def matvec_fp8(out, q, scales, x, block_rows):  # out: [N] f32, q: [N, K] uint8, x: [K] f32
    """out[n] = sum_k e4m3(q[n, k]) scale[n // bn, k // 128] x[k]"""
    for n in prange(q.shape[0]):
        out[n] = fp8_row_dot(q[n], scales[n // block_rows], x)


@jit
def dequantize_fp8_rows(tile, q, scales, first_row, block_rows):
    # tile: [R, K] float32 out; q: rows first_row .. first_row + R - 1 of the [N, K] uint8 matrix
    """tile[r, k] = e4m3(q[r, k]) * scale[(first_row + r) // bn, k // 128]"""
    # Serial, like matmul.widen_rows: it alternates with BLAS calls, whose threads need the cores.
    R, K = q.shape
    for r in range(R):
        scale_row, tile_r, q_r = scales[(first_row + r) // block_rows], tile[r], q[r]
        for k in range(K):
            tile_r[k] = e4m3_over_256(q_r[k]) * (scale_row[k // BLOCK_COLS] * FP8_TO_FP16_SCALE)


def matmul_fp8(out, x, w: Fp8Matrix, tile_floats=TILE_FLOATS):  # out: [T, N] f32, x: [T, K] f32
    """out[t, n] = sum_k x[t, k] W[n, k]   (out = x @ W.T, for T > 1: tiles dequantised for BLAS)"""
    matmul_tiled(out, x, w.q.shape, lambda tile, r0, r1: dequantize_fp8_rows(
        tile, w.q[r0:r1], w.scales, r0, w.block_rows), tile_floats)


def dequantize_fp8(w: Fp8Matrix) -> np.ndarray:  # -> [N, K] float32 (for re-quantising to int8 / int4)
    tile = np.empty(w.q.shape, np.float32)
    dequantize_fp8_rows(tile, w.q, w.scales, 0, w.block_rows)
    return tile


def e4m3_reference(q) -> np.ndarray:  # uint8 bits -> float64 values, from the definition
    byte = np.arange(256)
    sign, exponent, fraction = np.where(byte & 0x80, -1.0, 1.0), (byte >> 3) & 0xF, (byte & 7) / 8
    values = sign * np.where(exponent == 0, fraction * 2.0 ** -6, (1 + fraction) * 2.0 ** (exponent - 7))
    values[(exponent == 15) & (fraction == 7 / 8)] = np.nan
    return values[np.asarray(q)]


def dequantize_fp8_reference(q, scales, block_rows):  # -> [N, K] float64
    N, K = q.shape
    grid = np.repeat(np.repeat(scales.astype(np.float64), block_rows, axis=0), BLOCK_COLS, axis=1)
    return e4m3_reference(q) * grid[:N, :K]


def matvec_fp8_reference(q, scales, x, block_rows):  # -> [N] float64
    return dequantize_fp8_reference(q, scales, block_rows) @ x.astype(np.float64)
