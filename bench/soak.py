"""Soak: hundreds of mixed requests from concurrent clients against `minqwen serve`, then the checks that
it came out whole.

    python bench/soak.py [--requests 600] [--clients 16] [--parallel 4] [--seed 0] [--max-seconds 3600]
                         [--shape tiny] [--work ~/.cache/minqwen-bench] [--out results.json]

The workload, seeded (a run can be repeated), kinds in a fixed rotation (WORKLOAD):
    greedy      chat or completions, streamed or not, temperature 0, 1-24 new tokens, some with stop
                strings; prompts drawn from a few conversations, so the slots' prompt caches get hits
    sampled     the same, with random temperature, top_p, top_k, min_p, penalties, seed and logprobs
    leaves      a client that disconnects: mid-stream after an event or two, or right after sending
    malformed   not JSON, not an object, out-of-range fields, a token id past the vocabulary, a prompt
                past the context window: 400
    oversized   a body over the server's limit: 413
    wrong_key   a wrong or missing API key: 401

Then: /health answers 200, every slot is free and nothing waits, the server logged no traceback;
resident memory (VmRSS) at the end against its first plateau (the highest in the first quarter of the
requests, by which every kind has run several times); and every greedy request that completed is sent
again, one at a time, and must get the same answer: batching, chunked prefill, the prompt cache and
the clients around it change nothing.

The server runs in this process (/proc/self/status is its memory; the client threads' share is small
and does not grow), on a loopback port, with a tiny random-weight Qwen2.5 (its real tokenizer and chat
template) unless --shape names a bench shape. Every request has a timeout and the run a deadline. The
last stdout line is one JSON document. tests/test_soak.py runs a few dozen of the same requests.
"""
from __future__ import annotations

import argparse
import gc
import http.client
import io
import json
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import minqwen
from minqwen.serve.engine import Engine
from minqwen.serve.http_server import ApiServer
from minqwen.serve.openai_api import Api

API_KEY = "soak-key"
MAX_BODY = 64 << 10  # the server's body limit here: an oversized body need not be large
WAIT = 300  # seconds a request may take before its client gives up: a bound, never a measurement
TOKEN_IDS = 151643  # ordinary Qwen2.5 tokens (the special ones start here)
WORKLOAD = ("greedy", "sampled", "greedy", "leaves", "sampled", "malformed", "greedy", "wrong_key",
            "sampled", "oversized", "greedy", "leaves")  # the kinds in turn: every 12 requests see each
SYSTEMS = ("Be brief.", "Answer as a pirate would.", "You are a careful assistant.")
TOPICS = ("the sea", "a clock", "bread", "rain in the mountains", "a red bicycle", "the moon")
STOPS = ([" the"], ["."], ["\n", "!"])


@dataclass
class Call:
    """One request of the workload, and what it must get."""

    kind: str
    path: str
    body: bytes
    stream: bool = False
    key: str | None = API_KEY
    status: int | None = 200  # None: the client leaves before the status line
    leave_after: int | None = None  # a leaving stream: events read before the client disconnects


@dataclass
class Answer:
    status: int | None = None
    text: str = ""  # the content (chat) or text (completions), streamed chunks joined
    finish_reason: str | None = None
    completion_tokens: int | None = None
    error: str | None = None  # the error envelope's message, an SSE error event's, or a transport error
    envelope: bool = True  # an error came in OpenAI's envelope
    done: bool = False  # a stream's "data: [DONE]" arrived

    def result(self) -> tuple:
        return self.text, self.finish_reason, self.completion_tokens


# ---- the workload

def conversation(rng) -> list[dict]:
    """A chat from a small set, sometimes with an earlier turn (so prompts share prefixes)."""
    topic = TOPICS[rng.integers(len(TOPICS))]
    messages = [{"role": "system", "content": SYSTEMS[rng.integers(len(SYSTEMS))]},
                {"role": "user", "content": f"Tell me about {topic}."}]
    if rng.random() < 0.4:
        messages += [{"role": "assistant", "content": f"{topic.capitalize()} is a long story."},
                     {"role": "user", "content": "Go on, briefly."}]
    return messages


