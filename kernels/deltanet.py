"""Kernels of the Qwen3-Next / Qwen3.5 hybrid layers: Gated DeltaNet (linear attention with a matrix
state) and the sigmoid output gate of their full-attention layers.

One Gated DeltaNet layer, token t, after the input projections (C = 2*Hk*Dk + Hv*Dv conv channels):

    [q_t, k_t, v_t] <- silu(depthwise causal conv over time, K taps)       causal_conv1d
    q_t, k_t        <- q_t / |q_t|,  k_t / |k_t|   per key head             l2norm
    g_t    = -exp(A_log) * softplus(a_t + dt_bias)   per value head          delta_rule_gates
    beta_t = sigmoid(b_t)
    per value head h, reading key head h // (Hv / Hk), state S_h [Dk, Dv]:  gated_delta_rule_*
        S <- exp(g_t) S                      forget
        S <- S + k_t (beta_t (v_t - S^T k_t))^T   delta rule: move S^T k_t towards v_t
        o_t = S^T q_t / sqrt(Dk)
    o_t <- o_t / rms(o_t) * w * silu(z_t)   per value head                  gated_rmsnorm

Layouts (all activations float32, token-major like every other minqwen activation):
    q, k [T, Hk, Dk]    v, out [T, Hv, Dv]    g, beta [T, Hv]    state [Hv, Dk, Dv]
    conv x, out [T, C]  conv_state [K-1, C]   conv weight [C, K] (checkpoint [C, 1, K] squeezed)
Value heads share key heads in consecutive groups (torch's repeat_interleave): value heads
h = j*G .. j*G + G - 1, G = Hv // Hk, all read key head j.

The recurrent and chunked (WY / UT transform) forms compute the same thing, and any split of a
sequence between the two gives the same outputs and final state. The chunked form is what GPUs use
for prefill; it does about as many flops as the recurrence and wins only through tiled matmuls, which
these plain loops are not: on our 2-core CPU it ran ~2x slower than the recurrence for 512 tokens
(Hv=32, Dk=Dv=128), so the recurrence is the faster prefill here too.

Semantics follow transformers' torch_recurrent_gated_delta_rule and torch_chunk_gated_delta_rule
with use_qk_l2norm_in_kernel=False: l2norm is its own kernel here, applied to q and k before the
delta rule, as the torch code does first thing inside it.
"""
import numpy as np
from numba import prange

from .dtypes import widen
from .jit import jit, pjit


# ---------------------------------------------------------------------------------------------------
# Short causal convolution over time


@pjit
def causal_conv1d(out, conv_state, x, weight):  # [T, C], [K-1, C] (in/out), [T, C], [C, K]
    """out[t, c] = silu( sum_j weight[c, j] * xx[t + j, c] ),   xx = concat(conv_state, x) over time,

    then conv_state <- the last K-1 rows of xx. Tap K-1 multiplies the current token, tap 0 the token
    K-1 steps back (torch's conv1d with padding K-1, cut to T outputs). A zero conv_state starts a
    sequence; since the state carries the last K-1 inputs, feeding a sequence in any split (a prefill
    chunk, then single tokens) gives the same outputs. No bias: Qwen3-Next/3.5 conv1d has bias=False.
    out must not alias x or conv_state.
    """
    T, C = x.shape
    K = weight.shape[1]
    keep = K - 1
    for t in prange(T):
        for c in range(C):
            out[t, c] = 0.0
        for j in range(K):
            s = t - keep + j  # time index of the input tap j reads; < 0 means "from before this call"
            if s >= 0:
                for c in range(C):
                    out[t, c] += widen(weight[c, j]) * x[s, c]
            else:
                for c in range(C):
                    out[t, c] += widen(weight[c, j]) * conv_state[keep + s, c]
        for c in range(C):
            y = out[t, c]
            out[t, c] = y / (np.float32(1.0) + np.exp(-y))
    # The state is read by every token above, so it is updated only after the parallel loop.
    if T >= keep:
        for r in range(keep):
            for c in range(C):
                conv_state[r, c] = x[T - keep + r, c]
    else:
        for r in range(keep - T):  # shift the older rows up; ascending r reads ahead of where it writes
            for c in range(C):
                conv_state[r, c] = conv_state[r + T, c]
        for r in range(T):
            for c in range(C):
                conv_state[keep - T + r, c] = x[r, c]


