"""Autoregressive generation: penalties, sampling, stop conditions, timing.

    logits = model(tokens)                        # prefill the prompt, then one token at a time
    logits = mask(logits)                         # structured output: what a JSON schema, regex or
                                                  # grammar does not allow next is out (constraints.py)
    logits = penalties(logits, tokens so far)     # repetition (CTRL; prompt + output), frequency and
                                                  # presence (OpenAI; output only)
    next   = sample(logits / T, top-k, top-p, min-p, coin)   # coin ~ U[0,1) from the seeded generator

`Sampler` is one sequence's side of that loop, a step at a time (stream_tokens drives one; the server's
engine many): its own generator, penalty counts, and its end — an end-of-turn token (returned, as
transformers does) or max_new_tokens. Stop strings are text: the Reply (text/reply.py) that turns the
tokens into text says when one appears, and the token completing it is the last returned.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from ..errors import SamplingError
from ..kernels.sampling import apply_penalties, sample
from .constraints import Constraint
from .reply import Reply
from .speculative import DRAFT_TOKENS, DraftLength, settle


@dataclass
class GenerationOptions:
    """How to choose each token and when to stop, as `Model.generate(..., **options)` takes them."""

    temperature: float | None = 0.0  # 0 or None = greedy
    top_k: int | None = None  # None or 0 = off
    top_p: float | None = None  # None or 1 = off
    min_p: float | None = None  # None or 0 = off
    repetition_penalty: float | None = None  # None or 1 = off
    frequency_penalty: float | None = None  # None or 0 = off
    presence_penalty: float | None = None  # None or 0 = off
    seed: int | None = None
    stop: list[str] | str | None = None  # stop strings, matched on the decoded text
    # Structured output, at most one (text/constraints.py): a JSON schema (a dict or JSON text;
    # {"type": "object"} for any JSON object), a regular expression, a grammar (Lark or GBNF); compiled
    # against the tokenizer by Constraint.of.
    json_schema: dict | str | None = None
    regex: str | None = None
    grammar: str | None = None
    # Thinking tokens before the end of thinking is forced (Reply.forced_end_of_thinking): -1 (or None) no
    # limit, 0 none. The prompt is read as a chat prompt, whose markers say where thinking is.
    reasoning_budget: int | None = -1

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
        number("frequency_penalty", self.frequency_penalty, lambda v: True, "a finite number")
        number("presence_penalty", self.presence_penalty, lambda v: True, "a finite number")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or self.seed < 0):
            raise SamplingError(f"seed must be an integer >= 0, got {self.seed!r}")
        self.stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise SamplingError("stop strings must be non-empty strings")
        if self.temperature is None:
            self.temperature = 0.0
        if self.reasoning_budget is None:
            self.reasoning_budget = -1
        number("reasoning_budget", self.reasoning_budget, lambda v: v >= -1 and int(v) == v,
               "an integer >= -1 (-1: no limit)")
        self.reasoning_budget = int(self.reasoning_budget)


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
    drafted: int = 0  # speculative decoding: tokens drafted, and of them accepted
    accepted: int = 0

    def line(self) -> str:
        prefilled = self.prompt_tokens - self.cached_tokens
        prefill = prefilled / self.prefill_seconds if self.prefill_seconds else 0.0
        # The first generated token comes from the prefill's logits; decode time covers the rest.
        decode = (self.generated_tokens - 1) / self.decode_seconds if self.decode_seconds else 0.0
        cached = f" ({self.cached_tokens} cached)" if self.cached_tokens else ""
        rate = f"{self.accepted / self.drafted:.0%}" if self.drafted else ""
        drafts = f" | drafts: {self.accepted} of {self.drafted} accepted ({rate})" if self.drafted else ""
        return (f"prompt: {self.prompt_tokens} tokens{cached}, prefill {prefill:.1f} tok/s | "
                f"generated: {self.generated_tokens} tokens, decode {decode:.1f} tok/s{drafts}")


class Sampler:
    """One sequence's choice of tokens, one step at a time: `next(logits)` masks what a constraint does not
    allow (text/constraints.py), penalises, samples and counts; `finish_reason` becomes "stop" (an
    end-of-turn token; the caller sets it for a stop string) or "length" (max_new_tokens)."""

    def __init__(self, options: GenerationOptions, prompt, vocab_size: int, max_new_tokens: int,
                 eos_ids, constraint: Constraint | None = None):
        self.options, self.max_new_tokens, self.eos = options, max_new_tokens, set(eos_ids)
        self.rng = np.random.default_rng(options.seed)
        self.probs, self.order = np.empty(vocab_size, np.float32), np.empty(vocab_size, np.int64)
        self.penalize = (options.repetition_penalty not in (None, 1.0) or bool(options.frequency_penalty)
                         or bool(options.presence_penalty))
        self.counts = np.zeros(vocab_size, np.int32)  # generated tokens, per id (frequency, presence)
        self.seen = np.zeros(vocab_size, dtype=bool)  # prompt and generated ids (repetition)
        self.seen[np.asarray(prompt, dtype=np.int64)] = True
        self.seen_ids = np.flatnonzero(self.seen)
        self.generated = 0
        self.forced: list[int] = []  # tokens to take next instead of sampling (Reply.forced)
        self.finish_reason: str | None = None
        self.constrained = constraint.start(list(prompt)) if constraint is not None else None

    def next(self, logits: np.ndarray) -> int:
        """The next token after `logits` (vocab,) float32, which the mask and the penalties change in
        place."""
        o = self.options
        if self.forced:
            token = self.forced.pop(0)
        else:
            if self.constrained is not None:
                self.constrained.mask(logits)
            if self.penalize:
                apply_penalties(logits, self.seen_ids, self.counts, o.repetition_penalty or 1.0,
                                o.frequency_penalty or 0.0, o.presence_penalty or 0.0)
            token = int(sample(self.probs, self.order, logits, o.temperature, o.top_k or 0,
                               1.0 if o.top_p is None else o.top_p, o.min_p or 0.0, self.rng.random()))
        if self.constrained is not None:
            self.constrained.consume(token)
        self.generated += 1
        self.counts[token] += 1
        if not self.seen[token]:
            self.seen[token] = True
            self.seen_ids = np.append(self.seen_ids, token)
        if token in self.eos:
            self.finish_reason = "stop"
        elif self.generated >= self.max_new_tokens:
            self.finish_reason = "length"
        return token


def stream_tokens(sequence, prompt: list[int], max_new_tokens: int, options: GenerationOptions,
                  eos_ids: list[int], reply: Reply | None = None, stats: Stats | None = None,
                  drafter=None, most_drafts: int = DRAFT_TOKENS, constraint: Constraint | None = None):
    """A generator of (new token id, what it added to `reply`: a Delta, or None without a reply). The reply
    reads each token before it is yielded, and a stop string it finds ends the generation: stop strings
    are matched on its text, so `options.stop` needs a reply made with them, and the tokens the reply
    needs next are taken before sampling (Reply.forced: the end of thinking past `options.reasoning_budget`,
    which needs a reply made with it). The arguments are checked
    here, at the call; the prompt's ids are checked by the sequence (Sequence.check) when the generator
    starts. With a drafter (text/speculative.py), decoding is speculative, drafting at most `most_drafts`
    tokens a round: the same tokens, in fewer passes. A constraint (text/constraints.py, built from
    `options`' json_schema / regex / grammar) limits the tokens chosen; drafts are verified under it."""
    if isinstance(most_drafts, bool) or not isinstance(most_drafts, int) or most_drafts < 1:
        raise SamplingError(f"the most tokens to draft must be an integer >= 1, got {most_drafts!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise SamplingError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if options.stop and reply is None:
        raise SamplingError("stop strings need the checkpoint's tokenizer")
    if options.reasoning_budget >= 0 and reply is None:
        raise SamplingError("a reasoning budget needs the checkpoint's tokenizer")
    if constraint is None and (options.json_schema, options.regex, options.grammar) != (None, None, None):
        raise SamplingError("json_schema, regex and grammar need their compiled Constraint (Constraint.of)")
    return _generate(sequence, prompt, max_new_tokens, options, eos_ids, reply, stats or Stats(), drafter,
                     most_drafts, constraint)


def _generate(sequence, prompt, max_new_tokens, options: GenerationOptions, eos_ids, reply: Reply | None,
              stats: Stats, drafter, most_drafts: int, constraint: Constraint | None):
    """The decode loop, speculative when given a drafter (text/speculative.py): each round runs the last
    chosen token and its drafts in one pass, and chooses a token after each of them in turn until one
    differs from its draft."""
    if max_new_tokens == 0:
        return
    stats.prompt_tokens = len(prompt)
    started = time.perf_counter()
    sequence.check(prompt, 0, room=max_new_tokens)
    stats.cached_tokens = reused = sequence.rewind_to_reusable_prefix(prompt)
    chunk = sequence.decoder.ws.rows
    for start in range(reused, len(prompt), chunk):
        rows = sequence.extend(prompt[start:start + chunk])[None]
        if drafter is not None:
            drafter.observe(start, sequence.decoder.hidden)
    stats.prefill_seconds = time.perf_counter() - started
    sampler = Sampler(options, prompt, sequence.decoder.config.vocab_size, max_new_tokens, eos_ids,
                      constraint)
    length = DraftLength(most_drafts)
    drafts, hidden = [], None
    started = time.perf_counter()
    while True:
        accepted = 0
        for j, logits in enumerate(rows):  # rows[j]: after the last token and the first j drafts
            if reply is not None:  # tokens the reply needs next: the end of thinking past its budget
                sampler.forced += reply.forced()
            token = sampler.next(logits)
            delta = reply.push(token) if reply is not None else None
            if reply is not None and reply.stopped:
                sampler.finish_reason = "stop"
            stats.generated_tokens = sampler.generated
            stats.decode_seconds = time.perf_counter() - started
            yield token, delta
            if sampler.finish_reason is not None:
                return
            if j == len(drafts) or token != drafts[j]:
                break
            accepted += 1
        if drafts:
            settle(sequence, length, stats, len(drafts), accepted, start)
        if drafter is not None and hidden is not None:  # the prefill's states were observed as they came
            drafter.observe(start, hidden[:accepted + 1])
        start = len(sequence.tokens)
        room = max_new_tokens - sampler.generated - 1  # tokens a round may add after this one
        drafts = drafter.draft([*sequence.tokens, token], min(length.next(), room)) if drafter else []
        if drafts:
            sequence.cache.keep_states()
            rows = sequence.extend([token, *drafts], every_token=True)
        else:
            rows = sequence.extend([token])[None]
        hidden = sequence.decoder.hidden
