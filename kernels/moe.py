"""Sparse mixture of experts: a router picks k of E SwiGLU experts per token.

    p      = softmax(router_logits)                       over all E experts, in float32
    e_1..k = the k largest p (ties: lower expert index first)
    w_j    = p[e_j]          or  p[e_j] / sum_i p[e_i]    if norm_topk_prob
    out    = sum_j w_j * down[e_j] @ (silu(gate[e_j] @ x) * up[e_j] @ x)

Expert weights stay in their stored format: gate_w, up_w [E][F, D], down_w [E][D, F], either stacked 3-D
arrays or (as the model passes them) numba typed Lists of the checkpoint's memory-mapped per-expert matrices
(bf16 / fp16 / fp32 arrays, FP8 or GGML blocks: linear.row_dot reads any of them); the kernels only ever index
one expert at a time, w[e]. Only the k chosen experts are read, so decoding a token moves bytes in proportion
to the *active* parameters (3 k F D weights), not the total. Two forms of the same sum:
- `moe_one_token` streams one token's k experts (decode, or a few tokens, one at a time);
- `moe_by_expert` runs each chosen expert once on all of its tokens, as matrix products (prefill).
The shared expert of Qwen2-MoE, Qwen3-Next and Qwen3.5-MoE is an ordinary SwiGLU: the dense kernels run it.
"""
import math

import numpy as np
from numba import prange

from .activations import silu, silu_reference, swiglu
from .jit import jit, pjit
from .linear import linear, row_dot
from .matmul import matmul_reference


@jit
def route(weights_out, experts_out, router_logits, top_k, norm_topk_prob):
    # weights_out: [T, k] f32, experts_out: [T, k] i64, router_logits: [T, E] f32 (= x @ router_w.T)
    """p = softmax(logits);  experts = argtopk_k(p) (ties -> lower index);  weights = p[experts] (/ sum)

    softmax is monotonic, so we rank the logits themselves: the same order as ranking p, without
    the ties that rounding p to float32 can create between distinct logits. torch.topk on CPU breaks
    exact ties in whatever order std::nth_element / std::partial_sort leave them, so no engine can
    match it there; we take the lower expert index, which is what a stable sort would do."""
    T, E = router_logits.shape
    for t in range(T):
        logits = router_logits[t]
        m, s = logits.max(), np.float32(0.0)
        for i in range(E):
            s += np.float32(math.exp(logits[i] - m))
        # Selection by k passes over E (k*E compares, ~1000 for Qwen3's 8 of 128): pass j takes the
        # best expert ranked strictly after pick j-1 in the order (logit descending, index ascending),
        # so nothing needs marking as taken and nothing is allocated.
        prev = -1
        for j in range(top_k):
            best = -1
            for i in range(E):
                if prev >= 0 and not (logits[i] < logits[prev] or (logits[i] == logits[prev] and i > prev)):
                    continue  # ranked at or before the previous pick
                if best < 0 or logits[i] > logits[best]:  # strict: the lower index wins a tie
                    best = i
            experts_out[t, j] = best
            weights_out[t, j] = np.float32(math.exp(logits[best] - m)) / s
            prev = best
        if norm_topk_prob:
            weights_out[t, :top_k] /= weights_out[t, :top_k].sum()


