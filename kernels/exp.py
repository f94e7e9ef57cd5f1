"""exp(x) for x <= 0 as a few float32 vector operations, so that loops over it vectorise.

Softmax (after subtracting the maximum) and SiLU (in its overflow-free form) only ever need e**x for
x <= 0. `math.exp` compiles to a call into libm, one element at a time, which LLVM cannot vectorise
without a vector math library; in the decode attention kernel it was ~40% of the time. This is the
textbook reduction

    x = n ln2 + r,   n = round(x / ln2),  |r| <= ln2 / 2
    e**x = 2**n * e**r,   e**r by its Taylor polynomial to r**7 / 7!  (error < 2e-8 on |r| <= 0.35)
    2**n = the float32 whose exponent bits are n + 127

with ln2 split into a short high part (exact in float32) and a tiny low part, so n ln2 is subtracted
without rounding. Measured error: <= 3e-7 relative (2-3 ulp) for x >= -87. Below -87 e**x is under
float32's normal range (and 2**n would need a subnormal exponent): the result is 0.
"""
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .jit import jit

LN2_HIGH, LN2_LOW = np.float32(0.693145751953125), np.float32(1.428606765330187e-06)  # ln2 = high + low
LOG2_E = np.float32(1.4426950408889634)


@intrinsic
def _float_from_bits(typingctx, bits):  # uint32 -> the float32 with those bits
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(bits), codegen


@jit
def exp_neg(x):  # x: float32 <= 0
    """e**x   (see the module docstring)"""
    clamped = max(x, np.float32(-87.0))  # a select, like the last line: the loop stays vectorised
    n = np.float32(round(clamped * LOG2_E))
    r = clamped - n * LN2_HIGH - n * LN2_LOW
    p = np.float32(1.0 / 5040.0)  # Horner: 1 + r + r^2/2! + ... + r^7/7!
    p = p * r + np.float32(1.0 / 720.0)
    p = p * r + np.float32(1.0 / 120.0)
    p = p * r + np.float32(1.0 / 24.0)
    p = p * r + np.float32(1.0 / 6.0)
    p = p * r + np.float32(0.5)
    p = p * r + np.float32(1.0)
    p = p * r + np.float32(1.0)
    e = p * _float_from_bits(np.uint32((np.int32(n) + np.int32(127)) << np.int32(23)))
    return e if x >= np.float32(-87.0) else np.float32(0.0)


def exp_neg_reference(x):  # -> float64
    x = np.asarray(x, np.float64)
    return np.where(x >= -87.0, np.exp(x), 0.0)
