"""The model as users hold it: the decoder over its weights, with its tokenizer and generation defaults."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import ConfigError
from .kernels.dtypes import FP16
from .network.config import Config
from .network.decoder import KV_CACHE_DTYPES, Cache, Decoder, Sequence
from .network.mtp import MtpHead
from .network.weights import Weights
from .text.constraints import Constraint
from .text.generation import GenerationOptions, stream_tokens
from .text.reply import Reply
from .text.speculative import DRAFT_TOKENS, MtpDrafter, NgramDrafter, SequenceDrafter


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
        self.mtp_head: MtpHead | None = None  # built on first use by drafter("mtp")
        self.draft_models: dict[str, Model] = {}  # drafter("model:PATH")'s, loaded once

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
        if there is one; options are GenerationOptions' fields (temperature, top_k, ..., seed, stop,
        json_schema / regex / grammar, reasoning_budget: see docs/generation.md)."""
        return list(self.stream(token_ids, max_new_tokens, **options))

    def stream(self, token_ids, max_new_tokens: int, speculative: str | None = None,
               speculative_tokens: int = DRAFT_TOKENS, **options):
        """Yield new token ids as they are produced (same options as `generate`). `speculative` ("ngram",
        "mtp", "model:PATH"; see `drafter`) drafts up to `speculative_tokens` tokens a step and verifies
        them in one pass: the same tokens, faster where the drafts are right."""
        prompt, options = list(token_ids), GenerationOptions(**options)
        reply = None  # without a tokenizer, stream_tokens refuses stop strings and a reasoning budget
        # Stop strings alone are matched on all the text, markers included; a reasoning budget reads the
        # prompt as a chat prompt, whose markers say where the thinking is (and stop strings skip them).
        thinking = options.reasoning_budget >= 0
        if (options.stop or thinking) and self.tokenizer is not None:
            reply = Reply(self.tokenizer, prompt, options.stop, chat=thinking,
                          reasoning_budget=options.reasoning_budget)
        constraint = Constraint.of(options, self.tokenizer, self.config.vocab_size, self.eos_token_ids)
        drafter = self.drafter(speculative) if speculative else None
        steps = stream_tokens(self.sequence(), prompt, max_new_tokens, options, self.eos_token_ids, reply,
                              drafter=drafter, most_drafts=speculative_tokens, constraint=constraint)
        return (token for token, _ in steps)

    def drafter(self, speculative: str):
        """A new drafter for one sequence (text/speculative.py): "ngram" (prompt lookup), "mtp" (the
        checkpoint's own multi-token-prediction head) or "model:PATH" (a smaller checkpoint with the same
        tokenizer, loaded once, with the same KV cache type). Raises ConfigError for anything else."""
        if speculative == "ngram":
            return NgramDrafter()
        if speculative == "mtp":
            if self.weights.mtp is None:
                raise ConfigError(f"{self.path or 'this checkpoint'} has no MTP head to draft with: "
                                  "use --speculative ngram or model:PATH")
            self.mtp_head = self.mtp_head or MtpHead(self.config, self.weights)
            return MtpDrafter(self.mtp_head, self.mtp_head.cache(self.context_length, self.kv_dtype))
        if isinstance(speculative, str) and speculative.startswith("model:"):
            path = speculative.removeprefix("model:")
            if path not in self.draft_models:
                from .loader import load  # the loader imports this module
                draft = load(path, kv_cache="fp16" if self.kv_dtype == FP16 else "fp32")
                if draft.tokenizer is None or self.tokenizer is None or \
                        draft.tokenizer.backend.get_vocab() != self.tokenizer.backend.get_vocab():
                    raise ConfigError(f"the draft model {path} does not share this model's tokenizer")
                self.draft_models[path] = draft
            return SequenceDrafter(self.draft_models[path].sequence(), self.config.vocab_size)
        raise ConfigError(f"speculative must be ngram, mtp or model:PATH, got {speculative!r}")