def route_reference(router_logits, top_k, norm_topk_prob):  # [T, E] -> [T, k] float64, [T, k] int64
    """transformers' order: softmax, topk (a stable sort: lower index first on ties), renormalise."""
    logits = router_logits.astype(np.float64)
    p = np.exp(logits - logits.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    experts = np.argsort(-p, axis=-1, kind="stable")[:, :top_k]
    weights = np.take_along_axis(p, experts, axis=-1)
    if norm_topk_prob:
        weights /= weights.sum(axis=-1, keepdims=True)
    return weights, experts


@pjit
def moe_one_token(out, hidden, x, gate_w, up_w, down_w, experts, weights):
    # out: [D] f32, hidden: [k, F] f32 scratch, x: [D] f32, experts: [k] i64, weights: [k] f32,
    # gate_w, up_w: [E][F, D], down_w: [E][D, F] stored format (stacked array or typed List)
    """hidden[j] = silu(gate[e_j] @ x) * (up[e_j] @ x);   out = sum_j weights[j] * down[e_j] @ hidden[j]"""
    (k, F), D = hidden.shape, x.shape[0]
    # Work items are blocks of 32 rows: taking an expert's matrix out of a typed List costs an atomic
    # reference count (contended when both threads touch the same expert), paid once a block, not once a row.
    rows = 32
    # Region 1: blocks of the k experts' gate and up rows, (expert, block) flattened into one axis
    # so both threads get work even when k is small.
    f_blocks = (F + rows - 1) // rows
    for jb in prange(k * f_blocks):
        j, r0 = jb // f_blocks, (jb % f_blocks) * rows
        gate, up = gate_w[experts[j]], up_w[experts[j]]
        for r in range(r0, min(r0 + rows, F)):
            hidden[j, r] = silu(row_dot(gate, r, x)) * row_dot(up, r, x)
    # Region 2: blocks of output rows, each summing over the k experts, so threads write disjoint
    # rows of out and no reduction across threads is needed.
    for db in prange((D + rows - 1) // rows):
        d0, d1 = db * rows, min(db * rows + rows, D)
        out[d0:d1] = 0.0
        for j in range(k):
            down = down_w[experts[j]]
            for d in range(d0, d1):
                out[d] += weights[j] * row_dot(down, d, hidden[j])


def expert_reference(x, gate_w, up_w, down_w):  # [.., D], [F, D], [F, D], [D, F] stored -> [.., D] float64
    """down @ (silu(gate @ x) * (up @ x))  in float64"""
    return matmul_reference(silu_reference(matmul_reference(x, gate_w)) * matmul_reference(x, up_w), down_w)


def moe_one_token_reference(x, gate_w, up_w, down_w, experts, weights):  # [D], .., [k], [k] -> [D] float64
    terms = [float(w) * expert_reference(x, gate_w[e], up_w[e], down_w[e]) for e, w in zip(experts, weights)]
    return np.sum(terms, axis=0)


def moe_by_expert(out, x, gate_w, up_w, down_w, experts, weights):
    # out, x: [T, D] f32, experts: [T, k] i64, weights: [T, k] f32; gate_w, up_w, down_w as moe_one_token's
    """out[t] = sum_j weights[t, j] * down[e_tj] @ (silu(gate[e_tj] @ x[t]) * (up[e_tj] @ x[t]))

    The (token, slot) pairs sorted by expert, each expert runs once on all of its tokens through
    `linear` (reading its weights once, not once per token that chose it); the results scatter-add."""
    k, E, D = experts.shape[1], len(gate_w), out.shape[1]
    flat = experts.reshape(-1)
    order = np.argsort(flat, kind="stable")  # (token, slot) pairs grouped by expert
    starts = np.concatenate(([0], np.cumsum(np.bincount(flat, minlength=E))))
    n_max = int(np.diff(starts).max())  # rows of the work buffers: the busiest expert's tokens
    gate, up = np.empty((2, n_max, gate_w[0].shape[0]), dtype=np.float32)
    y = np.empty((n_max, D), dtype=np.float32)
    out[...] = 0.0
    for e in np.flatnonzero(np.diff(starts)):  # experts no token chose are skipped: their weights never read
        pairs = order[starts[e] : starts[e + 1]]
        tokens, n = pairs // k, len(pairs)
        rows = x[tokens]  # gather [n, D]
        linear(gate[:n], rows, gate_w[e])
        linear(up[:n], rows, up_w[e])
        swiglu(gate[:n], gate[:n], up[:n])
        linear(y[:n], gate[:n], down_w[e])
        # A token picks an expert at most once, so `tokens` has no repeats and += cannot collide.
        out[tokens] += weights.reshape(-1)[pairs][:, None] * y[:n]


def moe_by_expert_reference(x, gate_w, up_w, down_w, experts, weights):
    # [T, D], .., [T, k], [T, k] -> [T, D] f64
    """token by token, straight from the formula"""
    return np.stack([moe_one_token_reference(xt, gate_w, up_w, down_w, e, w)
                     for xt, e, w in zip(x, experts, weights)])


def moe_reference(x, gate_w, up_w, down_w, router_w, top_k, norm_topk_prob):
    # [T, D], .., [E, D] -> [T, D] f64
    """The whole sparse block in float64: router logits, route, experts (no shared expert)."""
    weights, experts = route_reference(matmul_reference(x, router_w), top_k, norm_topk_prob)
    return moe_by_expert_reference(x, gate_w, up_w, down_w, experts, weights)
