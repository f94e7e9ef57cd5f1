"""The multi-token prediction head of Qwen3.5 / Qwen3-Next (`mtp.*`, weights.MtpWeights): a draft of the token
after next, for speculative decoding. Row i reads the model's final normed state h_i and the token t_{i+1}:

    x_i = fc [RMSNorm_e(embed(t_{i+1})) ; RMSNorm_h(h_i)]      (concatenated: embedding first)
    x = layer(x)                                                a full-attention decoder layer, own KV cache
    logits_i = lm_head(RMSNorm(x_i))                            a guess at t_{i+2}

As vLLM's qwen3_5_mtp.py / qwen3_next_mtp.py (order, norms, h after the final norm, output normed) and
v1/spec_decode/eagle.py (row i at position i; chained, the normed output returns with its draft a position on)
define it; llama.cpp's qwen35 graph_mtp puts row i at i + 1, which RoPE (distances only) cannot tell apart.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from ..errors import UnsupportedModelError
from ..kernels.dtypes import FP32
from ..kernels.embedding import embed
from ..kernels.linear import linear
from ..kernels.norm import rmsnorm
from .config import Config
from .decoder import PREFILL_CHUNK, Cache, Decoder
from .weights import Weights


class MtpHead:
    """Its layer run by a Decoder of its own: a config of one full-attention layer with the model's MLP kind,
    the head's final norm, the model's embeddings and LM head."""

    def __init__(self, config: Config, weights: Weights, prefill_chunk: int = PREFILL_CHUNK):
        self.weights, d = weights.mtp, config.hidden_size
        if len(self.weights.layers) != 1:  # vLLM runs deeper ones' layers one per draft step; none published
            raise UnsupportedModelError(f"an MTP head of {len(self.weights.layers)} layers: minqwen runs one")
        self.config = dataclasses.replace(config, num_hidden_layers=1, layer_types=["full_attention"],
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
