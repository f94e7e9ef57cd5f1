"""Gated DeltaNet kernels (Qwen3-Next / Qwen3.5) against their float64 references, against each other
(any split of a sequence gives the same outputs and state), and against transformers' torch code: the
functions one by one, then whole Qwen3NextGatedDeltaNet / Qwen3_5GatedDeltaNet layers
rebuilt from our kernels with the projection layouts the model loader must use.
"""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.models.qwen3_5.configuration_qwen3_5 import Qwen3_5TextConfig
from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5GatedDeltaNet
from transformers.models.qwen3_next import modeling_qwen3_next as hf
from transformers.models.qwen3_next.configuration_qwen3_next import Qwen3NextConfig

from minqwen.kernels.deltanet import (
    causal_conv1d,
    causal_conv1d_reference,
    delta_rule_gates,
    delta_rule_gates_reference,
    gated_delta_rule_recurrent,
    gated_delta_rule_recurrent_reference,
    gated_rmsnorm,
    gated_rmsnorm_reference,
    l2norm,
    l2norm_reference,
)
from minqwen.kernels.dtypes import bf16_bits, to_float32

TOL = 1e-5  # max|diff| / max|ref| for fp32 kernels vs float64 references (observed: ~1e-6 or less)

head_dims = st.sampled_from([1, 3, 5, 16, 17, 32])
decays = st.sampled_from(["weak", "medium", "strong"])


def assert_close(got, ref, what, tol=TOL, scale=None):  # scale: of the terms summed (default: max|ref|)
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != {ref.shape}"
    diff = np.abs(got - ref)
    scale = max(float(np.abs(ref).max()) if scale is None else scale, 1e-30)
    assert diff.max() <= tol * scale, (
        f"{what}: max|diff| {diff.max():.3g}, mean|diff| {diff.mean():.3g}, max|ref| {scale:.3g}")


def delta_inputs(seed, T, Hk, group, Dk, Dv, decay):
    """Random (state, q, k, v, g, beta) as the model feeds them: unit q and k, g <= 0, beta in (0, 1)."""
    rng = np.random.default_rng(seed)
    Hv = Hk * group
    q = l2norm_reference(rng.standard_normal((T, Hk, Dk)), 1e-6).astype(np.float32)
    k = l2norm_reference(rng.standard_normal((T, Hk, Dk)), 1e-6).astype(np.float32)
    v = rng.standard_normal((T, Hv, Dv)).astype(np.float32)
    strongest = {"weak": 0.05, "medium": 2.0, "strong": 50.0}[decay]
    g = -rng.uniform(0, strongest, (T, Hv)).astype(np.float32)
    beta = rng.uniform(0, 1, (T, Hv)).astype(np.float32)
    state = rng.standard_normal((Hv, Dk, Dv)).astype(np.float32)
    return state, q, k, v, g, beta


def cuts(T, points):
    """[(lo, hi), ...] covering 0..T, cut at the given points."""
    bounds = [0] + sorted({p for p in points if 0 < p < T}) + [T]
    return list(zip(bounds[:-1], bounds[1:]))


# ---------------------------------------------------------------------------------------------------
# Kernels vs float64 references


@settings(deadline=None, max_examples=30)
@given(T=st.integers(1, 40), C=st.integers(1, 70), K=st.integers(2, 5), bf16=st.booleans(),
       seed=st.integers(0, 2**31), points=st.lists(st.integers(1, 39), max_size=5))
def test_causal_conv1d_any_split(T, C, K, bf16, seed, points):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, C)).astype(np.float32)
    weight = rng.standard_normal((C, K)).astype(np.float32)
    if bf16:
        weight = bf16_bits(weight)
    state0 = rng.standard_normal((K - 1, C)).astype(np.float32)  # as if a sequence were under way
    ref_out, ref_state = causal_conv1d_reference(state0, x, to_float32(weight))
    state, out = state0.copy(), np.empty_like(x)
    for lo, hi in cuts(T, points):
        causal_conv1d(out[lo:hi], state, x[lo:hi], weight)
    assert_close(out, ref_out, "conv out")
    assert_close(state, ref_state, "conv state")


