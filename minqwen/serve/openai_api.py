"""The OpenAI API over the engine, with no HTTP in it (http_server.py carries it):

    Api                     the endpoints: each takes a request's JSON body (and path) and returns the
                            answer's, or, for a generation, the checked Request that Api.start hands to
                            the engine as a Job
        chat                messages -> the chat template -> the engine -> content, reasoning_content,
                            tool_calls (reply.py); structured outputs (request_constraint)
        completion          a raw prompt (text or token ids) -> text
        models, health, tokenize, detokenize
    chat_request, completion_request    a body -> Request: every field checked against the API's ranges
                            and the context window, a 400 naming the field otherwise
    Outcome                 what the engine sent back for one job, gathered
    Response                its OpenAI shapes: a whole body, or a stream's chunks
    ApiError                an error response: its status and OpenAI's envelope
                            {"error": {"message", "type", "param", "code"}}
"""
from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Callable

from ..errors import ConstraintError, ContextLengthError, MinqwenError, SamplingError
from ..model import Model
from ..text.constraints import Constraint, choice_grammar
from ..text.generation import GenerationOptions, Sampler, options_with_defaults
from ..text.reply import Reply
from .engine import Busy, End, Engine, Job, Stopped, Token

MAX_TOP_LOGPROBS = 20  # as the OpenAI API
MAX_STOP_STRINGS = 16
COMPLETION_MAX_TOKENS = 16  # the OpenAI API's default for /v1/completions
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
MESSAGE_FIELDS = ("name", "tool_call_id", "reasoning_content", "reasoning", "thinking")
RESERVED_TEMPLATE_NAMES = ("messages", "tools", "documents", "add_generation_prompt")
GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",  # vLLM's older names
          "guided_grammar": "grammar"}
THINKING_BUDGETS = ("thinking_budget_tokens", "thinking_token_budget")  # llama.cpp's name, vLLM's
ENGINE_STOPPED = "the engine stopped on an internal error (see the server's log): restart the server"


class ApiError(Exception):
    """An error response: its status and OpenAI's envelope."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        kind = "server_error" if self.status >= 500 else "invalid_request_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


# ---- request fields

def number(body: dict, name: str, low: float, high: float, open_low: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or not low <= value <= high or (open_low and value == low)):
        interval = f"{'(' if open_low else '['}{low:g}, {high:g}]"
        raise invalid(f"{name} must be a number in {interval}, got {value!r}", name)
    return float(value)


def integer(body: dict, name: str, low: int, high: float = math.inf) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise invalid(f"{name} must be an integer in [{low}, {high:g}], got {value!r}", name)
    return value


def flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise invalid(f"{name} must be true or false, got {value!r}", name)
    return value


def sampling_options(body: dict, generation_config: dict, reasoning_budget: int = -1) -> GenerationOptions:
    """The sampling fields in the OpenAI API's ranges; those not given from generation_config.json."""
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop
    if stops is not None and (not isinstance(stops, list) or len(stops) > MAX_STOP_STRINGS
                              or not all(isinstance(s, str) and s for s in stops)):
        raise invalid(f"stop must be a non-empty string or a list of up to {MAX_STOP_STRINGS}", "stop")
    top_k, seed = integer(body, "top_k", -1), integer(body, "seed", -1)
    given = dict(temperature=number(body, "temperature", 0, 2), top_p=number(body, "top_p", 0, 1, True),
                 top_k=0 if top_k == -1 else top_k,  # -1 and 0: off (vLLM's spellings)
                 min_p=number(body, "min_p", 0, 1),
                 repetition_penalty=number(body, "repetition_penalty", 0, math.inf, True),
                 frequency_penalty=number(body, "frequency_penalty", -2, 2),
                 presence_penalty=number(body, "presence_penalty", -2, 2),
                 seed=None if seed == -1 else seed,  # -1: a random seed (llama.cpp's spelling)
                 stop=stops, reasoning_budget=reasoning_budget)
    return options_with_defaults(given, generation_config)


def refuse_unsupported(body: dict):
    """Fields the API defines that minqwen does not implement: a 400 rather than a silent ignore."""
    if body.get("n") not in (None, 1):
        raise invalid("n must be 1: one choice per request", "n")
    if body.get("best_of") not in (None, 1):
        raise invalid("best_of must be 1", "best_of")
    if body.get("logit_bias"):
        raise invalid("logit_bias is not supported", "logit_bias")
    if body.get("stream_options") is not None and not body.get("stream"):
        raise invalid("stream_options needs stream: true", "stream_options")


