"""RMSNorm (Zhang & Sennrich 2019), the only normalisation Qwen uses, and the sum of squares that every
norm in minqwen (RMSNorm, DeltaNet's l2norm and gated RMSNorm) starts from.

Qwen3 also normalises every query and key head before RoPE; the caller reshapes [T, H, hd] to
[T*H, hd] and reuses this kernel, so one row may be a token's hidden state or one head of it.
"""
import math

import numpy as np

from .jit import jit


@jit
def sum_of_squares(v):  # v: [D] float32 -> float32
    """sum_d v[d]**2"""
    # float32 is enough (a few thousand positive terms: no cancellation); fastmath lets LLVM vectorise it.
    ss = np.float32(0.0)
    for d in range(v.shape[0]):
        ss += v[d] * v[d]
    return ss


@jit  # one thread: decoding, its work (a row, a token's heads) costs less than a parallel region's start
def rmsnorm(out, x, weight, eps):  # out, x: [N, D] float32 (out may be x), weight: [D]
    """out[n] = x[n] / sqrt(mean(x[n]**2) + eps) * weight"""
    N, D = x.shape
    for n in range(N):
        inv_rms = np.float32(1.0 / math.sqrt(sum_of_squares(x[n]) / D + eps))
        # Reading x[n, d] before writing out[n, d] keeps the in-place call (out is x) correct.
        for d in range(D):
            out[n, d] = x[n, d] * inv_rms * weight[d]


def rmsnorm_reference(x, weight, eps):  # [N, D] -> [N, D] float64
    x = x.astype(np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight.astype(np.float64)
