"""Structured outputs: only the tokens a JSON schema, a regular expression or a grammar allows next.

    allowed = matcher's mask                      # llguidance: one bit per token id, tens of µs
    logits[not allowed] = MASKED                  # before the penalties and the sampling
    token = sample(logits);  matcher.consume(token)

llguidance (the engine vLLM, SGLang and llama.cpp use) does the work: it compiles the constraint against
the tokenizer's vocabulary and walks it token by token. This file builds what it needs from minqwen's
Tokenizer, refuses what does not compile or what it cannot enforce (a ConstraintError naming the
problem: never unconstrained output), and keeps the thinking out of the constraint:

    Constraint              one request's compiled constraint; `start(prompt)` -> one sequence's
    ConstrainedSequence     mask(logits) before a token is chosen, consume(token) after

The vocabulary is the LM head's: Qwen pads it past the tokenizer's last id, and no padded id is allowed
(llguidance knows no text for them; a GGUF's converter names them "[PAD<id>]", and they are blocked by
name). Every end-of-turn id ends a document, and only a complete one.

Thinking (Qwen3, Qwen3.5/3.6 chat templates): the constraint applies to the answer, after </think>. A
prompt that opens <think> (Qwen3.5's template) leaves the model thinking until it writes </think>; one
whose generation prompt already closed it (enable_thinking false) is constrained from the first token;
one with neither (Qwen3 thinking on: the model writes <think> itself) allows <think> as the first token
besides what the constraint allows.
"""
from __future__ import annotations

import json
import threading
import weakref

import llguidance
import llguidance.numpy
import numpy as np

from ..errors import ConstraintError, quoted
from .reply import Markers, _last_index
from .tokenizer import one_line

# Far below any logit, and finite: the sampling kernel assumes finite logits (fastmath), and exp() of
# (MASKED - max) / temperature is 0 for any temperature above 1e-18.
MASKED = np.float32(-1e20)

# JSON the way json.dumps writes it: ", " and ": ", no other whitespace. llguidance's default allows any
# whitespace between tokens, and a model can then write newlines forever. A schema's own "x-guidance"
# overrides these.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

# Tokenizer -> {(vocab_size, end ids): (LLTokenizer, padded ids)}
_llg_tokenizers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_llg_lock = threading.Lock()


def llg_tokenizer(tokenizer, vocab_size: int, end_ids: tuple[int, ...]) -> tuple[llguidance.LLTokenizer,
                                                                                   np.ndarray]:
    """llguidance's view of `tokenizer` (its tokenizers backend as tokenizer.json text: the same for a
    folder's and for a GGUF's vocabulary), `vocab_size` ids wide, ending at `end_ids`; and the ids of a
    GGUF's "[PAD<id>]" fillers. Built once per Tokenizer object (about a second for Qwen's 151k tokens)."""
    key = (vocab_size, end_ids)
    with _llg_lock:
        built = _llg_tokenizers.setdefault(tokenizer, {})
        if key not in built:
            llg = llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size,
                                         eos_token=list(end_ids) or None)
            padded = [i for piece, i in tokenizer.backend.get_vocab().items() if piece == f"[PAD{i}]"]
            built[key] = llg, np.array(sorted(padded), dtype=np.int64)
        return built[key]


def grammar_of(json_schema=None, regex: str | None = None, grammar: str | None = None) -> tuple[str, str]:
    """(what was given, llguidance's grammar text) for exactly one of: a JSON schema (a dict, or JSON
    text), a regular expression (Rust regex syntax, matched whole), a grammar (Lark, or GBNF as llama.cpp
    writes it; told apart by content)."""
    given = [(name, value) for name, value in
             (("json_schema", json_schema), ("regex", regex), ("grammar", grammar)) if value is not None]
    if len(given) != 1:
        raise ConstraintError(f"give one of json_schema, regex, grammar, not {len(given)}")
    name, value = given[0]
    if name == "json_schema":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as e:
                raise ConstraintError(f"json_schema is not JSON ({e})") from None
        if not isinstance(value, dict):
            raise ConstraintError(f"json_schema must be a JSON object, got {quoted(value)}")
        return name, llguidance.LLMatcher.grammar_from_json_schema(value, defaults=JSON_LAYOUT)
    if not isinstance(value, str) or not value:
        raise ConstraintError(f"{name} must be a non-empty string, got {quoted(value)}")
    if name == "regex":
        return name, llguidance.LLMatcher.grammar_from_regex(value)
    try:
        return name, llguidance.grammar_from("grammar", value)  # GBNF -> Lark; Lark as it is
    except ValueError as e:
        raise ConstraintError(f"grammar: {one_line(e)}") from None


