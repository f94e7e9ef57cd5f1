"""The Qwen network: token ids -> logits. Every family, layer by layer (its switches are mapped below):

    x = embed(tokens)
    for each layer:
        h = RMSNorm(x)                  zero_centred_norms: the weight is applied as (1 + w)
        x = x + SelfAttention(h)        full_attention / sliding_attention layers: softmax over the KV cache,
                                        grouped-query, RoPE on q and k (on a fraction of each head's dims with
                                        partial rotary); qk_norm: RMSNorm of each q and k head before RoPE;
                                        sliding layers see the last `sliding_window` positions;
                                        output_gate: out * sigmoid(gate), q_proj yields [q_h, gate_h] per head
              or GatedDeltaNet(h)       linear_attention layers (hybrids): a fixed-size state per head,
                                        moved towards v along k at every token (kernels/deltanet.py)
        h = RMSNorm(x)
        x = x + MLP(h)                  dense layers: SwiGLU, down(silu(gate h) * up h)
              or SparseMoE(h)           sparse layers: sum of the top-k routed experts' SwiGLUs,
                                        + sigmoid(shared_expert_gate . h) * a shared SwiGLU, if any
    logits = lm_head(RMSNorm(x))        lm_head is embed_tokens itself when tied

Where each switch is declared (config.py) and where it acts. weights.py loads the tensors a switch
implies and refuses one it switches off (left unread, it would silently change the logits); the
decoder tests the switches on the config (`project` adds whichever bias was loaded):

    switch              declared in                                   acts in
    qk_norm             FAMILIES                                      weights._attention, self_attention
    output_gate         FAMILIES                                      weights._attention, self_attention
    zero_centred_norms  FAMILIES                                      weights._norm: 1 + w, once, at load
    each layer's mixer  layer_types, else FAMILIES' rule              weights._layer, forward
    sliding window      use_sliding_window, sliding_window,           config.windows -> self_attention
                        max_window_layers (FAMILIES' rule)
    partial rotary      partial_rotary_factor (hybrids' default)      rope_frequencies.RotaryTables
    biases              qkv_bias (Qwen2's default), attention_bias    weights._attention, project
    sparse layers       num_experts, decoder_sparse_step,             config.is_sparse: weights._layer,
                        mlp_only_layers                               forward
    shared expert       shared_expert_intermediate_size > 0           weights._moe, sparse_moe
    top-k renormalised  norm_topk_prob (hybrids' default)             route, in sparse_moe
    tied head           tie_word_embeddings                           weights.load_weights

How a checkpoint stores its weights is no switch (weights.py recognises it by tensor name); of its
layouts only Qwen3-Next's fused in_proj_qkvz / in_proj_ba reach the decoder (gated_deltanet).

Prefill and decode run the same code (Sequence.extend -> Decoder.forward): each sequence in a batch
brings T new tokens at its own positions (T = 1 when decoding), in activation buffers allocated once
for the largest batch (Workspace) and sliced, so decoding allocates nothing large per token.

bench/decode_profile.py times the kernels by swapping the names imported below for clocked wrappers, so
the forward pass calls kernels by these module-level names only.
"""
from __future__ import annotations

import numpy as np

from ..errors import ContextLengthError, TokenError
from ..kernels.activations import sigmoid_gate, swiglu
from ..kernels.attention import attention_decode, attention_prefill
from ..kernels.deltanet import (
    causal_conv1d,
    delta_rule_gates,
    gated_delta_rule_recurrent,
    gated_rmsnorm,
    l2norm,
)
from ..kernels.dtypes import FP16, FP32, from_float32, to_float32
from ..kernels.embedding import embed
from ..kernels.linear import linear
from ..kernels.moe import moe_by_expert, moe_one_token, route
from ..kernels.norm import rmsnorm
from ..kernels.rope import apply_rope
from .config import Config
from .rope_frequencies import RotaryTables
from .weights import AttentionWeights, DeltaNetWeights, MLPWeights, MoEWeights, Weights

