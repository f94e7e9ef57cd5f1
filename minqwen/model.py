"""The model as users hold it: the decoder over its weights, with its tokenizer and generation defaults."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .network.config import Config
from .network.decoder import KV_CACHE_DTYPES, Cache, Decoder, Sequence
from .network.weights import Weights
from .text.generation import GenerationOptions, stream_tokens
from .text.reply import Reply


class Model:
    """A loaded Qwen checkpoint, as users see it: `logits`, `generate`, `stream`, `sequence`, `tokenizer`."""

    def __init__(self, config: Config, weights: Weights, tokenizer=None,
                 generation_config: dict | None = None, path: Path | None = None,
                 context_length: int | None = None, kv_cache: str = "fp32"):
        self.config, self.weights, self.tokenizer, self.path = config, weights, tokenizer, path
        self.generation_config = generation_config or {}
        self.context_length = context_length or config.context_window
        self.kv_dtype = KV_CACHE_DTYPES[kv_cache]  # see Cache
        self.decoder = Decoder(config, weights)

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.generation_config.get("eos_token_id", self.config.eos_token_id)
        return [eos] if isinstance(eos, int) else list(eos or [])

    def sequence(self) -> Sequence:
        return Sequence(self.decoder, Cache(self.config, self.context_length, dtype=self.kv_dtype))

    def logits(self, token_ids) -> np.ndarray:
        """Logits (len(token_ids), vocab) float32 of every position of a fresh sequence."""
        return self.sequence().extend(list(token_ids), every_token=True)

    def generate(self, token_ids, max_new_tokens: int, **options) -> list[int]:
        """The new tokens only, ending with the end-of-turn token or the one that completes a stop string
        if there is one; options are GenerationOptions' fields (temperature, top_k, ..., seed, stop)."""
        return list(self.stream(token_ids, max_new_tokens, **options))

    def stream(self, token_ids, max_new_tokens: int, **options):
        """Yield new token ids as they are produced (same options as `generate`)."""
        prompt, options = list(token_ids), GenerationOptions(**options)
        reply = None  # without a tokenizer, stream_tokens refuses stop strings
        if options.stop and self.tokenizer is not None:  # matched on all the text, markers included
            reply = Reply(self.tokenizer, prompt, options.stop, chat=False)
        steps = stream_tokens(self.sequence(), prompt, max_new_tokens, options, self.eos_token_ids, reply)
        return (token for token, _ in steps)