def constraint_fields(body: dict) -> tuple[str, dict] | None:
    """(the field, Constraint's keyword arguments) of the one structured-output field the body gives, or
    None: OpenAI's response_format (json_object, json_schema), llama.cpp's json_schema and grammar (GBNF),
    vLLM's structured_outputs (json, regex, choice, grammar) and its older guided_json, guided_regex, ...
    (taken, not ignored: an ignored one would be unconstrained output)."""
    given = [name for name in ("response_format", "json_schema", "grammar", "structured_outputs", *GUIDED)
             if body.get(name) is not None]
    if len(given) > 1:
        raise invalid(f"give one of {' and '.join(given)}: they constrain the same output", given[1])
    if not given:
        return None
    name, value = given[0], body[given[0]]
    if name == "json_schema":
        return name, {"json_schema": value}
    if name == "grammar":
        return name, {"grammar": value}
    if name == "response_format":
        kind = value.get("type") if isinstance(value, dict) else None
        schema = value.get("json_schema") if isinstance(value, dict) else None
        if kind == "text":
            return None
        if kind == "json_object":
            return name, {"json_schema": {"type": "object"}}
        if kind == "json_schema" and isinstance(schema, dict) and isinstance(schema.get("schema"), dict):
            return name, {"json_schema": schema["schema"]}
        raise invalid('response_format must be {"type": "text"}, {"type": "json_object"} or {"type": '
                      '"json_schema", "json_schema": {"name": ..., "schema": {...}}}', name)
    kinds = ("json", "regex", "choice", "grammar")
    if name in GUIDED:
        value = {GUIDED[name]: value}
    if not isinstance(value, dict) or len(value) != 1 or next(iter(value)) not in kinds:
        raise invalid(f"structured_outputs must be an object with one of {', '.join(kinds)}", name)
    (kind, spec), = value.items()
    if kind == "choice":
        try:
            return name, {"grammar": choice_grammar(spec)}
        except ConstraintError as e:
            raise invalid(f"{name}: {e}", name) from None
    return name, {{"json": "json_schema"}.get(kind, kind): spec}


def request_constraint(body: dict, model: Model, chat: bool, tools: list[dict] | None = None,
                       require_call: str | None = None) -> Constraint | None:
    """The request's constraint, compiled (Constraint): its structured-output field, and its tools' calls
    (`require_call` as chat_tools gives it; with "auto", a text answer follows the structured-output field
    if there is one). A 400 naming the field (or the tool) if it does not compile or asks for what cannot
    be enforced."""
    field = constraint_fields(body)
    if tools and model.tokenizer.token_to_id("<tool_call>") is None:  # no call to constrain, nor to parse
        if require_call is not None:
            raise invalid("this model's vocabulary has no <tool_call> token: it cannot be made to call",
                          "tool_choice")
        tools = None
    if field is None and not tools:
        return None
    name, given = field or ("tools", {})
    for other in ("ignore_eos", "tool_choice") if field is not None else ():  # a call has no document
        if body.get(other) not in (None, False, "auto", "none"):
            raise invalid(f"{name} cannot be combined with {other} {body[other]!r}", name)
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise invalid(f"parallel_tool_calls must be true or false, got {parallel!r}", "parallel_tool_calls")
    try:
        return Constraint(model.tokenizer, model.config.vocab_size, model.eos_token_ids, chat=chat,
                          tools=tools, call=require_call, parallel=parallel, **given)
    except ConstraintError as e:
        if str(e).startswith("tools:"):
            raise invalid(str(e), "tools") from None
        raise invalid(f"{name}: {e}", name) from None


