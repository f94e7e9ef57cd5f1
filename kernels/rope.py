"""Rotary position embedding (Su et al. 2021) in the "rotate half" layout of Qwen and transformers.

Each head vector is split into two halves that form the pairs (x[i], x[i + R/2]); pair i is
rotated by the angle pos * theta_i, whose cos and sin the caller tabulates once per position.
(llama2.c and Meta's Llama pair *adjacent* dims (x[2i], x[2i+1]) instead; using the wrong
layout gives fluent-looking garbage, which only a parity test catches.) With partial rotary
(R < hd) the dims from R on carry no position information and are left as they are.
"""
import numpy as np

from .jit import jit


@jit  # one thread: decoding, its work (a token's heads) costs less than a parallel region's start
def apply_rope(x, cos, sin):  # x: [T, H, hd] float32, in place; cos, sin: [T, R/2] float32
    """For i < R/2, with a = x[t,h,i] and b = x[t,h,i+R/2]:

        x[t,h,i]       = a cos[t,i] - b sin[t,i]
        x[t,h,i+R/2]   = b cos[t,i] + a sin[t,i]"""
    (T, H, _), half = x.shape, cos.shape[1]
    for t in range(T):
        for h in range(H):
            for i in range(half):
                a, b = x[t, h, i], x[t, h, i + half]
                x[t, h, i] = a * cos[t, i] - b * sin[t, i]
                x[t, h, i + half] = b * cos[t, i] + a * sin[t, i]


def apply_rope_reference(x, cos, sin):  # [T, H, hd] -> [T, H, hd] float64 (a new array)
    x, half = x.astype(np.float64), cos.shape[1]
    c, s = cos.astype(np.float64)[:, None, :], sin.astype(np.float64)[:, None, :]
    a, b, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    return np.concatenate([a * c - b * s, b * c + a * s, rest], axis=-1)
