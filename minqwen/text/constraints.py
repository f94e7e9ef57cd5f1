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
    tool_call_grammar       the OpenAI API's tools -> a Lark grammar of the calls they allow, in the form
                            the chat template teaches (hermes JSON, or Qwen3.5's and Qwen3-Coder's XML)

Tool calls: "required" or a named function makes the answer calls only; "auto" leaves the text free
until the model writes the <tool_call> token (a marker token, which no text can spell), then holds the
call to the tool's schema. A <tool_call> inside the thinking ends it, as Reply reads it.

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
from .reply import Markers, _last_index, value_types
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


def llg_tokenizer(tokenizer, vocab_size: int, end_ids) -> tuple[llguidance.LLTokenizer, np.ndarray]:
    """llguidance's view of `tokenizer` (its tokenizers backend as tokenizer.json text: the same for a
    folder's and for a GGUF's vocabulary), `vocab_size` ids wide, ending at `end_ids`; and the ids of a
    GGUF's "[PAD<id>]" fillers. Built once per Tokenizer object (about a second for Qwen's 151k tokens)."""
    key = (vocab_size, tuple(sorted(set(end_ids))))
    with _llg_lock:
        built = _llg_tokenizers.setdefault(tokenizer, {})
        if key not in built:
            llg = llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size,
                                         eos_token=list(key[1]) or None)
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


# ---- tool calls: the calls a request's tools allow, in the form the chat template teaches

ANNOTATIONS = {"description", "title", "default", "examples", "deprecated", "readOnly", "writeOnly",
               "$comment"}
# What an XML call can enforce: its parameters one by one (the JSON form leaves the schema to llguidance)
PARAMETERS_KEYWORDS = ANNOTATIONS | {"type", "properties", "required", "additionalProperties", "$defs",
                                     "definitions", "$schema", "$id"}
TEXT_KEYWORDS = ANNOTATIONS | {"type", "enum", "const", "pattern", "minLength", "maxLength", "anyOf"}
JSON_TYPES = {"string", "integer", "number", "boolean", "object", "array", "null"}
# A <parameter=P> value is text up to "\n</parameter>", and may not contain "</parameter>": Reply ends it at
# the first one that a parameter or </function> follows.
NOT_CLOSING = r"~/(?s:.*)<\/parameter>(?s:.*)/"


def xml_calls(tokenizer) -> bool:
    """Whether the chat template teaches Qwen3.5/3.6's and Qwen3-Coder's XML calls, else hermes JSON."""
    return "<function=" in (tokenizer.chat_template or "")


def tool_call_grammar(tools: list[dict], call: str | None, parallel: bool, markers: Markers, xml: bool,
                      answer: str | None = None) -> str:
    """llguidance's grammar for an answer with tool calls, each `<tool_call>`, a newline, one call of the
    form the template teaches, a newline, `</tool_call>` (the markers are tokens: text cannot spell them):

        {"name": "NAME", "arguments": {...}}               hermes: the arguments as `parameters` says
        <function=NAME>\n<parameter=P>\nVALUE\n</parameter>\n...</function>
                                                            XML: each value typed as Reply reads it back

    `call` None ("auto"): the answer is text (`answer`, llguidance's grammar of a response_format, if one
    is given), or text and then calls; "" ("required"): calls only; a function's name: calls of it only.
    Calls follow each other on new lines (the templates' layout) if `parallel`, else there is one. Raises
    ConstraintError naming a tool whose parameters an XML call cannot hold to its schema."""
    functions = [t["function"] for t in tools if call in (None, "", t["function"]["name"])]
    rules = []
    for i, function in enumerate(functions):
        name, parameters = function["name"], function.get("parameters")
        if parameters is None:  # OpenAI: a function without parameters takes none
            parameters = {"type": "object", "properties": {}, "additionalProperties": False}
        if not isinstance(parameters, dict):
            raise ConstraintError(f"{name}: parameters must be a JSON schema object")
        if xml:
            rules += _xml_function(f"f{i}", name, parameters)
        else:
            opening = '{"name": ' + json.dumps(name) + ', "arguments": '
            rules.append(f'f{i}: {json.dumps(opening)} {_json_value(parameters, parameters)} "}}"')
    one_call = f'<[{markers.tool_call}]> "\\n" ({" | ".join(f"f{i}" for i in range(len(functions)))}) ' \
               f'"\\n" <[{markers.end_tool_call}]>'
    calls = 'call ("\\n" call)*' if parallel else "call"
    start = ("LEAD? calls" if call is not None else "@answer | LEAD? calls" if answer is not None
             else "TEXT | TEXT? calls")
    lark = "\n".join(["%llguidance {}", f"start: {start}", f"calls: {calls}", f"call: {one_call}",
                       r"LEAD: /\n{1,2}/", r"TEXT: /(?s:.+)/", *rules])
    if answer is None or call is not None:
        return lark
    answer_grammar = (json.loads(answer)["grammars"][0] if answer.lstrip().startswith("{")
                      else {"lark_grammar": answer})
    return json.dumps({"grammars": [{"name": "tool_calls", "lark_grammar": lark},
                                    {**answer_grammar, "name": "answer"}]})


