"""python -m minqwen serve: the OpenAI API over HTTP, on the standard library's ThreadingHTTPServer.

    POST /v1/chat/completions   messages -> the chat template -> the engine -> content,
                                reasoning_content, tool_calls (reply.py); as server-sent events if asked
    POST /v1/completions        a raw prompt (text or token ids) -> text
    GET  /v1/models[/{id}], /health;   POST /tokenize, /detokenize
    (every /v1/x also answers at /x)

A thread per connection reads and checks the request, renders the prompt and hands a Job to the engine
thread (engine.py), which runs all requests' sequences in one batch; the connection's thread writes
what comes back. Everything is checked before the status line, so a bad request gets its 4xx and
OpenAI's envelope {"error": {"message", "type", "param", "code"}}; once a stream has begun, an error
is an SSE event. A client that leaves is noticed within an engine step (its socket polled for EOF, or
a write that fails) and its slot freed.

Safe by default: binds 127.0.0.1; an API key (--api-key or MINQWEN_API_KEY) compared in constant time;
bodies up to MAX_BODY bytes; a bounded queue (503 + Retry-After past it); one log line per request —
status, token counts, time — never a prompt.
"""
from __future__ import annotations

import hmac
import json
import math
import queue
import select
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import accumulate

from ..errors import CheckpointError, ContextLengthError, MinqwenError, SamplingError
from ..model import Model
from ..text.generation import GenerationOptions, Sampler, options_with_defaults
from ..text.reply import Reply
from .engine import Busy, End, Engine, Job, Token

MAX_BODY = 16 << 20  # bytes of a request body
KEEPALIVE_SECONDS = 10  # an SSE comment after this long without an event (a long prefill), so proxies
# and clients do not time out; it also finds a client that left while its prompt waited
POLL_SECONDS = 0.25  # how often a connection's thread checks on a job still waiting for a slot
MAX_TOP_LOGPROBS = 20  # as the OpenAI API
MAX_STOP_STRINGS = 16
COMPLETION_MAX_TOKENS = 16  # the OpenAI API's default for /v1/completions
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
MESSAGE_FIELDS = ("name", "tool_call_id", "reasoning_content", "reasoning", "thinking")
RESERVED_TEMPLATE_NAMES = ("messages", "tools", "documents", "add_generation_prompt")


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


def sampling_options(body: dict, generation_config: dict) -> GenerationOptions:
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
                 stop=stops)
    return options_with_defaults(given, generation_config)


def refuse_unsupported(body: dict):
    """Fields the API defines that minqwen does not implement: a 400 rather than a silent ignore."""
    if body.get("n") not in (None, 1):
        raise invalid("n must be 1: one choice per request", "n")
    if body.get("best_of") not in (None, 1):
        raise invalid("best_of must be 1", "best_of")
    response_format = body.get("response_format")
    if response_format is not None and (not isinstance(response_format, dict)
                                        or response_format.get("type") != "text"):
        raise invalid("response_format must be {\"type\": \"text\"}: minqwen does not constrain decoding",
                      "response_format")
    if body.get("logit_bias"):
        raise invalid("logit_bias is not supported", "logit_bias")
    if body.get("stream_options") is not None and not body.get("stream"):
        raise invalid("stream_options needs stream: true", "stream_options")


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
    require_call: str | None = None  # tool_choice "required" (""), or the function named
    snapshot_at: int | None = None


def chat_request(body: dict, model: Model, engine: Engine) -> Request:
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
                              require_call=require_call, snapshot_at=snapshot_at)


def completion_request(body: dict, model: Model, engine: Engine) -> Request:
    refuse_unsupported(body)
    for name in ("echo", "suffix"):
        if body.get(name):
            raise invalid(f"{name} is not supported", name)
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
                       default_max_tokens: int | None = None, **fields) -> Request:
    """The fields both endpoints share; the prompt and max_tokens checked against the context window."""
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
        options = sampling_options(body, model.generation_config)
    except SamplingError as e:  # what the API's ranges let through and minqwen does not take
        raise invalid(str(e)) from None
    return Request(options=options, max_tokens=max_tokens,
                   ignore_eos=flag(body, "ignore_eos"), stream=flag(body, "stream"),
                   include_usage=flag(stream_options, "include_usage"), **fields)


# ---- responses

