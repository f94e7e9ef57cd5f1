"""Mixture-of-experts kernels against their float64 references, torch.topk and transformers' MoE blocks."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numba.typed import List

from minqwen.kernels.dtypes import BF16, FP16, FP32, from_float32, to_float32
from minqwen.kernels.moe import (
    moe_by_expert,
    moe_by_expert_reference,
    moe_one_token,
    moe_one_token_reference,
    moe_reference,
    route,
    route_reference,
)

DTYPES = [BF16, FP16, FP32]
TOL = 1e-5  # fp32 math against float64: max|diff| / max|ref|


def make_experts(rng, E, F, D, dtype, as_list=False):  # -> gate_w, up_w [E][F, D], down_w [E][D, F]
    """Stacked 3-D arrays, or (as_list, what the loader passes) typed Lists of read-only per-expert
    matrices, like the memory-mapped tensors of a checkpoint."""
    # scaled so that every stage stays O(1) whatever the sizes
    gate_w = from_float32(rng.standard_normal((E, F, D)) / np.sqrt(D), dtype)
    up_w = from_float32(rng.standard_normal((E, F, D)) / np.sqrt(D), dtype)
    down_w = from_float32(rng.standard_normal((E, D, F)) / np.sqrt(F), dtype)
    if not as_list:
        return gate_w, up_w, down_w
    return tuple(List([read_only(m) for m in w]) for w in (gate_w, up_w, down_w))


def read_only(a):
    a = a.view()
    a.flags.writeable = False
    return a


def assert_close(got, ref, tol, what, scale=None):  # scale: of the terms summed (default: max|ref|)
    diff = np.abs(got.astype(np.float64) - ref)
    scale = max(np.abs(ref).max() if scale is None else scale, 1e-30)
    assert diff.max() <= tol * scale, (
        f"{what}: max|diff| {diff.max():.3g}, mean|diff| {diff.mean():.3g}, max|ref| {scale:.3g}"
    )


def run_route(logits, k, norm):
    T = logits.shape[0]
    weights = np.full((T, k), np.nan, dtype=np.float32)
    experts = np.full((T, k), -1, dtype=np.int64)
    route(weights, experts, logits, k, norm)
    return weights, experts


def torch_route(logits, k, norm):  # transformers' Qwen{2,3}MoeTopKRouter.forward after the matmul
    import torch

    probs = torch.nn.functional.softmax(torch.from_numpy(logits), dtype=torch.float, dim=-1)
    values, indices = torch.topk(probs, k, dim=-1)
    if norm:
        values /= values.sum(dim=-1, keepdim=True)
    return values.numpy(), indices.numpy()


def draw_logits(rng, T, E, kind):  # [T, E] float32 router logits
    if kind == "ties":  # a few distinct values per row, so ties sit at and across the k-th place
        return (rng.integers(0, rng.integers(1, 4), size=(T, E)) * 0.75).astype(np.float32)
    if kind == "separated":  # distinct and at least 0.005 apart: no two float32 probabilities can be equal
        step = rng.uniform(0.01, 0.2)
        rows = [rng.permutation(E) * step + rng.uniform(0, step / 2, E) for _ in range(T)]
        return np.stack(rows).astype(np.float32)
    return (rng.standard_normal((T, E)) * rng.uniform(0.1, 6.0)).astype(np.float32)


def draw_routing(rng, T, E, k):  # random but valid routing: k distinct experts per token
    experts = np.stack([rng.choice(E, size=k, replace=False) for _ in range(T)]).astype(np.int64)
    weights = rng.uniform(0.05, 1.0, size=(T, k)).astype(np.float32)
    return weights, experts


# ---------------------------------------------------------------------------------------------
# route

def route_cases(kinds):
    return st.tuples(
        st.integers(1, 40),  # T
        st.integers(1, 160),  # E
        st.integers(1, 160),  # k, clipped to E
        st.booleans(),  # norm_topk_prob
        st.sampled_from(kinds),  # how the logits are drawn
        st.integers(0, 2**32 - 1),  # seed
    )


@settings(max_examples=60)
@given(route_cases(["normal", "ties", "separated"]))
def test_route_matches_reference(case):
    T, E, k, norm, kind, seed = case
    k = min(k, E)
    logits = draw_logits(np.random.default_rng(seed), T, E, kind)
    weights, experts = run_route(logits, k, norm)
    ref_w, ref_e = route_reference(logits, k, norm)
    # exact ties included: both take the lower expert index first
    np.testing.assert_array_equal(experts, ref_e)
    rel = np.abs(weights - ref_w) / ref_w
    assert rel.max() <= 2e-5, f"weights: max rel diff {rel.max():.3g}, mean {rel.mean():.3g}"


@settings(max_examples=40)
@given(route_cases(["ties", "separated"]))
def test_route_matches_torch(case):
    T, E, k, norm, kind, seed = case
    k = min(k, E)
    logits = draw_logits(np.random.default_rng(seed), T, E, kind)
    weights, experts = run_route(logits, k, norm)
    torch_w, torch_e = torch_route(logits, k, norm)
    rel = np.abs(weights - torch_w) / torch_w
    assert rel.max() <= 2e-5, f"weights: max rel diff {rel.max():.3g}, mean {rel.mean():.3g}"
    if kind == "separated":
        np.testing.assert_array_equal(experts, torch_e)
    else:
        # torch.topk on CPU breaks exact ties in std::nth_element's arbitrary order, so only the
        # choice up to ties can agree: distinct experts whose logits are, position by position,
        # the ones torch chose (hence the same weights and the same multiset of probabilities).
        assert all(len(set(row)) == k for row in experts)
        np.testing.assert_array_equal(
            np.take_along_axis(logits, experts, -1), np.take_along_axis(logits, torch_e, -1)
        )


def test_route_ties_go_to_the_lower_index():
    logits = np.array([[1.0, 3.0, 3.0, 0.0, 3.0], [2.0, 2.0, 2.0, 2.0, 2.0]], dtype=np.float32)
    weights, experts = run_route(logits, 2, False)
    np.testing.assert_array_equal(experts, [[1, 2], [0, 1]])
    np.testing.assert_allclose(weights[1], [0.2, 0.2], rtol=1e-6)
    weights, experts = run_route(logits, 4, True)
    np.testing.assert_array_equal(experts, [[1, 2, 4, 0], [0, 1, 2, 3]])
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# experts

expert_cases = st.tuples(
    st.integers(1, 16),  # E
    st.integers(1, 16),  # k, clipped to E
    st.integers(1, 71),  # D
    st.integers(1, 71),  # F
    st.sampled_from(DTYPES),
    st.booleans(),  # experts as a typed List of matrices rather than stacked
    st.integers(0, 2**32 - 1),  # seed
)


def run_decode(x, gate_w, up_w, down_w, experts, weights):
    out = np.full(x.shape[0], np.nan, dtype=np.float32)
    hidden = np.full((len(experts), gate_w[0].shape[0]), np.nan, dtype=np.float32)
    moe_one_token(out, hidden, x, gate_w, up_w, down_w, experts, weights)
    return out


def run_prefill(x, gate_w, up_w, down_w, experts, weights):
    out = np.full(x.shape, np.nan, dtype=np.float32)
    moe_by_expert(out, x, gate_w, up_w, down_w, experts, weights)
    return out


@settings(max_examples=50)
@given(expert_cases)
def test_moe_one_token_matches_reference(case):
    E, k, D, F, dtype, as_list, seed = case
    k = min(k, E)
    rng = np.random.default_rng(seed)
    gate_w, up_w, down_w = make_experts(rng, E, F, D, dtype, as_list)
    x = rng.standard_normal(D).astype(np.float32)
    weights, experts = draw_routing(rng, 1, E, k)
    got = run_decode(x, gate_w, up_w, down_w, experts[0], weights[0])
    ref = moe_one_token_reference(x, gate_w, up_w, down_w, experts[0], weights[0])
    terms = expert_terms(x[None], gate_w, up_w, down_w, experts, weights)  # an output that cancels: to these
    assert_close(got, ref, TOL, f"moe_one_token {dtype}", terms.max())


def expert_terms(x, gate_w, up_w, down_w, experts, weights):  # -> [T, D] float64
    """sum_j w_j |down_e| @ |silu(gate_e x) (up_e x)|: the size of the terms each output sums, which float32
    rounds; outputs that cancel to far less than it (hypothesis cases: D = 1, 9 of 10 experts, max|ref|
    2e-4 of terms ~1; one token, D = 1, 16 of 16 experts, 7.5e-8 off a max|ref| of 3e-3) are held to it,
    not to themselves"""
    out = np.zeros(x.shape)
    for t in range(x.shape[0]):
        for e, w in zip(experts[t], weights[t]):
            g, u = (to_float32(m[e]).astype(np.float64) @ x[t] for m in (gate_w, up_w))
            down = np.abs(to_float32(down_w[e]).astype(np.float64))
            out[t] += w * (down @ np.abs(g / (1 + np.exp(-g)) * u))
    return out


@settings(max_examples=40)
@given(expert_cases, st.integers(1, 40))
def test_moe_by_expert_matches_reference_and_decode(case, T):
    E, k, D, F, dtype, as_list, seed = case
    k = min(k, E)
    rng = np.random.default_rng(seed)
    gate_w, up_w, down_w = make_experts(rng, E, F, D, dtype, as_list)
    x = rng.standard_normal((T, D)).astype(np.float32)
    weights, experts = draw_routing(rng, T, E, k)
    got = run_prefill(x, gate_w, up_w, down_w, experts, weights)
    ref = moe_by_expert_reference(x, gate_w, up_w, down_w, experts, weights)
    scale = max(np.abs(ref).max(), expert_terms(x, gate_w, up_w, down_w, experts, weights).max())
    assert_close(got, ref, TOL, f"moe_by_expert {dtype}", scale)
    by_token = np.stack([run_decode(x[t], gate_w, up_w, down_w, experts[t], weights[t]) for t in range(T)])
    assert_close(got, by_token.astype(np.float64), TOL, f"moe_by_expert vs moe_one_token {dtype}", scale)


@settings(max_examples=30)
@given(expert_cases, st.integers(2, 40), st.integers(0, 2**32 - 1))
def test_any_split_of_the_batch_gives_the_same_output(case, T, split_seed):
    E, k, D, F, dtype, as_list, seed = case
    k = min(k, E)
    rng = np.random.default_rng(seed)
    gate_w, up_w, down_w = make_experts(rng, E, F, D, dtype, as_list)
    x = rng.standard_normal((T, D)).astype(np.float32)
    logits = draw_logits(rng, T, E, ["normal", "ties"][seed & 1])
    s = 1 + split_seed % (T - 1)
    # routing is per token: exactly equal
    weights, experts = run_route(logits, k, True)
    w0, e0 = run_route(logits[:s], k, True)
    w1, e1 = run_route(logits[s:], k, True)
    np.testing.assert_array_equal(np.concatenate([e0, e1]), experts)
    np.testing.assert_array_equal(np.concatenate([w0, w1]), weights)
    # experts: BLAS may sum in another order for another number of rows, so equal to rounding
    whole = run_prefill(x, gate_w, up_w, down_w, experts, weights)
    parts = np.concatenate(
        [
            run_prefill(x[:s], gate_w, up_w, down_w, e0, w0),
            run_prefill(x[s:], gate_w, up_w, down_w, e1, w1),
        ]
    )
    assert_close(parts, whole.astype(np.float64), TOL, f"split at {s} of {T}")


# ---------------------------------------------------------------------------------------------
# the whole sparse block: our kernels == moe_reference == transformers


@settings(max_examples=30)
@given(expert_cases, st.integers(1, 40), st.booleans())
def test_route_then_prefill_matches_moe_reference(case, T, norm):
    E, k, D, F, dtype, as_list, seed = case
    k = min(k, E)
    rng = np.random.default_rng(seed)
    gate_w, up_w, down_w = make_experts(rng, E, F, D, dtype, as_list)
    # Small integers times multiples of 1/8: the router logits come out exact in float32 and in
    # float64 alike, so rounding cannot reorder nearly tied experts between us and the reference.
    router_w = from_float32(rng.integers(-2, 3, size=(E, D)), dtype)
    x = (np.round(rng.standard_normal((T, D)) * 8) / 8).astype(np.float32)
    logits = x @ to_float32(router_w).T  # the caller's router matmul, in float32
    weights, experts = run_route(logits, k, norm)
    got = run_prefill(x, gate_w, up_w, down_w, experts, weights)
    ref = moe_reference(x, gate_w, up_w, down_w, router_w, k, norm)
    assert_close(got, ref, TOL, f"route + moe_by_expert {dtype}")


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe"])
@settings(max_examples=8)
@given(case=expert_cases, T=st.integers(1, 12), norm=st.booleans())
def test_moe_reference_matches_transformers(family, case, T, norm):
    import torch

    E, k, D, F, _, _, seed = case
    k = min(k, E)
    rng = np.random.default_rng(seed)
    gate_w, up_w, down_w = make_experts(rng, E, F, D, FP32)
    router_w = rng.standard_normal((E, D)).astype(np.float32)
    x = rng.standard_normal((T, D)).astype(np.float32)
    sizes = dict(hidden_size=D, moe_intermediate_size=F, num_experts=E, num_experts_per_tok=k)
    if family == "qwen2_moe":
        from transformers.models.qwen2_moe import modeling_qwen2_moe as m

        config = m.Qwen2MoeConfig(**sizes, norm_topk_prob=norm, shared_expert_intermediate_size=F)
        block = m.Qwen2MoeSparseMoeBlock(config).double()
        # the shared expert is the dense kernels' job: switch it off to see the sparse part alone
        torch.nn.init.zeros_(block.shared_expert.down_proj.weight)
    else:
        from transformers.models.qwen3_moe import modeling_qwen3_moe as m

        config = m.Qwen3MoeConfig(**sizes, norm_topk_prob=norm)
        block = m.Qwen3MoeSparseMoeBlock(config).double()
    with torch.no_grad():
        # transformers fuses gate and up into one [E, 2F, D] tensor: gate rows first
        block.experts.gate_up_proj.copy_(torch.from_numpy(np.concatenate([gate_w, up_w], axis=1)))
        block.experts.down_proj.copy_(torch.from_numpy(down_w))
        block.gate.weight.copy_(torch.from_numpy(router_w))
        theirs = block(torch.from_numpy(x.astype(np.float64))[None]).numpy()[0]
    ref = moe_reference(x, gate_w, up_w, down_w, router_w, k, norm)
    assert_close(theirs, ref, TOL, f"{family} block")
