"""A Qwen3-30B-A3B-shaped MoE decoder layer, run by the engine's own forward pass, against the bandwidth
limit of the bytes it must read.

    python bench/moe.py [--quick]

Shape (published config): hidden 2048, 128 experts of moe_intermediate 768, top-8 with norm_topk_prob,
attention 32 query / 4 key-value heads of 128 with q/k norm; random bf16 weights. Decode reads only the
8 routed experts: bytes/token = attention + router + 8 x 3 x 768 x 2048 x 2 + the KV cache.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from numba.typed import List

from common import RandomBF16, median_seconds, read_bandwidth, report
from minqwen.config import Config
from minqwen.model import Cache, Transformer
from minqwen.weights import Attention, Layer, SparseMoE, Weights

CONFIG = Path(__file__).parent.parent / "tests" / "data" / "configs" / "qwen3-30b-a3b.config.json"
MODEL_LAYERS = 48


def build(config: Config, layers: int, rng: RandomBF16) -> Weights:
    d, f, e = config.hidden_size, config.moe_intermediate_size, config.num_experts
    q, kv, hd = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim, config.head_dim

    def layer():
        attention = Attention(q_proj=rng.matrix(q, d), k_proj=rng.matrix(kv, d), v_proj=rng.matrix(kv, d),
                              o_proj=rng.matrix(d, q), q_bias=None, k_bias=None, v_bias=None, o_bias=None,
                              q_norm=rng.vector(hd), k_norm=rng.vector(hd), output_gate=False)
        moe = SparseMoE(gate=rng.matrix(e, d), gate_projs=List([rng.matrix(f, d) for _ in range(e)]),
                        up_projs=List([rng.matrix(f, d) for _ in range(e)]),
                        down_projs=List([rng.matrix(d, f) for _ in range(e)]), shared_expert=None,
                        shared_expert_gate=None)
        return Layer(input_layernorm=rng.vector(d), post_attention_layernorm=rng.vector(d), self_attn=attention,
                     linear_attn=None, mlp=moe)

    return Weights(embed_tokens=rng.matrix(4096, d), layers=[layer() for _ in range(layers)], norm=rng.vector(d),
                   lm_head=rng.matrix(8, d))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer experts' worth of work, for a smoke test")
    parser.add_argument("--context", type=int, default=128, help="tokens in the KV cache while decoding")
    args = parser.parse_args()

    raw = json.loads(CONFIG.read_text())
    raw["num_hidden_layers"] = 1
    if args.quick:
        raw.update(num_experts=16)
    config = Config.from_dict(raw)
    rng = RandomBF16()
    weights = build(config, 1, rng)
    transformer = Transformer(config, weights)
    bandwidth = read_bandwidth(0.5 if args.quick else 1.0)
    d, f, k = config.hidden_size, config.moe_intermediate_size, config.num_experts_per_tok
    attention = weights.layers[0].self_attn
    attention_bytes = sum(w.nbytes for w in (attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj))
    kv_bytes = 2 * config.num_key_value_heads * args.context * config.head_dim * 4
    expert_bytes = k * 3 * f * d * 2
    router_bytes = config.num_experts * d * 2
    bytes_per_token = attention_bytes + router_bytes + expert_bytes + kv_bytes
    tokens = np.random.default_rng(1).integers(0, 4096, size=4096)

    cache = Cache(config, args.context + 600)
    transformer.forward(cache, tokens[:args.context])  # fill the KV cache; compiles every kernel
    steps = 40 if args.quick else 200
    position = iter(range(steps * 4))

    def decode_one():  # a different token each time, so the router picks different experts
        cache.length = args.context
        transformer.forward(cache, tokens[args.context + next(position) % 3000:][:1])

    decode_one()
    decode_seconds = median_seconds(decode_one, steps)
    limit_seconds = bytes_per_token / (bandwidth * 1e9)

    prefill = {}
    for n in (1, 16, 128, 512):
        def run():
            transformer.forward(Cache(config, 1024), tokens[:n])
        run()
        prefill[n] = n / median_seconds(run, 3 if n >= 128 else 10)

    lm_head_bytes = 151936 * d * 2
    model_seconds = MODEL_LAYERS * decode_seconds + lm_head_bytes / (0.8 * bandwidth * 1e9)
    active_bytes = 3.3e9 * 2  # Qwen3-30B-A3B: 3.3 B active parameters, bf16
    model_bytes = MODEL_LAYERS * bytes_per_token + lm_head_bytes
    results = {
        "read_bandwidth_GBps": bandwidth, "context": args.context, "experts": config.num_experts,
        "decode_ms_per_layer": decode_seconds * 1e3, "limit_ms_per_layer": limit_seconds * 1e3,
        "decode_limit_ratio": limit_seconds / decode_seconds, "bytes_per_token_per_layer": bytes_per_token,
        "achieved_GBps": bytes_per_token / decode_seconds / 1e9,
        "prefill_tok_per_s": prefill, "implied_model_decode_tok_per_s": 1 / model_seconds,
        "model_bytes_per_token": model_bytes, "active_parameter_bytes": active_bytes,
    }
    print(f"read bandwidth            {bandwidth:8.1f} GB/s  ({'quick: ' if args.quick else ''}"
          f"{config.num_experts} experts, top-{k}, context {args.context})")
    print(f"decode, one layer         {decode_seconds * 1e3:8.2f} ms   limit {limit_seconds * 1e3:.2f} ms "
          f"-> {limit_seconds / decode_seconds:.2f} of the bandwidth limit ({bytes_per_token / 1e6:.1f} MB/token, "
          f"{bytes_per_token / decode_seconds / 1e9:.1f} GB/s)")
    for n, rate in prefill.items():
        print(f"prefill {n:4d} tokens        {rate:8.1f} tok/s (one layer)")
    print(f"48-layer model (+lm_head) {1 / model_seconds:8.2f} tok/s decode, {model_bytes / 1e9:.2f} GB read per token "
          f"vs {active_bytes / 1e9:.2f} GB of active parameters")
    report("moe", results)


if __name__ == "__main__":
    main()
