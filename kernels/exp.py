"""e**x in float32 as a few vector operations, so that loops over it vectorise.

Softmax (after subtracting the maximum), sigmoid and SiLU need e**x inside loops; `math.exp` compiles to a
call into libm, one element at a time, which LLVM cannot vectorise without a vector math library (in the
decode attention kernel it was ~40% of the time). This is the textbook reduction

    x = n ln2 + r,   n = round(x / ln2),  |r| <= ln2 / 2
    e**x = 2**n * e**r,   e**r by its Taylor polynomial to r**7 / 7!  (error < 2e-8 on |r| <= 0.35)
    2**n = the float32 whose exponent bits are n + 127

with ln2 split into a short high part (exact in float32) and a tiny low part, so n ln2 is subtracted
without rounding. Measured error: <= 3e-7 relative (2-3 ulp) for -87 <= x <= 88. Outside that range
float32 has no normal result: below -87 the result is 0, above 88 it saturates at e**88 (~1.65e38), so
1 + e**-x and x / (1 + e**-x) stay finite (fastmath assumes there is no inf).
"""
import numpy as np

from .dtypes import float_from_bits
from .jit import jit

LN2_HIGH, LN2_LOW = np.float32(0.693145751953125), np.float32(1.428606765330187e-06)  # ln2 = high + low
LOG2_E = np.float32(1.4426950408889634)
EXP_MIN, EXP_MAX = np.float32(-87.0), np.float32(88.0)


@jit
def expf(x):  # x: float32
    """e**x for x in [-87, 88]; 0 below, e**88 above   (see the module docstring)"""
    clamped = min(max(x, EXP_MIN), EXP_MAX)  # selects, like the last line: the loop stays vectorised
    n = np.float32(round(clamped * LOG2_E))
    r = clamped - n * LN2_HIGH - n * LN2_LOW
    p = np.float32(1.0 / 5040.0)  # Horner: 1 + r + r^2/2! + ... + r^7/7!
    for factorial in (720.0, 120.0, 24.0, 6.0, 2.0, 1.0, 1.0):  # 6!, 5!, ..., 0!
        p = p * r + np.float32(1.0 / factorial)
    e = p * float_from_bits(np.uint32((np.int32(n) + np.int32(127)) << np.int32(23)))
    return e if x >= EXP_MIN else np.float32(0.0)


def expf_reference(x):  # -> float64
    x = np.asarray(x, np.float64)
    return np.where(x >= -87.0, np.exp(np.minimum(x, 88.0)), 0.0)
