"""The hybrid generation (Qwen3-Next, Qwen3.5 dense and MoE, Qwen3.5 image-text checkpoints) against
transformers: logits, greedy tokens, and prefill-then-decode equal to decode from the start."""
from __future__ import annotations

import json

import numpy as np
import pytest

import minqwen
from checkpoints import (
    DATA,
    assert_batch_matches_alone,
    assert_matches_transformers,
    build_case,
    published_config,
)

LINEAR = dict(linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_num_key_heads=2,
              linear_value_head_dim=12, linear_num_value_heads=4)
QWEN3_NEXT = dict(model_type="qwen3_next", architectures=["Qwen3NextForCausalLM"], vocab_size=300,
                  hidden_size=48, intermediate_size=64, moe_intermediate_size=16,
                  shared_expert_intermediate_size=24, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, num_experts=6, num_experts_per_tok=2,
                  norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], full_attention_interval=4,
                  partial_rotary_factor=0.25, rope_theta=10000.0, max_position_embeddings=256,
                  tie_word_embeddings=False, **LINEAR)
QWEN3_5 = dict(model_type="qwen3_5_text", architectures=["Qwen3_5ForCausalLM"], vocab_size=300,
               hidden_size=48, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=1, head_dim=16, attn_output_gate=True,
               max_position_embeddings=256, tie_word_embeddings=True,
               layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
               rope_parameters={"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5,
                                "mrope_section": [2, 1, 1], "mrope_interleaved": True}, **LINEAR)
QWEN3_5_MOE = dict(QWEN3_5, model_type="qwen3_5_moe_text", architectures=["Qwen3_5MoeForCausalLM"],
                   moe_intermediate_size=16, shared_expert_intermediate_size=20, num_experts=5,
                   num_experts_per_tok=2, tie_word_embeddings=False)

TEXT_SIZES = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, linear_key_head_dim=16, linear_num_key_heads=2,
                  linear_value_head_dim=16, linear_num_value_heads=4, vocab_size=400)
MOE_SIZES = dict(moe_intermediate_size=16, shared_expert_intermediate_size=16, num_experts=8)
VISION_SIZES = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, num_position_embeddings=16,
                    patch_size=4, out_hidden_size=64, deepstack_visual_indexes=[])


def published_image_text(name: str, **text_sizes) -> dict:
    """A published image-text config, shrunk: text and vision sizes tiny, every other key as published."""
    config = json.loads((DATA / "configs" / f"{name}.config.json").read_text())
    text = dict(config["text_config"], **text_sizes)
    text["layer_types"] = text["layer_types"][:text["num_hidden_layers"]]
    return dict(config, text_config=text, vision_config=dict(config["vision_config"], **VISION_SIZES))


CASES = {
    "qwen3_next-fp32": (QWEN3_NEXT, "fp32"),
    "qwen3_next-bf16-dense-layers": (dict(QWEN3_NEXT, mlp_only_layers=[1], num_hidden_layers=8), "bf16"),
    "qwen3_5-fp32": (QWEN3_5, "fp32"),
    "qwen3_5-bf16": (QWEN3_5, "bf16"),
    "qwen3_5_moe-fp32": (QWEN3_5_MOE, "fp32"),
    "qwen3_5_moe-bf16": (QWEN3_5_MOE, "bf16"),
    "published-qwen3-next-80b-a3b": (published_config("qwen3-next-80b-a3b-instruct", **dict(
        TEXT_SIZES, **MOE_SIZES, num_experts_per_tok=3)), "bf16"),
    "published-qwen3.5-27b-image-text": (published_image_text("qwen3.5-27b", **TEXT_SIZES), "bf16"),
    "published-qwen3.5-35b-a3b-image-text": (published_image_text(
        "qwen3.5-35b-a3b", **TEXT_SIZES, **MOE_SIZES), "fp32"),
    "published-qwen3.5-397b-a17b-image-text": (published_image_text(
        "qwen3.5-397b-a17b", **dict(TEXT_SIZES, **MOE_SIZES, num_experts_per_tok=4)), "bf16"),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    return build_case(CASES, request.param, tmp_path_factory)


def test_logits_and_greedy_match_transformers(case):
    # transformers' own fp32 result strays up to ~1e-4 (relative) from its float64 result on these
    # random hybrids, as far as the tolerance itself: float64 is the oracle here (see the helper).
    # 70 tokens: more than one 64-token block of transformers' chunked delta rule.
    model = assert_matches_transformers(*case, prompt_length=70, reference_dtype="float64")
    if "image-text" in case[0]:
        assert model.config.has_vision_tower
    # Only Qwen3-Next's checkpoints store in_proj_qkvz / in_proj_ba fused: only they need the buffers.
    assert hasattr(model.decoder.ws, "qkvz") == (model.config.model_type == "qwen3_next")


def test_prefill_then_decode_equals_decode_from_the_start(case):
    """A prefill and single decode steps leave the same states (conv window, delta-rule state, KV cache)."""
    name, folder, _ = case
    model = minqwen.load(folder)
    prompt = np.random.default_rng(5).integers(0, model.config.vocab_size, size=40).tolist()
    split = 29
    prefilled = model.sequence()
    prefilled.extend(prompt[:split])
    stepped = model.sequence()
    for token in prompt[:split]:
        stepped.extend([token])
    for token in prompt[split:]:
        a, b = prefilled.extend([token]).copy(), stepped.extend([token]).copy()
        assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max(), name


def test_a_batch_decodes_as_its_sequences_do(case):
    """Batched forward passes keep each sequence's DeltaNet state, conv window and KV cache apart."""
    assert_batch_matches_alone(minqwen.load(case[1]))


def test_a_snapshot_brings_a_hybrid_sequence_back(tmp_path_factory):
    """A hybrid cannot rewind, except to its snapshot: a second prompt sharing only the first's prefix
    up to the snapshot reuses it and gets the logits of a fresh sequence; a shorter common prefix starts
    from 0, and the snapshot can be restored more than once."""
    model = minqwen.load(build_case(CASES, "qwen3_5-fp32", tmp_path_factory)[1])
    rng = np.random.default_rng(6)
    history, first, second = (rng.integers(0, model.config.vocab_size, size=n).tolist() for n in (12, 7, 9))
    sequence = model.sequence()
    sequence.extend(history)
    sequence.cache.snapshot()
    sequence.extend(first)
    for prompt, kept in ((history + second, len(history)), (history + first[:3], len(history)),
                         (history[:5] + second, 0)):
        assert sequence.reusable_prefix(prompt) == kept
        last = sequence.reset_to(prompt).copy()
        assert sequence.reused == kept and sequence.cache.length == len(prompt)
        fresh = model.logits(prompt)[-1]
        assert np.abs(last - fresh).max() <= 1e-4 * np.abs(fresh).max()
    assert sequence.cache.saved is None  # rewound below it: its keys and values were overwritten