def causal_conv1d_reference(conv_state, x, weight):  # [K-1, C], [T, C], [C, K] -> out [T, C], state [K-1, C]
    K = weight.shape[1]
    xx = np.concatenate([conv_state, x]).astype(np.float64)
    w = np.asarray(weight, dtype=np.float64)
    T = x.shape[0]
    y = np.zeros((T, x.shape[1]))
    for t in range(T):
        for j in range(K):
            y[t] += w[:, j] * xx[t + j]
    return y / (1.0 + np.exp(-y)), xx[len(xx) - (K - 1):]


# ---------------------------------------------------------------------------------------------------
# L2 normalisation of q and k


@jit
def l2norm(out, x, eps):  # [T, H, D] <- [T, H, D]; out may be x (in place)
    """out[t, h] = x[t, h] / sqrt( sum_d x[t, h, d]^2 + eps )

    eps is added to the *sum* of squares (not the mean) inside the root, as FLA and transformers'
    l2norm do; the model uses eps = 1e-6. Serial: a few flops per element, less than waking threads.
    """
    T, H, D = x.shape
    eps32 = np.float32(eps)
    for t in range(T):
        for h in range(H):
            ss = np.float32(0.0)
            for d in range(D):
                ss += x[t, h, d] * x[t, h, d]
            inv = np.float32(1.0) / np.sqrt(ss + eps32)
            for d in range(D):
                out[t, h, d] = x[t, h, d] * inv


def l2norm_reference(x, eps):  # [T, H, D] -> [T, H, D]
    x = np.asarray(x, dtype=np.float64)
    return x / np.sqrt((x * x).sum(-1, keepdims=True) + eps)


# ---------------------------------------------------------------------------------------------------
# Per-token forget gate g (log space) and write strength beta


@jit
def delta_rule_gates(g, beta, a, b, A_log, dt_bias):  # [T, Hv], [T, Hv] <- [T, Hv], [T, Hv], [Hv], [Hv]
    """g[t, h]    = -exp(A_log[h]) * softplus(a[t, h] + dt_bias[h])      (<= 0: S decays by exp(g))
    beta[t, h] = sigmoid(b[t, h])

    softplus(x) = log(1 + e^x), taken as x above 20 like torch's F.softplus (threshold=20).
    A_log and dt_bias may be stored bf16/fp16/fp32 (widened here); the math is fp32, as the torch
    code's .float() casts make it.
    """
    T, H = a.shape
    for t in range(T):
        for h in range(H):
            x = a[t, h] + widen(dt_bias[h])
            softplus = x if x > np.float32(20.0) else np.log1p(np.exp(x))
            g[t, h] = -np.exp(widen(A_log[h])) * softplus
            beta[t, h] = np.float32(1.0) / (np.float32(1.0) + np.exp(-b[t, h]))


def delta_rule_gates_reference(a, b, A_log, dt_bias):  # -> g [T, Hv], beta [T, Hv]
    x = np.asarray(a, np.float64) + np.asarray(dt_bias, np.float64)
    g = -np.exp(np.asarray(A_log, np.float64)) * np.logaddexp(0.0, x)
    beta = 1.0 / (1.0 + np.exp(-np.asarray(b, np.float64)))
    return g, beta


# ---------------------------------------------------------------------------------------------------
# The gated delta rule, token by token (decode)


