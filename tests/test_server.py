"""`minqwen serve` end to end: the real `openai` client against a server on a free loopback port, tiny
random checkpoints with the real Qwen tokenizers. Answers equal the library's own generation for the
same templated prompt; errors have their status and envelope and the server keeps serving; clients that
leave stop costing the engine anything. Reasoning and tool calls go through a stand-in decoder that
writes a fixed script (random weights never write those markers)."""
from __future__ import annotations

import http.client
import io
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict

import numpy as np
import openai
import pytest
from test_parity_hybrid import QWEN3_5
from test_reply import USER, WEATHER

import minqwen
from checkpoints import build_checkpoint, chat_checkpoint
from minqwen.serve.engine import Engine
from minqwen.serve.http_server import MAX_BODY, ApiServer
from minqwen.serve.openai_api import Api
from minqwen.text.generation import options_with_defaults

WAIT = 300  # seconds before a waiting test fails instead of hanging: a bound, never a measurement


@pytest.fixture(scope="module")
def qwen25(tmp_path_factory):
    return minqwen.load(chat_checkpoint(tmp_path_factory.mktemp("qwen25"), "qwen2.5"))


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    return minqwen.load(chat_checkpoint(tmp_path_factory.mktemp("qwen3"), "qwen3"))


@contextmanager
def running(model, parallel=4, queue_size=32, api_key=None, max_body=MAX_BODY, speculative=None):
    log = io.StringIO()  # the engine's failures and the request lines, in one stream as `serve` has them
    engine = Engine(model, parallel, queue_size, log=log, speculative=speculative)
    server = ApiServer(("127.0.0.1", 0), Api(model, engine, "tiny"), api_key, max_body, log)
    engine.start()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        engine.stop()
        server.server_close()


@contextmanager
def decoder_replaced(model, stand_in):
    """model.decoder replaced by stand_in(the real one) while the block runs (engines made inside it use
    the stand-in)."""
    real = model.decoder
    model.decoder = stand_in(real)
    try:
        yield model.decoder
    finally:
        model.decoder = real


class Gated:
    """Stands in for the decoder: each forward pass first waits for the gate to be open, so a test can
    hold the engine between two steps, with jobs in its slots and queue, without any timing."""

    def __init__(self, decoder):
        self.decoder, self.gate = decoder, threading.Event()
        self.gate.set()

    def forward(self, batch, every_token=False):
        assert self.gate.wait(WAIT)
        return self.decoder.forward(batch, every_token)

    def __getattr__(self, name):
        return getattr(self.decoder, name)


class Failing(Gated):
    """Gated, and the forward passes numbered in `failing` (the first is 1) raise."""

    def __init__(self, decoder, failing=()):
        super().__init__(decoder)
        self.failing, self.passes = set(failing), 0

    def forward(self, batch, every_token=False):
        assert self.gate.wait(WAIT)
        self.passes += 1
        if self.passes in self.failing:
            raise RuntimeError(f"injected failure in forward pass {self.passes}")
        return self.decoder.forward(batch, every_token)


def client(server, api_key="unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key=api_key,
                         max_retries=0, timeout=WAIT)


def raw(server, method, path, body=None, headers=None) -> tuple[int, dict, dict]:
    """(status, headers, JSON body) of one request sent by hand."""
    connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=WAIT)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    connection.request(method, path, data, {"Content-Type": "application/json", **(headers or {})})
    response = connection.getresponse()
    payload = response.read()
    connection.close()
    return response.status, dict(response.getheaders()), json.loads(payload) if payload else {}


def greedy(model, prompt, n, **given):
    """What the library generates for `prompt` with the server's defaults (generation_config.json) and
    temperature 0 unless given."""
    options = options_with_defaults({"temperature": 0.0, **given}, model.generation_config)
    return model.generate(prompt, max_new_tokens=n, **asdict(options))


def expected_text(model, tokens):
    assert model.tokenizer.token_to_id("<tool_call>") not in tokens  # plain text: nothing to parse
    text = [t for t in tokens if t not in model.eos_token_ids]
    return model.tokenizer.decode(text, skip_special_tokens=True)


def chat(api: openai.OpenAI, messages, **fields):
    """A chat completion (greedy unless told), or its stream."""
    return api.chat.completions.create(model="tiny", messages=messages, **{"temperature": 0, **fields})