@settings(deadline=None, max_examples=20)
@given(T=st.integers(1, 20), H=st.integers(1, 4), D=head_dims, seed=st.integers(0, 2**31),
       in_place=st.booleans())
def test_l2norm(T, H, D, seed, in_place):
    x = np.random.default_rng(seed).standard_normal((T, H, D)).astype(np.float32)
    x[0, 0] *= 1e-4  # near-zero rows: eps (added to the sum of squares) matters here
    ref = l2norm_reference(x, 1e-6)
    out = x if in_place else np.empty_like(x)
    l2norm(out, x, 1e-6)
    assert_close(out, ref, "l2norm")


@settings(deadline=None, max_examples=20)
@given(T=st.integers(1, 20), H=st.integers(1, 12), seed=st.integers(0, 2**31), bf16=st.booleans())
def test_delta_rule_gates(T, H, seed, bf16):
    rng = np.random.default_rng(seed)
    a = rng.uniform(-30, 30, (T, H)).astype(np.float32)  # both sides of softplus' threshold at 20
    b = rng.uniform(-10, 10, (T, H)).astype(np.float32)
    A_log = np.log(rng.uniform(0.01, 16, H)).astype(np.float32)
    dt_bias = rng.standard_normal(H).astype(np.float32)
    if bf16:
        A_log, dt_bias = bf16_bits(A_log), bf16_bits(dt_bias)
    ref_g, ref_beta = delta_rule_gates_reference(a, b, to_float32(A_log), to_float32(dt_bias))
    g, beta = np.empty_like(a), np.empty_like(b)
    delta_rule_gates(g, beta, a, b, A_log, dt_bias)
    assert_close(g, ref_g, "g")
    assert_close(beta, ref_beta, "beta")


def recurrence_terms(state, v, ref_out, ref_state):
    """The size of the terms the recurrence sums: each step adds terms the size of v (k and q are unit
    vectors) to a state that starts as `state`. A state that decays and cancels far below them (hypothesis:
    T = 76, one-dimensional heads, max|ref| 3e-3 of terms ~1) is held to their size, not its own."""
    return max(np.abs(v).max(), np.abs(state).max(), np.abs(ref_state).max(), np.abs(ref_out).max())


@settings(deadline=None, max_examples=30)
@given(T=st.integers(1, 80), Hk=st.integers(1, 4), group=st.integers(1, 3), Dk=head_dims, Dv=head_dims,
       decay=decays, tiled=st.booleans(), seed=st.integers(0, 2**31))
def test_gated_delta_rule_recurrent(T, Hk, group, Dk, Dv, decay, tiled, seed):
    state, q, k, v, g, beta = delta_inputs(seed, T, Hk, group, Dk, Dv, decay)
    ref_out, ref_state = gated_delta_rule_recurrent_reference(state, q, k, v, g, beta, tiled)
    terms = recurrence_terms(state, v, ref_out, ref_state)
    out = np.empty_like(v)
    gated_delta_rule_recurrent(out, state, q, k, v, g, beta, tiled)
    assert_close(out, ref_out, "recurrent out", scale=terms)
    assert_close(state, ref_state, "recurrent state", scale=terms)


@settings(deadline=None, max_examples=20)
@given(T=st.integers(1, 20), Hk=st.integers(1, 4), group=st.integers(2, 4), Dk=head_dims, Dv=head_dims,
       seed=st.integers(0, 2**31))
def test_tiled_heads_are_the_grouped_heads_reordered(T, Hk, group, Dk, Dv, seed):
    """llama.cpp's converter moves grouped value head j*G + i to tiled position i*Hk + j (in v, g, beta
    and the state alike): run tiled on the moved heads, the recurrence gives the grouped outputs, moved.
    The two orders differ whenever G > 1, so a kernel that ignored `tiled` fails here."""
    state, q, k, v, g, beta = delta_inputs(seed, T, Hk, group, Dk, Dv, "medium")
    grouped_out = np.empty_like(v)
    grouped_state = state.copy()
    gated_delta_rule_recurrent(grouped_out, grouped_state, q, k, v, g, beta, False)
    moved = np.arange(Hk * group).reshape(Hk, group).T.ravel()  # tiled position -> grouped head
    tiled_state = np.ascontiguousarray(state[moved])
    tiled_out = np.empty_like(v)
    gated_delta_rule_recurrent(tiled_out, tiled_state, q, k, *(np.ascontiguousarray(a[:, moved])
                                                                for a in (v, g, beta)), True)
    assert_close(tiled_out, grouped_out[:, moved], "tiled out", tol=1e-6)
    assert_close(tiled_state, grouped_state[moved], "tiled state", tol=1e-6)


