"""The dense transformer's kernels against their float64 references, on random and awkward shapes."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minqwen.kernels import isa
from minqwen.kernels.activations import (
    sigmoid,
    sigmoid_gate,
    sigmoid_gate_reference,
    sigmoid_reference,
    silu,
    silu_reference,
    swiglu,
    swiglu_reference,
)
from minqwen.kernels.attention import attention_decode, attention_prefill, attention_reference
from minqwen.kernels.dtypes import BF16, FP16, FP32, from_float32
from minqwen.kernels.embedding import embed, embed_reference
from minqwen.kernels.exp import expf, expf_reference
from minqwen.kernels.jit import jit
from minqwen.kernels.linear import FEW_TOKENS, linear
from minqwen.kernels.matmul import matmul, matmul_few, matmul_reference, matvec, matvec_reference, widen_rows
from minqwen.kernels.norm import rmsnorm, rmsnorm_reference
from minqwen.kernels.rope import apply_rope, apply_rope_reference

DTYPES = [BF16, FP16, FP32]
TOL = 1e-5  # fp32 math against float64: max|diff| / max|ref|
seeds = st.integers(0, 2**32 - 1)
head_dims = st.sampled_from([1, 2, 3, 5, 17, 64, 128])


def assert_close(got, ref, tol, what=""):
    diff = np.abs(got.astype(np.float64) - ref)
    scale = max(np.abs(ref).max(), 1e-30)
    assert np.all(np.isfinite(got)) and diff.max() <= tol * scale, (
        f"{what}: max|diff| {diff.max():.3g}, mean|diff| {diff.mean():.3g}, max|ref| {scale:.3g}"
    )


# ---- rmsnorm ----

@settings(deadline=None, max_examples=40)
@given(seed=seeds, N=st.integers(1, 70), D=st.sampled_from([1, 2, 7, 64, 128, 896, 1000]),
       magnitude=st.sampled_from([1e-3, 1.0, 300.0]), eps=st.sampled_from([1e-6, 1e-5]),
       in_place=st.booleans())
def test_rmsnorm(seed, N, D, magnitude, eps, in_place):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((N, D)) * magnitude).astype(np.float32)
    weight = rng.standard_normal(D).astype(np.float32)
    ref = rmsnorm_reference(x, weight, eps)
    out = x if in_place else np.full_like(x, np.nan)
    rmsnorm(out, x, weight, eps)
    # per row: rows differ in scale only through the weight, so compare each row to its own max
    for n in range(N):
        assert_close(out[n], ref[n], TOL, f"row {n}")


def test_rmsnorm_zero_row_is_zero():  # eps keeps an all-zero row finite
    x = np.zeros((2, 8), np.float32)
    out = np.full_like(x, np.nan)
    rmsnorm(out, x, np.ones(8, np.float32), 1e-6)
    assert np.all(out == 0.0)


def test_rmsnorm_per_head_view():  # Qwen3's q/k norm: [T, H, hd] viewed as [T*H, hd], in place
    rng = np.random.default_rng(0)
    q = rng.standard_normal((3, 4 * 16)).astype(np.float32)
    w = rng.standard_normal(16).astype(np.float32)
    ref = rmsnorm_reference(q.reshape(12, 16), w, 1e-6).reshape(3, 64)
    rmsnorm(q.reshape(12, 16), q.reshape(12, 16), w, 1e-6)
    assert_close(q, ref, TOL)


# ---- rope ----

def rope_tables(rng, positions, R, theta=10000.0):  # cos, sin [T, R/2] as minqwen/rope.py builds them
    inv_freq = 1.0 / theta ** (np.arange(0, R, 2) / R)
    angles = np.outer(positions, inv_freq)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


@settings(deadline=None, max_examples=40)
@given(seed=seeds, T=st.integers(1, 20), H=st.integers(1, 9), hd=head_dims, data=st.data())
def test_apply_rope(seed, T, H, hd, data):
    R = 2 * data.draw(st.integers(0, hd // 2), label="R/2")  # R < hd: partial rotary
    rng = np.random.default_rng(seed)
    start = int(rng.integers(0, 40000))
    cos, sin = rope_tables(rng, start + np.arange(T), R)
    x = rng.standard_normal((T, H, hd)).astype(np.float32)
    ref = apply_rope_reference(x, cos, sin)
    apply_rope(x, cos, sin)
    assert_close(x, ref, TOL)
    assert np.array_equal(x[..., R:], ref[..., R:].astype(np.float32)), "dims >= R must not change"


def test_apply_rope_rotates_halves_not_adjacent_pairs():
    # hd = 4, R = 4: pairs are (0, 2) and (1, 3). A quarter turn on pair 0 only.
    x = np.array([[[1.0, 10.0, 2.0, 20.0]]], np.float32)
    cos = np.array([[0.0, 1.0]], np.float32)
    sin = np.array([[1.0, 0.0]], np.float32)
    apply_rope(x, cos, sin)
    assert np.array_equal(x[0, 0], np.array([-2.0, 10.0, 1.0, 20.0], np.float32))


# ---- expf ----

@jit
def expf_all(out, x):  # the scalar kernel over an array, as the attention and activation loops call it
    for i in range(x.size):
        out[i] = expf(x[i])


@settings(deadline=None, max_examples=40)
@given(seed=seeds, scale=st.sampled_from([1e-6, 0.1, 1.0, 10.0, 86.0, 200.0]), n=st.integers(1, 300),
       sign=st.sampled_from([-1.0, 1.0, 0.0]))
def test_expf(seed, scale, n, sign):
    x = np.random.default_rng(seed).standard_normal(n) * scale
    x = (sign * np.abs(x) if sign else x).astype(np.float32)  # all <= 0, all >= 0, or both
    x[0] = 0.0  # e**0 = 1 exactly enough
    out = np.full(n, np.nan, np.float32)
    expf_all(out, x)
    ref = expf_reference(x)
    assert np.all(np.abs(out - ref) <= 4e-7 * ref), np.abs(out / ref - 1).max()
    assert np.all(out[x < -87] == 0) and np.all(out[x >= -87] > 0) and np.isfinite(out).all()



def run_attention(rng, T, Hq, Hkv, hd, start, window, capacity, kernel=attention_decode, cache_dtype=FP32):
    q = rng.standard_normal((T, Hq, hd)).astype(np.float32)
    # Positions beyond start + T hold NaN: a kernel that reads them fails.
    k_cache = np.full((Hkv, capacity, hd), np.nan, np.float32)
    v_cache = np.full((Hkv, capacity, hd), np.nan, np.float32)
    L = start + T
    k_cache[:, :L] = rng.standard_normal((Hkv, L, hd))
    v_cache[:, :L] = rng.standard_normal((Hkv, L, hd))
    k_cache, v_cache = from_float32(k_cache, cache_dtype), from_float32(v_cache, cache_dtype)
    scale = float(rng.choice([1.0 / np.sqrt(hd), 1.0, 3.0 / np.sqrt(hd)]))
    out = np.full((T, Hq, hd), np.nan, np.float32)
    kernel(out, q, k_cache, v_cache, start, window, scale)
    return out, attention_reference(q, k_cache, v_cache, start, window, scale)


@settings(deadline=None, max_examples=60)
@given(seed=seeds, T=st.sampled_from([1, 1, 2, 5, 33]), start=st.sampled_from([0, 0, 1, 7, 100]),
       Hkv=st.integers(1, 3), ratio=st.sampled_from([1, 2, 3, 4, 7]), hd=head_dims,
       window=st.sampled_from([0, -1, 1, 2, 5, 16, 1000]), spare=st.integers(0, 9),
       cache_dtype=st.sampled_from(DTYPES))
def test_attention(seed, T, start, Hkv, ratio, hd, window, spare, cache_dtype):
    rng = np.random.default_rng(seed)
    out, ref = run_attention(rng, T, Hkv * ratio, Hkv, hd, start, window, start + T + spare,
                             cache_dtype=cache_dtype)
    assert_close(out, ref, 2 * TOL, f"T={T} start={start} window={window}")


@settings(deadline=None, max_examples=40)
@given(seed=seeds, T=st.sampled_from([1, 2, 5, 33, 70, 131]), start=st.sampled_from([0, 1, 7, 100]),
       Hkv=st.integers(1, 3), ratio=st.sampled_from([1, 2, 3, 7]), hd=head_dims,
       window=st.sampled_from([0, 1, 2, 5, 16, 1000]), cache_dtype=st.sampled_from(DTYPES))
def test_attention_prefill(seed, T, start, Hkv, ratio, hd, window, cache_dtype):
    """The tiled form of attention (the decode form where there is no vector layer): rows of a tile from
    several tokens, key panels cut by the window, hd padded to whole panels."""
    rng = np.random.default_rng(seed)
    out, ref = run_attention(rng, T, Hkv * ratio, Hkv, hd, start, window, start + T + 3, attention_prefill,
                             cache_dtype)
    assert_close(out, ref, 2 * TOL, f"T={T} start={start} window={window}")


AVX2_ATTENTION = """
import sys
import numpy as np
from minqwen.kernels import isa
from minqwen.kernels.attention import attention_prefill
from minqwen.kernels.gemm import LANES
sys.path.insert(0, sys.argv[1])
from test_kernels_core import TOL, assert_close, run_attention
assert isa.ISA == "avx2"
rng = np.random.default_rng(0)
for T, start, Hkv, ratio, hd, window in [(33, 7, 2, 3, 17, 0), (70, 100, 1, 7, 64, 16), (5, 0, 3, 1, 128, 0)]:
    out, ref = run_attention(rng, T, Hkv * ratio, Hkv, hd, start, window, start + T + 3, attention_prefill)
    assert_close(out, ref, 2 * TOL, f"T={T} start={start} hd={hd} window={window}")
