"""Kernels of the Qwen3-Next / Qwen3.5 hybrid layers: Gated DeltaNet, linear attention with a matrix state.

One Gated DeltaNet layer, token t, after the input projections (C = 2*Hk*Dk + Hv*Dv conv channels):

    [q_t, k_t, v_t] <- silu(depthwise causal conv over time, K taps)       causal_conv1d
    q_t, k_t        <- q_t / |q_t|,  k_t / |k_t|   per key head             l2norm
    g_t    = -exp(A_log) * softplus(a_t + dt_bias)   per value head          delta_rule_gates
    beta_t = sigmoid(b_t)
    per value head h, reading key head j(h), state S_h [Dk, Dv]:           gated_delta_rule_recurrent
        S <- exp(g_t) S                      forget
        S <- S + k_t (beta_t (v_t - S^T k_t))^T   delta rule: move S^T k_t towards v_t
        o_t = S^T q_t / sqrt(Dk)
    o_t <- o_t / rms(o_t) * w * silu(z_t)   per value head                  gated_rmsnorm

Layouts (all activations float32, token-major like every other minqwen activation):
    q, k [T, Hk, Dk]    v, out [T, Hv, Dv]    g, beta [T, Hv]    state [Hv, Dk, Dv]
    conv x, out [T, C]  conv_state [K-1, C]   conv weight [C, K] (checkpoint [C, 1, K] squeezed)
Value heads share key heads (G = Hv // Hk value heads per key head) in one of two orders:
    grouped  j(h) = h // G    value heads j*G .. j*G + G - 1 read key head j (torch's repeat_interleave,
                              transformers' checkpoints)
    tiled    j(h) = h % Hk    value heads j, j + Hk, j + 2 Hk, ... read key head j (llama.cpp's converter
                              reorders qwen35 / qwen35moe files so, for ggml's broadcast)
Everything per value head (v, z, a, b, A_log, dt_bias, out_proj's columns) is in the same order, so the
order matters only where a value head meets its key head: gated_delta_rule_recurrent takes it as
`tiled`, and the weights run as stored.

Prefill runs the same recurrence as decode, token by token: the chunked (WY / UT transform) form GPUs
prefill with, written as plain loops, was never faster here (docs/performance.md).

Semantics follow transformers' torch_recurrent_gated_delta_rule (and torch_chunk_gated_delta_rule); its
l2norm of q and k (use_qk_l2norm_in_kernel) is a kernel of its own here, run before the delta rule.
"""
import numpy as np
from numba import prange

from .activations import sigmoid, sigmoid_reference, silu, silu_reference
from .dtypes import widen
from .jit import jit, pjit
from .norm import sum_of_squares

# ---------------------------------------------------- short causal convolution over time ----

@pjit
def causal_conv1d(out, conv_state, x, weight):  # [T, C], [K-1, C] (in/out), [T, C], [C, K]
    """out[t, c] = silu( sum_j weight[c, j] * xx[t + j, c] ),   xx = concat(conv_state, x) over time,

    then conv_state <- the last K-1 rows of xx. Tap K-1 multiplies the current token, tap 0 the token
    K-1 steps back (torch's conv1d with padding K-1, cut to T outputs). A zero conv_state starts a
    sequence; since the state carries the last K-1 inputs, feeding a sequence in any split (a prefill
    chunk, then single tokens) gives the same outputs. No bias: Qwen3-Next/3.5 conv1d has bias=False.
    out must not alias x or conv_state."""
    (T, C), K = x.shape, weight.shape[1]
    keep = K - 1
    for t in prange(T):
        out[t] = 0.0
        for j in range(K):
            s = t - keep + j  # time index of the input tap j reads; < 0 means "from before this call"
            row = x[s] if s >= 0 else conv_state[keep + s]
            for c in range(C):
                out[t, c] += widen(weight[c, j]) * row[c]
        for c in range(C):
            out[t, c] = silu(out[t, c])
    # The state is read by every token above, so it is updated only after the parallel loop: row r takes
    # xx's row T + r, from x or (T < K-1) an older state row, which ascending r reads before overwriting.
    for r in range(keep):
        s = T - keep + r
        conv_state[r] = x[s] if s >= 0 else conv_state[r + T]


def causal_conv1d_reference(conv_state, x, weight):  # [K-1, C], [T, C], [C, K] -> out [T, C], state [K-1, C]
    T, K = len(x), weight.shape[1]
    xx, w = np.concatenate([conv_state, x]).astype(np.float64), np.asarray(weight, dtype=np.float64)
    y = sum(w[:, j] * xx[j:j + T] for j in range(K))  # y[t] = sum_j w[:, j] xx[t + j]
    return silu_reference(y), xx[len(xx) - (K - 1):]


# ----------------------------------------------------------- L2 normalisation of q and k ----

@jit
def l2norm(out, x, eps):  # [T, H, D] <- [T, H, D]; out may be x (in place)
    """out[t, h] = x[t, h] / sqrt( sum_d x[t, h, d]^2 + eps )

    eps is added to the *sum*, as in FLA's and transformers' l2norm. Serial: less work than waking threads."""
    T, H, D = x.shape
    for t in range(T):
        for h in range(H):
            inv = np.float32(1.0) / np.sqrt(sum_of_squares(x[t, h]) + np.float32(eps))
            for d in range(D):
                out[t, h, d] = x[t, h, d] * inv


def l2norm_reference(x, eps):  # [T, H, D] -> [T, H, D]
    x = np.asarray(x, dtype=np.float64)
    return x / np.sqrt((x * x).sum(-1, keepdims=True) + eps)