def byte_of_char() -> dict[str, int]:
    """GPT-2's byte-level BPE (Qwen's) spells every byte as a printable character: the printable
    Latin-1 bytes as themselves, the others as chr(256), chr(257), ... in order. This undoes it."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


BYTE_OF_CHAR = byte_of_char()


def token_bytes(tokenizer, token: int) -> bytes:
    """The bytes a token stands for (maybe part of a UTF-8 character): the logprobs' `bytes`."""
    piece = tokenizer.backend.id_to_token(token) or ""
    if token in tokenizer.special_ids or any(c not in BYTE_OF_CHAR for c in piece):
        return piece.encode()  # special tokens are stored as their text
    return bytes(BYTE_OF_CHAR[c] for c in piece)


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

    def usage_chunk(self, outcome: Outcome) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk" if self.request.chat else "text_completion",
                "created": self.created, "model": self.model_id, "choices": [], "usage": self.usage(outcome)}

    def logprobs(self, entries: list) -> dict | None:
        """The chat shape ({"content": [{token, logprob, bytes, top_logprobs}]}) or the completions one
        (tokens, token_logprobs, top_logprobs as {text: logprob}, text_offset)."""
        if self.request.top_logprobs is None or not entries:
            return None

        def text(token):
            return token_bytes(self.tokenizer, token).decode("utf-8", errors="replace")

        if self.request.chat:
            def item(token, log_p):
                return {"token": text(token), "logprob": log_p,
                        "bytes": list(token_bytes(self.tokenizer, token))}
            return {"content": [{**item(token, log_p), "top_logprobs": [item(t, p) for t, p in top]}
                                for token, log_p, top in entries]}
        texts = [text(token) for token, _, _ in entries]
        return {"tokens": texts, "token_logprobs": [log_p for _, log_p, _ in entries],
                "top_logprobs": [{text(t): p for t, p in top} for _, _, top in entries],
                "text_offset": list(accumulate((len(t) for t in texts[:-1]), initial=0))}


# ---- HTTP