print("tiles of", LANES, "lanes")
"""


@pytest.mark.skipif(isa.ISA != "avx512", reason="the avx2 path is run here from an AVX-512 CPU")
def test_attention_prefill_on_the_avx2_path(tmp_path):
    """The tiled attention with the avx2 path's 8-lane panels (MINQWEN_ISA=avx2), run on this CPU."""
    env = {**os.environ, "MINQWEN_ISA": "avx2", "NUMBA_CACHE_DIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", AVX2_ATTENTION, str(Path(__file__).parent)], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "tiles of 8 lanes" in result.stdout, result.stderr[-2000:]


def test_attention_long_sequence_matches_and_window_matters():
    rng = np.random.default_rng(1)
    out, ref = run_attention(rng, 1, 14, 2, 64, 3000, 0, 3001)  # decode deep into a long context
    assert_close(out, ref, 2 * TOL)
    rng = np.random.default_rng(2)
    out_w, ref_w = run_attention(rng, 40, 4, 2, 64, 500, 64, 540)  # chunked prefill with a window
    assert_close(out_w, ref_w, 2 * TOL)
    rng = np.random.default_rng(2)
    _, ref_full = run_attention(rng, 40, 4, 2, 64, 500, 0, 540)
    assert np.abs(ref_w - ref_full).max() > 0.01  # the window case above really tests the window


