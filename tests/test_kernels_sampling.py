"""The samplers against float64 references built from transformers' rules, and against transformers itself."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from minqwen.kernels.sampling import (
    apply_penalties,
    apply_penalties_reference,
    draw_reference,
    sample,
    sample_reference,
)

seeds = st.integers(0, 2**32 - 1)
SLACK = 1e-5  # how far top_p / min_p may move before a float32 kernel may keep a different set


def make_logits(rng, V, kind):  # [V] float32, kept within +-12 so no probability underflows
    if kind == "normal":
        x = rng.standard_normal(V) * rng.choice([0.5, 2.0, 4.0])
    elif kind == "grid":  # many exact ties: top-k / top-p boundaries fall inside groups of equals
        x = np.round(rng.standard_normal(V) * 2) / 2
    else:  # "peaked": a few likely tokens over a long flat tail (top-p must look deep into it)
        x = np.full(V, -12.0)
        x[rng.integers(0, V, 3)] = rng.uniform(-3, 0, 3)
    return (x * (12.0 / max(12.0, np.abs(x).max()))).astype(np.float32)  # rescaled, not clipped: no new ties


def run_sample(logits, temperature, top_k, top_p, min_p, coin):
    V = logits.shape[0]
    probs = np.full(V, np.nan, np.float32)
    order = np.full(V, -1, np.int64)
    before = logits.copy()
    token = sample(probs, order, logits, temperature, top_k, top_p, min_p, coin)
    assert np.array_equal(logits, before), "sample must not modify the logits"
    return int(token), probs


def kept_bounds(logits, temperature, top_k, top_p, min_p, slack):
    """The kept sets of the reference with top_p / min_p nudged to keep fewer and more tokens."""
    fewer = sample_reference(logits, temperature, top_k, top_p - slack, min_p * (1 + slack)) > 0
    more = sample_reference(logits, temperature, top_k, top_p + slack, min_p * (1 - slack)) > 0
    return fewer, more


def check_sample(logits, temperature, top_k, top_p, min_p, coin):
    token, probs = run_sample(logits, temperature, top_k, top_p, min_p, coin)
    kept = probs > 0
    fewer, more = kept_bounds(logits, temperature, top_k, top_p, min_p, SLACK)
    assert np.all(kept[fewer]) and not np.any(kept[~more]), (
        f"kept {np.flatnonzero(kept)[:20]} outside "
        f"[{np.flatnonzero(fewer)[:20]}, {np.flatnonzero(more)[:20]}]"
    )
    # The distribution: softmax(logits / temperature) renormalised over the kept tokens.
    z = logits.astype(np.float64) / temperature
    q = np.where(kept, np.exp(z - z[kept].max()), 0.0)
    q /= q.sum()
    diff = np.abs(probs - q)
    assert diff.max() <= 1e-5 * q.max(), f"max|diff| {diff.max():.3g}, mean|diff| {diff.mean():.3g}"
    # The draw: the first token, in vocabulary order, whose cumulative probability exceeds coin.
    cum = np.cumsum(q)
    lo = cum[token] - q[token]
    assert q[token] > 0 and lo - 1e-6 <= coin < cum[token] + 1e-6, (
        f"token {token} covers [{lo}, {cum[token]}), coin {coin}, reference {draw_reference(q, coin)}"
    )
    return token, probs


top_ks = st.sampled_from([0, 0, 1, 2, 5, 20, 999, 10**6])
top_ps = st.sampled_from([1.0, 1.0, 0.0, 0.3, 0.8, 0.95, 0.999]) | st.floats(0.0, 1.0)
min_ps = st.sampled_from([0.0, 0.0, 0.01, 0.05, 0.3, 1.0])


@settings(deadline=None, max_examples=150)
@given(seed=seeds, V=st.sampled_from([1, 2, 7, 100, 1000, 5000]),
       kind=st.sampled_from(["normal", "grid", "peaked"]), temperature=st.sampled_from([0.3, 0.7, 1.0, 1.7]),
       top_k=top_ks, top_p=top_ps, min_p=min_ps, coin=st.floats(0.0, 1.0, exclude_max=True))
def test_sample_matches_reference(seed, V, kind, temperature, top_k, top_p, min_p, coin):
    logits = make_logits(np.random.default_rng(seed), V, kind)
    check_sample(logits, temperature, top_k, top_p, min_p, coin)


def transformers_kept(logits, temperature, top_k, top_p, min_p):
    """The tokens transformers' warpers leave finite, applied in generate()'s order."""
    scores = torch.from_numpy(logits.copy())[None]
    warpers = [TemperatureLogitsWarper(temperature)]
    if top_k > 0:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    if min_p > 0.0:
        warpers.append(MinPLogitsWarper(min_p))
    for warp in warpers:
        scores = warp(None, scores)
    return torch.isfinite(scores[0]).numpy()


@settings(deadline=None, max_examples=60)
@given(seed=seeds, V=st.sampled_from([2, 7, 100, 1000]), temperature=st.sampled_from([0.3, 0.7, 1.0, 1.7]),
       top_k=top_ks, top_p=top_ps, min_p=min_ps)
def test_kept_set_matches_transformers(seed, V, temperature, top_k, top_p, min_p):
    # Distinct logits only: torch.sort is not stable, so transformers' top-p breaks ties arbitrarily.
    logits = make_logits(np.random.default_rng(seed), V, "normal")
    expected = transformers_kept(logits, temperature, top_k, top_p, min_p)
    # transformers sums in float32 over the whole ascending sort: give it a wider slack
    fewer, more = kept_bounds(logits, temperature, top_k, top_p, min_p, 1e-4)
    assert np.all(expected[fewer]) and not np.any(expected[~more]), "reference rules != transformers"
    _, probs = run_sample(logits, temperature, top_k, top_p, min_p, 0.5)
    kept = probs > 0
    assert np.all(kept[fewer]) and not np.any(kept[~more]), (
        f"kernel kept {np.flatnonzero(kept)[:20]}, transformers {np.flatnonzero(expected)[:20]}"
    )


def test_top_k_keeps_ties_with_the_kth_value():  # as transformers: scores < topk(...)[-1] are removed
    logits = np.array([1.0, 3.0, 2.0, 3.0, 2.0, 0.0], np.float32)
    _, probs = run_sample(logits, 1.0, 3, 1.0, 0.0, 0.5)
    assert np.array_equal(np.flatnonzero(probs), [1, 2, 3, 4])
    assert np.array_equal(np.flatnonzero(transformers_kept(logits, 1.0, 3, 1.0, 0.0)), [1, 2, 3, 4])


def test_top_p_ties_keep_the_lower_id():
    logits = np.log(np.array([0.1, 0.3, 0.3, 0.3], np.float64)).astype(np.float32)
    _, probs = run_sample(logits, 1.0, 0, 0.5, 0.0, 0.5)  # needs two of the three 0.3s
    assert np.array_equal(np.flatnonzero(probs), [1, 2])


@pytest.mark.parametrize("n, top_p, keep", [(2, 0.5, 1), (4, 0.5, 2), (4, 0.75, 3), (4, 0.7, 3), (4, 0.0, 1)])
def test_top_p_exact_boundary(n, top_p, keep):  # equal logits: the cumulative sums hit 1 - top_p exactly
    logits = np.zeros(n, np.float32)
    _, probs = run_sample(logits, 1.0, 0, top_p, 0.0, 0.5)
    assert np.array_equal(np.flatnonzero(probs), np.arange(keep))
    assert transformers_kept(logits, 1.0, 0, top_p, 0.0).sum() == keep


def test_draw_needs_the_cumulative_sum_to_exceed_the_coin():
    logits = np.zeros(2, np.float32)  # q = [0.5, 0.5]: token 0 covers [0, 0.5), token 1 [0.5, 1)
    assert [run_sample(logits, 1.0, 0, 1.0, 0.0, c)[0] for c in (0.0, 0.4999, 0.5, 0.9999)] == [0, 0, 1, 1]


def test_top_p_looks_past_a_heavy_head_into_a_long_tail():
    # 19999 tokens at e = exp(-20) ~ 2e-9 hold 4e-5 of the mass: top_p = 0.99999 needs ~3/4 of them,
    # below every early threshold of the kernel's partial sort.
    V = 20000
    logits = np.full(V, -20.0, np.float32)
    logits[123] = 0.0
    _, probs = check_sample(logits, 1.0, 0, 0.99999, 0.0, 0.9999999)
    z = np.exp(-20.0)
    needed = int(np.ceil((0.99999 * (1 + (V - 1) * z) - 1) / z))  # tail tokens before the cut
    assert abs((probs > 0).sum() - (needed + 1)) <= 1  # the head token + the needed tail, +-1 rounding
    kept = np.flatnonzero(probs)
    assert np.array_equal(kept, np.r_[0:123, 123, 124:kept[-1] + 1]), (
        "equal tail tokens: the lowest ids are kept"
    )


@pytest.mark.parametrize("V", [1, 5, 151936])
def test_greedy_is_argmax_first_of_equals(V):
    rng = np.random.default_rng(V)
    logits = rng.standard_normal(V).astype(np.float32)
    logits[V // 2:] = logits.max()  # ties for the maximum: the lowest index wins, as np.argmax
    for coin in (0.0, 0.5, 0.999):
        token, _ = run_sample(logits, 0.0, 20, 0.9, 0.1, coin)
        assert token == np.argmax(logits) == V // 2


def test_coin_sweep_is_deterministic_and_follows_the_distribution():
    rng = np.random.default_rng(7)
    V = 300
    logits = make_logits(rng, V, "normal")
    for temperature, top_k, top_p, min_p in [(0.8, 0, 1.0, 0.0), (0.7, 20, 0.8, 0.0), (1.3, 0, 0.9, 0.02)]:
        q = sample_reference(logits, temperature, top_k, top_p, min_p)
        n = 4000
        coins = (np.arange(n) + 0.5) / n
        tokens = np.array([run_sample(logits, temperature, top_k, top_p, min_p, c)[0] for c in coins])
        again = np.array([run_sample(logits, temperature, top_k, top_p, min_p, c)[0] for c in coins[::97]])
        assert np.array_equal(tokens[::97], again), "the same coin must give the same token"
        assert np.all(np.diff(tokens) >= 0), "tokens are laid out in vocabulary order along [0, 1)"
        freq = np.bincount(tokens, minlength=V) / n
        assert np.abs(freq - q).max() <= 1.0 / n + 1e-6, f"max|freq - q| {np.abs(freq - q).max():.3g}"


def test_a_seeded_generator_gives_the_same_tokens():
    logits = make_logits(np.random.default_rng(3), 1000, "normal")

    def run(seed):
        rng = np.random.default_rng(seed)
        return [run_sample(logits, 0.7, 20, 0.8, 0.0, rng.random())[0] for _ in range(50)]

    assert run(5) == run(5)
    assert run(5) != run(6)


def test_top_k_one_is_greedy_for_any_coin():
    logits = make_logits(np.random.default_rng(11), 2000, "normal")
    for coin in np.linspace(0, 1, 17, endpoint=False):
        assert run_sample(logits, 1.3, 1, 1.0, 0.0, coin)[0] == np.argmax(logits)


# ---- penalties ----

@settings(deadline=None, max_examples=60)
@given(seed=seeds, V=st.sampled_from([1, 7, 1000]), repetition=st.sampled_from([1.0, 1.1, 1.5, 0.8]),
       frequency=st.sampled_from([0.0, 0.3, -0.7, 2.0]), presence=st.sampled_from([0.0, 0.5, -1.0]),
       data=st.data())
def test_apply_penalties(seed, V, repetition, frequency, presence, data):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal(V) * 3).astype(np.float32)
    logits[rng.integers(0, V, 3)] = 0.0
    n_seen = data.draw(st.integers(0, V), label="n_seen")
    seen = np.sort(rng.choice(V, n_seen, replace=False)).astype(np.int64)
    counts = np.zeros(V, np.int32)  # some seen ids were generated (1-5 times), the others are prompt-only
    generated = seen[rng.random(n_seen) < 0.5]
    counts[generated] = rng.integers(1, 6, generated.size)
    ref = apply_penalties_reference(logits, seen, counts, repetition, frequency, presence)
    got = logits.copy()
    apply_penalties(got, seen, counts, repetition, frequency, presence)
    diff = np.abs(got - ref)
    assert diff.max(initial=0) <= 1e-6 * np.abs(ref).max(), f"max|diff| {diff.max():.3g}"
    prompt_only = np.setdiff1d(seen, generated)  # frequency and presence never touch them
    expected = RepetitionPenaltyLogitsProcessor(repetition)(
        torch.from_numpy(seen)[None], torch.from_numpy(logits.copy())[None])[0].numpy()
    assert np.abs(got[prompt_only] - expected[prompt_only]).max(initial=0) <= 1e-6 * np.abs(expected).max()
    if frequency == presence == 0.0:  # repetition alone is transformers' RepetitionPenaltyLogitsProcessor
        assert np.abs(got - expected).max(initial=0) <= 1e-6 * np.abs(expected).max()


def test_frequency_and_presence_follow_the_openai_formula():
    # z -= frequency * count + presence * (count > 0), on generated counts only
    logits = np.array([1.0, 1.0, 1.0, 1.0], np.float32)
    counts = np.array([0, 1, 3, 0], np.int32)  # id 0 and 3: in the prompt only / never seen
    apply_penalties(logits, np.array([0, 1, 2], np.int64), counts, 1.0, 0.5, 0.25)
    assert np.array_equal(logits, np.array([1.0, 0.25, -0.75, 1.0], np.float32))


def test_apply_penalties_ignores_ids_outside_the_vocabulary():
    logits = np.array([1.0, -1.0, 2.0], np.float32)
    counts = np.array([0, 1, 0], np.int32)
    apply_penalties(logits, np.array([-1, 1, 3, 100], np.int64), counts, 2.0, 0.0, 0.5)
    assert np.array_equal(logits, np.array([1.0, -2.5, 2.0], np.float32))