@pjit
def gated_delta_rule_recurrent(out, state, q, k, v, g, beta):
    # [T, Hv, Dv], [Hv, Dk, Dv] (in/out) <- [T, Hk, Dk], [T, Hk, Dk], [T, Hv, Dv], [T, Hv], [T, Hv]
    """For each value head h (key head j = h // (Hv/Hk)) and token t, with S = state[h]:

        S     <- exp(g_t) S
        delta  = beta_t (v_t - S^T k_t)
        S     <- S + k_t delta^T
        o_t    = S^T q_t / sqrt(Dk)

    q and k are expected l2-normalised (see l2norm). out must not alias the inputs.
    """
    T, Hk, Dk = k.shape
    Hv, Dv = v.shape[1], v.shape[2]
    group = Hv // Hk
    scale = np.float32(1.0 / np.sqrt(Dk))
    for h in prange(Hv):
        j = h // group
        S = state[h]
        delta = np.empty(Dv, dtype=np.float32)  # per head, not per token; fully rewritten before use
        for t in range(T):
            decay = np.exp(g[t, h])
            # Pass 1 over S: forget, and read what S already stores for k_t (S^T k_t, into delta).
            for e in range(Dv):
                delta[e] = 0.0
            for i in range(Dk):
                ki = k[t, j, i]
                for e in range(Dv):
                    S[i, e] *= decay
                    delta[e] += S[i, e] * ki
            bt = beta[t, h]
            for e in range(Dv):
                delta[e] = (v[t, h, e] - delta[e]) * bt
            # Pass 2: write the correction along k_t, and read the updated state at q_t.
            for e in range(Dv):
                out[t, h, e] = 0.0
            for i in range(Dk):
                ki = k[t, j, i]
                qi = q[t, j, i] * scale
                for e in range(Dv):
                    S[i, e] += ki * delta[e]
                    out[t, h, e] += S[i, e] * qi


def gated_delta_rule_recurrent_reference(state, q, k, v, g, beta):
    # -> out [T, Hv, Dv], final state [Hv, Dk, Dv], float64; the literal recurrence
    T, Hk, Dk = k.shape
    Hv = v.shape[1]
    group = Hv // Hk
    S = np.array(state, dtype=np.float64)
    out = np.zeros(v.shape)
    for h in range(Hv):
        j = h // group
        for t in range(T):
            qt = np.asarray(q[t, j], np.float64)
            kt = np.asarray(k[t, j], np.float64)
            vt = np.asarray(v[t, h], np.float64)
            S[h] *= np.exp(np.float64(g[t, h]))
            delta = np.float64(beta[t, h]) * (vt - S[h].T @ kt)
            S[h] += np.outer(kt, delta)
            out[t, h] = S[h].T @ qt / np.sqrt(Dk)
    return out, S


# ---------------------------------------------------------------------------------------------------
# The gated delta rule over chunks of tokens (prefill)