def test_attention_prefill_then_decode_equals_one_prefill():
    rng = np.random.default_rng(3)
    T, Hq, Hkv, hd = 9, 6, 2, 32
    q = rng.standard_normal((T, Hq, hd)).astype(np.float32)
    k_cache = rng.standard_normal((Hkv, T, hd)).astype(np.float32)
    v_cache = rng.standard_normal((Hkv, T, hd)).astype(np.float32)
    whole = np.empty_like(q)
    attention_decode(whole, q, k_cache, v_cache, 0, 4, 0.2)
    steps = np.empty_like(q)
    attention_decode(steps[:5], q[:5], k_cache, v_cache, 0, 4, 0.2)
    for t in range(5, T):
        attention_decode(steps[t:t + 1], q[t:t + 1], k_cache, v_cache, t, 4, 0.2)
    assert_close(steps, whole.astype(np.float64), TOL)


# ---- matvec, matmul, linear ----

awkward = st.sampled_from([1, 2, 3, 17, 64, 513])


@settings(deadline=None, max_examples=40)
@given(seed=seeds, N=awkward, K=awkward, dtype=st.sampled_from(DTYPES))
def test_matvec(seed, N, K, dtype):
    rng = np.random.default_rng(seed)
    w = from_float32(rng.standard_normal((N, K)), dtype)
    x = rng.standard_normal(K).astype(np.float32)
    out = np.full(N, np.nan, np.float32)
    matvec(out, w, x)
    assert_close(out, matvec_reference(w, x), TOL, str(dtype))