@settings(deadline=None, max_examples=30)
@given(T=st.integers(2, 80), Hk=st.integers(1, 3), group=st.integers(1, 3), Dk=head_dims, Dv=head_dims,
       decay=decays, tiled=st.booleans(), data=st.data(), seed=st.integers(0, 2**31))
def test_any_split_of_prefill_and_decode_steps(T, Hk, group, Dk, Dv, decay, tiled, data, seed):
    """A sequence fed as pieces (prefill chunks, single tokens), from a zero state like a new sequence:
    same outputs and final state as the recurrence over the whole."""
    state, q, k, v, g, beta = delta_inputs(seed, T, Hk, group, Dk, Dv, decay)
    state[:] = 0.0
    ref_out, ref_state = gated_delta_rule_recurrent_reference(state, q, k, v, g, beta, tiled)
    out = np.empty_like(v)
    for lo, hi in cuts(T, data.draw(st.lists(st.integers(1, T - 1), max_size=4), label="cuts")):
        piece = slice(lo, hi)
        gated_delta_rule_recurrent(out[piece], state, q[piece], k[piece], v[piece], g[piece], beta[piece],
                                   tiled)
    terms = recurrence_terms(state, v, ref_out, ref_state)
    assert_close(out, ref_out, "split out", scale=terms)
    assert_close(state, ref_state, "split state", scale=terms)


@settings(deadline=None, max_examples=20)
@given(T=st.integers(1, 20), H=st.integers(1, 4), D=head_dims, bf16=st.booleans(), in_place=st.booleans(),
       seed=st.integers(0, 2**31))
def test_gated_rmsnorm(T, H, D, bf16, in_place, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, H, D)).astype(np.float32)
    # z as the model has it in Qwen3-Next: a strided view into a wider projection output
    z = rng.standard_normal((T, H, 2 * D)).astype(np.float32)[:, :, D:]
    weight = (1 + 0.3 * rng.standard_normal(D)).astype(np.float32)
    if bf16:
        weight = bf16_bits(weight)
    ref = gated_rmsnorm_reference(x, to_float32(weight), z, 1e-6)
    out = x if in_place else np.empty_like(x)
    gated_rmsnorm(out, x, weight, z, 1e-6)
    assert_close(out, ref, "gated_rmsnorm")


# ---------------------------------------------------------------------------------------------------
# Against transformers' torch code