PREFILL_CHUNK = 512  # tokens a pass takes at most: bounds activation memory; bigger widens bf16 less often
FEW_QUERIES, FEW_SCORES = 8, 2048  # attention_decode below 8 tokens or to 2048 query-key pairs a head
KV_CACHE_DTYPES = {"fp32": FP32, "fp16": FP16}
L2NORM_EPS = 1e-6  # Gated DeltaNet's q/k normalisation, as transformers' l2norm


class Cache:
    """Everything a sequence remembers between forward passes.

    Attention layers: keys and values, (n_kv_heads, capacity, head_dim) each, float32, or fp16 when asked
    (load(kv_cache="fp16")): half the memory and the bytes a decode step reads, less exact
    (docs/performance.md), float32 again if a value exceeds fp16's range. Capacity doubles when a sequence
    outgrows it (amortised O(1) per token), up to the context length: a short chat reserves no 32k positions.
    Gated DeltaNet layers: a fixed-size state whatever the length — the last kernel-1 inputs of the
    causal convolution and one (key_dim, value_dim) matrix per value head — which cannot be rewound,
    only restored where `snapshot()` copied it or at a position since `keep_states()` (see reusable)."""

    def __init__(self, config: Config, context_length: int, capacity: int = 256, dtype=FP32):
        self.n_kv_heads, self.head_dim = config.num_key_value_heads, config.head_dim
        self.context_length = context_length
        self.attention_layers, self.deltanet_layers = config.attention_layers, config.deltanet_layers
        conv_shape = (config.linear_conv_kernel_dim - 1, config.deltanet_conv_channels)
        state_shape = (config.linear_num_value_heads, config.linear_key_head_dim,
                       config.linear_value_head_dim)
        self.length, self.capacity = 0, 0  # positions 0..length-1 are cached, in none allocated yet
        self._allocate(min(capacity, context_length), dtype)
        self.conv = {i: np.zeros(conv_shape, np.float32) for i in self.deltanet_layers}
        self.recurrent = {i: np.zeros(state_shape, np.float32) for i in self.deltanet_layers}
        self.saved: tuple[int, dict, dict] | None = None  # (length, conv, recurrent) from snapshot()
        self.trail: tuple[int, dict, dict] | None = None  # as saved, lists of states from keep_states() on

    def _allocate(self, capacity: int, dtype):
        shape = (self.n_kv_heads, capacity, self.head_dim)
        k = {i: np.zeros(shape, dtype) for i in self.attention_layers}
        v = {i: np.zeros(shape, dtype) for i in self.attention_layers}
        kept = min(self.capacity, capacity)  # every stored position, a chunk still being stored included
        for i in self.attention_layers if self.capacity else ():
            k[i][:, :kept] = from_float32(to_float32(self.k[i][:, :kept]), dtype)
            v[i][:, :kept] = from_float32(to_float32(self.v[i][:, :kept]), dtype)
        self.k, self.v, self.capacity, self.dtype = k, v, capacity, dtype

    def reserve(self, length: int):
        if length > self.capacity:
            self._allocate(min(self.context_length, max(length, 2 * self.capacity)), self.dtype)

    def reusable(self, length: int) -> int:
        """How many of the first `length` positions rewind(length) keeps (the reusable prefix): `length`
        itself (at most the cached length), except for a hybrid model asked to go back, which can only
        return to a position since keep_states(), to its snapshot if not past `length`, or to 0."""
        if length >= self.length or not self.deltanet_layers:
            return min(length, self.length)
        if self.trail is not None and self.trail[0] <= length:
            return length
        return self.saved[0] if self.saved is not None and self.saved[0] <= length else 0

    def rewind(self, length: int) -> int:
        """Forget positions from `length` on, as far as the cache can (reusable); returns the length kept."""
        length = self.reusable(length)
        if length < self.length and self.deltanet_layers:
            restored = self.saved[1:] if self.saved is not None and self.saved[0] == length else None
            if self.trail is not None and self.trail[0] <= length:
                start, conv, recurrent = self.trail
                restored = ({i: c[length - start] for i, c in conv.items()},
                            {i: r[length - start] for i, r in recurrent.items()})
            for i in self.deltanet_layers:  # copied, not swapped: the snapshot can be restored again
                self.conv[i][:] = restored[0][i] if restored else 0
                self.recurrent[i][:] = restored[1][i] if restored else 0
        if self.saved is not None and length < self.saved[0]:
            self.saved = None  # its keys and values before self.saved[0] will be overwritten
        self.length, self.trail = length, None
        return length

    def keep_states(self):
        """Until the next rewind, remember the DeltaNet state after every new position (a few MB each),
        so that rewind can return to any of them: speculative decoding's verify pass, whose rejected
        drafts must leave the state as if never seen. Attention-only models rewind without it."""
        if self.deltanet_layers:
            self.trail = (self.length, {i: [c.copy()] for i, c in self.conv.items()},
                          {i: [r.copy()] for i, r in self.recurrent.items()})

    def snapshot(self):
        """Remember the linear-attention state at the current length, so that a later sequence sharing
        only this prefix (a chat's next turn, whose template re-renders the last reply) can rewind here
        rather than prefill from 0; a new snapshot replaces it. Attention-only models rewind without one."""
        if self.deltanet_layers:
            self.saved = (self.length, {i: c.copy() for i, c in self.conv.items()},
                          {i: r.copy() for i, r in self.recurrent.items()})

    def store(self, layer: int, start: int, k: np.ndarray, v: np.ndarray):
        """k, v: (T, n_kv_heads, head_dim) float32 of positions start..start+T-1."""
        if self.dtype == FP16 and max(np.abs(k).max(), np.abs(v).max()) > np.finfo(np.float16).max:
            self._allocate(self.capacity, FP32)
        t = k.shape[0]
        self.k[layer][:, start:start + t] = from_float32(k, self.dtype).transpose(1, 0, 2)
        self.v[layer][:, start:start + t] = from_float32(v, self.dtype).transpose(1, 0, 2)