def generation(rng) -> tuple[str, dict]:
    """A chat or completions request body of random shape, without sampling options."""
    stream = bool(rng.random() < 0.5)
    fields = {"max_tokens": int(rng.integers(1, 25)), "stream": stream}
    if stream:
        fields["stream_options"] = {"include_usage": True}
    if rng.random() < 0.6:
        return "/v1/chat/completions", {"messages": conversation(rng), **fields}
    if rng.random() < 0.5:
        topic = TOPICS[rng.integers(len(TOPICS))]
        return "/v1/completions", {"prompt": f"Once upon a time, {topic}", **fields}
    ids = rng.integers(0, TOKEN_IDS, size=int(rng.integers(3, 60))).tolist()
    return "/v1/completions", {"prompt": ids, **fields}


def greedy(rng, context: int) -> Call:
    path, body = generation(rng)
    body["temperature"] = 0
    if rng.random() < 0.3:
        body["stop"] = STOPS[rng.integers(len(STOPS))]
    return Call("greedy", path, json.dumps(body).encode(), body["stream"])


def sampled(rng, context: int) -> Call:
    path, body = generation(rng)
    body.update(temperature=round(float(rng.uniform(0.1, 1.5)), 3),
                top_p=round(float(rng.uniform(0.3, 1)), 3), top_k=int(rng.choice([-1, 0, 5, 40])),
                min_p=float(rng.choice([0, 0.05])),
                presence_penalty=round(float(rng.uniform(-1, 1)), 3),
                frequency_penalty=round(float(rng.uniform(-1, 1)), 3))
    if rng.random() < 0.3:
        body["repetition_penalty"] = 1.1
    if rng.random() < 0.5:
        body["seed"] = int(rng.integers(1 << 31))
    if rng.random() < 0.3:
        k = int(rng.integers(0, 6))
        body.update({"logprobs": True, "top_logprobs": k} if "messages" in body else {"logprobs": k})
    return Call("sampled", path, json.dumps(body).encode(), body["stream"])


def leaves(rng, context: int) -> Call:
    """A long generation whose client goes: after one to three stream events, or before any answer."""
    path, body = generation(rng)
    body.update(max_tokens=200, temperature=0.8)
    if rng.random() < 0.7:
        body.update(stream=True)
        return Call("leaves", path, json.dumps(body).encode(), True, leave_after=int(rng.integers(1, 4)))
    body.update(stream=False)
    return Call("leaves", path, json.dumps(body).encode(), status=None, leave_after=0)


def malformed(rng, context: int) -> Call:
    user = [{"role": "user", "content": "Hello"}]
    bodies = [("/v1/chat/completions", b"{not json"), ("/v1/chat/completions", b"[1, 2]"),
              ("/v1/chat/completions", {"messages": "hello"}),
              ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}),
              ("/v1/chat/completions", {"messages": user, "temperature": 3}),
              ("/v1/chat/completions", {"messages": user, "max_tokens": 0}),
              ("/v1/completions", {"prompt": [1, 10 ** 9]}),
              ("/v1/completions", {"prompt": "Hello", "max_tokens": context})]  # past the window
    path, body = bodies[rng.integers(len(bodies))]
    return Call("malformed", path, body if isinstance(body, bytes) else json.dumps(body).encode(), status=400)


def oversized(rng, context: int) -> Call:
    body = b'{"prompt": "' + b"x" * MAX_BODY + b'"}'
    return Call("oversized", "/v1/completions", body, status=413)


def wrong_key(rng, context: int) -> Call:
    call = greedy(rng, context)
    call.kind, call.key, call.status = "wrong_key", ("wrong", None)[rng.integers(2)], 401
    return call


MAKERS = {"greedy": greedy, "sampled": sampled, "leaves": leaves, "malformed": malformed,
          "oversized": oversized, "wrong_key": wrong_key}


def workload(requests: int, seed: int, context: int) -> list[Call]:
    rng = np.random.default_rng(seed)
    return [MAKERS[WORKLOAD[i % len(WORKLOAD)]](rng, context) for i in range(requests)]


# ---- one client's request

def send(port: int, call: Call) -> Answer:
    """One request on its own connection, read as the client of its kind would."""
    headers = {"Content-Type": "application/json"}
    if call.key is not None:
        headers["Authorization"] = f"Bearer {call.key}"
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
    answer = Answer()
    try:
        connection.request("POST", call.path, call.body, headers)
        if call.leave_after == 0:
            return answer  # gone before the answer (the connection closes below)
        response = connection.getresponse()
        answer.status = response.status
        if call.stream and response.status == 200:
            read_stream(response, answer, call.leave_after)
        else:
            read_whole(json.loads(response.read() or b"{}"), answer)
    except (OSError, http.client.HTTPException, ValueError) as e:
        answer.error = f"{type(e).__name__}: {e}"
    finally:
        connection.close()
    return answer


