"""Qwen2 / Qwen2.5 / Qwen3 against transformers on random checkpoints: logits of every position and
16 greedy tokens (which exercise the KV cache, decode after prefill)."""
from __future__ import annotations

import json

import numpy as np
import pytest

import minqwen
from checkpoints import (
    TOLERANCE,
    assert_batch_matches_alone,
    assert_matches_transformers,
    build_case,
    build_checkpoint,
)
from checkpoints import published_config as published
from minqwen.kernels.dtypes import FP16, FP32, to_float32
from minqwen.network import decoder as decoder_module
from minqwen.network.decoder import Cache, Decoder

QWEN2 = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=320, hidden_size=64,
             intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False)
QWEN3 = dict(QWEN2, model_type="qwen3", architectures=["Qwen3ForCausalLM"], head_dim=24, attention_bias=False,
             num_attention_heads=6, num_key_value_heads=2, rope_scaling=None, rope_theta=1000000.0)


TINY = dict(hidden_size=64, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=400)

CASES = {
    # name: (config, dtype, shard size)
    "qwen2-fp32-gqa2": (QWEN2, "fp32", None),
    "qwen2-bf16-gqa6-untied": (dict(QWEN2, hidden_size=48, num_attention_heads=6, num_key_value_heads=1),
                               "bf16", None),
    "qwen2-fp16-tied": (dict(QWEN2, tie_word_embeddings=True), "fp16", None),
    "qwen2-mha-sharded": (dict(QWEN2, num_key_value_heads=4), "fp32", "100KB"),
    "qwen2-sliding-window": (dict(QWEN2, num_hidden_layers=3, use_sliding_window=True, sliding_window=5,
                                  max_window_layers=1), "fp32", None),
    "qwen2-rope-linear": (dict(QWEN2, rope_scaling={"type": "linear", "factor": 2.0}), "fp32", None),
    "qwen2-rope-dynamic": (dict(QWEN2, max_position_embeddings=12,
                                rope_scaling={"rope_type": "dynamic", "factor": 3.0}), "fp32", None),
    "qwen2-rope-yarn": (dict(QWEN2, rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                  "original_max_position_embeddings": 32}), "fp32", None),
    "qwen2-rope-yarn-default-original": (dict(QWEN2, rope_scaling={"type": "yarn", "factor": 2.0}),
                                         "bf16", None),
    "qwen3-fp32-headdim": (QWEN3, "fp32", None),
    "qwen3-bf16-tied-bias": (dict(QWEN3, tie_word_embeddings=True, attention_bias=True,
                                  num_key_value_heads=3), "bf16", None),
    "qwen3-rope-parameters-spelling": (
        dict({k: v for k, v in QWEN3.items() if k not in ("rope_theta", "rope_scaling")},
             rope_parameters={"rope_type": "yarn", "rope_theta": 5e5, "factor": 3.0,
                              "original_max_position_embeddings": 40}), "fp32", None),
    "qwen3-layer-types-sliding": (dict(QWEN3, use_sliding_window=True, sliding_window=4,
                                       layer_types=["sliding_attention", "full_attention"]), "fp32", None),
    "llama-qwen2s-parent": (dict({k: v for k, v in QWEN2.items() if k != "architectures"}, model_type="llama",
                                 architectures=["LlamaForCausalLM"], num_key_value_heads=1), "fp32", None),
    "published-qwen2.5-0.5b": (published("qwen2.5-0.5b-instruct", **TINY), "bf16", None),
    "published-qwen2.5-7b": (published("qwen2.5-7b-instruct", **dict(TINY, num_key_value_heads=1)),
                             "fp32", None),
    "published-qwen3-0.6b": (published("qwen3-0.6b", **dict(TINY, head_dim=32)), "bf16", None),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    return build_case(CASES, request.param, tmp_path_factory)


def test_logits_and_greedy_match_transformers(case):
    assert_matches_transformers(*case)