class Workspace:
    """Every activation buffer of a forward pass, allocated once for `rows` tokens: those the config's
    switches use, and Qwen3-Next's fused projection outputs when the weights are stored fused."""

    def __init__(self, config: Config, rows: int, fused_deltanet: bool = False):
        d, hd = config.hidden_size, config.head_dim
        q_dim, kv_dim = config.num_attention_heads * hd, config.num_key_value_heads * hd

        def new(*shape):
            return np.zeros(shape, np.float32)

        self.rows = rows
        self.x, self.h, self.out = new(rows, d), new(rows, d), new(rows, d)
        self.q, self.k, self.v, self.attn = (new(rows, q_dim), new(rows, kv_dim), new(rows, kv_dim),
                                             new(rows, q_dim))
        # Flat, viewed as (T, F) by each SwiGLU MLP: dense, shared-expert and MoE widths differ.
        f = max(config.intermediate_size, config.shared_expert_intermediate_size)
        self.gate, self.up = new(rows * f), new(rows * f)
        if config.num_experts:
            k = config.num_experts_per_tok
            self.router_logits = new(rows, config.num_experts)
            self.route_weights, self.route_experts = new(rows, k), np.zeros((rows, k), np.int64)
            self.expert_hidden = new(k, config.moe_intermediate_size)
        if config.num_experts and config.shared_expert_intermediate_size:
            self.shared, self.shared_gate = new(rows, d), new(rows, 1)
        if config.family.output_gate:
            self.q_and_gate = new(rows, 2 * q_dim)
        if config.deltanet_layers:
            hv, dv = config.linear_num_value_heads, config.linear_value_head_dim
            channels, value_dim = config.deltanet_conv_channels, config.deltanet_value_dim
            self.qkv, self.conv_out, self.z = new(rows, channels), new(rows, channels), new(rows, value_dim)
            self.b, self.a, self.g, self.beta = new(rows, hv), new(rows, hv), new(rows, hv), new(rows, hv)
            self.core = new(rows, hv, dv)
            if fused_deltanet:  # in_proj_qkvz / in_proj_ba's outputs, before they are reordered
                self.qkvz, self.ba = new(rows, channels + value_dim), new(rows, 2 * hv)


