"""A Qwen3-30B-A3B-shaped MoE model, run by the engine's own forward pass, against the bandwidth limit of
the bytes a decoded token must read.

    python bench/moe.py [--quick] [--layers 3] [--context 1024] [--threads N]

Shapes from the published config (tests/data/configs/qwen3-30b-a3b.config.json): hidden 2048; attention
32 query / 4 key-value heads of 128 with q/k norm; 128 experts of moe_intermediate 768, top-8 with
norm_topk_prob. Random bf16 weights built as NumPy arrays, experts as the loader holds them (numba typed
Lists of per-expert 2-D uint16 arrays). The model gets `--layers` distinct layers (1.25 GB each), so
every decoded token streams them all and no cache can serve a layer from the previous token's reads;
times per layer are the forward time divided by the layer count.

Decoding a token reads, per layer: q/k/v/o (37.7 MB), the router (0.5 MB), the 8 chosen experts'
gate/up/down (75.5 MB) and the float32 KV cache up to the context (2 x 4 heads x 128 x 4 B = 4 KB per
position). The KV cache is filled with random values (no prefill needed to time decode at a context);
every step rewinds to the same context and decodes a random token, so the router picks different
experts each time. "ratio" = (bytes / read bandwidth) / measured time: 1.0 would be a kernel as fast as
a bare streaming sum; the read bandwidth is sampled between the timed steps (the VM's bandwidth drifts).
The same layers are then timed in parts (attention incl. its KV cache; router + experts), and the
real lm_head product (151936 x 2048 bf16) on its own; the 48-layer figure is 48 layers + lm_head.
Prefill (fresh sequences of 1, 16, 128, 512 tokens) runs a 1-layer model of the first layer: it reads
all experts (or 113 MB at T = 1), more than any cache holds, so rotating layers would change nothing.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numba
import numpy as np
from numba.typed import List

from common import (
    Bandwidth,
    RandomBF16,
    context_switches,
    machine,
    report,
    seconds_each,
    warn_if_contended,
    warn_if_workqueue,
)
from minqwen.kernels.linear import linear
from minqwen.network.config import Config
from minqwen.network.decoder import Cache, Decoder, Segment
from minqwen.network.weights import AttentionWeights, LayerWeights, MoEWeights, Weights

CONFIG = Path(__file__).parent.parent / "tests" / "data" / "configs" / "qwen3-30b-a3b.config.json"
MODEL_LAYERS = 48  # Qwen3-30B-A3B
ACTIVE_PARAMETERS = 3.3e9  # published: "30.5B total, 3.3B activated"
EMBED_ROWS = 4096  # tokens are drawn below this; the embedding reads one row per token anyway
PREFILL = (1, 16, 128, 512)


def build(config: Config, rng: RandomBF16) -> Weights:
    d, f, e, hd = config.hidden_size, config.moe_intermediate_size, config.num_experts, config.head_dim
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd

    def layer():
        attention = AttentionWeights(q_proj=rng.matrix(q, d), k_proj=rng.matrix(kv, d),
                                     v_proj=rng.matrix(kv, d), o_proj=rng.matrix(d, q), q_bias=None,
                                     k_bias=None, v_bias=None, o_bias=None, q_norm=rng.vector(hd),
                                     k_norm=rng.vector(hd))
        moe = MoEWeights(gate=rng.matrix(e, d), gate_projs=List([rng.matrix(f, d) for _ in range(e)]),
                         up_projs=List([rng.matrix(f, d) for _ in range(e)]),
                         down_projs=List([rng.matrix(d, f) for _ in range(e)]),
                         shared_expert=None, shared_expert_gate=None)
        return LayerWeights(input_layernorm=rng.vector(d), post_attention_layernorm=rng.vector(d),
                            self_attn=attention, linear_attn=None, mlp=moe)

    # Embedding rows ~ N(0, 1): each token's residual stream is then mostly its own row, so the router
    # sees unrelated inputs and picks different experts token to token (with N(0, 1/d) rows the
    # attention output, much alike for every token over the same KV cache, made a few experts win).
    return Weights(embed_tokens=rng.matrix(EMBED_ROWS, d, std=1.0),
                   layers=[layer() for _ in range(config.num_hidden_layers)],
                   norm=rng.vector(d), lm_head=rng.matrix(config.vocab_size, d))


def bytes_per_token(config: Config, weights: Weights, context: int) -> dict:
    """Bytes one layer must read to decode a token at position `context` (it attends to context + 1)."""
    attention, moe = weights.layers[0].self_attn, weights.layers[0].mlp
    k, d = config.num_experts_per_tok, config.hidden_size
    return {
        "attention": sum(w.nbytes for w in (attention.q_proj, attention.k_proj, attention.v_proj,
                                            attention.o_proj)),
        "router": moe.gate.nbytes,
        "experts": k * (moe.gate_projs[0].nbytes + moe.up_projs[0].nbytes + moe.down_projs[0].nbytes),
        "kv_cache": 2 * config.num_key_value_heads * (context + 1) * config.head_dim * 4,
        "norms": 2 * d * 4 + 2 * config.head_dim * 4,
    }


def active_parameters(config: Config) -> int:
    """Parameters one token touches: per layer attention, router, k experts, norms;
    plus embedding + lm_head."""
    d, hd, f = config.hidden_size, config.head_dim, config.moe_intermediate_size
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    per_layer = (2 * q * d + 2 * kv * d + config.num_experts * d + config.num_experts_per_tok * 3 * f * d
                 + 2 * d + 2 * hd)
    return MODEL_LAYERS * per_layer + 2 * config.vocab_size * d + d


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 layer, few steps and repeats")
    parser.add_argument("--layers", type=int, default=None,
                        help="distinct layers to rotate through (default 3; quick 1)")
    parser.add_argument("--context", type=int, default=1024, help="positions in the KV cache while decoding")
    parser.add_argument("--threads", type=int, default=None, help="Numba threads (default: all cores)")
    args = parser.parse_args()
    if args.threads:
        numba.set_num_threads(args.threads)
    n_layers = args.layers or (1 if args.quick else 3)
    rounds, steps = (3, 10) if args.quick else (8, 25)  # decode: rounds x steps tokens, bandwidth in between
    repeats = {1: 3, 16: 2, 128: 1, 512: 1} if args.quick else {1: 10, 16: 5, 128: 3, 512: 3}  # prefill

    raw = json.loads(CONFIG.read_text())
    raw["num_hidden_layers"] = n_layers
    config = Config.from_dict(raw)
    weights = build(config, RandomBF16())
    decoder = Decoder(config, weights)
    bandwidth = Bandwidth(1.0)
    warn_if_workqueue()
    rng = np.random.default_rng(1)
    n_kv, hd = config.num_key_value_heads, config.head_dim

    # --- decode: the whole forward pass over n_layers (lm_head included), and lm_head on its own ---------
    cache = Cache(config, args.context + 1)
    cache.reserve(args.context + 1)
    for i in cache.attention_layers:
        cache.k[i][:, :args.context] = rng.standard_normal((n_kv, args.context, hd), dtype=np.float32)
        cache.v[i][:, :args.context] = rng.standard_normal((n_kv, args.context, hd), dtype=np.float32)
    tokens = rng.integers(0, EMBED_ROWS, size=rounds * steps + 1)
    chosen = []

    def decode(token):
        cache.length = args.context  # rewind: every step attends to context + 1 positions
        decoder.forward([(cache, tokens[token:token + 1])])
        chosen.append(decoder.ws.route_experts[0].copy())  # the last layer's picks

    decode(len(tokens) - 1)  # compile every decode kernel
    chosen.clear()
    step_seconds, switches = [], context_switches()
    for r in range(rounds):
        bandwidth.sample()
        for s in range(steps):
            step_seconds += seconds_each(lambda: decode(r * steps + s), 1)
    bandwidth.sample()
    switches = context_switches() - switches
    hidden = np.ascontiguousarray(decoder.ws.x[:1])
    logits = np.empty((1, config.vocab_size), np.float32)
    lm_head_seconds = float(np.median(seconds_each(lambda: linear(logits, hidden, weights.lm_head),
                                                   2 * rounds)))
    layer_seconds = (float(np.median(step_seconds)) - lm_head_seconds) / n_layers
    best_layer_seconds = (min(step_seconds) - lm_head_seconds) / n_layers

    # --- the same layer in parts: attention, and router + experts ---------------------------------------
    h = rng.standard_normal((2 * steps, 1, config.hidden_size), dtype=np.float32)
    out = np.zeros((1, config.hidden_size), np.float32)
    cos, sin = decoder.rope.cos_sin(args.context, 1)
    one_token = [Segment(cache, 0, 1, args.context)]
    parts = {}
    calls = {
        "attention": lambda j: decoder.self_attention(out, h[j], weights.layers[j % n_layers].self_attn,
                                                      one_token, j % n_layers, cos, sin),
        "router+experts": lambda j: decoder.sparse_moe(out, h[j], weights.layers[j % n_layers].mlp),
    }
    for name, call in calls.items():
        parts[name] = float(np.median([seconds_each(lambda: call(j), 1)[0] for j in range(2 * steps)]))
        bandwidth.sample()

    # --- prefill: fresh sequences of T tokens, through a 1-layer model of the first layer -----------------
    # Prefill reads every expert's weights (T >= 16) or 113 MB (T = 1): more than any cache either way,
    # so one layer suffices, and a full run stays short.
    raw["num_hidden_layers"] = 1
    one_layer = Config.from_dict(raw)
    # (Its lm_head runs on the last token only: the figures below include one lm_head per prompt.)
    prefill_model = Decoder(one_layer, Weights(weights.embed_tokens, weights.layers[:1], weights.norm,
                                               weights.lm_head))
    prefill = {}
    prefill_cache = Cache(one_layer, max(PREFILL))
    prefill_cache.reserve(max(PREFILL))
    prompt = rng.integers(0, EMBED_ROWS, size=max(PREFILL))
    for T in PREFILL:
        def run():
            prefill_cache.length = 0
            prefill_model.forward([(prefill_cache, prompt[:T])])
        run()  # compile (moe_by_expert and attention_prefill only run for T > 1)
        seconds = float(np.median(seconds_each(run, repeats[T])))
        prefill[T] = {"layer_tok_per_s": T / (seconds - lm_head_seconds),
                      "model_tok_per_s": T / (MODEL_LAYERS * (seconds - lm_head_seconds) + lm_head_seconds)}

    # --- what it all means --------------------------------------------------------------------------------
    parts_bytes = bytes_per_token(config, weights, args.context)
    layer_bytes = sum(parts_bytes.values())
    bw = bandwidth.median
    limit_seconds = layer_bytes / (bw * 1e9)
    lm_head_bytes = weights.lm_head.nbytes
    model_seconds = MODEL_LAYERS * layer_seconds + lm_head_seconds
    model_bytes = MODEL_LAYERS * layer_bytes + lm_head_bytes + config.hidden_size * 2  # + one embedding row
    weight_bytes = model_bytes - MODEL_LAYERS * parts_bytes["kv_cache"]
    active = active_parameters(config)
    picks = np.concatenate(chosen)
    usage = np.bincount(picks, minlength=config.num_experts)
    part_bytes = {"attention": parts_bytes["attention"] + parts_bytes["kv_cache"],
                  "router+experts": parts_bytes["router"] + parts_bytes["experts"]}

    print(f"Qwen3-30B-A3B shapes, random bf16, {n_layers} distinct layers rotating "
          f"({sum(w.nbytes for w in _matrices(weights)) / 1e9:.1f} GB), context {args.context}, "
          f"{numba.get_num_threads()} threads, threading layer {machine()['threading_layer']}")
    print(f"read bandwidth (1 GiB prange sum, {len(bandwidth.samples)} samples between runs): "
          f"median {bw:.1f} GB/s, best {bandwidth.best:.1f}")
    print(f"\n{'decode, per layer':24s} {'ms':>8s} {'MB':>8s} {'GB/s':>7s} {'ratio':>6s}")
    print(f"{'whole layer (median)':24s} {layer_seconds * 1e3:8.2f} {layer_bytes / 1e6:8.1f} "
          f"{layer_bytes / layer_seconds / 1e9:7.1f} {limit_seconds / layer_seconds:6.2f}")
    # both best: the quiet-machine guess
    best_ratio = layer_bytes / (bandwidth.best * 1e9) / best_layer_seconds
    print(f"{'whole layer (best)':24s} {best_layer_seconds * 1e3:8.2f} {layer_bytes / 1e6:8.1f} "
          f"{layer_bytes / best_layer_seconds / 1e9:7.1f} {best_ratio:6.2f}")
    for name, seconds in parts.items():
        print(f"{'  ' + name:24s} {seconds * 1e3:8.2f} {part_bytes[name] / 1e6:8.1f} "
              f"{part_bytes[name] / seconds / 1e9:7.1f} {part_bytes[name] / (bw * 1e9) / seconds:6.2f}")
    other = layer_seconds - sum(parts.values())
    print(f"{'  rest (norms, Python)':24s} {other * 1e3:8.2f}")
    print(f"{'lm_head (once a token)':24s} {lm_head_seconds * 1e3:8.2f} {lm_head_bytes / 1e6:8.1f} "
          f"{lm_head_bytes / lm_head_seconds / 1e9:7.1f} {lm_head_bytes / (bw * 1e9) / lm_head_seconds:6.2f}")
    print(f"bandwidth limit per layer {limit_seconds * 1e3:.2f} ms -> "
          f"ratio {limit_seconds / layer_seconds:.2f} (goal >= 0.8); "
          f"{switches} context switches during decode")
    warn_if_contended(switches, len(step_seconds))
    print(f"routing over {len(chosen)} tokens (last layer): "
          f"{np.count_nonzero(usage)} of {config.num_experts} experts used, busiest {usage.max()} times "
          f"(uniform would be {len(picks) / config.num_experts:.1f})")
    print(f"\n{'prefill T':>10s} {'tok/s per layer':>16s} {'48-layer tok/s':>15s}")
    for T, row in prefill.items():
        print(f"{T:>10d} {row['layer_tok_per_s']:>16.1f} {row['model_tok_per_s']:>15.2f}")
    print(f"\n48-layer model: {1 / model_seconds:.2f} tok/s decode "
          f"(bandwidth limit {bw * 1e9 / model_bytes:.2f}); reads {model_bytes / 1e9:.2f} GB per token "
          f"({weight_bytes / 1e9:.2f} GB weights + "
          f"{MODEL_LAYERS * parts_bytes['kv_cache'] / 1e9:.2f} GB KV cache) vs "
          f"{2 * active / 1e9:.2f} GB of active parameters in bf16 ({active / 1e9:.2f} B by shape, "
          f"published {ACTIVE_PARAMETERS / 1e9:.1f} B; the difference is the embedding table, "
          f"of which a token reads one row)")
    report("moe", {
        "quick": args.quick, "layers": n_layers, "context": args.context, "experts": config.num_experts,
        "top_k": config.num_experts_per_tok,
        "read_bandwidth_GBps": bw, "read_bandwidth_best_GBps": bandwidth.best,
        "read_bandwidth_samples": bandwidth.samples, "decode_steps": len(step_seconds),
        "decode_ms_per_layer": layer_seconds * 1e3, "decode_ms_per_layer_best": best_layer_seconds * 1e3,
        "limit_ms_per_layer": limit_seconds * 1e3, "decode_limit_ratio": limit_seconds / layer_seconds,
        "decode_limit_ratio_best": best_ratio,
        "bytes_per_token_per_layer": parts_bytes, "achieved_GBps": layer_bytes / layer_seconds / 1e9,
        "parts_ms": {k: v * 1e3 for k, v in parts.items()}, "lm_head_ms": lm_head_seconds * 1e3,
        "context_switches_during_decode": switches,
        "experts_used": int(np.count_nonzero(usage)), "busiest_expert_picks": int(usage.max()),
        "prefill": {str(T): row for T, row in prefill.items()},
        "model_layers": MODEL_LAYERS, "implied_model_decode_tok_per_s": 1 / model_seconds,
        "model_limit_tok_per_s": bw * 1e9 / model_bytes, "model_bytes_per_token": model_bytes,
        "model_weight_bytes_per_token": weight_bytes, "active_parameters_by_shape": active,
        "active_parameter_bytes_bf16": 2 * active, "active_parameters_published": ACTIVE_PARAMETERS,
    })


def _matrices(weights: Weights):
    for layer in weights.layers:
        a, m = layer.self_attn, layer.mlp
        yield from (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate)
        yield from (*m.gate_projs, *m.up_projs, *m.down_projs)


if __name__ == "__main__":
    main()
