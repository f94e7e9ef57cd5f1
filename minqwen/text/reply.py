"""Generated tokens -> text, the one place: `StopStrings` decodes them and ends the text before a stop
string; `Reply` splits what a Qwen chat model writes, as the OpenAI API returns it, into
`reasoning_content`, `content` and `tool_calls` while the tokens arrive. The server, the CLI and
Model.generate's stop strings all read tokens through a Reply.

The markers are single tokens in every Qwen vocabulary (ids differ between vocabularies, so they are
looked up by name) and are not "special", so decoding keeps them as text. Splitting on their ids is
exact, and text that merely spells "<think>" (in code, say) stays text:

    <think> ... </think>           reasoning. Qwen3 writes <think> itself; the Qwen3.5/3.6 templates
                                   open it in the prompt, so the model only writes </think>: whether a
                                   reply starts in reasoning is read from the prompt's last marker.
    <tool_call> ... </tool_call>   one call, in one of two forms:
        {"name": NAME, "arguments": {...}}                       Qwen2.5, Qwen3 (vLLM's "hermes")
        <function=NAME>\n<parameter=P>\nvalue\n</parameter>...</function>
                                   Qwen3.5/3.6, Qwen3-Coder (vLLM's "qwen3_coder"): values are text,
                                   typed by the tool's JSON schema (a number, a list, ...)

A <tool_call> inside reasoning ends the reasoning (Qwen3.5 sometimes calls before closing </think>). A
call that does not parse is returned as content, tags and all, rather than lost (a required or named
call, and any call once <tool_call> opens it, is held to the tools' schemas by the constraint:
text/constraints.py, tool_call_grammar). Newlines next to a marker are layout (the templates strip them
when they render a reply back into a prompt): dropped.
Stop strings apply to all the text (StopStrings); no stop string spans a marker.
"""
from __future__ import annotations

import ast
import json
import math
import re
import uuid
from dataclasses import dataclass, field

REASONING, CONTENT, CALL = "reasoning", "content", "call"
THINKING_CUT_SHORT = ("Considering the limited time by the user, I have to give the solution based on the "
                      "thinking directly now.")
STRING_TYPES = ("string", "str", "text", "varchar", "char", "enum")


@dataclass
class Delta:
    """What one token (or the end) added to the reply."""

    reasoning: str = ""
    content: str = ""
    tool_calls: list[dict] = field(default_factory=list)  # {"id", "type": "function", "function": {...}}

    def __bool__(self):
        return bool(self.reasoning or self.content or self.tool_calls)


@dataclass
class Markers:
    think: int | None = None
    end_think: int | None = None
    tool_call: int | None = None
    end_tool_call: int | None = None

    @classmethod
    def of(cls, tokenizer) -> Markers:
        names = ("<think>", "</think>", "<tool_call>", "</tool_call>")
        return cls(*(tokenizer.token_to_id(name) for name in names))


