"""Decode speed against context length for the two mixers of a Qwen3.5-shaped model.

    python bench/hybrid.py [--quick]

A Gated DeltaNet layer keeps a fixed-size state (conv window + one key x value matrix per value head),
so its decode time must not change with the context; a full-attention layer reads its whole KV cache
per token, so its time grows with it. Shapes: Qwen3.5-27B's text_config (hidden 5120; linear attention
16 key / 48 value heads of 128; full attention 24 query / 4 kv heads of 256 with an output gate),
random bf16 weights. The context is made by filling the KV cache and the recurrent state with random
values (prefilling 8k tokens would only add minutes), then timing single-token steps of each mixer.
The implied whole-model decode adds the MLPs and lm_head at the measured matvec bandwidth.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from common import RandomBF16, median_seconds, read_bandwidth, report
from minqwen.config import Config
from minqwen.model import Cache, Transformer
from minqwen.weights import MLP, Attention, Layer, LinearAttention, Weights

CONFIG = Path(__file__).parent.parent / "tests" / "data" / "configs" / "qwen3.5-27b.config.json"
CONTEXTS = (128, 1024, 8192)


def build(config: Config, rng: RandomBF16) -> Weights:
    d, hd = config.hidden_size, config.head_dim
    hk, hv, dk, dv = (config.linear_num_key_heads, config.linear_num_value_heads, config.linear_key_head_dim,
                      config.linear_value_head_dim)
    channels = 2 * hk * dk + hv * dv
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    mlp = MLP(gate_proj=rng.matrix(config.intermediate_size, d), up_proj=rng.matrix(config.intermediate_size, d),
              down_proj=rng.matrix(d, config.intermediate_size))
    linear = LinearAttention(
        in_proj_qkv=rng.matrix(channels, d), in_proj_z=rng.matrix(hv * dv, d), in_proj_b=rng.matrix(hv, d),
        in_proj_a=rng.matrix(hv, d), in_proj_qkvz=None, in_proj_ba=None, qkvz_order=None, ba_order=None,
        conv1d=(np.random.default_rng(2).standard_normal((channels, config.linear_conv_kernel_dim)) * 0.5
                ).astype(np.float32),
        A_log=np.zeros(hv, np.float32), dt_bias=np.zeros(hv, np.float32), norm=rng.vector(dv),
        out_proj=rng.matrix(d, hv * dv))
    full = Attention(q_proj=rng.matrix(2 * q, d), k_proj=rng.matrix(kv, d), v_proj=rng.matrix(kv, d),
                     o_proj=rng.matrix(d, q), q_bias=None, k_bias=None, v_bias=None, o_bias=None,
                     q_norm=rng.vector(hd), k_norm=rng.vector(hd), output_gate=True)
    layers = [Layer(rng.vector(d), rng.vector(d), None, linear, mlp),
              Layer(rng.vector(d), rng.vector(d), full, None, mlp)]
    return Weights(embed_tokens=rng.matrix(1024, d), layers=layers, norm=rng.vector(d), lm_head=rng.matrix(8, d))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args()

    raw = json.loads(CONFIG.read_text())["text_config"]
    raw.update(num_hidden_layers=2, layer_types=["linear_attention", "full_attention"])
    config = Config.from_dict(raw)
    weights = build(config, RandomBF16())
    transformer = Transformer(config, weights)
    bandwidth = read_bandwidth(0.5 if args.quick else 1.0)
    repeats = 10 if args.quick else 40
    rng = np.random.default_rng(0)
    h = rng.standard_normal((1, config.hidden_size)).astype(np.float32)
    out = np.zeros_like(h)
    cos, sin = transformer.rope.cos_sin(0, 1)

    rows = []
    for context in CONTEXTS:
        cache = Cache(config, context + 1)
        cache.reserve(context + 1)
        for i in cache.layers:  # a full KV cache of `context` positions
            cache.k[i][:, :context] = rng.standard_normal((config.num_key_value_heads, context, config.head_dim))
            cache.v[i][:, :context] = rng.standard_normal((config.num_key_value_heads, context, config.head_dim))
        for i in cache.linear_layers:  # a state that has seen `context` tokens: its size never changes
            cache.recurrent[i][:] = rng.standard_normal(cache.recurrent_shape) * 0.1
        cache.length = context
        cos, sin = transformer.rope.cos_sin(context, 1)

        def linear_step():
            transformer.gated_deltanet(out, h, weights.layers[0].linear_attn, cache, 0)

        def full_step():
            transformer.attention(out, h, weights.layers[1].self_attn, cache, 1, context, cos, sin)

        linear_step(), full_step()
        rows.append({"context": context, "linear_ms": median_seconds(linear_step, repeats) * 1e3,
                     "full_ms": median_seconds(full_step, repeats) * 1e3})

    mlp = weights.layers[0].mlp
    mlp_bytes = sum(w.nbytes for w in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    lm_head_bytes = config.vocab_size * config.hidden_size * 2
    n_linear = sum(t == "linear_attention" for t in Config.from_dict(json.loads(CONFIG.read_text())).layer_types)
    n_layers = 64
    print(f"read bandwidth {bandwidth:.1f} GB/s; Qwen3.5-27B shapes, one token per step")
    print(f"{'context':>8} {'linear-attn ms':>15} {'full-attn ms':>13} {'implied 27B decode tok/s':>25}")
    for row in rows:
        rest = (n_layers * mlp_bytes + lm_head_bytes) / (0.8 * bandwidth * 1e9)
        seconds = n_linear * row["linear_ms"] / 1e3 + (n_layers - n_linear) * row["full_ms"] / 1e3 + rest
        row["implied_model_tok_per_s"] = 1 / seconds
        print(f"{row['context']:>8} {row['linear_ms']:>15.3f} {row['full_ms']:>13.3f} {1 / seconds:>25.2f}")
    report("hybrid", {"read_bandwidth_GBps": bandwidth, "rows": rows, "linear_layers": n_linear,
                      "layers": n_layers})


if __name__ == "__main__":
    main()
