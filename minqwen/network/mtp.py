"""The multi-token prediction head of Qwen3.5 / Qwen3-Next (`mtp.*`, weights.MtpWeights): a draft of the token
after next, for speculative decoding. Row i reads the model's final normed state h_i and the token t_{i+1}:

    x_i = fc [RMSNorm_e(embed(t_{i+1})) ; RMSNorm_h(h_i)]      (concatenated: embedding first)
    x = layers(x)                                               full-attention decoder layers, own KV cache
    logits_i = lm_head(RMSNorm(x_i))                            a guess at t_{i+2}

As vLLM's qwen3_5_mtp.py / qwen3_next_mtp.py define it (concat order, norms, h after the model's final norm,
the output normed) and v1/spec_decode/eagle.py runs it (row i at the model's position i; chained, the head's
normed output returns with its draft one position on). llama.cpp's qwen35 graph_mtp agrees, but puts row i
at position i + 1: RoPE sees only distances, so the logits are the same.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from ..kernels.dtypes import FP32
from ..kernels.embedding import embed
from ..kernels.linear import linear
from ..kernels.norm import rmsnorm
from .config import Config
from .decoder import PREFILL_CHUNK, Cache, Decoder
from .weights import Weights


class MtpHead:
    """Its layers run by a Decoder of their own: a config of that many full-attention layers with the model's
    MLP kind, the head's final norm, the model's embeddings and LM head."""

    def __init__(self, config: Config, weights: Weights, prefill_chunk: int = PREFILL_CHUNK):
        self.weights, n, d = weights.mtp, len(weights.mtp.layers), config.hidden_size
        self.config = dataclasses.replace(config, num_hidden_layers=n, layer_types=["full_attention"] * n,
                                          mlp_only_layers=[], decoder_sparse_step=1)
        self.decoder = Decoder(self.config, dataclasses.replace(
            weights, layers=self.weights.layers, norm=self.weights.norm, mtp=None), prefill_chunk)
        self.joined = np.zeros((prefill_chunk, 2 * d), np.float32)  # [RMSNorm_e(e) | RMSNorm_h(h)] per row
        self.x = np.zeros((prefill_chunk, d), np.float32)  # the embeddings, then fc's output

    @property
    def hidden(self) -> np.ndarray:
        """The last pass's final normed states (a view, until the next pass): chained, the next row's h."""
        return self.decoder.hidden

    def cache(self, context_length: int, dtype=FP32) -> Cache:
        return Cache(self.config, context_length, dtype=dtype)

    def forward(self, batch: list[tuple[Cache, np.ndarray, np.ndarray]],
                every_token: bool | list[bool] = False) -> np.ndarray:
        """Several sequences' rows in one pass: each brings (its head cache, states h (n, hidden) of positions
        cache.length.., the token (n,) int64 after each). Returns Decoder.forward's logits for them."""
        w, eps, d = self.weights, self.config.rms_norm_eps, self.config.hidden_size
        tokens = np.concatenate([t for _, _, t in batch])
        x, joined = self.x[:len(tokens)], self.joined[:len(tokens)]
        embed(x, self.decoder.weights.embed_tokens, tokens)
        rmsnorm(joined[:, :d], x, w.pre_fc_norm_embedding, eps)
        # concatenated (copied) before the pass: chained, h is this head's own last states
        rmsnorm(joined[:, d:], np.concatenate([h for _, h, _ in batch]), w.pre_fc_norm_hidden, eps)
        linear(x, joined, w.fc)
        return self.decoder.forward([(cache, t) for cache, _, t in batch], every_token, inputs=x)

    def extend(self, cache: Cache, hidden: np.ndarray, next_tokens: np.ndarray,
               every_token: bool = False) -> np.ndarray:
        """One sequence's rows, in chunks the workspace holds: the logits after its last row (vocab,), or
        after each (n, vocab), in an array of the caller's own."""
        chunk = self.decoder.ws.rows
        logits = [self.forward([(cache, hidden[s:s + chunk], next_tokens[s:s + chunk])], every_token)
                  for s in range(0, len(next_tokens), chunk)]
        return np.concatenate(logits) if every_token else logits[-1][0].copy()