def text_content(content, where: str) -> str:
    """A message's content: a string, or OpenAI's text parts joined by newlines (as vLLM does)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "\n".join(p["text"] for p in content)
    raise invalid(f"{where}.content must be a string or a list of text parts (this model reads text only)",
                  f"{where}.content")


def template_tool_call(call, where: str) -> dict:
    """An assistant's earlier tool call, arguments as a dict: the API sends them as JSON text, and the
    Qwen3.5/3.6 templates iterate over them (`arguments|items`)."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise invalid(f"{where}.tool_calls entries must be {{type: function, function: {{name, arguments}}}}",
                      f"{where}.tool_calls")
    arguments = function.get("arguments") or {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            raise invalid(f"{where}.tool_calls: arguments must be JSON text", f"{where}.tool_calls") from None
    return {"id": call.get("id"), "type": "function", "function": {"name": function["name"],
                                                                   "arguments": arguments}}


def chat_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise invalid("messages must be a non-empty list", "messages")
    rendered = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise invalid(f"{where}.role must be one of {', '.join(ROLES)}", f"{where}.role")
        message = {"role": ROLES[m["role"]], "content": text_content(m.get("content"), where)}
        message.update((k, m[k]) for k in MESSAGE_FIELDS if m.get(k) is not None)
        if m.get("tool_calls"):
            if not isinstance(m["tool_calls"], list):
                raise invalid(f"{where}.tool_calls must be a list", f"{where}.tool_calls")
            message["tool_calls"] = [template_tool_call(c, where) for c in m["tool_calls"]]
        rendered.append(message)
    return rendered


def chat_tools(body: dict) -> tuple[list[dict] | None, str | None]:
    """The tools to offer the model (none with tool_choice "none": then it cannot call any), and the call
    it must make: "" for "required", a function's name for a named choice, None for "auto" (Reply)."""
    tools = body.get("tools")
    if tools is not None and (not isinstance(tools, list) or not tools or not all(
            isinstance(t, dict) and isinstance(t.get("function"), dict)
            and isinstance(t["function"].get("name"), str) for t in tools)):
        raise invalid("tools must be a non-empty list of {type: function, function: {name, parameters}}",
                      "tools")
    choice = body.get("tool_choice", "auto")
    if choice in ("auto", "none"):
        return (tools if choice == "auto" else None), None
    names = [t["function"]["name"] for t in tools or []]
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if choice == "required" and names:
        return tools, ""
    if name in names and choice.get("type") == "function":
        return tools, name
    raise invalid('tool_choice must be "auto", "none", "required" or {"type": "function", "function": '
                  '{"name": ...}} naming one of the tools', "tool_choice")


def template_kwargs(body: dict) -> dict:
    """chat_template_kwargs, plus the spellings of thinking on/off other servers take."""
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict) or any(k in kwargs for k in RESERVED_TEMPLATE_NAMES):
        raise invalid("chat_template_kwargs must be an object of template variables (not "
                      f"{', '.join(RESERVED_TEMPLATE_NAMES)})", "chat_template_kwargs")
    kwargs = dict(kwargs)
    if "enable_thinking" not in kwargs:
        if isinstance(body.get("enable_thinking"), bool):  # Qwen's own API
            kwargs["enable_thinking"] = body["enable_thinking"]
        elif body.get("reasoning_effort") == "none":
            kwargs["enable_thinking"] = False
    return kwargs


@dataclass
class Request:
    """A checked generation request."""

    chat: bool  # /chat/completions (reasoning and tools parsed) or /completions (raw text)
    prompt: list[int]
    options: GenerationOptions
    max_tokens: int
    ignore_eos: bool = False
    stream: bool = False
    include_usage: bool = False
    top_logprobs: int | None = None  # None: no logprobs
    tools: list[dict] | None = None
    snapshot_at: int | None = None
    speculative: str | None = None  # the drafter (Model.drafter's names), None: plain decoding
    constraint: Constraint | None = None  # structured output (text/constraints.py)


def speculative_choice(body: dict, model: Model, default: str | None) -> str | None:
    """minqwen's own `speculative` field: "ngram", "mtp", "none", or the server's --speculative (its default).
    Only the server's own draft model may be named: a client cannot make it load a file."""
    value = body.get("speculative")
    if value is None:
        return default
    if value == "mtp" and model.weights.mtp is None:
        raise invalid("this model has no MTP head to draft with", "speculative")
    if value in ("ngram", "mtp", default):
        return value
    if value == "none":
        return None
    choices = ", ".join(f'"{name}"' for name in ("ngram", "mtp", "none", default) if name)
    raise invalid(f"speculative must be one of {choices}, got {value!r}", "speculative")


def thinking_budget(body: dict, default: int) -> int:
    """The request's thinking budget in tokens (-1: no limit), under llama.cpp's or vLLM's name; the
    server's --reasoning-budget if it gives none."""
    given = [name for name in THINKING_BUDGETS if body.get(name) is not None]
    if len(given) > 1:
        raise invalid(f"give one of {' and '.join(given)}: they set the same budget", given[1])
    return integer(body, given[0], -1) if given else default


