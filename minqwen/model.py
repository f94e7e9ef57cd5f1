"""The Qwen decoder: forward pass, KV cache and the user-facing Model.

    x = embed(tokens)
    for each layer:
        x = x + Attention(RMSNorm(x))        # grouped-query, RoPE, causal (sliding window on some layers)
        x = x + MLP(RMSNorm(x))              # SwiGLU: down(silu(gate x) * up x)
    logits = lm_head(RMSNorm(x))

Prefill and decode run the same code: a chunk of T tokens at positions start..start+T-1 (T = 1 when
decoding). All activation buffers are allocated once (Workspace) for the largest chunk and sliced, so
decoding allocates nothing large per token.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .config import Config, load_config, read_json
from .errors import ConfigError, ContextLengthError, TokenError
from .kernels.activations import swiglu
from .kernels.attention import attention, attention_blocked
from .kernels.deltanet import (causal_conv1d, delta_rule_gates, gated_delta_rule_chunked,
                               gated_delta_rule_recurrent, gated_rmsnorm, l2norm, sigmoid_gate)
from .kernels.dtypes import FP16, FP32, from_float32, to_float32
from .kernels.embedding import embed
from .kernels.matmul import linear
from .kernels.moe import moe_decode, moe_prefill, route
from .kernels.norm import rmsnorm
from .kernels.rope import apply_rope
from .rope import RotaryTables, rotary_dims
from .weights import MLP, Attention, LinearAttention, SparseMoE, Weights, load_weights

PREFILL_CHUNK = 512  # tokens per forward chunk: bounds activation memory; bigger chunks widen bf16 weights fewer times
DELTA_RULE_CHUNK = 64  # tokens per block of the chunked (matrix-form) delta rule in prefill
KV_CACHE_DTYPES = {"fp32": FP32, "fp16": FP16}
FP16_MAX = 65504.0  # the largest finite fp16
L2NORM_EPS = 1e-6  # Gated DeltaNet's q/k normalisation, as transformers' l2norm


class Cache:
    """Everything a sequence remembers between forward calls.

    Attention layers: keys and values, (n_kv_heads, capacity, head_dim) each, float32 by default, or
    fp16 when asked (load(kv_cache="fp16")): half the memory, and half the bytes each decode step reads
    per context token (Qwen3-0.6B at 2048 tokens: 17 -> 21 tok/s), at a price in exactness: logits
    move by ~5e-4 of their range (fp32 keys and values match transformers' fp32 to ~1e-6), enough to
    flip an MoE router's choice now and then. A value beyond fp16's range (65504) turns the cache to
    float32 rather than to inf. Capacity doubles
    when a sequence outgrows it (amortised O(1) per token), up to the context length, so a short chat
    does not reserve memory for 32k positions.
    Gated DeltaNet layers: a fixed-size state whatever the length — the last kernel-1 inputs of the
    causal convolution and one (key_dim, value_dim) matrix per value head. That state cannot be
    rewound, so a hybrid model's sequence can only be extended, or restarted."""

    def __init__(self, config: Config, context_length: int, capacity: int = 256, dtype=FP32):
        self.n_kv_heads, self.head_dim = config.num_key_value_heads, config.head_dim
        self.context_length = context_length
        self.layers = [i for i, t in enumerate(config.layer_types) if t != "linear_attention"]
        self.linear_layers = [i for i, t in enumerate(config.layer_types) if t == "linear_attention"]
        hk, hv = config.linear_num_key_heads, config.linear_num_value_heads
        dk, dv = config.linear_key_head_dim, config.linear_value_head_dim
        self.conv_shape = (config.linear_conv_kernel_dim - 1, 2 * hk * dk + hv * dv)
        self.recurrent_shape = (hv, dk, dv)
        self.length = 0  # positions 0..length-1 are cached
        self.capacity = 0
        self._allocate(min(capacity, context_length), dtype)
        self.conv = {i: np.zeros(self.conv_shape, np.float32) for i in self.linear_layers}
        self.recurrent = {i: np.zeros(self.recurrent_shape, np.float32) for i in self.linear_layers}

    def _allocate(self, capacity: int, dtype):
        shape = (self.n_kv_heads, capacity, self.head_dim)
        k = {i: np.zeros(shape, dtype) for i in self.layers}
        v = {i: np.zeros(shape, dtype) for i in self.layers}
        kept = min(self.capacity, capacity)  # every stored position, a chunk still being stored included
        for i in self.layers if self.capacity else ():
            k[i][:, :kept] = from_float32(to_float32(self.k[i][:, :kept]), dtype)
            v[i][:, :kept] = from_float32(to_float32(self.v[i][:, :kept]), dtype)
        self.k, self.v, self.capacity, self.dtype = k, v, capacity, dtype

    def reserve(self, length: int):
        if length > self.capacity:
            self._allocate(min(self.context_length, max(length, 2 * self.capacity)), self.dtype)

    def rewind(self, length: int) -> int:
        """Forget positions from `length` on; returns the length actually kept (0 for a hybrid model
        asked to go back: its linear-attention state holds no history to rewind to)."""
        if length < self.length and self.linear_layers:
            length = 0
            for i in self.linear_layers:
                self.conv[i][:] = 0
                self.recurrent[i][:] = 0
        self.length = min(length, self.length)
        return self.length

    def store(self, layer: int, start: int, k: np.ndarray, v: np.ndarray):
        """k, v: (T, n_kv_heads, head_dim) float32 of positions start..start+T-1."""
        if self.dtype == FP16 and max(np.abs(k).max(), np.abs(v).max()) > FP16_MAX:
            self._allocate(self.capacity, FP32)
        t = k.shape[0]
        self.k[layer][:, start:start + t] = from_float32(k, self.dtype).transpose(1, 0, 2)
        self.v[layer][:, start:start + t] = from_float32(v, self.dtype).transpose(1, 0, 2)


class Workspace:
    """Every activation buffer of a forward chunk, allocated once for `rows` tokens."""

    def __init__(self, config: Config, rows: int):
        d, hd = config.hidden_size, config.head_dim
        q_dim, kv_dim = config.num_attention_heads * hd, config.num_key_value_heads * hd
        new = lambda *shape: np.zeros(shape, np.float32)  # noqa: E731
        self.rows = rows
        self.x, self.h, self.out = new(rows, d), new(rows, d), new(rows, d)
        self.q, self.k, self.v, self.attn = new(rows, q_dim), new(rows, kv_dim), new(rows, kv_dim), new(rows, q_dim)
        # Flat, viewed as (T, F) by each SwiGLU MLP: dense, shared-expert and MoE widths differ.
        f = max(config.intermediate_size, config.shared_expert_intermediate_size)
        self.gate, self.up = new(rows * f), new(rows * f)
        if config.num_experts:
            k = config.num_experts_per_tok
            self.router_logits = new(rows, config.num_experts)
            self.route_weights, self.route_experts = new(rows, k), np.zeros((rows, k), np.int64)
            self.expert_hidden = new(k, config.moe_intermediate_size)
            self.shared, self.shared_gate = new(rows, d), new(rows, 1)
        if config.attn_output_gate:
            self.q_and_gate = new(rows, 2 * q_dim)
        if "linear_attention" in config.layer_types:
            hk, hv = config.linear_num_key_heads, config.linear_num_value_heads
            dk, dv = config.linear_key_head_dim, config.linear_value_head_dim
            channels = 2 * hk * dk + hv * dv
            self.qkv, self.conv_out, self.z = new(rows, channels), new(rows, channels), new(rows, hv * dv)
            self.b, self.a, self.g, self.beta = new(rows, hv), new(rows, hv), new(rows, hv), new(rows, hv)
            self.core = new(rows, hv, dv)
            self.qkvz, self.ba = new(rows, channels + hv * dv), new(rows, 2 * hv)  # Qwen3-Next's fused layout


class Transformer:
    """The forward pass over weights; knows nothing of tokenizers or sampling."""

    def __init__(self, config: Config, weights: Weights):
        self.config, self.weights = config, weights
        self.rope = RotaryTables(config)
        self.rotary_dims = rotary_dims(config)
        self.scale = np.float32(config.head_dim ** -0.5)
        self.windows = [config.sliding_window if s else 0 for s in config.sliding]
        self.ws = Workspace(config, PREFILL_CHUNK)

    def forward(self, cache: Cache, tokens: np.ndarray) -> np.ndarray:
        """Run tokens at positions cache.length.. through the model; returns the final normed hidden
        states (T, hidden) — a view into the workspace, valid until the next call."""
        assert 0 < len(tokens) <= self.ws.rows
        T, start = len(tokens), cache.length
        cache.reserve(start + T)
        ws, cfg = self.ws, self.config
        x, h, out = ws.x[:T], ws.h[:T], ws.out[:T]
        embed(x, self.weights.embed_tokens, tokens)
        cos, sin = self.rope.cos_sin(start, T)
        for i, layer in enumerate(self.weights.layers):
            rmsnorm(h, x, layer.input_layernorm, cfg.rms_norm_eps)
            if layer.linear_attn is not None:
                self.gated_deltanet(out, h, layer.linear_attn, cache, i)
            else:
                self.attention(out, h, layer.self_attn, cache, i, start, cos, sin)
            x += out
            rmsnorm(h, x, layer.post_attention_layernorm, cfg.rms_norm_eps)
            if isinstance(layer.mlp, SparseMoE):
                self.sparse_moe(out, h, layer.mlp)
            else:
                self.mlp(out, h, layer.mlp)
            x += out
        cache.length = start + T
        rmsnorm(x, x, self.weights.norm, cfg.rms_norm_eps)
        return x

    def attention(self, out, h, w: Attention, cache: Cache, i: int, start: int, cos, sin):
        cfg, T = self.config, h.shape[0]
        hd, n_q, n_kv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        q, k, v, attn = self.ws.q[:T], self.ws.k[:T], self.ws.v[:T], self.ws.attn[:T]
        if w.output_gate:  # q_proj yields [q_h, gate_h] per head; the gate scales the output later
            q_and_gate = self.ws.q_and_gate[:T]
            project(q_and_gate, h, w.q_proj, w.q_bias)
            q.reshape(T, n_q, hd)[:] = q_and_gate.reshape(T, n_q, 2 * hd)[:, :, :hd]
        else:
            project(q, h, w.q_proj, w.q_bias)
        project(k, h, w.k_proj, w.k_bias)
        project(v, h, w.v_proj, w.v_bias)
        q3, k3 = q.reshape(T, n_q, hd), k.reshape(T, n_kv, hd)
        if w.q_norm is not None:  # Qwen3: RMSNorm of each head before rotating it
            rmsnorm(q.reshape(T * n_q, hd), q.reshape(T * n_q, hd), w.q_norm, cfg.rms_norm_eps)
            rmsnorm(k.reshape(T * n_kv, hd), k.reshape(T * n_kv, hd), w.k_norm, cfg.rms_norm_eps)
        apply_rope(q3, cos, sin)
        apply_rope(k3, cos, sin)
        cache.store(i, start, k3, v.reshape(T, n_kv, hd))
        attend = attention if T == 1 else attention_blocked  # one query streams; a block goes through BLAS
        attend(attn.reshape(T, n_q, hd), q3, cache.k[i], cache.v[i], start, self.windows[i], self.scale)
        if w.output_gate:  # attn * sigmoid(gate)
            gate = q_and_gate.reshape(T, n_q, 2 * hd)[:, :, hd:]
            sigmoid_gate(attn.reshape(T, n_q, hd), attn.reshape(T, n_q, hd), gate)
        project(out, attn, w.o_proj, w.o_bias)

    def gated_deltanet(self, out, h, w: LinearAttention, cache: Cache, i: int):
        """Gated DeltaNet (Yang et al. 2024), per value head with state S (Dk x Dv):
            q, k, v = silu(causal_conv(W_qkv h));  q, k = q / |q|, k / |k|
            g = -exp(A_log) softplus(W_a h + dt_bias);  beta = sigmoid(W_b h)
            S <- exp(g) S;  S <- S + beta k (v - S^T k)^T;  o = S^T q / sqrt(Dk)
            out = W_out (RMSNorm(o) * w * silu(W_z h))"""
        cfg, ws, T = self.config, self.ws, h.shape[0]
        hk, hv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        dk, dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        qkv, z, b, a = ws.qkv[:T], ws.z[:T], ws.b[:T], ws.a[:T]
        if w.in_proj_qkvz is not None:  # Qwen3-Next: one fused product, then reorder its outputs
            qkvz, ba = ws.qkvz[:T], ws.ba[:T]
            linear(qkvz, h, w.in_proj_qkvz)
            linear(ba, h, w.in_proj_ba)
            channels = qkv.shape[1]
            qkv[:] = qkvz[:, w.qkvz_order[:channels]]
            z[:] = qkvz[:, w.qkvz_order[channels:]]
            b[:], a[:] = ba[:, w.ba_order[:hv]], ba[:, w.ba_order[hv:]]
        else:
            linear(qkv, h, w.in_proj_qkv)
            linear(z, h, w.in_proj_z)
            linear(b, h, w.in_proj_b)
            linear(a, h, w.in_proj_a)
        conv = ws.conv_out[:T]
        causal_conv1d(conv, cache.conv[i], qkv, w.conv1d)
        q = conv[:, :hk * dk].reshape(T, hk, dk)
        k = conv[:, hk * dk:2 * hk * dk].reshape(T, hk, dk)
        v = conv[:, 2 * hk * dk:].reshape(T, hv, dv)
        l2norm(q, q, L2NORM_EPS)
        l2norm(k, k, L2NORM_EPS)
        g, beta = ws.g[:T], ws.beta[:T]
        delta_rule_gates(g, beta, a, b, w.A_log, w.dt_bias)
        core = ws.core[:T]
        if T == 1:
            gated_delta_rule_recurrent(core, cache.recurrent[i], q, k, v, g, beta)
        else:
            gated_delta_rule_chunked(core, cache.recurrent[i], q, k, v, g, beta, DELTA_RULE_CHUNK)
        gated_rmsnorm(core, core, w.norm, z.reshape(T, hv, dv), cfg.rms_norm_eps)
        linear(out, core.reshape(T, hv * dv), w.out_proj)

    def mlp(self, out, h, w: MLP):
        T, f = h.shape[0], w.gate_proj.shape[0]
        gate, up = self.ws.gate[:T * f].reshape(T, f), self.ws.up[:T * f].reshape(T, f)
        linear(gate, h, w.gate_proj)
        linear(up, h, w.up_proj)
        swiglu(gate, gate, up)
        linear(out, gate, w.down_proj)

    def sparse_moe(self, out, h, w: SparseMoE):
        """out = sum over the token's top-k experts of weight_e * MLP_e(h)  (+ sigmoid(g . h) * shared MLP(h))."""
        cfg, ws, T = self.config, self.ws, h.shape[0]
        logits, weights, experts = ws.router_logits[:T], ws.route_weights[:T], ws.route_experts[:T]
        linear(logits, h, w.gate)
        route(weights, experts, logits, cfg.num_experts_per_tok, cfg.norm_topk_prob)
        if T * cfg.num_experts_per_tok <= cfg.num_experts:
            # Decode, or so few tokens that an expert rarely serves two: stream only the chosen
            # experts' weights, token by token, in one pass each.
            for t in range(T):
                moe_decode(out[t], ws.expert_hidden, h[t], w.gate_projs, w.up_projs, w.down_projs, experts[t],
                           weights[t])
        else:  # prefill: each chosen expert runs once, on all of its tokens, as matrix products
            moe_prefill(out, h, w.gate_projs, w.up_projs, w.down_projs, experts, weights)
        if w.shared_expert is not None:
            shared, gate = ws.shared[:T], ws.shared_gate[:T]
            self.mlp(shared, h, w.shared_expert)
            linear(gate, h, w.shared_expert_gate)
            out += shared / (1 + np.exp(-gate))


def project(out: np.ndarray, x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None):
    """out = x W^T (+ b)."""
    linear(out, x, weight)
    if bias is not None:
        out += bias


class Sequence:
    """One token sequence being extended: its tokens and KV cache. Reuses the cached prefix it shares
    with a new prompt, so a chat's history is not prefilled again."""

    def __init__(self, model: "Model"):
        self.model = model
        self.cache = Cache(model.config, model.context_length, dtype=model.kv_dtype)
        self.tokens: list[int] = []
        self.reused = 0  # tokens the last reset_to found already cached

    def extend(self, tokens: list[int]) -> np.ndarray:
        """Append tokens; returns the logits (vocab,) after the last one."""
        self.model.check_tokens(tokens, already=len(self.tokens))
        return self._run(tokens, all_logits=False)[-1]

    def reset_to(self, tokens: list[int]) -> np.ndarray:
        """Make the sequence equal `tokens`, keeping the longest cached common prefix; returns the logits
        after the last token."""
        self.model.check_tokens(tokens, already=0)
        common = self.cache.rewind(self.common_prefix(tokens))
        self.tokens, self.reused = self.tokens[:common], common
        return self._run(tokens[common:], all_logits=False)[-1]

    def common_prefix(self, tokens: list[int]) -> int:
        """How many leading tokens are already cached (at most len(tokens) - 1: one must run for logits)."""
        n = 0
        for a, b in zip(self.tokens, tokens):
            if a != b:
                break
            n += 1
        return min(n, len(tokens) - 1)

    def _run(self, tokens: list[int], all_logits: bool) -> np.ndarray:
        transformer, chunk = self.model.transformer, PREFILL_CHUNK
        ids = np.asarray(tokens, dtype=np.int64)
        rows = [] if all_logits else None
        last = None
        for s in range(0, len(ids), chunk):
            hidden = transformer.forward(self.cache, ids[s:s + chunk])
            if all_logits:
                rows.append(self.model.lm_head(hidden))
            last = hidden[-1:]
        self.tokens.extend(int(t) for t in tokens)
        return np.concatenate(rows) if all_logits else self.model.lm_head(last)


class Model:
    """A loaded Qwen checkpoint: `logits`, `generate`, `stream`, and its `tokenizer`."""

    def __init__(self, config: Config, weights: Weights, tokenizer=None, generation_config: dict | None = None,
                 path: Path | None = None, context_length: int | None = None, kv_cache: str = "fp32"):
        self.config, self.weights, self.tokenizer, self.path = config, weights, tokenizer, path
        self.generation_config = generation_config or {}
        self.context_length = context_length or config.context_window
        self.transformer = Transformer(config, weights)
        self.kv_dtype = KV_CACHE_DTYPES[kv_cache]  # see Cache
        self._logits_row = np.zeros((1, config.vocab_size), np.float32)

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.generation_config.get("eos_token_id", self.config.eos_token_id)
        return [eos] if isinstance(eos, int) else list(eos or [])

    def lm_head(self, hidden: np.ndarray) -> np.ndarray:
        """(T, hidden) -> logits (T, vocab); the one-row case writes into a reused buffer."""
        out = self._logits_row if hidden.shape[0] == 1 else np.empty((hidden.shape[0], self.config.vocab_size), np.float32)
        linear(out, np.ascontiguousarray(hidden), self.weights.lm_head)
        return out

    def check_tokens(self, tokens, already: int = 0):
        if len(tokens) == 0:
            raise TokenError("no tokens given: a sequence needs at least one token")
        ids = np.asarray(tokens)
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise TokenError("token ids must be a flat sequence of integers")
        bad = ids[(ids < 0) | (ids >= self.config.vocab_size)]
        if bad.size:
            raise TokenError(f"token id {int(bad[0])} is outside the vocabulary [0, {self.config.vocab_size})")
        if already + len(tokens) > self.context_length:
            raise ContextLengthError(
                f"{already + len(tokens)} tokens do not fit the context window of {self.context_length}")

    def sequence(self) -> Sequence:
        return Sequence(self)

    def logits(self, token_ids) -> np.ndarray:
        """Logits (len(token_ids), vocab) float32 of every position of a fresh sequence."""
        self.check_tokens(token_ids)
        return Sequence(self)._run(list(token_ids), all_logits=True).copy()

    def generate(self, token_ids, max_new_tokens: int, **sampling) -> list[int]:
        """The new tokens only (ending with the end-of-turn token if one was produced)."""
        return list(self.stream(token_ids, max_new_tokens, **sampling))

    def stream(self, token_ids, max_new_tokens: int, temperature=0.0, top_k=None, top_p=None, min_p=None,
               repetition_penalty=None, presence_penalty=None, seed=None, stop=None):
        """Yield new token ids as they are produced (same options as `generate`)."""
        from .generate import SamplingParams, stream_tokens

        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                                seed=seed)
        return stream_tokens(self.sequence(), list(token_ids), max_new_tokens, params, stop)


