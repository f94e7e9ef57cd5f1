"""How weights of each stored dtype reach the kernels, and `widen`, which turns one element to fp32.

NumPy has no bfloat16 and Numba has no float16, so half-width weights travel as their raw bits:

    bf16  ->  np.uint16 array   (the top 16 bits of an IEEE float32)
    fp16  ->  np.int16 array    (IEEE half bits; int16 only to tell it apart from bf16)
    fp32  ->  np.float32 array

Every kernel that reads weights calls `widen(w[i])`; Numba compiles one specialisation of the
kernel per weight dtype, and `widen` inlines to one or two instructions:

    bf16:  f32 = bitcast(u32(bits) << 16)        (exact: bf16 is truncated fp32)
    fp16:  f32 = fpext(bitcast<half>(bits))      (exact; LLVM emits vcvtph2ps)
"""
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

from .jit import jit

BF16, FP16, FP32 = np.dtype(np.uint16), np.dtype(np.int16), np.dtype(np.float32)


@intrinsic
def float_from_bits(typingctx, bits):  # uint32 -> the float32 with those bits
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(bits), codegen


@intrinsic
def _f16_bits_to_f32(typingctx, bits):
    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    return types.float32(bits), codegen


def widen(value):
    """One stored weight element -> float32 (see the module docstring)."""
    raise NotImplementedError("widen is only callable from compiled kernels")


@overload(widen, inline="always")
def _widen(value):
    if value == types.uint16:
        return lambda value: float_from_bits(np.uint32(np.uint32(value) << 16))
    if value == types.int16:
        return lambda value: _f16_bits_to_f32(value)
    if isinstance(value, types.Float):
        return lambda value: np.float32(value)
    return None


def to_float32(w: np.ndarray) -> np.ndarray:
    """Widen a whole stored-dtype array to float32 in NumPy (for tests, prefill tiles and small tensors)."""
    if w.dtype == BF16:
        return (w.astype(np.uint32) << 16).view(np.float32)
    if w.dtype == FP16:
        return w.view(np.float16).astype(np.float32)
    return np.asarray(w, dtype=np.float32)


def from_float32(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """float values -> the stored bits of `dtype` (BF16, FP16 or FP32): what the loader hands the kernels."""
    x = np.asarray(x, dtype=np.float32)
    if dtype == BF16:
        return bf16_bits(x)
    if dtype == FP16:
        return x.astype(np.float16).view(np.int16)
    return x


def bf16_bits(x):
    """float32 -> bf16 bits with round-to-nearest-even (what torch's .to(bfloat16) does)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    return bf16_rounded(x.reshape(-1)).reshape(x.shape)


@jit
def bf16_rounded(x):  # x: [n] float32 -> [n] uint16, its bf16 bits (bf16_bits' kernel; gemm.py calls it too)
    u, bits = x.view(np.uint32), np.empty(x.size, np.uint16)
    half, one, shift = np.uint32(0x7FFF), np.uint32(1), np.uint32(16)  # uint32: no lane widens to int64
    for i in range(x.size):  # a loop: as an array expression, its temporaries took 4x as long
        bits[i] = (u[i] + half + ((u[i] >> shift) & one)) >> shift
    return bits