def _json_value(schema: dict, parameters: dict) -> str:
    """`schema` inlined as llguidance's %json, in JSON_LAYOUT, with the definitions its $refs point to."""
    schema = {**{k: parameters[k] for k in ("$defs", "definitions") if k in parameters}, **schema}
    return "%json " + json.dumps({**schema, "x-guidance": schema.get("x-guidance", JSON_LAYOUT)})


def _xml_function(rule: str, name: str, parameters: dict) -> list[str]:
    """Lark rules for one function's XML call: its properties in the schema's order, the required ones
    present, each value what Reply's `typed` reads back as valid: a string type's raw text, the other
    types' JSON (a number's, true or false, null, an object's or array's)."""
    unknown = set(parameters) - PARAMETERS_KEYWORDS
    if unknown or parameters.get("type", "object") != "object":
        what = f"keywords {', '.join(sorted(unknown))}" if unknown else f"type {parameters.get('type')!r}"
        raise ConstraintError(f"{name}: parameters with {what} cannot be enforced in its XML calls")
    properties, required = parameters.get("properties") or {}, parameters.get("required") or []
    names = [*properties, *(p for p in required if p not in properties)]
    rules, parts = [], []
    for j, parameter in enumerate(names):
        where = f"{name}: parameter {parameter!r}"
        schema = properties.get(parameter, {})
        if not isinstance(schema, dict) or "\n" in parameter or ">" in parameter:
            raise ConstraintError(f"{where} cannot be written in an XML call")
        opening = json.dumps(f"<parameter={parameter}>\n")
        closing = json.dumps("\n</parameter>\n")
        types, kind = value_types(schema)
        if not set(types) <= JSON_TYPES:
            raise ConstraintError(f"{where}: type {schema.get('type')!r} is not a JSON schema type")
        if kind == "string":  # the text itself: a terminal, to the closing tag
            rules.append(f"{rule.upper()}_{j}: ({_text_value(schema, types, where)}) {closing}")
            rules.append(f"{rule}_{j}: {opening} {rule.upper()}_{j}")
        else:
            readable = {kind, "null"} | ({"integer"} if kind == "number" else set())
            if kind in ("integer", "number", "boolean") and not set(types) <= readable:
                raise ConstraintError(f"{where}: a {kind} value cannot also be of type "
                                      f"{', '.join(sorted(set(types) - readable))} (it is read as a {kind})")
            # JSON, or as the templates render Python's True, False and None (`value | string`)
            value = ('"true" | "false" | "True" | "False"' if kind == "boolean" and set(schema) <= ANNOTATIONS
                     | {"type"} else _json_value(schema, parameters))
            none = ' | "None"' if "null" in types else ""
            rules.append(f"{rule}_{j}: {opening} ({value}{none}) {closing}")
        parts.append(f"{rule}_{j}" + ("" if parameter in required else "?"))
    function = json.dumps(f"<function={name}>\n")
    return [f"{rule}: {function} {' '.join(parts)} \"</function>\"", *rules]


def _text_value(schema: dict, types: list[str], where: str) -> str:
    """A Lark terminal for a string parameter's text: its enum or const, else its pattern and lengths,
    never "</parameter>"; and "null" if the schema allows null (Reply reads that text as null)."""
    options = schema.get("anyOf")
    if options is not None:  # anyOf its types: the text must be one of its string options
        if set(schema) - ANNOTATIONS - {"anyOf"} or not all(isinstance(o, dict) and o.get("type")
                                                            for o in options):
            raise ConstraintError(f"{where}: an anyOf read as text needs a type in every option, and "
                                  "nothing beside it")
        texts = [_text_value(o, value_types(o)[0], where) for o in options
                 if value_types(o)[1] == "string" and "null" not in value_types(o)[0]]
        return " | ".join([*texts, *(['"null"', '"None"'] if "null" in types else [])])
    unknown = set(schema) - TEXT_KEYWORDS
    if unknown:
        raise ConstraintError(f"{where}: {', '.join(sorted(unknown))} cannot be enforced on a value read "
                              "as text" + ("" if types else ' (it has no "type")'))
    alternatives = ['"null"', '"None"'] if "null" in types else []
    if types == ["null"]:
        return " | ".join(alternatives)
    fixed = schema["enum"] if "enum" in schema else [schema["const"]] if "const" in schema else None
    if fixed is not None:
        if not isinstance(fixed, list) or not all(isinstance(v, str) or v is None for v in fixed):
            raise ConstraintError(f"{where}: an enum or const read as text must list strings")
        texts = [json.dumps(v, ensure_ascii=False) for v in fixed
                 if v is not None and "</parameter>" not in v]
        return " | ".join(texts + alternatives) or "/[^\\s\\S]/"
    low, high = schema.get("minLength", 0), schema.get("maxLength", "")
    text = f"/(?s:.){{{low},{high}}}/ & {NOT_CLOSING}"
    if "pattern" in schema:  # JSON schema patterns search: anchored where they say so
        pattern = schema["pattern"]
        start = pattern[1:] if pattern.startswith("^") else "(?s:.*)" + pattern
        start = start[:-1] if start.endswith("$") and not start.endswith("\\$") else start + "(?s:.*)"
        text += " & /" + start.replace("/", "\\/") + "/"
    return " | ".join([f"({text})", *alternatives])


