"""SwiGLU (Shazeer 2020), the gated activation of Qwen's MLPs: silu(gate) * up."""
import numpy as np
from numba import prange

from .exp import exp_neg
from .jit import pjit


@pjit
def swiglu(out, gate, up):  # out, gate, up: [T, F] float32 (out may be gate or up)
    """out = gate * sigmoid(gate) * up,   sigmoid(g) = 1 / (1 + exp(-g))"""
    T, F = gate.shape
    for t in prange(T):
        for f in range(F):
            g = gate[t, f]
            # exp(-|g|) never overflows: sigmoid(g) = 1/(1+e) for g >= 0 and e/(1+e) for g < 0.
            # (1/(1 + exp(-g)) would hit exp(-g) = inf for g < -88, and fastmath assumes no inf.)
            e = exp_neg(-abs(g))
            num = np.float32(1.0) if g >= 0 else e
            out[t, f] = g * (num / (np.float32(1.0) + e)) * up[t, f]


def swiglu_reference(gate, up):  # [T, F], [T, F] -> [T, F] float64
    g = gate.astype(np.float64)
    e = np.exp(-np.abs(g))  # the kernel's overflow-free form, in float64
    sigmoid = np.where(g >= 0, 1.0, e) / (1.0 + e)
    return g * sigmoid * up.astype(np.float64)
