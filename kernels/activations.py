"""The gates of Qwen's layers: sigmoid and SiLU as scalar helpers, SwiGLU and the sigmoid output gate.

Every sigmoid in minqwen is `sigmoid` below, and every SiLU `silu`, computed as torch computes them,

    sigmoid(x) = 1 / (1 + e**-x),     silu(x) = x / (1 + e**-x)

with one division, so that rounding follows torch's (the hybrids' random test models amplify a changed
rounding of SiLU into a visible logit difference), and with kernels/exp.py's vectorisable e**x, which
saturates at e**88 instead of overflowing: for x < -88 both give (almost) 0, not inf * 0.
"""
import numpy as np
from numba import prange

from .exp import expf
from .jit import jit, pjit


@jit
def sigmoid(x):  # float32 -> float32
    """1 / (1 + exp(-x))"""
    return np.float32(1.0) / (np.float32(1.0) + expf(-x))


@jit
def silu(x):  # float32 -> float32
    """x * sigmoid(x)"""
    return x / (np.float32(1.0) + expf(-x))


@pjit
def swiglu(out, gate, up):  # out, gate, up: [T, F] float32 (out may be gate or up)
    """out = silu(gate) * up    (SwiGLU, Shazeer 2020: the activation of Qwen's MLPs)"""
    T, F = gate.shape
    for t in prange(T):
        for f in range(F):
            out[t, f] = silu(gate[t, f]) * up[t, f]


@pjit
def sigmoid_gate(out, x, gate):  # out, x: [T, H, D] float32 (out may be x); gate: [T, H, D] or [T, H, 1]
    """out[t, h, d] = x[t, h, d] * sigmoid(gate[t, h, d])   (or gate[t, h, 0]: one gate per head)

    The hybrids' full-attention output gate (the gate half of q_proj's output) and a shared expert's gate."""
    (T, H, D), per_head = x.shape, gate.shape[2] == 1
    for t in prange(T):
        for h in range(H):
            for d in range(D):
                out[t, h, d] = x[t, h, d] * sigmoid(gate[t, h, 0 if per_head else d])


def sigmoid_reference(x):  # -> float64, in the same overflow-free form
    x = np.asarray(x, np.float64)
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0, e) / (1.0 + e)


def silu_reference(x):  # -> float64
    x = np.asarray(x, np.float64)
    return x * sigmoid_reference(x)


def swiglu_reference(gate, up):  # [T, F], [T, F] -> [T, F] float64
    return silu_reference(gate) * up.astype(np.float64)


def sigmoid_gate_reference(x, gate):  # [T, H, D], [T, H, D or 1] -> [T, H, D] float64
    return np.asarray(x, np.float64) * sigmoid_reference(gate)