class Constraint:
    """One request's constraint, compiled against a tokenizer: `start(prompt)` for each sequence.
    Raises ConstraintError when it does not compile, or names a feature llguidance would not enforce
    (its warnings are errors here: nothing is silently left unconstrained)."""

    def __init__(self, tokenizer, vocab_size: int, end_ids, json_schema=None, regex: str | None = None,
                 grammar: str | None = None, chat: bool = True, tools: list[dict] | None = None,
                 call: str | None = None, parallel: bool = True):
        """Tools (the OpenAI API's, with a chat template whose markers are tokens) constrain the calls:
        `call`, `parallel` and the answer beside them (json_schema, regex or grammar) as in
        tool_call_grammar."""
        self.markers = Markers.of(tokenizer) if chat else Markers()
        self.turn_start = tokenizer.token_to_id("<|im_start|>") if chat else None
        # the blank line a model writes after </think> (one token in Qwen's vocabularies)
        self.blank = [ids[0] for ids in map(tokenizer.encode, ("\n", "\n\n")) if len(ids) == 1]
        self.tools, self.what, answer = bool(tools), "tools", None
        if (json_schema, regex, grammar) != (None, None, None) or not tools:
            self.what, answer = grammar_of(json_schema, regex, grammar)
        self.end_ids = tuple(sorted(set(end_ids)))
        self.vocab_size = vocab_size
        llg, self.padded = llg_tokenizer(tokenizer, vocab_size, self.end_ids)
        if tools:
            if self.markers.tool_call is None or self.markers.end_tool_call is None:
                raise ConstraintError("tools: this vocabulary has no <tool_call> tokens to call with")
            xml = xml_calls(tokenizer)
            try:
                text = tool_call_grammar(tools, call, parallel, self.markers, xml, answer)
            except ConstraintError as e:
                raise ConstraintError(f"tools: {e}") from None
        else:
            text = answer
        self.matcher = llguidance.LLMatcher(llg, text, log_level=0)
        problems = _problems(self.matcher)
        if problems and tools:  # name the tool: its calls alone do not compile
            for tool in tools:
                name = tool["function"]["name"]
                alone = tool_call_grammar([tool], name, False, self.markers, xml)
                problems = _problems(llguidance.LLMatcher(llg, alone, log_level=0))
                if problems:
                    problems, self.what = [f"{name}: {problems[0]}"], "tools"
                    break
            else:  # not one tool's calls: the answer's constraint, or the calls together
                problems = _problems(self.matcher)
        if problems:
            raise ConstraintError(f"{self.what}: {one_line('; '.join(problems))}")

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


def _problems(matcher: llguidance.LLMatcher) -> list[str]:
    """Why a grammar did not compile, or the features llguidance would not enforce in it."""
    return [matcher.get_error()] if matcher.is_error() else matcher.get_grammar_warnings()


class ConstrainedSequence:
    """One sequence's walk through the constraint: `mask(logits)` before each choice, `consume(token)`
    after it (forced tokens too)."""

    def __init__(self, constraint: Constraint, prompt: list[int]):
        self.matcher = constraint.matcher.deep_copy()
        self.end_ids, self.padded = constraint.end_ids, constraint.padded
        self.bitmask = llguidance.numpy.allocate_token_bitmask(1, constraint.vocab_size)
        self.think, self.end_think = constraint.markers.think, constraint.markers.end_think
        # A call ends the thinking, as Reply reads it (Qwen3.5 sometimes calls before </think>)
        self.call = constraint.markers.tool_call if constraint.tools else None
        self.blank, self.after_think = constraint.blank, False
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
        if self.after_think:  # the model's own layout, which the answer's constraint need not allow
            allowed[self.blank] = True
        np.copyto(logits, MASKED, where=~allowed)

    def consume(self, token: int):
        """Move past `token`: thinking tokens pass by the constraint, the others must be ones it allows."""
        may_think, self.may_think = self.may_think, False
        after_think, self.after_think = self.after_think, False
        if self.thinking and token == self.call:
            self.thinking = False
        if self.thinking:
            self.thinking = token != self.end_think
            self.after_think = not self.thinking
        elif after_think and token in self.blank:
            pass  # Reply drops it too: newlines next to a marker are layout
        elif may_think and token == self.think:
            self.thinking = True
        elif token not in self.end_ids and not self.matcher.consume_token(token):
            raise ConstraintError(f"token {token} breaks the constraint: "
                                  f"{one_line(self.matcher.get_error())}")
