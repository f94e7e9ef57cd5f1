"""Autoregressive generation: penalties, sampling, stop conditions, timing.

    logits = model(tokens)                        # prefill the prompt, then one token at a time
    logits = penalties(logits, tokens seen)      # repetition (CTRL), presence (OpenAI)
    next   = sample(logits / T, top-k, top-p, min-p, coin)   # coin ~ U[0,1) from the seeded generator

Generation stops after an end-of-turn token (returned, as transformers does), after a stop string
appears in the decoded text (the token completing it is returned), or after max_new_tokens.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from .errors import SamplingError
from .kernels.sampling import apply_penalties, sample


@dataclass
class GenerationOptions:
    """How to choose each token and when to stop, as `Model.generate(..., **options)` takes them."""

    temperature: float | None = 0.0  # 0 or None = greedy
    top_k: int | None = None  # None or 0 = off
    top_p: float | None = None  # None or 1 = off
    min_p: float | None = None  # None or 0 = off
    repetition_penalty: float | None = None  # None or 1 = off
    presence_penalty: float | None = None  # None or 0 = off
    seed: int | None = None
    stop: list[str] | str | None = None  # stop strings, matched on the decoded text

    def __post_init__(self):
        def number(name, value, ok, rule):
            if value is None:
                return
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not ok(value):
                raise SamplingError(f"{name} must be {rule}, got {value!r}")

        number("temperature", self.temperature, lambda v: v >= 0, "a number >= 0")
        number("top_k", self.top_k, lambda v: v >= 0 and int(v) == v, "an integer >= 0")
        number("top_p", self.top_p, lambda v: 0 < v <= 1, "in (0, 1]")
        number("min_p", self.min_p, lambda v: 0 <= v <= 1, "in [0, 1]")
        number("repetition_penalty", self.repetition_penalty, lambda v: v > 0, "a number > 0")
        number("presence_penalty", self.presence_penalty, lambda v: True, "a finite number")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or self.seed < 0):
            raise SamplingError(f"seed must be an integer >= 0, got {self.seed!r}")
        self.stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise SamplingError("stop strings must be non-empty strings")
        if self.temperature is None:
            self.temperature = 0.0


def options_with_defaults(given: dict, generation_config: dict) -> GenerationOptions:
    """Options given as None take generation_config.json's values, as transformers does: sampling only
    if it says do_sample (then at its temperature, default 1), and its top_k / top_p / min_p /
    repetition_penalty."""
    options = dict(given)
    for name in ("top_k", "top_p", "min_p", "repetition_penalty"):
        if options.get(name) is None:
            options[name] = generation_config.get(name)
    if options.get("temperature") is None:
        options["temperature"] = (generation_config.get("temperature", 1.0)
                                  if generation_config.get("do_sample") else 0.0)
    return GenerationOptions(**options)


@dataclass
class Stats:
    prompt_tokens: int = 0
    prefill_seconds: float = 0.0
    generated_tokens: int = 0
    decode_seconds: float = 0.0
    cached_tokens: int = 0  # prompt tokens whose keys/values were already in the cache

    def line(self) -> str:
        prefilled = self.prompt_tokens - self.cached_tokens
        prefill = prefilled / self.prefill_seconds if self.prefill_seconds else 0.0
        # The first generated token comes from the prefill's logits; decode time covers the rest.
        decode = (self.generated_tokens - 1) / self.decode_seconds if self.decode_seconds else 0.0
        cached = f" ({self.cached_tokens} cached)" if self.cached_tokens else ""
        return (f"prompt: {self.prompt_tokens} tokens{cached}, prefill {prefill:.1f} tok/s | "
                f"generated: {self.generated_tokens} tokens, decode {decode:.1f} tok/s")


@dataclass
class StopStrings:
    """Finds stop strings in the decoded text, across token boundaries."""

    strings: list[str]
    decoder: object
    text: str = field(default="")

    def hit(self, token: int) -> bool:
        piece = self.decoder.push(token)
        if not piece:
            return False
        longest = max(len(s) for s in self.strings)
        window = self.text[-(longest - 1):] + piece if longest > 1 else piece
        self.text = (self.text + piece)[-longest:]
        return any(s in window for s in self.strings)


def stream_tokens(sequence, prompt: list[int], max_new_tokens: int, options: GenerationOptions,
                  eos_ids: list[int], tokenizer=None, stats: Stats | None = None):
    """A generator of new token ids. The arguments are checked here, at the call; the prompt's ids are
    checked by the sequence (Sequence.check) when the generator starts."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise SamplingError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if options.stop and tokenizer is None:
        raise SamplingError("stop strings need the checkpoint's tokenizer")
    stop = (StopStrings(options.stop, tokenizer.stream_decoder(skip_special_tokens=False))
            if options.stop else None)
    return _generate(sequence, prompt, max_new_tokens, options, set(eos_ids), stop, stats or Stats())


def _generate(sequence, prompt, max_new_tokens, options: GenerationOptions, eos: set[int], stop,
              stats: Stats):
    if max_new_tokens == 0:
        return
    vocab = sequence.decoder.config.vocab_size
    rng = np.random.default_rng(options.seed)
    probs, order = np.empty(vocab, np.float32), np.empty(vocab, np.int64)
    penalize = (options.repetition_penalty not in (None, 1.0)) or bool(options.presence_penalty)
    stats.prompt_tokens = len(prompt)
    started = time.perf_counter()
    logits = sequence.reset_to(prompt, room=max_new_tokens)
    stats.cached_tokens = sequence.reused
    stats.prefill_seconds = time.perf_counter() - started
    seen = np.zeros(vocab, dtype=bool)
    seen[np.asarray(prompt)] = True
    seen_ids = np.flatnonzero(seen)
    started = time.perf_counter()
    for n in range(max_new_tokens):
        if penalize:
            apply_penalties(logits, seen_ids, options.repetition_penalty or 1.0,
                            options.presence_penalty or 0.0)
        token = int(sample(probs, order, logits, options.temperature, options.top_k or 0,
                           1.0 if options.top_p is None else options.top_p, options.min_p or 0.0,
                           rng.random()))
        stats.generated_tokens = n + 1
        stats.decode_seconds = time.perf_counter() - started
        yield token
        if token in eos or (stop and stop.hit(token)) or n + 1 == max_new_tokens:
            return
        if not seen[token]:
            seen[token] = True
            seen_ids = np.append(seen_ids, token)
        logits = sequence.extend([token])
