"""AMX's tile instructions as plain Numba code, for running gemm.matmul_amx on a CPU without AMX.

Importing this module puts the emulations in place of the intrinsics kernels/simd.py gives gemm.py
(before matmul_amx is first compiled), so that the kernel's own code -- its tile numbers, offsets, strides,
the panels' layout -- runs against what Intel's manual says each instruction does:

    ldtilecfg / tilerelease   tiles(on): here every tile is zeroed
    tilezero c                tile c = 0
    tileloadd t, [arr + off]  row r of tile t = the 64 bytes at arr[off + r stride:], r < 16
    tilestored t, [arr + off] the same bytes = row r of tile t
    tdpbf16ps c, a, b         c[m, n] += sum_j a[m, 2j] b[j, 2n] + a[m, 2j + 1] b[j, 2n + 1]   (bf16, float32)

A child process only (tests/test_kernels_gemm.py): the registers are one global block of memory whose
address is compiled into the kernel, so a cache (NUMBA_CACHE_DIR) must not outlive the process, and with one
thread (NUMBA_NUM_THREADS=1) only, as each thread has its own tiles on a CPU.
"""
import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from minqwen.kernels import gemm

REGISTERS = np.zeros((8, 16, 16), np.uint32)  # tmm0-7: 16 rows of 64 bytes
ADDRESS = REGISTERS.ctypes.data
LOW, HIGH = np.uint32(16), np.uint32(0xFFFF0000)


@intrinsic
def _pointer(typingctx, address):
    return types.voidptr(address), lambda context, builder, sig, args: builder.inttoptr(
        args[0], ir.IntType(8).as_pointer())


@numba.njit
def registers():
    return numba.carray(_pointer(ADDRESS), (8, 16, 16), np.uint32)


@numba.njit
def tiles(on):
    registers()[:] = 0


@numba.njit
def tile_zero(c):
    registers()[c] = 0


@numba.njit
def tile_load(t, arr, off, stride):
    flat, n = arr.reshape(-1), 64 // arr.itemsize
    for r in range(16):
        registers()[t, r] = flat[off + r * stride:off + r * stride + n].copy().view(np.uint32)


@numba.njit
def tile_store(t, arr, off, stride):
    flat, n = arr.reshape(-1), 64 // arr.itemsize
    for r in range(16):
        flat[off + r * stride:off + r * stride + n] = registers()[t, r].copy().view(arr.dtype)


@numba.njit
def tile_dot_bf16(c, a, b):
    tile = registers()
    sums = tile[c].copy().view(np.float32)
    a_even, a_odd = (tile[a] << LOW).view(np.float32), (tile[a] & HIGH).view(np.float32)  # bf16 -> float32
    b_even, b_odd = (tile[b] << LOW).view(np.float32), (tile[b] & HIGH).view(np.float32)
    for m in range(16):
        for n in range(16):
            for j in range(16):
                sums[m, n] += a_even[m, j] * b_even[j, n] + a_odd[m, j] * b_odd[j, n]
    tile[c] = sums.view(np.uint32)


for instruction in (tiles, tile_zero, tile_load, tile_store, tile_dot_bf16):
    setattr(gemm, instruction.__name__, instruction)