def load(path_or_hub_id, context_length: int | None = None, quantize: str | None = None,
         kv_cache: str = "fp32") -> Model:
    """Load a checkpoint folder (or a hub id found in the local Hugging Face cache); `quantize="int8"` or
    `"int4"` quantises the weights as they load (see quantize.py); `kv_cache="fp16"` halves the KV cache
    (see Cache)."""
    from .checkpoint import read_tensors
    from .hub import resolve
    from .tokenizer import Tokenizer

    if kv_cache not in KV_CACHE_DTYPES:
        raise ConfigError(f"kv_cache must be one of {', '.join(KV_CACHE_DTYPES)}, got {kv_cache!r}")
    folder = resolve(path_or_hub_id)
    config = load_config(folder)
    weights = load_weights(config, read_tensors(folder))
    if quantize is not None:
        from .quantize import BITS, quantize_weights

        if quantize not in BITS:
            raise ConfigError(f"quantize must be one of {', '.join(BITS)}, got {quantize!r}")
        quantize_weights(weights, BITS[quantize])
    tokenizer = Tokenizer.from_dir(folder) if (folder / "tokenizer.json").exists() else None
    gen_path = folder / "generation_config.json"
    generation_config = read_json(gen_path) if gen_path.exists() else {}
    if context_length is not None and not 0 < context_length <= config.context_window:
        raise ContextLengthError(f"context length {context_length} must be in [1, {config.context_window}]")
    return Model(config, weights, tokenizer, generation_config, folder, context_length, kv_cache)