class StopStrings:
    """Generated tokens -> the text to show: `push(token)` returns the new text that can no longer be part
    of a stop string (a tail that could still grow into one is held back); once one appears, `found` is
    set and only the text before it is returned. With no stop strings, a plain streaming decoder."""

    def __init__(self, strings: list[str], decoder):
        self.strings, self.decoder = strings, decoder
        self.held = ""  # the end of the text, shown once it cannot begin a stop string
        self.found: str | None = None

    def push(self, token: int) -> str:
        return self._release(self.decoder.push(token), final=False)

    def flush(self) -> str:
        """Everything held back (at the end of the text, or at a boundary no stop string may cross)."""
        return self._release(self.decoder.flush(), final=True)

    def _release(self, piece: str, final: bool) -> str:
        if self.found is not None:
            return ""
        text, self.held = self.held + piece, ""
        hits = [(text.find(s), s) for s in self.strings if s in text]
        if hits:
            start, self.found = min(hits)
            return text[:start]
        if not final:
            keep = max((n for s in self.strings for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
            text, self.held = text[:len(text) - keep], text[len(text) - keep:]
        return text


class Reply:
    """Generated token ids -> Deltas. `push(token)` for each token, `finish()` once at the end; `stopped`
    says a stop string was found (the generation must end). `chat=False` (a prompt without the chat
    template: the completions endpoint, `generate --no-chat`, Model.generate's stop strings) returns all
    the text as content, markers and newlines included."""

    def __init__(self, tokenizer, prompt: list[int], stop: list[str], tools: list[dict] | None = None,
                 chat: bool = True, reasoning_budget: int = -1):
        self.tokenizer = tokenizer
        self.text = StopStrings(stop, tokenizer.stream_decoder(skip_special_tokens=True))
        self.markers = Markers.of(tokenizer) if chat else Markers()
        self.chat, self.tools = chat, tools  # tools: the request's; None: <tool_call> is only text
        m = self.markers
        opened = _last_index(prompt, m.think) > _last_index(prompt, m.end_think) and m.end_think is not None
        self.state = REASONING if opened else CONTENT
        self.lead = opened  # at the start of a segment: its leading newlines are layout
        self.trail = ""  # newlines at the end of the segment so far: layout if a marker follows
        self.call: list[str] = []  # text of the open tool call
        self.reasoning_tokens = 0  # generated inside <think> ... </think>, the closing tag included
        self.reasoning_budget = reasoning_budget  # thinking tokens before the end is forced; -1: no limit
        self.tool_calls: list[dict] = []

    def forced(self) -> list[int]:
        """Tokens that must come next, once: the end of thinking once the thinking budget is spent
        (forced_end_of_thinking)."""
        if self.state == REASONING and 0 <= self.reasoning_budget <= self.reasoning_tokens:
            self.reasoning_budget = -1
            return self.forced_end_of_thinking()
        return []

    def forced_end_of_thinking(self) -> list[int]:
        """Qwen's recommended end of thinking cut short by a budget (its thinking-budget guide): a blank
        line, "Considering the limited time by the user, I have to give the solution based on the thinking
        directly now.", then </think> on a line of its own, as the templates render reasoning. With nothing
        thought yet (a budget of 0) there is nothing to base the answer on: only the newline and </think>
        of an empty block. What follows </think> is the model's (or the constraint's): a JSON answer may
        not start with the template's blank line."""
        closing = (f"\n\n{THINKING_CUT_SHORT}\n" if self.reasoning_tokens else "\n")
        return self.tokenizer.encode(closing) + [self.markers.end_think]

    @property
    def stopped(self) -> bool:
        return self.text.found is not None

    def push(self, token: int) -> Delta:
        delta, m, state = Delta(), self.markers, self.state
        if state == REASONING:
            self.reasoning_tokens += 1
        if token == m.end_think and state == REASONING:
            self._end_segment(delta, CONTENT)
        elif token == m.think and state == CONTENT:
            self._end_segment(delta, REASONING)
        elif token in (m.think, m.end_think) and state != CALL:
            pass  # a stray repeat of the marker of the state we are in
        elif token == m.tool_call and state != CALL and self.tools:
            self._end_segment(delta, CALL)
        elif token == m.end_tool_call and state == CALL:
            self._end_segment(delta, CONTENT)
            self._close_call(delta, "</tool_call>")
        else:
            self._add(self.text.push(token), delta)
        return delta

    def finish(self) -> Delta:
        """The held-back text, and a call left open (cut by max_tokens or a stop string)."""
        delta = Delta()
        self._add(self.text.flush(), delta)
        if self.state == CALL:
            self._close_call(delta, "")
        else:
            self._put(self.trail, delta)
        self.trail = ""
        return delta

    def _end_segment(self, delta: Delta, state: str):
        self._add(self.text.flush(), delta)
        self.state, self.lead, self.trail = state, True, ""

    def _add(self, piece: str, delta: Delta):
        if self.state == CALL:
            self.call.append(piece)
            return
        if not self.chat:
            self._put(piece, delta)
            return
        if self.lead:
            piece = piece.lstrip("\n")
            self.lead = not piece
        text = self.trail + piece
        body = text.rstrip("\n")
        self.trail = text[len(body):]
        self._put(body, delta)

    def _put(self, text: str, delta: Delta):
        if self.state == REASONING:
            delta.reasoning += text
        else:
            delta.content += text

    def _close_call(self, delta: Delta, closing_tag: str):
        body, self.call, self.state = "".join(self.call), [], CONTENT
        call = parse_tool_call(body, self.tools or [])
        if call is None:
            delta.content += f"<tool_call>{body}{closing_tag}"
            return
        call = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": call}
        self.tool_calls.append(call)
        delta.tool_calls.append(call)


def _last_index(ids: list[int], token: int | None) -> int:
    if token is None:
        return -1
    return next((i for i in range(len(ids) - 1, -1, -1) if ids[i] == token), -1)


# ---- one call's text -> {"name": ..., "arguments": JSON text}

FUNCTION = re.compile(r"<function=([^>\n]*)>")
# A parameter ends at a </parameter> followed by another parameter, </function> or the end, so a value
# (code, say) may itself contain "</parameter>"; vLLM's qwen3_coder parser has the same rule.
PARAMETER = re.compile(r"<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>\s*(?=<parameter=|</function>|$)", re.S)
BAD_NAME = re.compile(r"[\s{}<>\"']")


def parse_tool_call(body: str, tools: list[dict]) -> dict | None:
    """{"name", "arguments"} of one call's text (either form), or None if it does not parse."""
    body = body.strip()
    if body.startswith("<function="):
        return _xml_call(body, tools)
    try:
        call = json.loads(body)
    except ValueError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or BAD_NAME.search(call["name"]):
        return None
    arguments = call.get("arguments", call.get("parameters", {}))
    if isinstance(arguments, str):  # already JSON text: keep it if it is JSON
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    return {"name": call["name"], "arguments": json.dumps(arguments, ensure_ascii=False)}


def _xml_call(body: str, tools: list[dict]) -> dict | None:
    name = FUNCTION.match(body)
    if name is None or not name.group(1) or BAD_NAME.search(name.group(1)):
        return None
    schema = next((t["function"].get("parameters") or {} for t in tools
                   if isinstance(t.get("function"), dict) and t["function"].get("name") == name.group(1)), {})
    properties = schema.get("properties") or {}
    arguments = {p: typed(value, properties.get(p)) for p, value in PARAMETER.findall(body, name.end())}
    return {"name": name.group(1), "arguments": json.dumps(arguments, ensure_ascii=False, default=str)}


def value_types(schema: dict) -> tuple[list[str], str]:
    """The types a parameter's schema names (its "type", or its anyOf options'), lower case, and the
    one its text is read as: the first that is not null, else string."""
    types = schema.get("type") or [option.get("type") for option in schema.get("anyOf", [])
                                   if isinstance(option, dict)]
    types = [str(t).lower() for t in ([types] if isinstance(types, str) else types) if t]
    return types, next((t for t in types if t != "null"), "string")


def typed(value: str, schema: dict | None):
    """A parameter's text as the JSON type of its schema (vLLM's qwen3_coder rules): a string for a
    parameter the schema does not list, or a string type; null, integer, number, boolean as they say;
    objects, arrays and anything else as JSON, else a Python literal, else the text itself."""
    if not isinstance(schema, dict):
        return value
    types, kind = value_types(schema)
    if value.strip().lower() in ("null", "none") and ("null" in types or kind not in STRING_TYPES):
        return None
    if kind in STRING_TYPES:
        return value
    try:
        if kind.startswith(("int", "uint", "long", "short", "unsigned")):
            return int(value)
        if kind.startswith(("num", "float")):
            number = float(value)
            return value if not math.isfinite(number) else int(number) if number.is_integer() else number
    except ValueError:
        return value
    if kind in ("boolean", "bool", "binary"):
        return value.strip().lower() == "true"
    try:
        return json.loads(value)
    except ValueError:
        pass
    try:
        return ast.literal_eval(value)
    except Exception:  # literal_eval raises several kinds (and RecursionError on deep nesting)
        return value
