"""Rotary position embedding tables: the angles theta_i * p for each position p, as cos and sin.

For rotated dims R (= head_dim * partial_rotary_factor) and base b, pair i in [0, R/2) turns by
    angle(p, i) = p * inv_freq_i,    inv_freq_i = b^(-2i / R)
and the scaling types change inv_freq (and, for YaRN, the magnitude of cos and sin), exactly as
transformers' modeling_rope_utils computes them, in float32 as torch does:
    linear   inv_freq_i / factor
    dynamic  b' = b * (factor * L / L_max - (factor - 1))^(R / (R - 2)) once the sequence length L
             exceeds L_max = max_position_embeddings; plain RoPE below it
    yarn     per-dim blend of inv_freq and inv_freq / factor along a linear ramp between the dims that
             turn beta_fast and beta_slow times over the original context; cos and sin scaled by
             attention_factor (default 0.1 * ln(factor) + 1)
"""
from __future__ import annotations

import math

import numpy as np

from .config import Config


def inverse_frequencies(config: Config, seq_len: int) -> tuple[np.ndarray, float]:
    """(inv_freq [R/2] float32, attention_factor) for a sequence of `seq_len` positions."""
    rope, dim, base = config.rope, config.rotary_dims, config.rope.rope_theta
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    if rope.rope_type == "dynamic":
        length = max(seq_len, config.max_position_embeddings)
        base = base * ((rope.factor * length / config.max_position_embeddings)
                       - (rope.factor - 1)) ** (dim / (dim - 2))
    if rope.rope_type == "yarn":
        return _yarn(config, dim, base, exponents)
    inv_freq = (1.0 / np.float32(base) ** exponents).astype(np.float32)
    return (inv_freq / np.float32(rope.factor if rope.rope_type == "linear" else 1.0)).astype(np.float32), 1.0


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(config: Config, dim: int, base: float, exponents: np.ndarray) -> tuple[np.ndarray, float]:
    rope, factor = config.rope, config.rope.factor
    attention_factor = rope.attention_factor
    if attention_factor is None:  # from factor, with both mscales when the config sets them
        attention_factor = (yarn_mscale(factor, rope.mscale) / yarn_mscale(factor, rope.mscale_all_dim)
                            if rope.mscale and rope.mscale_all_dim else yarn_mscale(factor))
    original = rope.original_max_position_embeddings

    def correction_dim(rotations: float) -> float:  # the dim whose wavelength fits `rotations` times
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    extrapolation_weight = (1 - ramp).astype(np.float32)
    pos_freqs = (np.float32(base) ** exponents).astype(np.float32)
    inv_extrapolation = (1.0 / pos_freqs).astype(np.float32)
    inv_interpolation = (1.0 / (np.float32(factor) * pos_freqs)).astype(np.float32)
    inv_freq = inv_interpolation * (1 - extrapolation_weight) + inv_extrapolation * extrapolation_weight
    return inv_freq.astype(np.float32), float(attention_factor)


class RotaryTables:
    """cos/sin [T, R/2] for positions start..start+T-1, from frequencies fixed at load (recomputed only
    for dynamic scaling, whose frequencies depend on how long the sequence has grown)."""

    def __init__(self, config: Config):
        self.config = config
        self.inv_freq, self.attention_factor = inverse_frequencies(config, config.max_position_embeddings)

    def cos_sin(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        inv_freq, scale = self.inv_freq, self.attention_factor
        if self.config.rope.rope_type == "dynamic":
            inv_freq, scale = inverse_frequencies(self.config, start + count)
        angles = np.arange(start, start + count, dtype=np.float32)[:, None] * inv_freq[None, :]  # angle(p, i)
        return np.cos(angles) * np.float32(scale), np.sin(angles) * np.float32(scale)