def choice_grammar(choices) -> str:
    """A Lark grammar for exactly one of `choices` (vLLM's structured_outputs.choice)."""
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
        raise ConstraintError(f"choice must be a non-empty list of non-empty strings, got {quoted(choices)}")
    return "start: " + " | ".join(json.dumps(c) for c in choices)


class Constraint:
    """One request's constraint, compiled against a tokenizer: `start(prompt)` for each sequence.
    Raises ConstraintError when it does not compile, or names a feature llguidance would not enforce
    (its warnings are errors here: nothing is silently left unconstrained)."""

    def __init__(self, tokenizer, vocab_size: int, end_ids, json_schema=None, regex: str | None = None,
                 grammar: str | None = None, chat: bool = True):
        self.what, text = grammar_of(json_schema, regex, grammar)
        self.end_ids = tuple(sorted(set(end_ids)))
        self.vocab_size = vocab_size
        llg, self.padded = llg_tokenizer(tokenizer, vocab_size, self.end_ids)
        self.matcher = llguidance.LLMatcher(llg, text, log_level=0)
        problems = ([self.matcher.get_error()] if self.matcher.is_error()
                    else self.matcher.get_grammar_warnings())
        if problems:
            raise ConstraintError(f"{self.what}: {one_line('; '.join(problems))}")
        self.markers = Markers.of(tokenizer) if chat else Markers()
        self.turn_start = tokenizer.token_to_id("<|im_start|>") if chat else None

    @classmethod
    def of(cls, options, tokenizer, vocab_size: int, end_ids, chat: bool = True) -> Constraint | None:
        """The constraint GenerationOptions ask for (json_schema, regex or grammar), None if none."""
        if options.json_schema is None and options.regex is None and options.grammar is None:
            return None
        if tokenizer is None:
            raise ConstraintError("a constraint needs the checkpoint's tokenizer")
        return cls(tokenizer, vocab_size, end_ids, options.json_schema, options.regex, options.grammar, chat)

    def start(self, prompt: list[int]) -> ConstrainedSequence:
        return ConstrainedSequence(self, prompt)


class ConstrainedSequence:
    """One sequence's walk through the constraint: `mask(logits)` before each choice, `consume(token)`
    after it (forced tokens too)."""

    def __init__(self, constraint: Constraint, prompt: list[int]):
        self.matcher = constraint.matcher.deep_copy()
        self.end_ids, self.padded = constraint.end_ids, constraint.padded
        self.bitmask = llguidance.numpy.allocate_token_bitmask(1, constraint.vocab_size)
        self.think, self.end_think = constraint.markers.think, constraint.markers.end_think
        opened, closed = _last_index(prompt, self.think), _last_index(prompt, self.end_think)
        # As Reply reads it: the prompt leaves the model inside <think> ... (Qwen3.5's templates)
        self.thinking = self.end_think is not None and opened > closed
        # ... or the generation prompt (after the last <|im_start|>) closed it: no thinking; else the
        # model may open it with its first token.
        generation_prompt = _last_index(prompt, constraint.turn_start)
        self.may_think = (self.think is not None and self.end_think is not None and not self.thinking
                          and closed <= generation_prompt)

    def mask(self, logits: np.ndarray):
        """Set the logits of the tokens the constraint does not allow next to MASKED, in place (none while
        the model thinks)."""
        if self.thinking:
            return
        llguidance.numpy.fill_next_token_bitmask(self.matcher, self.bitmask)
        if self.matcher.is_error():
            raise ConstraintError(f"the constraint failed: {one_line(self.matcher.get_error())}")
        allowed = np.unpackbits(self.bitmask.view(np.uint8), count=len(logits), bitorder="little").view(bool)
        allowed[self.padded] = False
        if self.may_think:
            allowed[self.think] = True
        np.copyto(logits, MASKED, where=~allowed)

    def consume(self, token: int):
        """Move past `token`: thinking tokens pass by the constraint, the others must be ones it allows."""
        may_think, self.may_think = self.may_think, False
        if self.thinking:
            self.thinking = token != self.end_think
        elif may_think and token == self.think:
            self.thinking = True
        elif token not in self.end_ids and not self.matcher.consume_token(token):
            raise ConstraintError(f"token {token} breaks the constraint: "
                                  f"{one_line(self.matcher.get_error())}")