def test_kernels_match_transformers_functions():
    """One random case through transformers' own l2norm, causal_conv1d_fn/_update,
    torch_chunk_gated_delta_rule (its prefill form), torch_recurrent_gated_delta_rule and
    Qwen3NextRMSNormGated."""
    rng = np.random.default_rng(7)
    T, Hk, group, Dk, Dv, K, chunk = 45, 2, 3, 17, 12, 4, 16
    Hv = Hk * group
    C = 2 * Hk * Dk + Hv * Dv
    tensor = torch.from_numpy

    # Conv: a prefill (causal_conv1d_fn from zeros) then two decode tokens (causal_conv1d_update).
    x = rng.standard_normal((T, C)).astype(np.float32)
    weight = rng.standard_normal((C, K)).astype(np.float32)
    torch_out = [hf.causal_conv1d_fn(tensor(x[:-2].T[None].copy()), tensor(weight), activation="silu")]
    torch_state = tensor(np.ascontiguousarray(x[T - 2 - (K - 1):T - 2].T[None]))
    for t in (T - 2, T - 1):
        torch_out.append(hf.causal_conv1d_update(tensor(x[t:t + 1].T[None].copy()), torch_state,
                                                 tensor(weight), activation="silu"))
    torch_out = torch.cat(torch_out, dim=-1)[0].T.numpy()
    state, out = np.zeros((K - 1, C), np.float32), np.empty_like(x)
    causal_conv1d(out[:-2], state, x[:-2], weight)
    for t in (T - 2, T - 1):
        causal_conv1d(out[t:t + 1], state, x[t:t + 1], weight)
    assert_close(out, torch_out, "conv vs transformers")
    assert_close(state, torch_state[0].T.numpy(), "conv state vs transformers")

    # l2norm + delta rule: torch normalises q and k inside (use_qk_l2norm_in_kernel=True), we before.
    q_raw = rng.standard_normal((T, Hk, Dk)).astype(np.float32)
    k_raw = rng.standard_normal((T, Hk, Dk)).astype(np.float32)
    _, _, _, v, g, beta = delta_inputs(8, T, Hk, group, Dk, Dv, "medium")
    state0 = rng.standard_normal((Hv, Dk, Dv)).astype(np.float32)
    assert_close(l2norm_reference(q_raw, 1e-6), hf.l2norm(tensor(q_raw), eps=1e-6).numpy(), "l2norm ref")
    q, k = np.empty_like(q_raw), np.empty_like(k_raw)
    l2norm(q, q_raw, 1e-6)
    l2norm(k, k_raw, 1e-6)
    batched = [tensor(a[None].copy()) for a in (q_raw, k_raw, v, g, beta)]
    for name, torch_fn, kw in [("chunked", hf.torch_chunk_gated_delta_rule, {"chunk_size": chunk}),
                               ("recurrent", hf.torch_recurrent_gated_delta_rule, {})]:
        torch_o, torch_s = torch_fn(*batched, initial_state=tensor(state0[None].copy()),
                                    output_final_state=True, use_qk_l2norm_in_kernel=True, **kw)
        state, o = state0.copy(), np.empty_like(v)
        gated_delta_rule_recurrent(o, state, q, k, v, g, beta, False)  # torch: grouped
        assert_close(o, torch_o[0].numpy(), f"recurrence vs transformers' {name} form: out")
        assert_close(state, torch_s[0].numpy(), f"recurrence vs transformers' {name} form: state")

    # Gated RMSNorm over rows of one value head.
    norm = hf.Qwen3NextRMSNormGated(Dv, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(tensor(rng.standard_normal(Dv).astype(np.float32)))
        z = rng.standard_normal((T, Hv, Dv)).astype(np.float32)
        torch_y = norm(tensor(v.reshape(-1, Dv)), tensor(z.reshape(-1, Dv))).numpy().reshape(T, Hv, Dv)
    y = np.empty_like(v)
    gated_rmsnorm(y, v, norm.weight.detach().numpy(), z, 1e-6)
    assert_close(y, torch_y, "gated_rmsnorm vs transformers")


# The projection layouts, as the loader must split them (see the kernel report):
# Qwen3-Next's in_proj_qkvz rows are grouped per key head j: [q_j (Dk), k_j (Dk), v (G*Dv), z (G*Dv)],
# the v and z blocks holding value heads j*G .. j*G+G-1; in_proj_ba rows per key head: [b (G), a (G)].
# Gathering rows turns them into Qwen3.5's separate in_proj_qkv ([all q | all k | all v]), in_proj_z,
# in_proj_b, in_proj_a, which the conv weight's channel order already matches.


def qwen3_next_qkvz_rows(Hk, group, Dk, Dv):  # -> (rows of in_proj_qkv, rows of in_proj_z)
    per_head = 2 * Dk + 2 * group * Dv
    start = np.arange(Hk)[:, None] * per_head

    def block(offset, size):
        return (start + offset + np.arange(size)).ravel()

    qkv = np.concatenate([block(0, Dk), block(Dk, Dk), block(2 * Dk, group * Dv)])
    return qkv, block(2 * Dk + group * Dv, group * Dv)


def qwen3_next_ba_rows(Hk, group):  # -> (rows of in_proj_b, rows of in_proj_a)
    start = np.arange(Hk)[:, None] * 2 * group
    return (start + np.arange(group)).ravel(), (start + group + np.arange(group)).ravel()


def deltanet_layer(hidden, weights, Hk, Hv, Dk, Dv, eps, pieces):  # [T, hidden] -> [T, hidden]
    """A Gated DeltaNet layer from our kernels, Qwen3.5 weight layout, fed as the given pieces."""
    in_proj_qkv, in_proj_z, in_proj_b, in_proj_a = (weights[n] for n in ("qkv", "z", "b", "a"))
    conv_weight = weights["conv1d"][:, 0, :]
    K = conv_weight.shape[1]
    conv_state = np.zeros((K - 1, conv_weight.shape[0]), np.float32)
    state = np.zeros((Hv, Dk, Dv), np.float32)
    outputs = []
    for lo, hi in pieces:
        x, n = hidden[lo:hi], hi - lo
        mixed = x @ in_proj_qkv.T
        conv = np.empty_like(mixed)
        causal_conv1d(conv, conv_state, mixed, conv_weight)
        q = conv[:, :Hk * Dk].reshape(n, Hk, Dk)
        k = conv[:, Hk * Dk:2 * Hk * Dk].reshape(n, Hk, Dk)
        v = conv[:, 2 * Hk * Dk:].reshape(n, Hv, Dv)
        l2norm(q, q, 1e-6)
        l2norm(k, k, 1e-6)
        g, beta = np.empty((n, Hv), np.float32), np.empty((n, Hv), np.float32)
        delta_rule_gates(g, beta, x @ in_proj_a.T, x @ in_proj_b.T, weights["A_log"], weights["dt_bias"])
        o = np.empty((n, Hv, Dv), np.float32)
        gated_delta_rule_recurrent(o, state, q, k, v, g, beta, False)
        gated_rmsnorm(o, o, weights["norm"], (x @ in_proj_z.T).reshape(n, Hv, Dv), eps)
        outputs.append(o.reshape(n, Hv * Dv) @ weights["out_proj"].T)
    return np.concatenate(outputs)


@pytest.mark.parametrize("family", ["qwen3_next", "qwen3_5"])
def test_deltanet_layer_matches_transformers(family):
    Hk, group, Dk, Dv, hidden_size, K, T = 2, 3, 16, 8, 24, 4, 11
    Hv = Hk * group
    config = dict(hidden_size=hidden_size, linear_num_key_heads=Hk, linear_num_value_heads=Hv,
                  linear_key_head_dim=Dk, linear_value_head_dim=Dv, linear_conv_kernel_dim=K,
                  num_hidden_layers=1, layer_types=["linear_attention"], num_attention_heads=2,
                  num_key_value_heads=1, head_dim=8, vocab_size=16)
    torch.manual_seed(0)
    if family == "qwen3_next":
        config = Qwen3NextConfig(**config)
        layer = hf.Qwen3NextGatedDeltaNet(config, 0)
    else:
        config = Qwen3_5TextConfig(**config)
        layer = Qwen3_5GatedDeltaNet(config, 0)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(0.5 * torch.randn_like(p))
        hidden = torch.randn(1, T, hidden_size)
        expected = layer(hidden)[0].numpy()
    sd = {name: t.detach().numpy() for name, t in layer.state_dict().items()}

    weights = {"conv1d": sd["conv1d.weight"], "A_log": sd["A_log"], "dt_bias": sd["dt_bias"],
               "norm": sd["norm.weight"], "out_proj": sd["out_proj.weight"]}
    if family == "qwen3_next":
        qkv_rows, z_rows = qwen3_next_qkvz_rows(Hk, group, Dk, Dv)
        b_rows, a_rows = qwen3_next_ba_rows(Hk, group)
        qkvz, ba = sd["in_proj_qkvz.weight"], sd["in_proj_ba.weight"]
        weights.update(qkv=qkvz[qkv_rows], z=qkvz[z_rows], b=ba[b_rows], a=ba[a_rows])
    else:
        weights.update(qkv=sd["in_proj_qkv.weight"], z=sd["in_proj_z.weight"], b=sd["in_proj_b.weight"],
                       a=sd["in_proj_a.weight"])

    x = hidden[0].numpy()
    for pieces in ([(0, T)], [(0, 6)] + [(t, t + 1) for t in range(6, T)], [(0, 1), (1, 2), (2, 9), (9, T)]):
        got = deltanet_layer(x, weights, Hk, Hv, Dk, Dv, config.rms_norm_eps, pieces)
        assert_close(got, expected, f"{family} layer, pieces {pieces}")