class Segment:
    """One sequence's share of a forward pass: its cache, and the rows of the workspace that hold its
    n new tokens, at positions start, start + 1, ..., start + n - 1."""

    def __init__(self, cache: Cache, first_row: int, n: int, start: int):
        self.cache, self.rows, self.n, self.start = cache, slice(first_row, first_row + n), n, start


class Decoder:
    """The network over its weights (see the module docstring); knows nothing of tokenizers or sampling."""

    def __init__(self, config: Config, weights: Weights, prefill_chunk: int = PREFILL_CHUNK):
        self.config, self.weights = config, weights
        self.rope, self.scale = RotaryTables(config), np.float32(config.head_dim ** -0.5)
        self.windows = config.windows
        self.ws = Workspace(config, prefill_chunk, weights.fused_deltanet)
        self.last_logits = np.zeros((0, config.vocab_size), np.float32)  # reused: grown to the largest batch
        self.hidden = self.ws.x[:0]  # the last pass's final normed states (see forward)

    def __call__(self, cache: Cache, tokens: np.ndarray, every_token: bool = False) -> np.ndarray:
        """Run one sequence's tokens (int64) at positions cache.length.., in chunks of at most
        prefill_chunk; returns the logits after the last token (vocab,), or after every one (T, vocab), in
        an array of the caller's own (forward's are reused by the next call)."""
        chunk = self.ws.rows
        logits = [self.forward([(cache, tokens[s:s + chunk])], every_token)
                  for s in range(0, len(tokens), chunk)]
        return np.concatenate(logits) if every_token else logits[-1][0].copy()

    def forward(self, batch: list[tuple[Cache, np.ndarray]], every_token: bool | list[bool] = False,
                inputs: np.ndarray | None = None) -> np.ndarray:
        """One pass of the network over several sequences' new tokens at once, each at its own positions:
        a prefill chunk, or one token each when decoding a batch (each weight is then read once for all).
        Returns the logits after each sequence's last token (len(batch), vocab), a view valid until the
        next call; with every_token, after every token (total tokens, vocab), in an array of their own;
        with a list of flags (speculative verify passes), after every token of the flagged sequences and
        the last of the others, in order (a view). `inputs` (total tokens, hidden) enter the first layer
        instead of the embeddings (the MTP head's). `hidden` keeps the final normed states (a view)."""
        segments, row = [], 0
        for cache, tokens in batch:
            cache.reserve(cache.length + len(tokens))
            segments.append(Segment(cache, row, len(tokens), cache.length))
            row += len(tokens)
        assert 0 < row <= self.ws.rows, "the caller splits batches into workspace-sized chunks"
        ws, cfg, T = self.ws, self.config, row
        x, h, out = ws.x[:T], ws.h[:T], ws.out[:T]
        if inputs is None:
            embed(x, self.weights.embed_tokens, np.concatenate([tokens for _, tokens in batch]))
        else:
            x[:] = inputs
        rotation = [self.rope.cos_sin(s.start, s.n) for s in segments]
        cos, sin = (np.concatenate(tables) for tables in zip(*rotation))
        for i, layer in enumerate(self.weights.layers):
            rmsnorm(h, x, layer.input_layernorm, cfg.rms_norm_eps)
            if cfg.layer_types[i] == "linear_attention":
                self.gated_deltanet(out, h, layer.linear_attn, segments, i)
            else:
                self.self_attention(out, h, layer.self_attn, segments, i, cos, sin)
            x += out
            rmsnorm(h, x, layer.post_attention_layernorm, cfg.rms_norm_eps)
            if cfg.is_sparse(i):
                self.sparse_moe(out, h, layer.mlp)
            else:
                self.mlp(out, h, layer.mlp)
            x += out
        for s in segments:
            s.cache.length = s.start + s.n
        rmsnorm(x, x, self.weights.norm, cfg.rms_norm_eps)
        self.hidden = x
        if every_token is True:
            rows, logits = x, np.empty((T, cfg.vocab_size), np.float32)
        else:  # the head runs only on the rows asked for
            flags = every_token or [False] * len(segments)
            rows = x[[r for s, every in zip(segments, flags)
                      for r in range(s.rows.stop - (s.n if every else 1), s.rows.stop)]]
            if len(self.last_logits) < len(rows):
                self.last_logits = np.zeros((len(rows), cfg.vocab_size), np.float32)
            logits = self.last_logits[:len(rows)]
        linear(logits, rows, self.weights.lm_head)
        return logits

    def self_attention(self, out, h, w: AttentionWeights, segments: list[Segment], i: int, cos, sin):
        cfg, T = self.config, h.shape[0]
        hd, n_q, n_kv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        q, k, v, attn = self.ws.q[:T], self.ws.k[:T], self.ws.v[:T], self.ws.attn[:T]
        if cfg.family.output_gate:  # q_proj yields [q_h, gate_h] per head; the gate scales the output later
            q_and_gate = self.ws.q_and_gate[:T]
            project(q_and_gate, h, w.q_proj, w.q_bias)
            q.reshape(T, n_q, hd)[:] = q_and_gate.reshape(T, n_q, 2 * hd)[:, :, :hd]
        else:
            project(q, h, w.q_proj, w.q_bias)
        project(k, h, w.k_proj, w.k_bias)
        project(v, h, w.v_proj, w.v_bias)
        q3, k3, v3, attn3 = (q.reshape(T, n_q, hd), k.reshape(T, n_kv, hd), v.reshape(T, n_kv, hd),
                             attn.reshape(T, n_q, hd))
        if cfg.family.qk_norm:  # RMSNorm of each head before rotating it
            rmsnorm(q.reshape(T * n_q, hd), q.reshape(T * n_q, hd), w.q_norm, cfg.rms_norm_eps)
            rmsnorm(k.reshape(T * n_kv, hd), k.reshape(T * n_kv, hd), w.k_norm, cfg.rms_norm_eps)
        apply_rope(q3, cos, sin)
        apply_rope(k3, cos, sin)
        for s in segments:
            s.cache.store(i, s.start, k3[s.rows], v3[s.rows])
            few = s.n < FEW_QUERIES or s.n * (s.start + s.n) <= FEW_SCORES
            kernel = attention_decode if few else attention_prefill
            kernel(attn3[s.rows], q3[s.rows], s.cache.k[i], s.cache.v[i], s.start, self.windows[i],
                   self.scale)
        if cfg.family.output_gate:  # attn * sigmoid(gate)
            sigmoid_gate(attn3, attn3, q_and_gate.reshape(T, n_q, 2 * hd)[:, :, hd:])
        project(out, attn, w.o_proj, w.o_bias)

    def gated_deltanet(self, out, h, w: DeltaNetWeights, segments: list[Segment], i: int):
        """Gated DeltaNet (Yang et al. 2024), per value head with state S (Dk x Dv):
            q, k, v = silu(causal_conv(W_qkv h));  q, k = q / |q|, k / |k|
            g = -exp(A_log) softplus(W_a h + dt_bias);  beta = sigmoid(W_b h)
            S <- exp(g) S;  S <- S + beta k (v - S^T k)^T;  o = S^T q / sqrt(Dk)
            out = W_out (RMSNorm(o) * w * silu(W_z h))"""
        cfg, ws, T = self.config, self.ws, h.shape[0]
        hk, hv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        dk, dv, key_dim = cfg.linear_key_head_dim, cfg.linear_value_head_dim, cfg.deltanet_key_dim
        qkv, z, b, a = ws.qkv[:T], ws.z[:T], ws.b[:T], ws.a[:T]
        if w.in_proj_qkvz is not None:  # stored fused (Qwen3-Next): one product, then reorder its outputs
            qkvz, ba = ws.qkvz[:T], ws.ba[:T]
            linear(qkvz, h, w.in_proj_qkvz)
            linear(ba, h, w.in_proj_ba)
            qkv[:], z[:] = np.split(qkvz[:, w.qkvz_order], [qkv.shape[1]], axis=1)
            b[:], a[:] = np.split(ba[:, w.ba_order], 2, axis=1)
        else:
            linear(qkv, h, w.in_proj_qkv)
            linear(z, h, w.in_proj_z)
            linear(b, h, w.in_proj_b)
            linear(a, h, w.in_proj_a)
        conv = ws.conv_out[:T]
        for s in segments:  # each sequence's convolution continues from its own last inputs
            if s.cache.trail is not None:  # the last kernel-1 inputs after each of its new positions
                inputs, width = np.concatenate([s.cache.conv[i], qkv[s.rows]]), len(s.cache.conv[i])
                s.cache.trail[1][i] += [inputs[t + 1:t + 1 + width] for t in range(s.n)]
            causal_conv1d(conv[s.rows], s.cache.conv[i], qkv[s.rows], w.conv1d)
        q, k = conv[:, :key_dim].reshape(T, hk, dk), conv[:, key_dim:2 * key_dim].reshape(T, hk, dk)
        v = conv[:, 2 * key_dim:].reshape(T, hv, dv)
        l2norm(q, q, L2NORM_EPS)
        l2norm(k, k, L2NORM_EPS)
        g, beta, core = ws.g[:T], ws.beta[:T], ws.core[:T]
        delta_rule_gates(g, beta, a, b, w.A_log, w.dt_bias)
        tiled = cfg.linear_value_head_order == "tiled"  # value heads as the weights store them
        for s in segments:  # token by token, also in prefill: see kernels/deltanet.py
            state = s.cache.recurrent[i]
            # the state after each position, when kept: one call per token, each followed by a copy
            steps = [slice(t, t + 1) for t in range(s.rows.start, s.rows.stop)] if s.cache.trail else [s.rows]
            for r in steps:
                gated_delta_rule_recurrent(core[r], state, q[r], k[r], v[r], g[r], beta[r], tiled)
                if s.cache.trail is not None:
                    s.cache.trail[2][i].append(state.copy())
        gated_rmsnorm(core, core, w.norm, z.reshape(T, hv, dv), cfg.rms_norm_eps)
        linear(out, core.reshape(T, hv * dv), w.out_proj)

    def mlp(self, out, h, w: MLPWeights):
        T, f = h.shape[0], w.gate_proj.shape[0]
        gate, up = self.ws.gate[:T * f].reshape(T, f), self.ws.up[:T * f].reshape(T, f)
        linear(gate, h, w.gate_proj)
        linear(up, h, w.up_proj)
        swiglu(gate, gate, up)
        linear(out, gate, w.down_proj)

    def sparse_moe(self, out, h, w: MoEWeights):
        """out = sum_{e in the token's top-k} weight_e * MLP_e(h)  (+ sigmoid(g . h) * shared MLP(h))."""
        cfg, ws, T = self.config, self.ws, h.shape[0]
        logits, weights, experts = ws.router_logits[:T], ws.route_weights[:T], ws.route_experts[:T]
        linear(logits, h, w.gate)
        route(weights, experts, logits, cfg.num_experts_per_tok, cfg.norm_topk_prob)
        if T * cfg.num_experts_per_tok <= cfg.num_experts:
            # Decode, or so few tokens that an expert rarely serves two: stream each token's chosen experts.
            for t in range(T):
                moe_one_token(out[t], ws.expert_hidden, h[t], w.gate_projs, w.up_projs, w.down_projs,
                              experts[t], weights[t])
        else:  # prefill: each chosen expert runs once, on all of its tokens, as matrix products
            moe_by_expert(out, h, w.gate_projs, w.up_projs, w.down_projs, experts, weights)
        if cfg.shared_expert_intermediate_size:
            shared, gate = ws.shared[:T], ws.shared_gate[:T]
            self.mlp(shared, h, w.shared_expert)
            linear(gate, h, w.shared_expert_gate)
            sigmoid_gate(shared.reshape(T, 1, -1), shared.reshape(T, 1, -1), gate.reshape(T, 1, 1))
            out += shared


