"""Causal grouped-query attention over a KV cache, with an optional sliding window.

Two forms of the same computation:
- `attention` (decode, and the reference-speed form of prefill): scores are never stored; each
  (query head, token) pair streams over its keys once and keeps a running max m, a running sum l of
  exp(s - m) and the weighted sum of values (the "online softmax" of Milakov & Gimelshein 2018, the
  idea behind FlashAttention). Memory is linear in the sequence length.
- `attention_blocked` (prefill): for a block of queries, S = Q K^T and O = softmax(S) V as matrix
  products through BLAS — ~10x the flop rate of scalar loops. Scores exist for one block of queries
  at a time, so memory still grows linearly with the sequence length.
"""
import math

import numpy as np
from numba import prange

from .dtypes import to_float32, widen
from .jit import pjit

QUERY_BLOCK = 64  # queries per block in attention_blocked: bounds the score matrix to 64 G x L


@pjit
def attention(out, q, k_cache, v_cache, start, window, scale):
    # out, q: [T, Hq, hd] float32; k_cache, v_cache: [Hkv, capacity, hd] float32 or bf16/fp16 bits
    """For the query of token t at position p = start + t, in head h (kv head g = h // (Hq/Hkv)):

        s_j = scale * q[t,h] . k[g,j]       for lo <= j <= p,  lo = max(0, p - window + 1)
        out[t,h] = sum_j softmax(s)_j v[g,j]                   (window <= 0: lo = 0)
    """
    T, Hq, hd = q.shape
    group = Hq // k_cache.shape[0]  # query heads sharing one kv head
    # One flat loop over (head, token) pairs: decoding (T = 1) splits over heads, prefill over both.
    for ht in prange(Hq * T):
        h = ht // T
        t = ht % T
        g = h // group
        p = start + t
        lo = max(0, p - window + 1) if window > 0 else 0
        acc = out[t, h]  # the weighted sum of values accumulates in place in the output row
        # Start from the first key rather than from m = -inf: fastmath lets LLVM assume no infinities.
        s = np.float32(0.0)
        for d in range(hd):
            s += q[t, h, d] * widen(k_cache[g, lo, d])
        m = s * scale
        l = np.float32(1.0)
        for d in range(hd):
            acc[d] = widen(v_cache[g, lo, d])
        for j in range(lo + 1, p + 1):
            s = np.float32(0.0)
            for d in range(hd):
                s += q[t, h, d] * widen(k_cache[g, j, d])
            s *= scale
            if s > m:
                # A new maximum: rescale what was summed so far to the new reference point.
                c = np.float32(math.exp(m - s))
                l *= c
                for d in range(hd):
                    acc[d] *= c
                m = s
            e = np.float32(math.exp(s - m))
            l += e
            for d in range(hd):
                acc[d] += e * widen(v_cache[g, j, d])
        inv_l = np.float32(1.0) / l
        for d in range(hd):
            acc[d] *= inv_l


def attention_blocked(out, q, k_cache, v_cache, start, window, scale, block=QUERY_BLOCK):
    # out, q: [T, Hq, hd] float32; k_cache, v_cache: [Hkv, capacity, hd] float32 or bf16/fp16 bits
    """The same as `attention`, for T > 1: per kv head g and block of queries,
        S = scale * Q_g K_g^T   (masked: j <= p, and j > p - window with a window)
        out = softmax_rows(S) V_g
    where Q_g stacks the block's queries of the G = Hq / Hkv heads that share kv head g."""
    T, Hq, hd = q.shape
    Hkv = k_cache.shape[0]
    group = Hq // Hkv
    for t0 in range(0, T, block):
        t1 = min(T, t0 + block)
        first = start + t0  # position of the block's first query
        lo = max(0, first - window + 1) if window > 0 else 0  # first key any query of the block sees
        hi = start + t1  # one past the last key
        # Row r of a head group's Q is (token t0 + r // group, head r % group); its position:
        positions = first + np.repeat(np.arange(t1 - t0), group)[:, None]
        keys = np.arange(lo, hi)[None, :]
        hidden = keys > positions
        if window > 0:
            hidden |= keys <= positions - window
        for g in range(Hkv):
            heads = slice(g * group, (g + 1) * group)
            queries = q[t0:t1, heads].reshape(-1, hd)
            scores = (queries @ to_float32(k_cache[g, lo:hi]).T) * np.float32(scale)
            scores[hidden] = -np.inf
            scores -= scores.max(axis=1, keepdims=True)
            np.exp(scores, out=scores)
            scores /= scores.sum(axis=1, keepdims=True)
            out[t0:t1, heads] = (scores @ to_float32(v_cache[g, lo:hi])).reshape(t1 - t0, group, hd)


def attention_reference(q, k_cache, v_cache, start, window, scale):  # -> [T, Hq, hd] float64
    T, Hq, hd = q.shape
    Hkv = k_cache.shape[0]
    L = start + T
    k = np.repeat(to_float32(k_cache[:, :L]).astype(np.float64), Hq // Hkv, axis=0)  # [Hq, L, hd]
    v = np.repeat(to_float32(v_cache[:, :L]).astype(np.float64), Hq // Hkv, axis=0)
    scores = scale * np.einsum("thd,hjd->htj", q.astype(np.float64), k)  # [Hq, T, L]
    pos = start + np.arange(T)[:, None]
    j = np.arange(L)[None, :]
    visible = j <= pos
    if window > 0:
        visible &= j > pos - window
    scores = np.where(visible[None], scores, -np.inf)
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
    return np.einsum("htj,hjd->thd", weights, v)