def read_stream(response, answer: Answer, leave_after: int | None):
    events = 0
    for line in response:  # to the end of the stream: the server closes its connection
        if not line.startswith(b"data: "):
            continue  # blank lines and keep-alive comments
        if line.strip() == b"data: [DONE]":
            answer.done = True
            return
        chunk, events = json.loads(line[len(b"data: "):]), events + 1
        if "error" in chunk:
            answer.error, answer.envelope = chunk["error"].get("message"), is_envelope(chunk)
        for choice in chunk.get("choices") or []:
            answer.text += (choice["delta"].get("content") or "") if "delta" in choice else choice["text"]
            answer.finish_reason = choice["finish_reason"] or answer.finish_reason
        if chunk.get("usage"):
            answer.completion_tokens = chunk["usage"]["completion_tokens"]
        if leave_after is not None and events >= leave_after:
            return  # the client leaves mid-stream


def read_whole(body: dict, answer: Answer):
    if "error" in body:
        answer.error, answer.envelope = body["error"].get("message"), is_envelope(body)
        return
    choice = body["choices"][0]
    answer.text = (choice["message"]["content"] or "") if "message" in choice else choice["text"]
    answer.finish_reason = choice["finish_reason"]
    answer.completion_tokens = body["usage"]["completion_tokens"]


def is_envelope(body: dict) -> bool:
    return set(body["error"]) == {"message", "type", "param", "code"}


def unexpected(call: Call, answer: Answer) -> str | None:
    """What is wrong with an answer, if anything."""
    if answer.status != call.status:
        return f"status {answer.status}, expected {call.status} ({answer.error})"
    if call.leave_after is not None:
        return None  # nothing more was read
    if call.status != 200:
        return None if answer.error is not None and answer.envelope else f"no error envelope: {answer}"
    if answer.error is not None or answer.finish_reason not in ("stop", "length"):
        return f"did not complete: {answer.error or answer.finish_reason}"
    if call.stream and not answer.done:
        return "the stream ended without [DONE]"
    return None


# ---- the run

