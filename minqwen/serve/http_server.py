"""python -m minqwen serve: the OpenAI API (openai_api.py) over HTTP, on the standard library's
ThreadingHTTPServer.

    POST /v1/chat/completions, /v1/completions      a generation: the whole answer, or server-sent events
    GET  /v1/models[/{id}], /health;   POST /tokenize, /detokenize
    (every /v1/x also answers at /x)

    ApiServer       the listening socket, the API key, the body limit, the log
    Handler         one connection's thread: route -> authorize -> read the JSON body -> the endpoint ->
                    JSON out; for a generation, the job handed to the engine thread (engine.py, which
                    runs all requests' sequences in one batch) and what comes back written as it comes
    serve()         the command: engine and server up, until SIGINT or SIGTERM

Everything is checked before the status line, so a bad request gets its 4xx and OpenAI's envelope; once
a stream has begun, an error is an SSE event. A client that leaves is noticed within an engine step (its
socket polled for EOF, or a write that fails) and its slot freed.

Safe by default: binds 127.0.0.1; an API key (--api-key or MINQWEN_API_KEY) compared in constant time;
bodies up to MAX_BODY bytes; a bounded queue (503 + Retry-After past it); one log line per request —
status, token counts, time — never a prompt; a failure's traceback in the same log.
"""
from __future__ import annotations

import hmac
import json
import queue
import select
import signal
import socket
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ..errors import CheckpointError
from ..model import Model
from ..text.constraints import llg_tokenizer
from ..text.speculative import DRAFT_TOKENS
from .engine import End, Engine, Job
from .openai_api import Api, ApiError, Outcome, Request, Response, invalid

MAX_BODY = 16 << 20  # bytes of a request body
KEEPALIVE_SECONDS = 10  # an SSE comment after this long without an event (a long prefill), so proxies
# and clients do not time out; it also finds a client that left while its prompt waited
POLL_SECONDS = 0.25  # how often a connection's thread checks on a job still waiting for a slot


class ApiServer(ThreadingHTTPServer):
    daemon_threads = True  # a connection left open by a client does not hold up shutdown

    def __init__(self, address, api: Api, api_key: str | None = None, max_body: int = MAX_BODY,
                 log=sys.stderr):
        super().__init__(address, Handler)
        self.api, self.max_body, self.log = api, max_body, log
        self.api_key = api_key.encode() if api_key else None
        self.requests_in_flight = 0
        self.lock = threading.Lock()

    def handle_error(self, request, client_address):
        """An exception outside dispatch, as a request line is read: a client that reset its connection
        (one that closed it before its answer was written gets a reset for the answer) is no failure;
        anything else goes to the log with its traceback (socketserver would print it to stderr)."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            print(f"{client_address[0]}: the connection failed", file=self.log, flush=True)
            traceback.print_exc(file=self.log)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ApiServer
    timeout = 600  # seconds a read or a write may block (an idle keep-alive connection is then closed)

    ROUTES = {("GET", "/health"): Api.health, ("GET", "/models"): Api.models,
              ("POST", "/chat/completions"): Api.chat, ("POST", "/completions"): Api.completion,
              ("POST", "/tokenize"): Api.tokenize, ("POST", "/detokenize"): Api.detokenize}

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
            endpoint = self.ROUTES.get((self.command, "/models" if path.startswith("/models/") else path))
            if endpoint is None:
                allowed = [method for method, p in self.ROUTES if p == path]
                if allowed:
                    raise ApiError(405, f"{path} takes {allowed[0]}", headers={"Allow": allowed[0]})
                raise ApiError(404, f"no such endpoint: {self.command} {self.path}", code="not_found")
            if endpoint is not Api.health:
                self.authorize()
            body = self.read_json() if self.command == "POST" else {}
            answer = endpoint(self.server.api, body, path)
            if isinstance(answer, Request):
                self.generate(answer)
            else:
                self.send_json(200, answer)
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

    # ---- generation

    def generate(self, request: Request):
        response = self.server.api.start(request, self.client_gone)
        with self.server.lock:
            self.server.requests_in_flight += 1
        try:
            outcome = self.stream(response) if request.stream else self.wait(response)
        finally:
            with self.server.lock:
                self.server.requests_in_flight -= 1
        job = response.job
        self.counts = (f" prompt={len(request.prompt)} cached={job.cached_tokens} completion={outcome.tokens}"
                       + (f" drafts={job.accepted}/{job.drafted}" if job.drafted else ""))

    def events(self, job: Job):
        """The job's events as they come, and None after each POLL_SECONDS without one (a job waiting
        for a slot is not polled by the engine: its client is checked here)."""
        while True:
            try:
                event = job.events.get(timeout=POLL_SECONDS)
            except queue.Empty:
                if self.client_gone():
                    self.server.api.engine.cancel(job)
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
        error = response.error(outcome)
        if error is not None:
            raise error
        if outcome.end.finish_reason != "cancelled":
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
        error = response.error(whole)
        if error is not None:
            self.send_event(error.body())
        elif whole.end.finish_reason != "cancelled":
            for chunk in response.closing_chunks(whole, pending):
                self.send_event(chunk)
        self.send_bytes(b"data: [DONE]\n\n")
        return whole

    # ---- the connection

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
          api_key: str | None = None, model_id: str | None = None, speculative: str | None = None,
          most_drafts: int = DRAFT_TOKENS, reasoning_budget: int = -1):
    """Serve until SIGINT or SIGTERM; then stop taking requests, end the ones in flight with an error,
    and return."""
    if model.tokenizer is None:
        raise CheckpointError(f"{model.path}: serving needs the checkpoint's tokenizer.json")
    engine = Engine(model, parallel, queue_size, log=sys.stderr, speculative=speculative,
                    most_drafts=most_drafts)
    api = Api(model, engine, model_id or model_name(model.path), reasoning_budget)
    server = ApiServer((host, port), api, api_key)
    engine.start()
    # llguidance's view of the vocabulary takes a second or two to build: build it now, not in the first
    # request that asks for structured output or sends tools
    vocabulary = (model.tokenizer, model.config.vocab_size, model.eos_token_ids)
    threading.Thread(target=llg_tokenizer, args=vocabulary, name="minqwen-llguidance", daemon=True).start()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    threading.Thread(target=server.serve_forever, name="minqwen-http", daemon=True).start()
    host, port = server.server_address[:2]
    print(f"serving {server.api.model_id} at http://{host}:{port}/v1 ({parallel} slots of up to "
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