def streamed_content(chunks) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def ask(messages_text: str) -> list[dict]:
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": messages_text}]


def test_chat_equals_the_library_streaming_or_not(qwen25):
    messages = ask("Tell me about the sea.")
    prompt = qwen25.tokenizer.apply_chat_template(messages)
    tokens = greedy(qwen25, prompt, 12)
    finish = "stop" if tokens[-1] in qwen25.eos_token_ids else "length"
    with running(qwen25) as server:
        api = client(server)
        reply = chat(api, messages, max_tokens=12)
        assert reply.choices[0].message.content == expected_text(qwen25, tokens)
        assert reply.choices[0].finish_reason == finish and reply.object == "chat.completion"
        assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (
            len(prompt), len(tokens), len(prompt) + len(tokens))
        chunks = list(chat(api, messages, max_tokens=12, stream=True, stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert streamed_content(chunks) == reply.choices[0].message.content
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == finish
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(tokens)
        # the second time, the prompt is in a slot's cache
        assert chunks[-1].usage.prompt_tokens_details.cached_tokens == len(prompt) - 1
        assert len({c.id for c in chunks}) == 1 and reply.id != chunks[0].id


def test_seeded_sampling_and_every_v1_path_without_v1(qwen25):
    messages = ask("Pick a number.")
    prompt = qwen25.tokenizer.apply_chat_template(messages)
    options = dict(temperature=0.9, top_p=0.95, seed=7, presence_penalty=0.5, frequency_penalty=0.25)
    tokens = greedy(qwen25, prompt, 10, **options)
    with running(qwen25) as server:
        status, _, body = raw(server, "POST", "/chat/completions",
                              {"messages": messages, "max_tokens": 10, **options})
        assert status == 200 and body["choices"][0]["message"]["content"] == expected_text(qwen25, tokens)
        for path in ("/health", "/models", "/v1/models", "/v1/models/tiny"):
            assert raw(server, "GET", path)[0] == 200, path
        assert raw(server, "GET", "/v1/models/other")[0] == 404
        assert client(server).models.list().data[0].id == "tiny"


def test_tokenize_and_detokenize(qwen25):
    tok = qwen25.tokenizer
    with running(qwen25) as server:
        status, _, body = raw(server, "POST", "/tokenize", {"prompt": "Hello world"})
        assert status == 200 and body["tokens"] == tok.encode("Hello world") and body["count"] == 2
        status, _, body = raw(server, "POST", "/v1/tokenize", {"messages": USER})
        assert body["tokens"] == tok.apply_chat_template(USER) and body["max_model_len"] == 512
        status, _, body = raw(server, "POST", "/detokenize", {"tokens": tok.encode("Hello world")})
        assert status == 200 and body["prompt"] == "Hello world"
        assert raw(server, "POST", "/detokenize", {"tokens": [-1]})[0] == 400


def test_completions_from_text_and_from_token_ids(qwen25):
    ids = qwen25.tokenizer.encode("Once upon a time")
    tokens = greedy(qwen25, ids, 16)
    with running(qwen25) as server:
        api = client(server)
        for prompt in ("Once upon a time", ids):
            reply = api.completions.create(model="tiny", prompt=prompt, temperature=0)  # 16 tokens by default
            assert reply.choices[0].text == expected_text(qwen25, tokens)
            assert reply.usage.completion_tokens == len(tokens) and reply.object == "text_completion"
        chunks = api.completions.create(model="tiny", prompt=ids, temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in chunks) == expected_text(qwen25, tokens)


def test_stop_strings_are_cut_out(qwen25):
    messages = ask("Say something long.")
    text = expected_text(qwen25, greedy(qwen25, qwen25.tokenizer.apply_chat_template(messages), 16))
    stop = text[6:9]
    with running(qwen25) as server:
        api = client(server)
        reply = chat(api, messages, max_tokens=16, stop=stop)
        assert reply.choices[0].message.content == text[:text.index(stop)]
        assert reply.choices[0].finish_reason == "stop"
        chunks = chat(api, messages, max_tokens=16, stop=[stop], stream=True)
        assert streamed_content(chunks) == text[:text.index(stop)]


def test_logprobs(qwen25):
    messages = ask("Hi")
    with running(qwen25) as server:
        reply = chat(client(server), messages, max_tokens=4, logprobs=True, top_logprobs=3)
        entries = reply.choices[0].logprobs.content
        assert len(entries) == reply.usage.completion_tokens == 4
        for entry in entries:
            top = [t.logprob for t in entry.top_logprobs]
            assert len(top) == 3 and top == sorted(top, reverse=True) and all(p <= 0 for p in top)
            assert entry.logprob == top[0]  # greedy: the chosen token is the most likely
            assert entry.token == bytes(entry.bytes).decode("utf-8", errors="replace")
        assert "".join(e.token for e in entries) == reply.choices[0].message.content
        chunks = chat(client(server), messages, max_tokens=4, logprobs=True, top_logprobs=3, stream=True)
        streamed = [e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
        assert [e.token for e in streamed] == [e.token for e in entries]
        # to rounding: the second time the prompt comes from the cache, and only its last token is run
        assert np.allclose([e.logprob for e in streamed], [e.logprob for e in entries], atol=1e-4)
        # log p of the raw logits: they sum to 1 over the vocabulary
        prompt = qwen25.tokenizer.apply_chat_template(messages)
        logits = qwen25.logits(prompt)[-1].astype(np.float64)
        log_p = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
        assert abs(entries[0].logprob - log_p.max()) < 1e-5


def test_eight_concurrent_requests_each_get_their_own_answer(qwen25):
    questions = [ask(f"Question number {i}: {'why ' * i}?") for i in range(8)]
    expected = [expected_text(qwen25, greedy(qwen25, qwen25.tokenizer.apply_chat_template(m), 8 + i))
                for i, m in enumerate(questions)]
    with running(qwen25, parallel=4) as server:
        api = client(server)

        def one(i):
            if i % 2:
                return streamed_content(chat(api, questions[i], max_tokens=8 + i, stream=True))
            return chat(api, questions[i], max_tokens=8 + i).choices[0].message.content

        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(one, range(8))) == expected
        assert server.api.engine.steps < sum(8 + i for i in range(8))  # slots decoded together


def test_speculative_slots_verify_in_the_shared_pass_and_answer_as_plain_decoding(qwen3, tmp_path):
    """Four slots at once, each with its own drafter (the server's draft model by default, prompt lookup,
    none) or sampling with a seed: every answer is the library's plain one, the drafts are verified in the
    passes the slots share, and the log shows how many were accepted."""
    config = json.loads((qwen3.path / "config.json").read_text())
    draft = build_checkpoint(tmp_path / "draft", config, "bf16", seed=7, tokenizer="qwen3")
    ids = [qwen3.tokenizer.encode(f"Story {i}: once upon a time " * (i + 1)) for i in range(5)]
    fields = [{}, {"speculative": "ngram"}, {"speculative": "none"}, {"speculative": f"model:{draft}"},
              {"temperature": 0.9, "seed": 3}]
    expected = [expected_text(qwen3, greedy(qwen3, prompt, 20, **{k: v for k, v in extra.items()
                                                                   if k != "speculative"}))
                for prompt, extra in zip(ids, fields)]
    with running(qwen3, parallel=4, speculative=f"model:{draft}") as server:
        def one(i):
            status, _, body = raw(server, "POST", "/v1/completions",
                                  {"prompt": ids[i], "max_tokens": 20, "temperature": 0, **fields[i]})
            assert status == 200, body
            return body["choices"][0]["text"]

        with ThreadPoolExecutor(5) as pool:
            assert list(pool.map(one, range(5))) == expected
        log = server.log.getvalue()
        assert len(re.findall(r"completion=20 drafts=\d+/\d+", log)) >= 2, log  # the draft model's two
        for value, message in (("mtp", "no MTP head"), ("model:/etc", "speculative must be one of"),
                               ("lookahead", "speculative must be one of")):
            status, _, body = raw(server, "POST", "/v1/completions",
                                  {"prompt": ids[0], "max_tokens": 2, "speculative": value})
            assert status == 400 and body["error"]["param"] == "speculative", body
            assert message in body["error"]["message"]


BAD = [  # (body, status, param, code): every one gets OpenAI's envelope
    (b"{not json", 400, None, None),
    (b"[1, 2]", 400, None, None),
    ({"model": "tiny"}, 400, "messages", None),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role", None),
    ({"messages": USER, "temperature": 3}, 400, "temperature", None),
    ({"messages": USER, "top_p": 0}, 400, "top_p", None),
    ({"messages": USER, "presence_penalty": -2.5}, 400, "presence_penalty", None),
    ({"messages": USER, "max_tokens": 0}, 400, "max_tokens", None),
    ({"messages": USER, "n": 2}, 400, "n", None),
    ({"messages": USER, "response_format": {"type": "yaml"}}, 400, "response_format", None),
    ({"messages": USER, "top_logprobs": 2}, 400, "top_logprobs", None),
    ({"messages": USER, "stop": ["ok", ""]}, 400, "stop", None),
    ({"messages": USER, "tools": []}, 400, "tools", None),
    ({"messages": USER, "tool_choice": "required"}, 400, "tool_choice", None),
    ({"messages": USER, "tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
     400, "tool_choice", None),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "messages[0].content", None),
    ({"messages": [{"role": "user", "content": "word " * 600}]}, 400, "messages", "context_length_exceeded"),
    ({"messages": USER, "max_tokens": 500}, 400, "messages", "context_length_exceeded"),
]


SHORT = {"messages": USER, "max_tokens": 2}


def test_bad_requests_get_their_status_and_envelope_and_the_server_goes_on(qwen25):
    with running(qwen25, max_body=64 << 10) as server:
        for body, status, param, code in BAD:
            got, _, envelope = raw(server, "POST", "/v1/chat/completions", body)
            assert got == status, (body, envelope)
            error = envelope["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert error["type"] == "invalid_request_error"
            assert (error["param"], error["code"]) == (param, code), body
        assert raw(server, "POST", "/v1/completions", {"prompt": [1, 10**7]})[0] == 400  # id > vocabulary
        assert raw(server, "POST", "/v1/chat/completions", b"x" * (65 << 10))[0] == 413
        assert raw(server, "GET", "/v1/nowhere")[0] == 404
        status, headers, _ = raw(server, "GET", "/v1/chat/completions")
        assert status == 405 and headers["Allow"] == "POST"
        with pytest.raises(openai.BadRequestError, match="temperature"):
            chat(client(server), USER, temperature=-1)
        # unknown fields are ignored, and the server still answers
        status, _, body = raw(server, "POST", "/v1/chat/completions",
                              {"messages": USER, "max_tokens": 2, "user": "me", "x_extra": {}})
        assert status == 200 and body["usage"]["completion_tokens"] == 2
    log = server.log.getvalue().splitlines()
    assert len(log) == len(BAD) + 6 and " 413 " in log[len(BAD) + 1]  # one line per request
    assert not any("word" in line or "Weather" in line for line in log)  # no prompt text in the log


def test_a_full_queue_is_a_503_with_retry_after(qwen25):
    with decoder_replaced(qwen25, Gated) as decoder, running(qwen25, parallel=1, queue_size=0) as server:
        long = chat(client(server), ask("Go on."), max_tokens=400, stream=True)
        next(iter(long))
        decoder.gate.clear()  # the one slot stays busy
        status, headers, body = raw(server, "POST", "/v1/chat/completions", SHORT)
        assert status == 503 and headers["Retry-After"] == "1" and body["error"]["type"] == "server_error"
        long.close()
        decoder.gate.set()
        deadline = time.monotonic() + WAIT
        while server.api.engine.busy() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert raw(server, "POST", "/v1/chat/completions", SHORT)[0] == 200


def test_api_key(qwen25):
    with running(qwen25, api_key="s3cret") as server:
        for key in ("wrong", ""):
            with pytest.raises(openai.AuthenticationError):
                client(server, key or "none").models.list()
        status, _, body = raw(server, "GET", "/v1/models")
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        assert raw(server, "GET", "/health")[0] == 200  # for load balancers: no key
        assert client(server, "s3cret").models.list().data[0].id == "tiny"


def send_by_hand(server, body: dict) -> socket.socket:
    connection = socket.create_connection(server.server_address, timeout=WAIT)
    data = json.dumps(body)
    connection.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}"
                       f"\r\n\r\n{data}".encode())
    return connection


def wait_until_free(server, cancelled: int):
    engine, deadline = server.api.engine, time.monotonic() + WAIT
    while (engine.cancelled < cancelled or engine.busy()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.cancelled == cancelled and engine.busy() == 0


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_leaves_frees_its_slot(qwen25, stream):
    """Streaming (the next write fails) or not (the engine polls the socket each step): the job is
    cancelled at the first step after the client left, and the slot serves the next request."""
    with decoder_replaced(qwen25, Gated) as decoder, running(qwen25, parallel=1) as server:
        decoder.gate.clear()  # the engine takes the job into its slot, then holds before the first step
        connection = send_by_hand(server, {"messages": ask("Go on."), "max_tokens": 400, "stream": stream})
        if stream:
            assert connection.recv(4096).startswith(b"HTTP/1.1 200")
        while not server.api.engine.busy():
            time.sleep(0.01)
        connection.close()
        decoder.gate.set()
        wait_until_free(server, cancelled=1)
        assert raw(server, "POST", "/v1/chat/completions", SHORT)[0] == 200
    # its log line: 499 when no answer was sent; a stream's status line (200) went out before it left
    prompt = len(qwen25.tokenizer.apply_chat_template(ask("Go on.")))
    line = next(line for line in server.log.getvalue().splitlines() if f" prompt={prompt} " in line)
    assert f"POST /chat/completions {200 if stream else 499} prompt={prompt} cached=0 completion=" in line


def test_a_queued_stream_gets_keepalives_and_is_dropped_when_its_client_leaves(qwen25, monkeypatch):
    """While a stream waits (for a slot here, as during a long prefill), SSE comments keep it alive; if
    its client leaves meanwhile, the job never takes a slot."""
    monkeypatch.setattr("minqwen.serve.http_server.KEEPALIVE_SECONDS", 0)
    with decoder_replaced(qwen25, Gated) as decoder, running(qwen25, parallel=1) as server:
        busy = send_by_hand(server, {"messages": ask("Go on."), "max_tokens": 400, "stream": True})
        assert busy.recv(4096).startswith(b"HTTP/1.1 200")
        deadline = time.monotonic() + WAIT  # (its status line goes out as it is queued, before its slot)
        while not server.api.engine.busy() and time.monotonic() < deadline:
            time.sleep(0.01)
        decoder.gate.clear()  # the engine holds between two steps: the slot stays taken
        waiting = send_by_hand(server, {"messages": USER, "max_tokens": 400, "stream": True})
        received = b""
        while b": keepalive" not in received:
            received += waiting.recv(4096)
        waiting.close()
        deadline = time.monotonic() + WAIT
        while server.api.engine.waiting and time.monotonic() < deadline:
            time.sleep(0.05)
        engine = server.api.engine
        assert engine.cancelled == 1 and engine.busy() == 1  # it left the queue, not a slot
        busy.close()
        decoder.gate.set()
        wait_until_free(server, cancelled=2)


class Scripted:
    """Stands in for the decoder: runs the real network (so caches stay consistent), then makes script[i]
    by far the most likely token at the i-th generated position after a prompt of `start` tokens."""

    def __init__(self, decoder, start: int, script: list[int]):
        self.decoder, self.start, self.script = decoder, start, script

    def forward(self, batch, every_token=False):
        logits = self.decoder.forward(batch, every_token)
        for row, (cache, _) in zip(logits, batch):
            i = cache.length - self.start
            if 0 <= i < len(self.script):
                row[:] = 0
                row[self.script[i]] = 30
        return logits

    def __getattr__(self, name):
        return getattr(self.decoder, name)


def scripted(model, prompt, script):
    """The model writes `script` (text, or token ids) after `prompt`."""
    ids = model.tokenizer.encode(script) if isinstance(script, str) else script
    return decoder_replaced(model, lambda real: Scripted(real, len(prompt), ids))


def test_reasoning_and_hermes_tool_calls_through_the_server(qwen3):
    tok = qwen3.tokenizer
    prompt = tok.apply_chat_template(USER, tools=[WEATHER])
    script = ('<think>\nNeed the weather.\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": '
              '{"city": "Paris", "days": 2}}\n</tool_call><|im_end|>')
    with scripted(qwen3, prompt, script), running(qwen3) as server:
        api = client(server)
        message = chat(api, USER, tools=[WEATHER])
        choice = message.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert choice.message.reasoning_content == choice.message.reasoning == "Need the weather."
        call = choice.message.tool_calls[0]
        assert call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == {"city": "Paris", "days": 2}
        assert message.usage.completion_tokens_details.reasoning_tokens == len(tok.encode(
            "\nNeed the weather.\n</think>"))
        chunks = list(chat(api, USER, tools=[WEATHER], stream=True))
        deltas = [c.choices[0].delta for c in chunks]
        assert "".join(d.model_extra.get("reasoning_content") or "" for d in deltas) == "Need the weather."
        assert not any(d.content for d in deltas)
        calls = [tc for d in deltas for tc in d.tool_calls or []]
        assert len(calls) == 1 and calls[0].index == 0 and calls[0].id.startswith("call_")
        assert calls[0].function.arguments == call.function.arguments
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        # the answer goes back into the conversation, arguments as JSON text, and renders
        follow_up = USER + [choice.message.model_dump(exclude_none=True),
                            {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 24 C"}]
        status, _, body = raw(server, "POST", "/v1/chat/completions",
                              {"messages": follow_up, "tools": [WEATHER], "max_tokens": 2})
        assert status == 200, body


@pytest.fixture(scope="module")
def qwen35(tmp_path_factory):
    """A tiny hybrid (Gated DeltaNet) Qwen3.5 with the real Qwen3.5 tokenizer and template."""
    config = dict(QWEN3_5, vocab_size=248320, max_position_embeddings=1024, eos_token_id=248046)  # <|im_end|>
    folder = build_checkpoint(tmp_path_factory.mktemp("qwen35"), config, "bf16", tokenizer="qwen3.5")
    return minqwen.load(folder)


def test_qwen35_reasoning_and_xml_tool_calls_through_the_server(qwen35):
    prompt = qwen35.tokenizer.apply_chat_template(USER, tools=[WEATHER])
    script = ("The forecast tool.\n</think>\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n"
              "</parameter>\n<parameter=days>\n3\n</parameter>\n</function>\n</tool_call><|im_end|>")
    with scripted(qwen35, prompt, script), running(qwen35) as server:
        reply = chat(client(server), USER, tools=[WEATHER], temperature=None)
        message = reply.choices[0].message
        assert message.reasoning_content == "The forecast tool." and message.content is None
        assert json.loads(message.tool_calls[0].function.arguments) == {"city": "Paris", "days": 3}
        assert reply.choices[0].finish_reason == "tool_calls"


def test_the_next_turn_of_a_hybrid_chat_restarts_from_the_snapshot(qwen35):
    """Qwen3.5's template drops the reply's <think> when it renders the next turn, so the new prompt
    diverges inside the last one's tail: the slot goes back to its snapshot (taken before the last
    "<|im_start|>") instead of prefilling the whole history."""
    tok = qwen35.tokenizer
    first = [{"role": "user", "content": "Tell me a story about the sea."}]
    with running(qwen35, parallel=2) as server:
        api = client(server)
        reply = chat(api, first, max_tokens=6).choices[0]
        second = first + [{"role": "assistant", "content": reply.message.content or "",
                           "reasoning_content": reply.message.reasoning_content},
                          {"role": "user", "content": "And then?"}]
        answer = chat(api, second, max_tokens=6)
    prompt, first_prompt = tok.apply_chat_template(second), tok.apply_chat_template(first)
    start = tok.token_to_id("<|im_start|>")
    last_header = len(first_prompt) - 1 - first_prompt[::-1].index(start)  # where the snapshot was taken
    assert answer.usage.prompt_tokens_details.cached_tokens == last_header
    expected = qwen35.tokenizer.decode(greedy(qwen35, prompt, 6), skip_special_tokens=True)
    assert (answer.choices[0].message.reasoning_content or "") == expected.strip("\n")


def streamed_events(server, body: dict) -> list:
    """The data of each server-sent event of a streamed chat request: dicts, then "[DONE]"."""
    connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=WAIT)
    connection.request("POST", "/v1/chat/completions", json.dumps({**body, "stream": True}).encode(),
                       {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200
    lines = response.read().decode().splitlines()  # to the end: the server closes a stream's connection
    connection.close()
    return [line[6:] if line == "data: [DONE]" else json.loads(line[6:])
            for line in lines if line.startswith("data: ")]


def assert_logged_once(server, message: str):
    """The failure's message and one traceback in the server's log."""
    log = server.log.getvalue()
    assert log.count("Traceback (most recent call last)") == 1 and message in log, log


def short_answer(model) -> str:
    """The library's greedy answer to SHORT (computed before a test replaces the decoder)."""
    return expected_text(model, greedy(model, model.tokenizer.apply_chat_template(USER), 2))


def assert_serves_the_next_request(server, expected: str):
    assert raw(server, "GET", "/health")[0] == 200
    status, _, body = raw(server, "POST", "/v1/chat/completions", {**SHORT, "temperature": 0})
    assert status == 200 and body["choices"][0]["message"]["content"] == expected


def test_a_failure_admitting_a_request_fails_it_alone(qwen25):
    """The engine admits a job to a slot outside a forward pass (its cache rewound to the prompt's
    reusable prefix): a failure there is the job's, and the slot starts afresh."""
    expected = short_answer(qwen25)
    with running(qwen25, parallel=1) as server:
        def broken(tokens):
            raise RuntimeError("injected failure at admission")

        server.api.engine.slots[0].sequence.rewind_to_reusable_prefix = broken
        status, _, body = raw(server, "POST", "/v1/chat/completions", SHORT)
        assert status == 500 and body["error"]["type"] == "server_error"
        assert body["error"]["message"] == "RuntimeError: injected failure at admission"
        assert_logged_once(server, "RuntimeError: injected failure at admission")
        assert_serves_the_next_request(server, expected)


@pytest.mark.parametrize("failing", [1, 2])  # the prompt's pass, the first generated token's
@pytest.mark.parametrize("stream", [False, True])
def test_a_failing_forward_pass_fails_its_requests_and_the_server_goes_on(qwen25, stream, failing):
    """A 500 in OpenAI's envelope, or an SSE error event once the stream has begun; the traceback in
    the log; and the next request gets the right answer from a fresh slot."""
    message, expected = f"RuntimeError: injected failure in forward pass {failing}", short_answer(qwen25)
    with decoder_replaced(qwen25, lambda real: Failing(real, {failing})), running(qwen25) as server:
        if stream:
            events = streamed_events(server, SHORT)
            assert events[-1] == "[DONE]" and events[-2]["error"]["type"] == "server_error"
            assert events[-2]["error"]["message"] == message
        else:
            status, _, body = raw(server, "POST", "/v1/chat/completions", SHORT)
            assert status == 500 and body["error"] == {"message": message, "type": "server_error",
                                                       "param": None, "code": None}
        assert_logged_once(server, message)
        assert_serves_the_next_request(server, expected)
    first = server.log.getvalue().split("POST /chat/completions ")[1]
    # the tokens that were generated before the failure: the prompt's pass gives the first
    assert first.startswith("200 prompt=" if stream else "500 ")
    assert not stream or f"completion={failing - 1} " in first.splitlines()[0]


def test_an_engine_that_cannot_go_on_says_so(qwen25, monkeypatch):
    """A failure the engine cannot recover from (here, memory runs out as it gives the failed slot a
    fresh cache) ends its thread: the request in a slot and the one waiting end with a 500, /health
    says 503, and a new request gets a 503 at once, instead of waiting for ever."""
    with decoder_replaced(qwen25, lambda real: Failing(real, {1})) as decoder, \
            running(qwen25, parallel=1) as server, ThreadPoolExecutor(2) as pool:
        engine = server.api.engine
        decoder.gate.clear()
        in_slot = pool.submit(raw, server, "POST", "/v1/chat/completions", SHORT)
        while not engine.busy():
            time.sleep(0.01)
        waiting = pool.submit(raw, server, "POST", "/v1/chat/completions", SHORT)
        while not engine.waiting:
            time.sleep(0.01)

        def out_of_memory():
            raise MemoryError("injected: no memory for a fresh cache")

        monkeypatch.setattr(qwen25, "sequence", out_of_memory)
        decoder.gate.set()
        for request in (in_slot, waiting):
            status, _, body = request.result(timeout=WAIT)
            assert status == 500 and body["error"]["type"] == "server_error", body
        assert engine.failure == "MemoryError: injected: no memory for a fresh cache"
        for method, path in (("GET", "/health"), ("POST", "/v1/chat/completions")):
            status, _, body = raw(server, method, path, SHORT if method == "POST" else None)
            assert status == 503 and "restart the server" in body["error"]["message"], path
        # the engine thread writes its last words as the connections' threads answer: wait for them (bounded)
        deadline = time.monotonic() + WAIT
        while "engine: stopped for good" not in server.log.getvalue() and time.monotonic() < deadline:
            time.sleep(0.01)
        log = server.log.getvalue()
        # how many jobs were still the engine's when it stopped depends on which thread ended them first
        assert re.search(r"engine: stopped for good; [01] job\(s\) end with an error\nTraceback", log), log
        assert "MemoryError: injected" in log and "RuntimeError: injected" in log


def test_a_client_resetting_its_connection_is_no_failure(qwen25, capsys):
    """A reset while the server reads a request line (a client gone abruptly) logs no traceback, in the
    server's log or on stderr; what else fails there goes to the log with its traceback."""
    with running(qwen25) as server:
        threads = threading.active_count()
        connection = socket.create_connection(server.server_address, timeout=WAIT)
        connection.sendall(b"POST /v1/chat/comp")  # the server waits for the rest of the line
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        connection.close()  # with a linger of 0: a reset, not an orderly close
        deadline = time.monotonic() + WAIT
        while threading.active_count() > threads and time.monotonic() < deadline:
            time.sleep(0.01)  # the connection's thread has read the reset and ended
        assert threading.active_count() == threads
        try:
            raise ValueError("injected failure reading a request")
        except ValueError:
            server.handle_error(None, ("127.0.0.1", 0))
    assert "Traceback" not in capsys.readouterr().err
    assert_logged_once(server, "ValueError: injected failure reading a request")


def test_stopping_ends_the_requests_in_flight(qwen25):
    """What shutdown does to requests under way: a stream gets an SSE error event (the status line is
    long gone), a request waiting for a slot a 503."""
    with decoder_replaced(qwen25, Gated) as decoder, running(qwen25, parallel=1) as server:
        chunks = iter(chat(client(server), ask("Go on."), max_tokens=400, stream=True))
        next(chunks)
        decoder.gate.clear()
        with ThreadPoolExecutor(2) as pool:
            waiting = pool.submit(raw, server, "POST", "/v1/chat/completions", SHORT)
            # the stream in the one slot and SHORT queued (the stream's first chunk, its role, is sent as
            # its job is queued: it may still be waiting, and SHORT not yet submitted, when next() returns)
            engine, deadline = server.api.engine, time.monotonic() + WAIT
            while not (engine.busy() and engine.waiting) and time.monotonic() < deadline:
                time.sleep(0.01)
            stopping = pool.submit(engine.stop)
            decoder.gate.set()  # the step under way ends, then the engine stops
            stopping.result(timeout=WAIT)
            status, _, body = waiting.result(timeout=WAIT)
        assert status == 503 and "shutting down" in body["error"]["message"]
        with pytest.raises(openai.APIError, match="shutting down"):
            list(chunks)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_command_shuts_down_cleanly(qwen25, sig):
    """The command, with its API key from the environment: serves, then exits 0 on either signal."""
    command = ["serve", "--model", str(qwen25.path), "--port", "0", "--parallel", "2"]
    process = subprocess.Popen([sys.executable, "-m", "minqwen", *command], stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, MINQWEN_API_KEY="from-env"))
    try:
        line = process.stderr.readline()
        assert line.startswith("serving ") and "API key required" in line, line
        port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
        for path, key, status in (("/health", "", 200), ("/v1/models", "", 401),
                                  ("/v1/models", "from-env", 200)):
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
            connection.request("GET", path, headers={"Authorization": f"Bearer {key}"})
            assert connection.getresponse().status == status, path
            connection.close()
        process.send_signal(sig)
        assert process.wait(timeout=WAIT) == 0
        assert "shutting down" in process.stderr.read()
    finally:
        process.kill()