@settings(deadline=None, max_examples=40)
@given(seed=seeds, T=st.sampled_from([2, 3, 17]), N=awkward, K=awkward, dtype=st.sampled_from(DTYPES),
       tile=st.sampled_from([7, 64, 1 << 20]))
def test_matmul(seed, T, N, K, dtype, tile):
    rng = np.random.default_rng(seed)
    w = from_float32(rng.standard_normal((N, K)), dtype)
    x = rng.standard_normal((T, K)).astype(np.float32)
    out = np.full((T, N), np.nan, np.float32)
    matmul(out, x, w, tile_floats=tile * K)  # tiles of `tile` rows: exercises the block loop's edges
    assert_close(out, matmul_reference(x, w), TOL, str(dtype))


@settings(deadline=None, max_examples=40)
@given(seed=seeds, T=st.integers(1, 2 * FEW_TOKENS), N=awkward, K=awkward, dtype=st.sampled_from(DTYPES))
def test_matmul_few(seed, T, N, K, dtype):  # every remainder of the four-token blocks
    rng = np.random.default_rng(seed)
    w = from_float32(rng.standard_normal((N, K)), dtype)
    x = rng.standard_normal((T, K)).astype(np.float32)
    out = np.full((T, N), np.nan, np.float32)
    matmul_few(out, x, w)
    assert_close(out, matmul_reference(x, w), TOL, str(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 4, FEW_TOKENS + 1])
def test_linear_dispatch_and_strided_out(dtype, T):
    rng = np.random.default_rng(T)
    N, K = 37, 29
    w = from_float32(rng.standard_normal((N, K)), dtype)
    x = rng.standard_normal((T, K)).astype(np.float32)
    out = np.full((T, N), np.nan, np.float32)
    linear(out, x, w)
    assert_close(out, matmul_reference(x, w), TOL)
    wide = np.full((T, N + 5), np.nan, np.float32)  # a column slice: out not C-contiguous
    linear(wide[:, 2:N + 2], x, w)  # each path: matvec, matmul_few, matmul
    assert_close(wide[:, 2:N + 2], matmul_reference(x, w), TOL)
    assert np.isnan(wide[:, :2]).all() and np.isnan(wide[:, N + 2:]).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_widen_rows_is_exact(dtype):
    rng = np.random.default_rng(0)
    w = from_float32(rng.standard_normal((5, 11)) * 100, dtype)
    tile = np.empty((5, 11), np.float32)
    widen_rows(tile, w)
    expected = {BF16: (w.astype(np.uint32) << 16).view(np.float32),
                FP16: w.view(np.float16).astype(np.float32), FP32: w}[dtype]
    assert np.array_equal(tile, expected)


# ---- swiglu ----

@settings(deadline=None, max_examples=30)
@given(seed=seeds, T=st.integers(1, 9), F=st.sampled_from([1, 3, 17, 64, 4864]),
       magnitude=st.sampled_from([0.1, 3.0, 100.0]), in_place=st.booleans())
