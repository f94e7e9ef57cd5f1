"""FP8 block kernels against float64 references of the dequantised weight, and e4m3 against torch."""
import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from numba.typed import List

from minqwen.kernels.fp8 import (
    BLOCK_COLS,
    Fp8Matrix,
    dequantize_fp8,
    dequantize_fp8_reference,
    e4m3_over_256,
    e4m3_reference,
    matmul_fp8,
    matvec_fp8,
    matvec_fp8_reference,
)
from minqwen.kernels.jit import jit
from minqwen.kernels.linear import linear
from minqwen.kernels.moe import moe_by_expert, moe_one_token, moe_one_token_reference

TOL = 1e-5  # fp32 sums against float64, relative to the size of the terms summed (max_n sum_k |w x|)
seeds = st.integers(0, 2**32 - 1)
# Widths around the 128-column blocks: partial last blocks, one block, several; 896 is Qwen2.5-0.5B's.
widths = st.sampled_from([1, 5, 127, 128, 129, 200, 256, 300, 896])
block_rows = st.sampled_from([1, 3, 128])


def fp8_matrix(rng, N, K, rows):
    """Random e4m3 bytes (every finite value; the NaN bytes 0x7F / 0xFF excluded) and positive scales
    spanning magnitudes, as the loader hands them over (scales widened to float32)."""
    q = rng.integers(0, 256, (N, K), dtype=np.uint8)
    q[(q & 0x7F) == 0x7F] = 0x7E
    scales = (10.0 ** rng.uniform(-4, 0, (-(-N // rows), -(-K // BLOCK_COLS)))).astype(np.float32)
    return Fp8Matrix(q, scales, rows)


def assert_close(got, ref, scale, what=""):
    diff = np.abs(got.astype(np.float64) - ref)
    assert np.isfinite(got).all() and diff.max() <= TOL * max(scale, 1e-30), (
        f"{what}: max|diff| {diff.max():.3g}, mean|diff| {diff.mean():.3g}, scale {scale:.3g}")


@jit
def decode_all(out, q):
    for i in range(q.shape[0]):
        out[i] = e4m3_over_256(q[i])


def test_e4m3_decoding_is_exact_for_every_byte():
    """All 256 bytes: the register trick against the format's definition and against torch."""
    q = np.arange(256, dtype=np.uint8)
    ours = np.empty(256, np.float32)
    decode_all(ours, q)
    finite = (q & 0x7F) != 0x7F
    definition = e4m3_reference(q)
    theirs = torch.from_numpy(q.copy()).view(torch.float8_e4m3fn).float().numpy()
    assert np.array_equal(ours[finite].astype(np.float64) * 256, definition[finite])
    assert np.array_equal(definition[finite], theirs[finite]) and np.isnan(theirs[~finite]).all()


@settings(deadline=None, max_examples=40)
@given(seed=seeds, N=widths, K=widths, rows=block_rows)
def test_matvec_fp8(seed, N, K, rows):
    rng = np.random.default_rng(seed)
    w = fp8_matrix(rng, N, K, rows)
    x = rng.standard_normal(K).astype(np.float32)
    out = np.full(N, np.nan, np.float32)
    matvec_fp8(out, w.q, w.scales, x, rows)
    terms = np.abs(dequantize_fp8_reference(w.q, w.scales, rows)) @ np.abs(x.astype(np.float64))
    assert_close(out, matvec_fp8_reference(w.q, w.scales, x, rows), terms.max(), "matvec_fp8")


@settings(deadline=None, max_examples=25)
@given(seed=seeds, T=st.sampled_from([2, 3, 64, 65]), N=widths, K=widths, rows=block_rows,
       tile_floats=st.sampled_from([1, 300, 1 << 20]))
def test_matmul_fp8_and_linear(seed, T, N, K, rows, tile_floats):
    """Prefill: dequantised tiles through BLAS, tile edges anywhere; `linear` picks matvec or matmul."""
    rng = np.random.default_rng(seed)
    w = fp8_matrix(rng, N, K, rows)
    x = rng.standard_normal((T, K)).astype(np.float32)
    dense = dequantize_fp8_reference(w.q, w.scales, rows)
    ref, terms = x.astype(np.float64) @ dense.T, np.abs(x.astype(np.float64)) @ np.abs(dense).T
    out = np.full((T, N), np.nan, np.float32)
    matmul_fp8(out, x, w, tile_floats)
    assert_close(out, ref, terms.max(), "matmul_fp8")
    wide = np.full((T, N + 3), np.nan, np.float32)
    for t in (slice(0, 1), slice(0, T)):  # one token (matvec_fp8) and all of them, into a column slice
        linear(wide[t, 2:N + 2], x[t], w)
        assert_close(wide[t, 2:N + 2], ref[t], terms.max(), "linear")
    np.testing.assert_array_equal(dequantize_fp8(w), dense.astype(np.float32))


@settings(deadline=None, max_examples=15)
@given(seed=seeds, D=st.sampled_from([64, 130, 256]), F=st.sampled_from([32, 129]), k=st.integers(1, 3),
       T=st.sampled_from([1, 5]))
def test_moe_with_fp8_experts(seed, D, F, k, T):
    """Experts as the FP8 Qwen3-MoE / Qwen3.5-MoE checkpoints store them: one Fp8Matrix each, read
    row by row (one token) or through `linear` (grouped by expert)."""
    rng = np.random.default_rng(seed)
    E = 4
    gate, up = [fp8_matrix(rng, F, D, 128) for _ in range(E)], [fp8_matrix(rng, F, D, 128) for _ in range(E)]
    down = [fp8_matrix(rng, D, F, 128) for _ in range(E)]
    x = (0.1 * rng.standard_normal((T, D))).astype(np.float32)
    experts = np.stack([rng.permutation(E)[:k] for _ in range(T)]).astype(np.int64)
    weights = rng.random((T, k)).astype(np.float32)
    dense = [[dequantize_fp8_reference(m.q, m.scales, 128) for m in ms] for ms in (gate, up, down)]
    ref = np.stack([moe_one_token_reference(x[t], *dense, experts[t], weights[t]) for t in range(T)])
    got = np.empty((T, D), np.float32)
    for t in range(T):
        moe_one_token(got[t], np.empty((k, F), np.float32), x[t], List(gate), List(up), List(down),
                      experts[t], weights[t])
    assert_close(got, ref, np.abs(ref).max(), "moe_one_token, FP8 experts")
    moe_by_expert(got, x, gate, up, down, experts, weights)
    assert_close(got, ref, np.abs(ref).max(), "moe_by_expert, FP8 experts")