@pjit
def gated_delta_rule_chunked(out, state, q, k, v, g, beta, chunk_size):
    # [T, Hv, Dv], [Hv, Dk, Dv] (in/out) <- [T, Hk, Dk], [T, Hk, Dk], [T, Hv, Dv], [T, Hv], [T, Hv], int
    """The same recurrence as gated_delta_rule_recurrent, a chunk of n <= chunk_size tokens at a time.
    Within a chunk, with S the state before it, c_r = g_1 + ... + g_r (cumulative log decay, r = 1..n)
    and q already scaled by 1/sqrt(Dk):

        A[r, s] = beta_r (k_r . k_s) exp(c_r - c_s)   for s < r   (strictly lower triangular)
        (I + A) U = beta v                 U [n, Dv]   (the UT transform, by forward substitution)
        (I + A) W = beta exp(c) k          W [n, Dk]
        V = U - W S                        V [n, Dv]   the deltas each token writes
        o_r = exp(c_r) q_r^T S + sum_{s <= r} (q_r . k_s) exp(c_r - c_s) V_s
        S  <- exp(c_n) S + sum_s exp(c_n - c_s) k_s V_s^T

    This is transformers' torch_chunk_gated_delta_rule; its zero padding of the last chunk is the
    same as a shorter last chunk, which is what we run. Every exp() argument is <= 0 (c_r <= 0, and
    c_r - c_s <= 0 for s <= r), so nothing overflows.
    """
    T, Hk, Dk = k.shape
    Hv, Dv = v.shape[1], v.shape[2]
    group = Hv // Hk
    scale = np.float32(1.0 / np.sqrt(Dk))
    C = chunk_size
    for h in prange(Hv):
        j = h // group
        S = state[h]
        # Per-head scratch, allocated once per call (Numba may reuse it across heads of one thread:
        # every entry read below is written first within the same chunk).
        c = np.empty(C, dtype=np.float64)         # cumulative log decay (see below why float64)
        tail = np.empty(C, dtype=np.float32)      # exp(c_n - c_s): decay from token s to chunk end
        A = np.empty((C, C), dtype=np.float32)    # the UT system (strictly lower part used)
        P = np.empty((C, C), dtype=np.float32)    # intra-chunk attention (lower part incl. diagonal)
        U = np.empty((C, Dv), dtype=np.float32)   # U, then V = U - W S in place
        W = np.empty((C, Dk), dtype=np.float32)
        for t0 in range(0, T, C):
            n = min(C, T - t0)
            # c is summed in float64: strong decays make c_r large and negative (hundreds), and the
            # differences c_r - c_s below would lose digits to cancellation in float32 (torch's fp32
            # cumsum does). The exps themselves stay float32.
            acc = 0.0
            for r in range(n):
                acc += g[t0 + r, h]
                c[r] = acc
            for r in range(n):
                tail[r] = np.exp(np.float32(c[n - 1] - c[r]))

            # Pairwise terms of the chunk: A (key-key, for the UT system) and P (query-key, for outputs).
            for r in range(n):
                for s in range(r + 1):
                    kk = np.float32(0.0)
                    qk = np.float32(0.0)
                    for i in range(Dk):
                        kk += k[t0 + r, j, i] * k[t0 + s, j, i]
                        qk += q[t0 + r, j, i] * k[t0 + s, j, i]
                    decay = np.exp(np.float32(c[r] - c[s]))
                    A[r, s] = beta[t0 + r, h] * kk * decay
                    P[r, s] = scale * qk * decay

            # UT transform: solve the unit lower triangular (I + A) [U W] = [beta v, beta exp(c) k].
            for r in range(n):
                br = beta[t0 + r, h]
                bk = br * np.exp(np.float32(c[r]))
                for e in range(Dv):
                    U[r, e] = br * v[t0 + r, h, e]
                for i in range(Dk):
                    W[r, i] = bk * k[t0 + r, j, i]
                for s in range(r):
                    a = A[r, s]
                    for e in range(Dv):
                        U[r, e] -= a * U[s, e]
                    for i in range(Dk):
                        W[r, i] -= a * W[s, i]

            # Outputs: the read of the state from before the chunk, plus attention within the chunk.
            for r in range(n):
                for i in range(Dk):  # V_r = U_r - W_r S: remove what the old state already predicts
                    w = W[r, i]
                    for e in range(Dv):
                        U[r, e] -= w * S[i, e]
            for r in range(n):
                for e in range(Dv):
                    out[t0 + r, h, e] = 0.0
                qdecay = scale * np.exp(np.float32(c[r]))
                for i in range(Dk):
                    qi = q[t0 + r, j, i] * qdecay
                    for e in range(Dv):
                        out[t0 + r, h, e] += qi * S[i, e]
                for s in range(r + 1):
                    p = P[r, s]
                    for e in range(Dv):
                        out[t0 + r, h, e] += p * U[s, e]

            # Carry the state to the end of the chunk.
            chunk_decay = np.exp(np.float32(c[n - 1]))
            for i in range(Dk):
                for e in range(Dv):
                    S[i, e] *= chunk_decay
                for s in range(n):
                    ks = k[t0 + s, j, i] * tail[s]
                    for e in range(Dv):
                        S[i, e] += ks * U[s, e]