@contextmanager
def serving(model, parallel: int, queue_size: int):
    """The server on a free loopback port in this process; its log (request lines, tracebacks) kept."""
    log = io.StringIO()
    engine = Engine(model, parallel, queue_size, log=log)
    server = ApiServer(("127.0.0.1", 0), Api(model, engine, "soak"), API_KEY, MAX_BODY, log)
    engine.start()
    threading.Thread(target=server.serve_forever, name="soak-http", daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        engine.stop()
        server.server_close()


def resident_mib() -> float:
    """This process's resident memory now (Linux's VmRSS)."""
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kib / 1024


def health(port: int) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
    connection.request("GET", "/health")
    status = connection.getresponse().status
    connection.close()
    return status


def soak(model, requests: int, clients: int, parallel: int = 4, seed: int = 0,
         max_seconds: float = 3600) -> dict:
    """Run the workload; returns the figures and the problems found (empty lists when all is well)."""
    calls = workload(requests, seed, model.context_length)
    with serving(model, parallel, queue_size=2 * clients) as server:
        port, engine = server.server_address[1], server.api.engine
        for call in workload(len(WORKLOAD), seed + 1, model.context_length):
            send(port, call)  # warm-up, one of each kind: JIT compiles, first buffers, tokenizer caches
        rss_start, started = resident_mib(), time.monotonic()
        deadline = started + max_seconds
        answers: list[Answer | None] = [None] * len(calls)
        rss: list[float] = []  # after each request, in the order they ended

        def client(i: int):
            if time.monotonic() < deadline:  # past it, the rest are not sent (and reported as such)
                answers[i] = send(port, calls[i])
                rss.append(resident_mib())

        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(client, range(len(calls))))
        concurrent_seconds = time.monotonic() - started
        settled = time.monotonic() + WAIT
        while (engine.busy() or engine.waiting) and time.monotonic() < settled:
            time.sleep(0.05)  # the last leaving clients' slots: freed at the next step
        idle = engine.busy() == 0 and not engine.waiting
        status = health(port)
        gc.collect()
        rss_end = resident_mib()
        sent = [(call, answer) for call, answer in zip(calls, answers) if answer is not None]
        problems = [f"{call.kind} {call.path}{' stream' if call.stream else ''}: {why}"
                    for call, answer in sent if (why := unexpected(call, answer))]
        completed = [(call, answer) for call, answer in sent
                     if call.kind == "greedy" and not unexpected(call, answer)]
        mismatches = []
        for call, answer in completed:  # one at a time: nothing batched beside it
            alone = send(port, call)
            if alone.result() != answer.result():
                mismatches.append({"path": call.path, "stream": call.stream, "concurrent": answer.result(),
                                   "alone": alone.result()})
        log = server.log.getvalue()
    plateau = max(rss[:max(1, len(rss) // 4)], default=rss_start)
    statuses: dict[str, Counter] = {}
    for call, answer in sent:
        statuses.setdefault(call.kind, Counter())[str(answer.status)] += 1
    return {"requests": len(calls), "sent": len(sent), "clients": clients, "parallel": parallel, "seed": seed,
            "concurrent_seconds": round(concurrent_seconds, 1), "statuses": statuses,
            "unexpected": problems, "health": status, "idle": idle, "tracebacks": log.count("Traceback"),
            "greedy_compared": len(completed), "mismatches": mismatches,
            "rss_mib": {"start": round(rss_start, 1), "plateau": round(plateau, 1),
                        "peak": round(max(rss, default=rss_start), 1), "end": round(rss_end, 1),
                        "by_tenth": [round(max(part), 1) for part in np.array_split(rss, 10) if len(part)]},
            "growth_after_plateau_mib": round(rss_end - plateau, 1)}


def tiny_checkpoint(work: Path) -> Path:
    """Qwen2.5-0.5B-Instruct's config with tiny sizes, random bf16 weights, the real tokenizer: the
    server's machinery, not the matrix products, is what a soak exercises."""
    from checkpoints import DATA, DONE, build_random_checkpoint  # bench/checkpoints.py (see main)

    folder = Path(work).expanduser() / "soak-tiny"
    if not (folder / DONE).exists():
        config = json.loads((DATA / "configs" / "qwen2.5-0.5b-instruct.config.json").read_text())
        config.update(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=512)
        build_random_checkpoint(folder, config, DATA / "tokenizers" / "qwen2.5")
    return folder


def main():
    # bench/'s own modules are imported here, not at the top: tests/test_soak.py loads this file for its
    # workload, and there `checkpoints` is the tests' module of that name
    from checkpoints import SHAPES, bench_checkpoint
    from common import report

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients")
    parser.add_argument("--parallel", type=int, default=4, help="the server's slots")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-seconds", type=float, default=3600, help="no request is sent after this")
    parser.add_argument("--shape", default="tiny", choices=["tiny", *sorted(SHAPES)])
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "minqwen-bench")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON document here")
    args = parser.parse_args()
    folder = tiny_checkpoint(args.work) if args.shape == "tiny" else bench_checkpoint(args.work, args.shape)
    started = time.perf_counter()
    results = {"shape": args.shape, **soak(minqwen.load(folder), args.requests, args.clients, args.parallel,
                                           args.seed, args.max_seconds)}
    results["seconds"] = round(time.perf_counter() - started)
    rss = results["rss_mib"]
    print(f"{results['sent']} of {results['requests']} requests from {args.clients} clients on "
          f"{args.parallel} slots in {results['concurrent_seconds']} s; statuses by kind: "
          f"{ {kind: dict(counts) for kind, counts in results['statuses'].items()} }")
    print(f"unexpected answers: {len(results['unexpected'])}; /health {results['health']}; slots free: "
          f"{results['idle']}; tracebacks logged: {results['tracebacks']}; greedy answers compared with "
          f"their sequential run: {results['greedy_compared']}, mismatches: {len(results['mismatches'])}")
    print(f"resident memory (MiB): start {rss['start']}, first plateau {rss['plateau']}, peak {rss['peak']}, "
          f"end {rss['end']} ({results['growth_after_plateau_mib']:+} after the plateau); "
          f"{results['seconds']} s in all")
    for problem in results["unexpected"][:20]:
        print("  unexpected:", problem)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    report("soak", results)


if __name__ == "__main__":
    main()