class ApiServer(ThreadingHTTPServer):
    daemon_threads = True  # a connection left open by a client does not hold up shutdown

    def __init__(self, address, model: Model, engine: Engine, model_id: str, api_key: str | None = None,
                 max_body: int = MAX_BODY, log=sys.stderr):
        super().__init__(address, Handler)
        self.model, self.engine, self.model_id = model, engine, model_id
        self.max_body, self.log = max_body, log
        self.api_key = api_key.encode() if api_key else None
        self.created = int(time.time())
        self.requests_in_flight = 0
        self.lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ApiServer
    timeout = 600  # seconds a read or a write may block (an idle keep-alive connection is then closed)

    ROUTES = {("GET", "/health"): "health", ("GET", "/models"): "models",
              ("POST", "/chat/completions"): "chat", ("POST", "/completions"): "completion",
              ("POST", "/tokenize"): "tokenize", ("POST", "/detokenize"): "detokenize"}

    def do_GET(self):
        self.dispatch()

    def do_POST(self):
        self.dispatch()

    def log_request(self, code="-", size="-"):
        pass  # one line per request, written by dispatch (with token counts)

    def dispatch(self):
        started, self.status, self.counts = time.perf_counter(), 0, ""
        self.write_failed, self.headers_sent, self.unread = False, False, self.command == "POST"
        path = self.path.split("?", 1)[0].rstrip("/")
        path = path[len("/v1"):] if path.startswith("/v1/") else path
        try:
            name = self.ROUTES.get((self.command, "/models" if path.startswith("/models/") else path))
            if name is None:
                allowed = [method for method, p in self.ROUTES if p == path]
                if allowed:
                    raise ApiError(405, f"{path} takes {allowed[0]}", headers={"Allow": allowed[0]})
                raise ApiError(404, f"no such endpoint: {self.command} {self.path}", code="not_found")
            if name != "health":
                self.authorize()
            body = self.read_json() if self.command == "POST" else {}
            getattr(self, name)(body, path)
        except ApiError as e:
            self.fail(e)
        except Exception:  # a bug: 500, and the traceback in the log (it holds no request text)
            traceback.print_exc(file=self.server.log)
            self.fail(ApiError(500, "internal error (see the server's log)"))
        finally:
            print(f"{self.address_string()} {self.command} {path} {self.status}{self.counts} "
                  f"{time.perf_counter() - started:.2f}s", file=self.server.log, flush=True)

    def authorize(self):
        key = self.server.api_key
        if key is None:
            return
        given = self.headers.get("Authorization", "")
        token = given[len("Bearer "):].strip().encode() if given.startswith("Bearer ") else b""
        if not hmac.compare_digest(token, key):
            raise ApiError(401, "Incorrect API key provided" if token else "Missing API key (Authorization: "
                           "Bearer ...)", code="invalid_api_key")

    def read_json(self) -> dict:
        if "Transfer-Encoding" in self.headers:
            raise ApiError(411, "send the body with a Content-Length")
        try:
            length = int(self.headers.get("Content-Length", 0))
        except ValueError:
            length = -1
        if length < 0:
            raise invalid("Content-Length must be a number >= 0")
        if length > self.server.max_body:
            raise ApiError(413, f"request body of {length} bytes is over the limit of {self.server.max_body}",
                           code="request_too_large")
        try:
            data = self.rfile.read(length)
            self.unread = False
            body = json.loads(data)
        except ValueError:
            raise invalid("the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise invalid("the body must be a JSON object")
        return body

    # ---- endpoints

    def health(self, body, path):
        if not self.server.engine.running:
            raise ApiError(503, "shutting down")
        self.send_json(200, {"status": "ok"})

    def models(self, body, path):
        card = {"id": self.server.model_id, "object": "model", "created": self.server.created,
                "owned_by": "minqwen", "max_model_len": self.server.model.context_length}
        if path.startswith("/models/"):
            if path[len("/models/"):] != self.server.model_id:
                raise ApiError(404, f"The model `{path[len('/models/'):]}` does not exist.", "model",
                               "model_not_found")
            self.send_json(200, card)
        else:
            self.send_json(200, {"object": "list", "data": [card]})

    def tokenize(self, body, path):
        """vLLM's /tokenize ({"prompt"} or {"messages"}), llama.cpp's {"content"} too."""
        tok = self.server.model.tokenizer
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
        self.send_json(200, {"tokens": ids, "count": len(ids),
                             "max_model_len": self.server.model.context_length})

    def detokenize(self, body, path):
        tok, ids = self.server.model.tokenizer, body.get("tokens")
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                and 0 <= t < tok.vocab_size for t in ids):
            raise invalid(f"tokens must be a list of token ids in [0, {tok.vocab_size})", "tokens")
        text = tok.decode(ids)
        self.send_json(200, {"prompt": text, "content": text})  # vLLM's name and llama.cpp's

    def chat(self, body, path):
        self.generate(chat_request(body, self.server.model, self.server.engine))

    def completion(self, body, path):
        self.generate(completion_request(body, self.server.model, self.server.engine))

    # ---- generation

    def generate(self, request: Request):
        model = self.server.model
        eos = [] if request.ignore_eos else model.eos_token_ids
        sampler = Sampler(request.options, request.prompt, model.config.vocab_size, request.max_tokens, eos)
        reply = Reply(model.tokenizer, request.prompt, request.options.stop, request.tools, request.chat,
                      request.require_call)
        job = Job(request.prompt, sampler, reply, request.top_logprobs, request.snapshot_at, self.client_gone)
        try:
            self.server.engine.submit(job)
        except Busy:
            raise ApiError(503, "The engine is currently overloaded, please try again later",
                           code="overloaded", headers={"Retry-After": "1"}) from None
        response = Response(request, job, self.server.model_id, model.tokenizer)
        with self.server.lock:
            self.server.requests_in_flight += 1
        try:
            outcome = self.stream(response) if request.stream else self.wait(response)
        finally:
            with self.server.lock:
                self.server.requests_in_flight -= 1
        self.counts = f" prompt={len(request.prompt)} cached={job.cached_tokens} completion={outcome.tokens}"

    def events(self, job: Job):
        """The job's events as they come, and None after each POLL_SECONDS without one (a job waiting
        for a slot is not polled by the engine: its client is checked here)."""
        while True:
            try:
                event = job.events.get(timeout=POLL_SECONDS)
            except queue.Empty:
                if self.client_gone():
                    self.server.engine.cancel(job)
                yield None
                continue
            yield event
            if isinstance(event, End):
                return

    def wait(self, response: Response) -> Outcome:
        outcome = Outcome()
        for event in self.events(response.job):
            if event is not None:
                outcome.add(event)
        end = outcome.end
        if end.finish_reason == "shutdown":
            raise ApiError(503, "the server is shutting down")
        if end.error is not None:
            raise ApiError(500, end.error)
        if end.finish_reason != "cancelled":
            self.send_json(200, response.whole(outcome))
        else:
            self.status = 499  # nginx's "client closed request": nobody is left to receive it
        return outcome

    def stream(self, response: Response) -> Outcome:
        self.status = 200
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the stream ends when the connection does
        self.end_headers()
        self.close_connection, self.headers_sent = True, True
        if response.request.chat:
            self.send_event(response.chunk(Outcome(), first=True))
        whole, pending, quiet_since = Outcome(), Outcome(), time.monotonic()
        for event in self.events(response.job):
            if event is None:
                if time.monotonic() - quiet_since > KEEPALIVE_SECONDS:
                    self.send_bytes(b": keepalive\n\n")
                    quiet_since = time.monotonic()
                continue
            whole.add(event)
            pending.add(event)
            if isinstance(event, End) or not pending.visible:
                continue  # text held back (a possible stop string), or a marker: nothing to show yet
            self.send_event(response.chunk(pending))
            pending, quiet_since = Outcome(), time.monotonic()
        end = whole.end
        if end.finish_reason == "shutdown":
            self.send_event(ApiError(503, "the server is shutting down").body())
        elif end.error is not None:
            self.send_event(ApiError(500, end.error).body())
        elif end.finish_reason != "cancelled":
            if pending.visible or pending.logprobs:
                self.send_event(response.chunk(pending))
                pending = Outcome()
            self.send_event(response.chunk(pending, finish=response.finish_reason(whole)))
            if response.request.include_usage:
                self.send_event(response.usage_chunk(whole))
        self.send_bytes(b"data: [DONE]\n\n")
        return whole

    def client_gone(self) -> bool:
        """The client closed the connection (called by the engine thread every step). While a client
        waits for its answer it sends nothing, so a readable socket means EOF, or a reset. (A client
        that only shuts down its sending side, and still reads, is taken as gone too.)"""
        if self.write_failed:
            return True
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):  # reset, or closed on our side
            return True

    def send_event(self, data: dict):
        self.send_bytes(b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n")

    def send_bytes(self, data: bytes):
        if self.write_failed:
            return
        try:
            self.wfile.write(data)
            self.wfile.flush()
        except OSError:  # BrokenPipeError, ConnectionResetError, a timeout: the client is gone
            self.write_failed = True

    def send_json(self, status: int, body: dict, headers: dict | None = None):
        data = json.dumps(body, ensure_ascii=False).encode()
        self.status = status
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.headers_sent = True
        self.send_bytes(data)

    def fail(self, error: ApiError):
        self.close_connection |= self.unread  # an unread body would be taken for the next request
        if self.headers_sent:  # a stream under way: the error goes in it
            self.send_event(error.body())
            self.send_bytes(b"data: [DONE]\n\n")
        else:
            self.send_json(error.status, error.body(), error.headers)


def model_name(path) -> str:
    """The id clients see: the checkpoint folder's name (a hub id as given)."""
    return str(path).rstrip("/").split("/")[-1] if path else "minqwen"


def serve(model: Model, host: str = "127.0.0.1", port: int = 8080, parallel: int = 4, queue_size: int = 32,
          api_key: str | None = None, model_id: str | None = None):
    """Serve until SIGINT or SIGTERM; then stop taking requests, end the ones in flight with an error,
    and return."""
    if model.tokenizer is None:
        raise CheckpointError(f"{model.path}: serving needs the checkpoint's tokenizer.json")
    engine = Engine(model, parallel, queue_size)
    server = ApiServer((host, port), model, engine, model_id or model_name(model.path), api_key)
    engine.start()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    threading.Thread(target=server.serve_forever, name="minqwen-http", daemon=True).start()
    host, port = server.server_address[:2]
    print(f"serving {server.model_id} at http://{host}:{port}/v1 ({parallel} slots of up to "
          f"{model.context_length} tokens each{', API key required' if api_key else ''})",
          file=sys.stderr, flush=True)
    while not stop.wait(0.5):
        pass
    print("shutting down", file=sys.stderr, flush=True)
    server.shutdown()  # no new connections
    engine.stop()  # requests in flight get an error, streams an SSE error event
    deadline = time.monotonic() + 5
    while server.requests_in_flight and time.monotonic() < deadline:
        time.sleep(0.05)
    server.server_close()