def test_swiglu(seed, T, F, magnitude, in_place):
    rng = np.random.default_rng(seed)
    gate = (rng.standard_normal((T, F)) * magnitude).astype(np.float32)
    up = rng.standard_normal((T, F)).astype(np.float32)
    ref = swiglu_reference(gate, up)
    out = gate if in_place else np.full_like(gate, np.nan)
    swiglu(out, gate, up)
    # elementwise: compare each value to its own reference (silu underflows to tiny values)
    diff = np.abs(out - ref)
    assert np.all(diff <= TOL * np.abs(ref) + 1e-30), f"max|diff| {diff.max():.3g}, mean {diff.mean():.3g}"


def test_swiglu_extreme_gates_are_finite():
    gate = np.array([[-1e30, -1e4, -100.0, -88.8, 0.0, 88.8, 100.0, 1e4, 1e30]], np.float32)
    up = np.full_like(gate, 2.0)
    out = np.empty_like(gate)
    with np.errstate(all="raise"):
        swiglu(out, gate, up)
    assert np.all(np.isfinite(out))
    assert np.all(out[0, :4] <= 0) and np.all(out[0, :4] > -1e-30)  # silu(-big) -> -0
    assert out[0, 4] == 0
    assert np.all(np.abs(out[0, 5:] / (2.0 * gate[0, 5:]) - 1) < 1e-6)  # silu(big) = big


# ---- embed ----

@settings(deadline=None, max_examples=30)
@given(seed=seeds, V=st.integers(1, 300), D=st.sampled_from([1, 3, 64, 896]), T=st.integers(1, 40),
       dtype=st.sampled_from(DTYPES))
def test_embed(seed, V, D, T, dtype):
    rng = np.random.default_rng(seed)
    table = from_float32(rng.standard_normal((V, D)), dtype)
    ids = rng.integers(0, V, T).astype(np.int64)
    out = np.full((T, D), np.nan, np.float32)
    embed(out, table, ids)
    assert np.array_equal(out, embed_reference(table, ids).astype(np.float32))  # widening is exact


# ---- sigmoid, silu, sigmoid_gate ----

@jit
def sigmoid_silu_all(s_out, silu_out, x):  # the scalar helpers over an array, as the kernels call them
    for i in range(x.shape[0]):
        s_out[i] = sigmoid(x[i])
        silu_out[i] = silu(x[i])


def test_sigmoid_and_silu_stay_finite_and_exact():
    x = np.concatenate([np.linspace(-120, 120, 2001),
                        [-1e30, -89.0, -88.0, 0.0, 88.0, 89.0, 1e30]]).astype(np.float32)
    s, si = np.empty_like(x), np.empty_like(x)
    sigmoid_silu_all(s, si, x)
    assert np.isfinite(s).all() and np.isfinite(si).all()
    assert np.abs(s - sigmoid_reference(x)).max() <= 1e-6
    rel = np.abs(si - silu_reference(x)) / np.maximum(np.abs(silu_reference(x)), 1e-30)
    assert rel[np.abs(x) < 80].max() <= 1e-6, f"max relative error {rel.max():.3g}"


@settings(deadline=None, max_examples=20)
@given(T=st.integers(1, 20), H=st.integers(1, 4), D=st.sampled_from([1, 3, 5, 16, 17, 32]),
       per_head=st.booleans(), seed=seeds)
def test_sigmoid_gate(T, H, D, per_head, seed):
    """The attention output gate (gate [T, H, D], a strided half of q_proj's output) and the shared
    expert's one gate per row (gate [T, H, 1])."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, H, D)).astype(np.float32)
    q_and_gate = 4 * rng.standard_normal((T, H, 2 * D)).astype(np.float32)
    gate = q_and_gate[:, :, D:D + 1] if per_head else q_and_gate[:, :, D:]
    ref = sigmoid_gate_reference(x, gate)
    sigmoid_gate(x, x, gate)
    assert_close(x, ref, TOL, "sigmoid_gate")