def gated_delta_rule_chunked_reference(state, q, k, v, g, beta, chunk_size):
    # -> out [T, Hv, Dv], final state [Hv, Dk, Dv], float64; the chunk formulas as matrix algebra
    T, Hk, Dk = k.shape
    Hv = v.shape[1]
    group = Hv // Hk
    S = np.array(state, dtype=np.float64)
    out = np.zeros(v.shape)
    for h in range(Hv):
        j = h // group
        for t0 in range(0, T, chunk_size):
            sl = slice(t0, min(t0 + chunk_size, T))
            qc = np.asarray(q[sl, j], np.float64) / np.sqrt(Dk)
            kc = np.asarray(k[sl, j], np.float64)
            vc = np.asarray(v[sl, h], np.float64)
            bc = np.asarray(beta[sl, h], np.float64)[:, None]
            c = np.cumsum(np.asarray(g[sl, h], np.float64))
            decay = np.tril(np.exp(c[:, None] - c[None, :]))
            A = np.tril(bc * (kc @ kc.T) * decay, -1)
            I = np.eye(len(c))
            U = np.linalg.solve(I + A, bc * vc)
            W = np.linalg.solve(I + A, bc * np.exp(c)[:, None] * kc)
            V = U - W @ S[h]
            out[sl, h] = (np.exp(c)[:, None] * qc) @ S[h] + ((qc @ kc.T) * decay) @ V
            S[h] = np.exp(c[-1]) * S[h] + (np.exp(c[-1] - c)[:, None] * kc).T @ V
    return out, S


# ---------------------------------------------------------------------------------------------------
# Output norm of the linear-attention layer, gated by z


@pjit
def gated_rmsnorm(out, x, weight, z, eps):  # [T, H, D] <- [T, H, D], [D], [T, H, D]; out may be x
    """out[t, h] = x[t, h] / sqrt(mean_d x[t, h, d]^2 + eps) * weight * silu(z[t, h])

    Qwen3NextRMSNormGated / Qwen3_5RMSNormGated: the weight is used as is (initialised to ones), NOT
    the zero-centred (1 + w) of the other RMSNorms of these models. The norm is per head (D = Dv).
    """
    T, H, D = x.shape
    eps32 = np.float32(eps)
    for t in prange(T):
        for h in range(H):
            ss = np.float32(0.0)
            for d in range(D):
                ss += x[t, h, d] * x[t, h, d]
            inv = np.float32(1.0) / np.sqrt(ss / np.float32(D) + eps32)
            for d in range(D):
                zd = z[t, h, d]
                out[t, h, d] = x[t, h, d] * inv * widen(weight[d]) * (zd / (np.float32(1.0) + np.exp(-zd)))


def gated_rmsnorm_reference(x, weight, z, eps):  # [T, H, D], [D], [T, H, D] -> [T, H, D]
    x, z, w = (np.asarray(a, dtype=np.float64) for a in (x, z, weight))
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w * (z / (1.0 + np.exp(-z)))


# ---------------------------------------------------------------------------------------------------
# Output gate of the full-attention layers


@pjit
def sigmoid_gate(out, x, gate):  # [T, H, D] <- [T, H, D], [T, H, D]; out may be x
    """out = x * sigmoid(gate), elementwise: the attention output, per head, times the gate half of
    q_proj's output (Qwen3-Next / Qwen3.5 full attention, before o_proj)."""
    T, H, D = x.shape
    for t in prange(T):
        for h in range(H):
            for d in range(D):
                out[t, h, d] = x[t, h, d] / (np.float32(1.0) + np.exp(-gate[t, h, d]))


def sigmoid_gate_reference(x, gate):  # [T, H, D], [T, H, D] -> [T, H, D]
    return np.asarray(x, np.float64) / (1.0 + np.exp(-np.asarray(gate, np.float64)))