# --------------------------- per-token forget gate g (log space) and write strength beta ----

@jit
def delta_rule_gates(g, beta, a, b, A_log, dt_bias):  # [T, Hv], [T, Hv] <- [T, Hv], [T, Hv], [Hv], [Hv]
    """g[t, h]    = -exp(A_log[h]) * softplus(a[t, h] + dt_bias[h])      (<= 0: S decays by exp(g))
    beta[t, h] = sigmoid(b[t, h])

    softplus(x) = log(1 + e^x), taken as x above 20 like torch's F.softplus (threshold=20). A_log and dt_bias
    may be stored bf16/fp16/fp32 (widened here); the math is fp32, as torch's .float() casts make it."""
    T, H = a.shape
    for t in range(T):
        for h in range(H):
            x = a[t, h] + widen(dt_bias[h])
            softplus = x if x > np.float32(20.0) else np.log1p(np.exp(x))
            g[t, h] = -np.exp(widen(A_log[h])) * softplus
            beta[t, h] = sigmoid(b[t, h])


def delta_rule_gates_reference(a, b, A_log, dt_bias):  # -> g [T, Hv], beta [T, Hv]
    x = np.asarray(a, np.float64) + np.asarray(dt_bias, np.float64)
    g = -np.exp(np.asarray(A_log, np.float64)) * np.logaddexp(0.0, x)
    return g, sigmoid_reference(b)


# -------------------------------------------------- the gated delta rule, token by token ----

@pjit
def gated_delta_rule_recurrent(out, state, q, k, v, g, beta, tiled):
    # [T, Hv, Dv], [Hv, Dk, Dv] (in/out) <- [T, Hk, Dk], [T, Hk, Dk], [T, Hv, Dv], [T, Hv], [T, Hv], bool
    """For each value head h (key head j = h % Hk if tiled else h // (Hv/Hk)) and token t, with S = state[h]:

        S     <- exp(g_t) S
        delta  = beta_t (v_t - S^T k_t)
        S     <- S + k_t delta^T
        o_t    = S^T q_t / sqrt(Dk)

    q and k are expected l2-normalised (see l2norm). out must not alias the inputs."""
    (T, Hk, Dk), (Hv, Dv) = k.shape, v.shape[1:]
    group, scale = Hv // Hk, np.float32(1.0 / np.sqrt(Dk))
    for h in prange(Hv):
        j, S = h % Hk if tiled else h // group, state[h]
        delta = np.empty(Dv, dtype=np.float32)  # per head, not per token; fully rewritten before use
        for t in range(T):
            decay = np.exp(g[t, h])
            # Pass 1 over S: forget, and read what S already stores for k_t (S^T k_t, into delta).
            delta[:] = 0.0
            for i in range(Dk):
                ki = k[t, j, i]
                for e in range(Dv):
                    S[i, e] *= decay
                    delta[e] += S[i, e] * ki
            bt = beta[t, h]
            for e in range(Dv):
                delta[e] = (v[t, h, e] - delta[e]) * bt
            # Pass 2: write the correction along k_t, and read the updated state at q_t.
            out[t, h] = 0.0
            for i in range(Dk):
                ki, qi = k[t, j, i], q[t, j, i] * scale
                for e in range(Dv):
                    S[i, e] += ki * delta[e]
                    out[t, h, e] += S[i, e] * qi


def gated_delta_rule_recurrent_reference(state, q, k, v, g, beta, tiled):
    # -> out [T, Hv, Dv], final state [Hv, Dk, Dv], float64; the literal recurrence
    (T, Hk, Dk), Hv = k.shape, v.shape[1]
    key_head = np.tile(np.arange(Hk), Hv // Hk) if tiled else np.repeat(np.arange(Hk), Hv // Hk)
    S, out = np.array(state, dtype=np.float64), np.zeros(v.shape)
    for h, j in enumerate(key_head):
        for t in range(T):
            qt, kt, vt = (np.asarray(a, np.float64) for a in (q[t, j], k[t, j], v[t, h]))
            S[h] *= np.exp(np.float64(g[t, h]))
            delta = np.float64(beta[t, h]) * (vt - S[h].T @ kt)
            S[h] += np.outer(kt, delta)
            out[t, h] = S[h].T @ qt / np.sqrt(Dk)
    return out, S


# --------------------------------- output norm of the linear-attention layer, gated by z ----

@pjit
def gated_rmsnorm(out, x, weight, z, eps):  # [T, H, D] <- [T, H, D], [D], [T, H, D]; out may be x
    """out[t, h] = x[t, h] / sqrt(mean_d x[t, h, d]^2 + eps) * weight * silu(z[t, h])

    Qwen3NextRMSNormGated / Qwen3_5RMSNormGated: the weight is used as is (initialised to ones), NOT
    the zero-centred (1 + w) of the other RMSNorms of these models. The norm is per head (D = Dv)."""
    T, H, D = x.shape
    for t in prange(T):
        for h in range(H):
            inv = np.float32(1.0) / np.sqrt(sum_of_squares(x[t, h]) / np.float32(D) + np.float32(eps))
            for d in range(D):
                out[t, h, d] = x[t, h, d] * inv * widen(weight[d]) * silu(z[t, h, d])


def gated_rmsnorm_reference(x, weight, z, eps):  # [T, H, D], [D], [T, H, D] -> [T, H, D]
    x, z, w = (np.asarray(a, dtype=np.float64) for a in (x, z, weight))
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w * silu_reference(z)