@pytest.mark.parametrize("name", ["qwen3-fp32-headdim", "qwen2-sliding-window"])
def test_a_long_prompt_matches_transformers(name, tmp_path_factory, monkeypatch):
    """A prompt long enough for attention's tiled form (the decoder's FEW_QUERIES / FEW_SCORES: 70 tokens,
    4,900 query-key pairs a head), with GQA, a head_dim of 24 (padded panels) and a sliding window."""
    calls, tiled = [], decoder_module.attention_prefill
    monkeypatch.setattr(decoder_module, "attention_prefill", lambda *args: calls.append(1) or tiled(*args))
    assert_matches_transformers(*build_case(CASES, name, tmp_path_factory), prompt_length=70)
    assert len(calls) >= 2  # the prompt's pass through each attention layer


def test_sliding_window_really_slides(tmp_path):
    """Guard against a test matrix where the window never matters: with the window on, late logits must
    differ from the same checkpoint read with the window off."""
    config = dict(QWEN2, use_sliding_window=True, sliding_window=3, max_window_layers=0)
    folder = build_checkpoint(tmp_path, config)
    prompt = list(range(1, 12))
    windowed = minqwen.load(folder).logits(prompt)
    config["use_sliding_window"] = False
    (folder / "config.json").write_text(json.dumps(config))
    full = minqwen.load(folder).logits(prompt)
    np.testing.assert_allclose(windowed[:3], full[:3], rtol=1e-5, atol=1e-5)
    assert np.abs(windowed[-1] - full[-1]).max() > 1e-3


def test_fp16_kv_cache_stays_close(tmp_path):
    """kv_cache="fp16" rounds keys and values to fp16: logits move, but stay within the half-precision
    tolerance of the float32 cache's (prefill and decode both read the cache)."""
    folder = build_checkpoint(tmp_path, QWEN3)
    prompt = np.random.default_rng(3).integers(0, 320, size=30).tolist()
    exact, half = minqwen.load(folder), minqwen.load(folder, kv_cache="fp16")
    error = np.abs(half.logits(prompt) - exact.logits(prompt)).max() / np.abs(exact.logits(prompt)).max()
    assert 0 < error <= TOLERANCE["fp16"]
    sequence = half.sequence()
    sequence.reset_to(prompt)
    assert sequence.cache.dtype == FP16 and sequence.cache.k[0].dtype == FP16


def test_fp16_kv_cache_turns_float32_rather_than_overflow(tmp_path):
    folder = build_checkpoint(tmp_path, QWEN3)
    sequence = minqwen.load(folder, kv_cache="fp16").sequence()
    sequence.reset_to(list(range(1, 9)))
    cache = sequence.cache
    before = to_float32(cache.k[1][:, :cache.length]).copy()
    n_kv, hd = cache.n_kv_heads, cache.head_dim
    huge = np.full((1, n_kv, hd), 1e6, np.float32)
    cache.store(1, cache.length, huge, huge)
    assert cache.dtype == FP32 and cache.k[0].dtype == cache.k[1].dtype == FP32
    assert np.array_equal(cache.k[1][:, :cache.length], before)  # what was stored survives the change
    assert np.all(cache.k[1][:, cache.length] == 1e6) and np.all(cache.v[1][:, cache.length] == 1e6)


def test_prefill_in_chunks_equals_one_pass(tmp_path):
    """A prompt longer than the decoder's chunk is run in pieces; the logits must not notice."""
    folder = build_checkpoint(tmp_path, QWEN3)
    prompt = np.random.default_rng(2).integers(0, 320, size=37).tolist()
    model = minqwen.load(folder)
    whole = model.logits(prompt)
    small_chunks = Decoder(model.config, model.weights, prefill_chunk=8)
    chunked = small_chunks(Cache(model.config, 64), np.array(prompt), every_token=True)
    assert np.abs(whole - chunked).max() <= 1e-5 * np.abs(whole).max()


def test_a_batch_decodes_as_its_sequences_do(tmp_path):
    folder = build_checkpoint(tmp_path, dict(QWEN2, use_sliding_window=True, sliding_window=5,
                                             max_window_layers=1))
    assert_batch_matches_alone(minqwen.load(folder))