def project(out: np.ndarray, x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None):
    """out = x W^T (+ b)."""
    linear(out, x, weight)
    if bias is not None:
        out += bias


class Sequence:
    """One token sequence being extended: the decoder that runs it, its cache, and its tokens."""

    def __init__(self, decoder: Decoder, cache: Cache):
        self.decoder, self.cache = decoder, cache
        self.tokens: list[int] = []
        self.reused = 0  # tokens the last reset_to found already cached (its reusable prefix)

    def check(self, tokens, start: int, room: int = 0):
        """The one validation point: `tokens` are ids inside the vocabulary that, placed at positions
        start.., leave `room` more positions in the context window (else TokenError, ContextLengthError)."""
        if len(tokens) == 0:
            raise TokenError("no tokens given: a sequence needs at least one token")
        ids = np.asarray(tokens)
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise TokenError("token ids must be a flat sequence of integers")
        vocab = self.decoder.config.vocab_size
        bad = ids[(ids < 0) | (ids >= vocab)]
        if bad.size:
            raise TokenError(f"token id {int(bad[0])} is outside the vocabulary [0, {vocab})")
        if start + len(tokens) + room > self.cache.context_length:
            more = f" + {room} new tokens" if room else ""
            raise ContextLengthError(f"{start + len(tokens)} tokens{more} do not fit the context window of "
                                     f"{self.cache.context_length}")

    def extend(self, tokens, every_token: bool = False) -> np.ndarray:
        """Append tokens; returns the logits after the last one (vocab,), or after each (T, vocab)."""
        self.check(tokens, start=len(self.tokens))
        logits = self.decoder(self.cache, np.asarray(tokens, dtype=np.int64), every_token)
        self.tokens.extend(int(t) for t in tokens)
        return logits

    def reset_to(self, tokens, room: int = 0) -> np.ndarray:
        """Make the sequence equal `tokens` (with `room` positions to spare after them), keeping its reusable
        prefix: a chat's history is not prefilled again. Returns the logits after the last token."""
        self.check(tokens, start=0, room=room)
        return self.extend(tokens[self.rewind_to_reusable_prefix(tokens):])

    def reusable_prefix(self, tokens) -> int:
        """How many leading `tokens` the cache could keep: their common prefix, as far as Cache.reusable."""
        return self.cache.reusable(self.common_prefix(tokens))

    def rewind_to_reusable_prefix(self, tokens) -> int:
        """Forget what follows the reusable prefix of `tokens`; returns its length, also kept in `reused`."""
        reused = self.cache.rewind(self.common_prefix(tokens))
        self.tokens, self.reused = self.tokens[:reused], reused
        return reused

    def truncate(self, length: int):
        """Forget the tokens from `length` on: any of them for attention layers, and for DeltaNet layers
        those since cache.keep_states() (a rejected speculative draft)."""
        kept = self.cache.rewind(length)
        assert kept == length, "a hybrid model's cache rewinds only as far as its kept states"
        del self.tokens[length:]

    @staticmethod
    def extend_together(batch: list[tuple[Sequence, list[int]]], every_token: list[bool] | None = None
                        ) -> np.ndarray:
        """Several sequences' new tokens (checked, and within the workspace's rows together) in one
        Decoder.forward, each weight read once for all; returns its logits (see forward)."""
        logits = batch[0][0].decoder.forward([(s.cache, np.asarray(t, np.int64)) for s, t in batch],
                                             every_token)
        for sequence, tokens in batch:
            sequence.tokens.extend(int(t) for t in tokens)
        return logits

    def common_prefix(self, tokens) -> int:
        """How many leading tokens are already cached (at most len(tokens) - 1: one must run for logits)."""
        same = [a == b for a, b in zip(self.tokens, tokens)] + [False]
        return min(same.index(False), len(tokens) - 1)  # up to the first token that differs
