"""Qwen2-MoE and Qwen3-MoE against transformers on random checkpoints (logits and greedy tokens)."""
from __future__ import annotations

import pytest

from checkpoints import assert_matches_transformers, build_case, published_config

QWEN2_MOE = dict(model_type="qwen2_moe", architectures=["Qwen2MoeForCausalLM"], vocab_size=300,
                 hidden_size=48, intermediate_size=80, moe_intermediate_size=24,
                 shared_expert_intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False,
                 decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=256, rope_theta=10000.0,
                 tie_word_embeddings=False)
QWEN3_MOE = dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], vocab_size=300,
                 hidden_size=48, intermediate_size=72, moe_intermediate_size=20, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=1, head_dim=16, num_experts=6,
                 num_experts_per_tok=3, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                 max_position_embeddings=256, rope_theta=1e6, tie_word_embeddings=False, attention_bias=False)

CASES = {
    "qwen2_moe-shared-top2-fp32": (QWEN2_MOE, "fp32"),
    "qwen2_moe-top1-mixed-step2-tied-bf16": (dict(QWEN2_MOE, num_experts_per_tok=1, decoder_sparse_step=2,
                                                  tie_word_embeddings=True), "bf16"),
    "qwen2_moe-norm-topk-mlp-only-sliding": (dict(QWEN2_MOE, norm_topk_prob=True, mlp_only_layers=[1],
                                                  use_sliding_window=True, sliding_window=4,
                                                  max_window_layers=3), "fp32"),
    "qwen3_moe-top3-norm-fp32": (QWEN3_MOE, "fp32"),
    "qwen3_moe-top-all-no-norm-bf16": (dict(QWEN3_MOE, num_experts_per_tok=6, norm_topk_prob=False), "bf16"),
    "qwen3_moe-top1-mlp-only-fp16": (dict(QWEN3_MOE, num_experts_per_tok=1, mlp_only_layers=[0, 2]), "fp16"),
    "published-qwen3-30b-a3b": (published_config("qwen3-30b-a3b", hidden_size=64, intermediate_size=96,
                                                 moe_intermediate_size=16, num_hidden_layers=2,
                                                 num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                                 num_experts=16, vocab_size=400), "bf16"),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    return build_case(CASES, request.param, tmp_path_factory)


def test_logits_and_greedy_match_transformers(case):
    assert_matches_transformers(*case)
