"""Decode time against context length for the two layer kinds of a Qwen3.5-shaped hybrid model.

    python bench/hybrid.py [--quick] [--contexts 128,1024,8192] [--threads N]

A Gated DeltaNet (linear-attention) layer carries a fixed-size state, a conv window and one key x value
matrix per value head, so its decode time must not change with the context; a full-attention layer
reads its whole KV cache for every token, so its time grows with the context.

Shapes: Qwen3.5-27B's text_config (tests/data/configs/qwen3.5-27b.config.json): hidden 5120, MLP 17408;
linear attention 16 key / 48 value heads of 128, conv kernel 4; full attention 24 query / 4 kv heads of
256 with q/k norm and an output gate. The model here has its first 4 layers (3 linear + 1 full, as the
published layer_types start), random bf16 weights built as NumPy arrays, ~3 GB in all.

The context is made by filling the KV cache, the recurrent states and the conv states with random values
(prefilling 8k tokens of these shapes would take minutes and time nothing we report), then timing
single-token steps at that position: each mixer through the engine's own Decoder.gated_deltanet /
Decoder.self_attention, the MLP through Decoder.mlp, and the whole 4-layer forward pass as a check
(~ 3 linear + 1 full + 4 MLPs). A layer = its mixer + the MLP. The implied 64-layer model (48 linear +
16 full) adds the lm_head (248320 x 5120 bf16, too big to build here) at the GB/s the MLP reached.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numba
import numpy as np

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
from minqwen.kernels.attention import attention_decode
from minqwen.network.config import Config
from minqwen.network.decoder import Cache, Decoder, Segment
from minqwen.network.weights import AttentionWeights, DeltaNetWeights, LayerWeights, MLPWeights, Weights

CONFIG = Path(__file__).parent.parent / "tests" / "data" / "configs" / "qwen3.5-27b.config.json"
LAYERS = 4  # the published model's first four: linear, linear, linear, full
EMBED_ROWS = 1024


def build(config: Config, rng: RandomBF16) -> Weights:
    d, hd, f = config.hidden_size, config.head_dim, config.intermediate_size
    hk, hv, dk, dv = (config.linear_num_key_heads, config.linear_num_value_heads, config.linear_key_head_dim,
                      config.linear_value_head_dim)
    channels = 2 * hk * dk + hv * dv
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd

    def linear_attention():
        return DeltaNetWeights(
            in_proj_qkv=rng.matrix(channels, d), in_proj_z=rng.matrix(hv * dv, d),
            in_proj_b=rng.matrix(hv, d), in_proj_a=rng.matrix(hv, d),
            in_proj_qkvz=None, in_proj_ba=None, qkvz_order=None, ba_order=None,
            conv1d=rng.matrix(channels, config.linear_conv_kernel_dim, std=0.5),
            A_log=np.zeros(hv, np.float32), dt_bias=np.zeros(hv, np.float32), norm=rng.vector(dv),
            out_proj=rng.matrix(d, hv * dv))

    def full_attention():  # q_proj yields [q_h, gate_h] per head: twice the query width
        return AttentionWeights(q_proj=rng.matrix(2 * q, d), k_proj=rng.matrix(kv, d),
                                v_proj=rng.matrix(kv, d), o_proj=rng.matrix(d, q), q_bias=None, k_bias=None,
                                v_bias=None, o_bias=None, q_norm=rng.vector(hd), k_norm=rng.vector(hd))

    layers = []
    for kind in config.layer_types:
        mlp = MLPWeights(gate_proj=rng.matrix(f, d), up_proj=rng.matrix(f, d), down_proj=rng.matrix(d, f))
        linear = kind == "linear_attention"
        layers.append(LayerWeights(rng.vector(d), rng.vector(d), None if linear else full_attention(),
                            linear_attention() if linear else None, mlp))
    return Weights(embed_tokens=rng.matrix(EMBED_ROWS, d, std=1.0), layers=layers, norm=rng.vector(d),
                   lm_head=rng.matrix(8, d))


def mixer_bytes(config: Config, layer: LayerWeights, context: int) -> int:
    """Bytes one decode step of this layer's mixer reads at position `context`."""
    if layer.linear_attn is not None:
        w = layer.linear_attn
        weights = sum(a.nbytes for a in (w.in_proj_qkv, w.in_proj_z, w.in_proj_b, w.in_proj_a, w.conv1d,
                                         w.out_proj))
        hv, dk, dv = config.linear_num_value_heads, config.linear_key_head_dim, config.linear_value_head_dim
        return weights + hv * dk * dv * 4  # + the recurrent state (read, and written back in place)
    w = layer.self_attn
    kv_cache = 2 * config.num_key_value_heads * (context + 1) * config.head_dim * 4
    return sum(a.nbytes for a in (w.q_proj, w.k_proj, w.v_proj, w.o_proj)) + kv_cache


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: few repeats")
    parser.add_argument("--contexts", default="128,1024,8192", help="comma-separated context lengths")
    parser.add_argument("--threads", type=int, default=None, help="Numba threads (default: all cores)")
    args = parser.parse_args()
    if args.threads:
        numba.set_num_threads(args.threads)
    contexts = [int(c) for c in args.contexts.split(",")]
    repeats = 6 if args.quick else 30  # single-token steps per measurement (median)

    published = json.loads(CONFIG.read_text())
    full_types = Config.from_dict(published).layer_types
    raw = json.loads(json.dumps(published))
    raw["text_config"].update(num_hidden_layers=LAYERS, layer_types=full_types[:LAYERS])
    config = Config.from_dict(raw)
    weights = build(config, RandomBF16())
    decoder = Decoder(config, weights)
    bandwidth = Bandwidth(1.0)
    warn_if_workqueue()
    rng = np.random.default_rng(0)
    d, n_kv, hd = config.hidden_size, config.num_key_value_heads, config.head_dim
    h = rng.standard_normal((repeats, 1, d), dtype=np.float32)
    out = np.zeros((1, d), np.float32)
    linear_layers, full_layers = config.deltanet_layers, config.attention_layers

    def median_ms(call):  # call(j) for j < repeats, rotating over the layers of one kind; median ms
        call(0)  # compile / warm up
        return float(np.median([seconds_each(lambda: call(j), 1)[0] for j in range(repeats)])) * 1e3

    switches = context_switches()
    # The MLP does not depend on the context: once, rotating over the 4 layers' MLPs.
    mlp_ms = median_ms(lambda j: decoder.mlp(out, h[j], weights.layers[j % LAYERS].mlp))
    bandwidth.sample()
    mlp = weights.layers[0].mlp
    mlp_bytes = mlp.gate_proj.nbytes + mlp.up_proj.nbytes + mlp.down_proj.nbytes

    rows = []
    tokens = rng.integers(0, EMBED_ROWS, size=repeats + 1)
    for context in contexts:
        cache = Cache(config, context + 1)
        cache.reserve(context + 1)
        for i in cache.attention_layers:  # a KV cache holding `context` positions
            cache.k[i][:, :context] = rng.standard_normal((n_kv, context, hd), dtype=np.float32)
            cache.v[i][:, :context] = rng.standard_normal((n_kv, context, hd), dtype=np.float32)
        for i in cache.deltanet_layers:  # states that have seen `context` tokens: their size never changes
            cache.recurrent[i][:] = rng.standard_normal(cache.recurrent[i].shape, dtype=np.float32) * 0.1
            cache.conv[i][:] = rng.standard_normal(cache.conv[i].shape, dtype=np.float32)
        cache.length = context
        cos, sin = decoder.rope.cos_sin(context, 1)
        one_token = [Segment(cache, 0, 1, context)]
        q = rng.standard_normal((1, config.num_attention_heads, hd), dtype=np.float32)
        attention_out = np.zeros_like(q)
        # The attention kernel alone rotates over copies of the KV cache totalling >= 128 MB: in the model
        # the other layers' weights stream between two visits of a layer's cache, so it comes from DRAM.
        i = full_layers[0]
        kv_copies = [(cache.k[i].copy(), cache.v[i].copy())
                     for _ in range(max(2, -(-128 * 10**6 // (2 * cache.k[i].nbytes))))]

        def linear_step(j):
            i = linear_layers[j % len(linear_layers)]
            decoder.gated_deltanet(out, h[j], weights.layers[i].linear_attn, one_token, i)

        def full_step(j):
            i = full_layers[j % len(full_layers)]
            decoder.self_attention(out, h[j], weights.layers[i].self_attn, one_token, i, cos, sin)

        def attention_kernel(j):  # the KV-cache part of full_step alone
            k, v = kv_copies[j % len(kv_copies)]
            attention_decode(attention_out, q, k, v, context, 0, decoder.scale)

        def forward(j):
            cache.length = context  # rewind the KV cache; the linear states just keep evolving
            decoder.forward([(cache, tokens[j:j + 1])])

        row = {"context": context, "linear_mixer_ms": median_ms(linear_step)}
        bandwidth.sample()
        row["full_mixer_ms"] = median_ms(full_step)
        bandwidth.sample()
        row["attention_kernel_ms"] = median_ms(attention_kernel)
        row["forward_4_layers_ms"] = median_ms(forward)
        bandwidth.sample()
        row["linear_layer_ms"] = row["linear_mixer_ms"] + mlp_ms
        row["full_layer_ms"] = row["full_mixer_ms"] + mlp_ms
        row["linear_mixer_bytes"] = mixer_bytes(config, weights.layers[linear_layers[0]], context)
        row["full_mixer_bytes"] = mixer_bytes(config, weights.layers[full_layers[0]], context)
        row["kv_cache_bytes"] = 2 * n_kv * (context + 1) * hd * 4
        rows.append(row)

    switches = context_switches() - switches
    timed_calls = repeats * (1 + 4 * len(contexts))
    bw = bandwidth.median
    mlp_GBps = mlp_bytes / mlp_ms / 1e6
    n_linear, n_full = (full_types.count("linear_attention"),
                        len(full_types) - full_types.count("linear_attention"))
    lm_head_bytes = config.vocab_size * d * 2
    lm_head_ms = lm_head_bytes / mlp_GBps / 1e6
    for row in rows:
        ms = n_linear * row["linear_layer_ms"] + n_full * row["full_layer_ms"] + lm_head_ms
        model_bytes = (n_linear * row["linear_mixer_bytes"] + n_full * row["full_mixer_bytes"]
                       + len(full_types) * mlp_bytes + lm_head_bytes)
        row.update(model_tok_per_s=1e3 / ms, model_limit_tok_per_s=bw * 1e9 / model_bytes,
                   model_bytes_per_token=model_bytes)

    print(f"Qwen3.5-27B shapes, random bf16, {LAYERS} layers ({', '.join(config.layer_types)}), "
          f"{numba.get_num_threads()} threads, threading layer {machine()['threading_layer']}")
    print(f"read bandwidth (1 GiB prange sum, {len(bandwidth.samples)} samples between runs): "
          f"median {bw:.1f} GB/s, best {bandwidth.best:.1f}; "
          "KV cache, recurrent and conv states filled with random values")
    print(f"MLP (gate/up/down {mlp_bytes / 1e6:.0f} MB): {mlp_ms:.2f} ms, {mlp_GBps:.1f} GB/s "
          f"({mlp_GBps / bw:.2f} of the read bandwidth)")
    print("\nms per token, one layer; mixer GB/s counts weights (+ state or KV cache) read")
    print(f"{'context':>8} | {'linear mixer':>12} {'GB/s':>5} {'layer':>7} | {'full mixer':>10} {'GB/s':>5} "
          f"{'(kernel)':>8} {'layer':>7} | {'4-layer fwd':>11} | {'64-layer tok/s':>14} {'(limit)':>7}")
    for r in rows:
        linear_GBps = r["linear_mixer_bytes"] / r["linear_mixer_ms"] / 1e6
        full_GBps = r["full_mixer_bytes"] / r["full_mixer_ms"] / 1e6
        print(f"{r['context']:>8} | {r['linear_mixer_ms']:>12.2f} {linear_GBps:>5.1f} "
              f"{r['linear_layer_ms']:>7.2f} | {r['full_mixer_ms']:>10.2f} {full_GBps:>5.1f} "
              f"{r['attention_kernel_ms']:>8.2f} {r['full_layer_ms']:>7.2f} | "
              f"{r['forward_4_layers_ms']:>11.1f} | {r['model_tok_per_s']:>14.2f} "
              f"{r['model_limit_tok_per_s']:>7.2f}")
    first, last = rows[0], rows[-1]
    kv_GBps = last["kv_cache_bytes"] / last["attention_kernel_ms"] / 1e6
    print(f"\nfrom context {first['context']} to {last['context']}: linear mixer x"
          f"{last['linear_mixer_ms'] / first['linear_mixer_ms']:.2f}, full mixer x"
          f"{last['full_mixer_ms'] / first['full_mixer_ms']:.2f} "
          f"(its KV cache {first['kv_cache_bytes'] / 1e6:.1f} -> {last['kv_cache_bytes'] / 1e6:.1f} MB; "
          f"the attention kernel alone {first['attention_kernel_ms']:.2f} -> "
          f"{last['attention_kernel_ms']:.2f} ms = {kv_GBps:.1f} GB/s "
          f"of KV cache)")
    warn_if_contended(switches, timed_calls)
    print(f"64-layer model = {n_linear} linear + {n_full} full layers + lm_head "
          f"({lm_head_bytes / 1e9:.2f} GB, estimated {lm_head_ms:.0f} ms at the MLP's GB/s)")
    report("hybrid", {"quick": args.quick, "layers": config.layer_types, "repeats": repeats,
                      "read_bandwidth_GBps": bw, "read_bandwidth_best_GBps": bandwidth.best,
                      "read_bandwidth_samples": bandwidth.samples, "context_fill": "random",
                      "context_switches": switches, "timed_calls": timed_calls,
                      "mlp_ms": mlp_ms, "mlp_bytes": mlp_bytes, "mlp_GBps": mlp_GBps, "rows": rows,
                      "model_layers": {"linear_attention": n_linear, "full_attention": n_full},
                      "lm_head_ms_estimated": lm_head_ms})


if __name__ == "__main__":
    main()