def chat_request(body: dict, model: Model, engine: Engine, reasoning_budget: int = -1) -> Request:
    refuse_unsupported(body)
    tok = model.tokenizer
    if not tok.has_chat_template:
        raise invalid("this model has no chat template: use /v1/completions", "messages")
    messages, (tools, require_call) = chat_messages(body.get("messages")), chat_tools(body)
    try:
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tools=tools,
                                         **template_kwargs(body))
    except MinqwenError as e:
        raise invalid(str(e), "messages") from None
    logprobs, top = flag(body, "logprobs"), integer(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if top and not logprobs:
        raise invalid("top_logprobs needs logprobs: true", "top_logprobs")
    # A hybrid model snapshots its state before the last message header ("<|im_start|>assistant..."):
    # the next turn's prompt shares everything before it, whatever the template does to the reply.
    header = tok.token_to_id("<|im_start|>")
    snapshot_at = max((i for i, t in enumerate(prompt) if t == header), default=0) or None
    return generation_request(body, model, engine, chat=True, prompt=prompt, param="messages",
                              top_logprobs=(top or 0) if logprobs else None, tools=tools,
                              require_call=require_call, snapshot_at=snapshot_at,
                              reasoning_budget=thinking_budget(body, reasoning_budget))


def completion_request(body: dict, model: Model, engine: Engine) -> Request:
    refuse_unsupported(body)
    for name in ("echo", "suffix"):
        if body.get(name):
            raise invalid(f"{name} is not supported", name)
    for name in THINKING_BUDGETS:  # a raw prompt has no chat template to say where thinking is
        if body.get(name) is not None:
            raise invalid(f"{name} needs /v1/chat/completions", name)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        prompt = model.tokenizer.encode(prompt)
    elif not isinstance(prompt, list) or any(isinstance(t, bool) or not isinstance(t, int) for t in prompt):
        raise invalid("prompt must be a string or a list of token ids (one prompt per request)", "prompt")
    return generation_request(body, model, engine, chat=False, prompt=prompt, param="prompt",
                              top_logprobs=integer(body, "logprobs", 0, MAX_TOP_LOGPROBS),
                              default_max_tokens=COMPLETION_MAX_TOKENS)


def generation_request(body: dict, model: Model, engine: Engine, param: str,
                       default_max_tokens: int | None = None, reasoning_budget: int = -1,
                       require_call: str | None = None, **fields) -> Request:
    """The fields both endpoints share; the prompt and max_tokens checked against the context window;
    the constraint (request_constraint), with the call the tools' `require_call` asks for."""
    prompt = fields["prompt"]
    max_tokens = integer(body, "max_completion_tokens", 1)
    max_tokens = integer(body, "max_tokens", 1) if max_tokens is None else max_tokens
    if max_tokens is None:  # default: as many as the window leaves (at least one, to fail in check)
        max_tokens = default_max_tokens or max(1, model.context_length - len(prompt))
    try:
        engine.check(prompt, room=max_tokens)
    except ContextLengthError as e:
        raise invalid(str(e), param, "context_length_exceeded") from None
    except MinqwenError as e:
        raise invalid(str(e), param) from None
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise invalid("stream_options must be an object", "stream_options")
    try:
        options = sampling_options(body, model.generation_config, reasoning_budget)
    except SamplingError as e:  # what the API's ranges let through and minqwen does not take
        raise invalid(str(e)) from None
    constraint = request_constraint(body, model, fields["chat"], fields.get("tools"), require_call)
    return Request(options=options, max_tokens=max_tokens, constraint=constraint,
                   ignore_eos=flag(body, "ignore_eos"), stream=flag(body, "stream"),
                   include_usage=flag(stream_options, "include_usage"),
                   speculative=speculative_choice(body, model, engine.speculative), **fields)


# ---- responses

@dataclass
class Outcome:
    """What the engine sent back for one job, gathered."""

    tokens: int = 0
    reasoning: list[str] = field(default_factory=list)
    content: list[str] = field(default_factory=list)
    tool_calls: list[dict] = field(default_factory=list)
    logprobs: list[tuple[int, float, list]] = field(default_factory=list)  # (token, log p, top)
    end: End | None = None

    @property
    def visible(self) -> bool:
        """Something a stream chunk can show: text or a tool call."""
        return any(self.content) or any(self.reasoning) or bool(self.tool_calls)

    def add(self, event):
        if isinstance(event, Token):
            self.tokens += 1
            if event.logprobs is not None:
                self.logprobs.append((event.token, *event.logprobs))
        else:
            self.end = event
        delta = event.delta
        if delta:
            self.reasoning.append(delta.reasoning)
            self.content.append(delta.content)
            self.tool_calls += delta.tool_calls


class Response:
    """The OpenAI shapes of one request's answer: a whole body, or the chunks of a stream."""

    def __init__(self, request: Request, job: Job, model_id: str, tokenizer):
        self.request, self.job, self.model_id, self.tokenizer = request, job, model_id, tokenizer
        self.id = ("chatcmpl-" if request.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.calls = 0  # tool calls streamed so far (their index)

    def error(self, outcome: Outcome) -> ApiError | None:
        """How a job the engine did not finish ends: 503 at shutdown, 500 after a failure."""
        if outcome.end.finish_reason == "shutdown":
            return ApiError(503, "the server is shutting down")
        if outcome.end.error is not None:
            return ApiError(500, outcome.end.error)
        return None

    def finish_reason(self, outcome: Outcome) -> str:
        reason = outcome.end.finish_reason
        return "tool_calls" if reason == "stop" and outcome.tool_calls else reason

    def usage(self, outcome: Outcome) -> dict:
        prompt = len(self.request.prompt)
        usage = {"prompt_tokens": prompt, "completion_tokens": outcome.tokens,
                 "total_tokens": prompt + outcome.tokens,
                 "prompt_tokens_details": {"cached_tokens": self.job.cached_tokens}}
        if self.request.chat:
            usage["completion_tokens_details"] = {"reasoning_tokens": self.job.reply.reasoning_tokens}
        return usage

    def whole(self, outcome: Outcome) -> dict:
        if self.request.chat:
            content = "".join(outcome.content)
            reasoning = "".join(outcome.reasoning)
            message = {"role": "assistant",
                       "content": content or (None if outcome.tool_calls or reasoning else "")}
            if reasoning:  # under both names: clients read one or the other (see README)
                message["reasoning_content"] = message["reasoning"] = reasoning
            if outcome.tool_calls:
                message["tool_calls"] = outcome.tool_calls
            choice = {"index": 0, "message": message}
        else:
            choice = {"index": 0, "text": "".join(outcome.content)}
        choice["logprobs"] = self.logprobs(outcome.logprobs)
        choice["finish_reason"] = self.finish_reason(outcome)
        return {"id": self.id, "object": "chat.completion" if self.request.chat else "text_completion",
                "created": self.created, "model": self.model_id, "choices": [choice],
                "usage": self.usage(outcome)}

    def chunk(self, outcome: Outcome, finish: str | None = None, first: bool = False) -> dict:
        """A stream chunk with what `outcome` gathered since the last one (the first: the role)."""
        if self.request.chat:
            delta = {"role": "assistant", "content": ""} if first else {}
            reasoning, content = "".join(outcome.reasoning), "".join(outcome.content)
            if reasoning:
                delta["reasoning_content"] = delta["reasoning"] = reasoning
            if content:
                delta["content"] = content
            if outcome.tool_calls:  # each call whole, numbered across the stream
                delta["tool_calls"] = [{"index": self.calls + i, **call}
                                       for i, call in enumerate(outcome.tool_calls)]
                self.calls += len(outcome.tool_calls)
            choice = {"index": 0, "delta": delta}
        else:
            choice = {"index": 0, "text": "".join(outcome.content)}
        choice["logprobs"] = self.logprobs(outcome.logprobs)
        choice["finish_reason"] = finish
        chunk = {"id": self.id, "object": "chat.completion.chunk" if self.request.chat else "text_completion",
                 "created": self.created, "model": self.model_id, "choices": [choice]}
        if self.request.include_usage:
            chunk["usage"] = None
        return chunk

    def closing_chunks(self, whole: Outcome, pending: Outcome) -> list[dict]:
        """A finished stream's last chunks: what was held back till the end (text that could have begun a
        stop string, the last logprobs), the finish reason, and the usage if asked for."""
        chunks = [self.chunk(pending)] if pending.visible or pending.logprobs else []
        chunks.append(self.chunk(Outcome(), finish=self.finish_reason(whole)))
        if self.request.include_usage:
            chunks.append(self.usage_chunk(whole))
        return chunks

    def usage_chunk(self, outcome: Outcome) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk" if self.request.chat else "text_completion",
                "created": self.created, "model": self.model_id, "choices": [], "usage": self.usage(outcome)}

    def logprobs(self, entries: list) -> dict | None:
        """The chat shape ({"content": [{token, logprob, bytes, top_logprobs}]}) or the completions one
        (tokens, token_logprobs, top_logprobs as {text: logprob}, text_offset)."""
        if self.request.top_logprobs is None or not entries:
            return None

        def text(token):
            return self.tokenizer.token_bytes(token).decode("utf-8", errors="replace")

        if self.request.chat:
            def item(token, log_p):
                return {"token": text(token), "logprob": log_p,
                        "bytes": list(self.tokenizer.token_bytes(token))}
            return {"content": [{**item(token, log_p), "top_logprobs": [item(t, p) for t, p in top]}
                                for token, log_p, top in entries]}
        texts = [text(token) for token, _, _ in entries]
        return {"tokens": texts, "token_logprobs": [log_p for _, log_p, _ in entries],
                "top_logprobs": [{text(t): p for t, p in top} for _, _, top in entries],
                "text_offset": list(accumulate((len(t) for t in texts[:-1]), initial=0))}


class Api:
    """The endpoints over one model and its engine. Each takes a request's JSON body and its path and
    returns the answer's JSON body, or, for the two generation endpoints, the checked Request for
    `start`; errors are raised as ApiError."""

    def __init__(self, model: Model, engine: Engine, model_id: str, reasoning_budget: int = -1):
        self.model, self.engine, self.model_id = model, engine, model_id
        self.reasoning_budget = reasoning_budget  # every chat request's, unless it gives its own
        self.created = int(time.time())

    def health(self, body: dict, path: str) -> dict:
        if self.engine.failure is not None:
            raise ApiError(503, ENGINE_STOPPED)
        if not self.engine.running:
            raise ApiError(503, "shutting down")
        return {"status": "ok"}

    def models(self, body: dict, path: str) -> dict:
        card = {"id": self.model_id, "object": "model", "created": self.created,
                "owned_by": "minqwen", "max_model_len": self.model.context_length}
        if not path.startswith("/models/"):
            return {"object": "list", "data": [card]}
        if path[len("/models/"):] != self.model_id:
            raise ApiError(404, f"The model `{path[len('/models/'):]}` does not exist.", "model",
                           "model_not_found")
        return card

    def tokenize(self, body: dict, path: str) -> dict:
        """vLLM's /tokenize ({"prompt"} or {"messages"}), llama.cpp's {"content"} too."""
        tok = self.model.tokenizer
        if "messages" in body:
            try:
                ids = tok.apply_chat_template(chat_messages(body["messages"]),
                                              add_generation_prompt=body.get("add_generation_prompt", True),
                                              tools=chat_tools(body)[0], **template_kwargs(body))
            except MinqwenError as e:
                raise invalid(str(e), "messages") from None
        else:
            text = body.get("prompt", body.get("content"))
            if not isinstance(text, str):
                raise invalid("prompt must be a string (or give messages)", "prompt")
            ids = tok.encode(text)
        return {"tokens": ids, "count": len(ids), "max_model_len": self.model.context_length}

    def detokenize(self, body: dict, path: str) -> dict:
        tok, ids = self.model.tokenizer, body.get("tokens")
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                and 0 <= t < tok.vocab_size for t in ids):
            raise invalid(f"tokens must be a list of token ids in [0, {tok.vocab_size})", "tokens")
        text = tok.decode(ids)
        return {"prompt": text, "content": text}  # vLLM's name and llama.cpp's

    def chat(self, body: dict, path: str) -> Request:
        return chat_request(body, self.model, self.engine, self.reasoning_budget)

    def completion(self, body: dict, path: str) -> Request:
        return completion_request(body, self.model, self.engine)

    def start(self, request: Request, client_gone: Callable[[], bool]) -> Response:
        """Hand the request to the engine as a Job; its events come back on response.job.events."""
        model = self.model
        eos = [] if request.ignore_eos else model.eos_token_ids
        sampler = Sampler(request.options, request.prompt, model.config.vocab_size, request.max_tokens, eos,
                          request.constraint)
        reply = Reply(model.tokenizer, request.prompt, request.options.stop, request.tools, request.chat,
                      reasoning_budget=request.options.reasoning_budget)
        job = Job(request.prompt, sampler, reply, request.top_logprobs, request.snapshot_at, client_gone,
                  speculative=request.speculative)
        try:
            self.engine.submit(job)
        except Busy:
            raise ApiError(503, "The engine is currently overloaded, please try again later",
                           code="overloaded", headers={"Retry-After": "1"}) from None
        except Stopped:
            raise ApiError(503, ENGINE_STOPPED) from None
        return Response(request, job, self.model_id, model.tokenizer)
