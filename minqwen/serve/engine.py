"""Continuous batching: one thread owns the model and runs every request's sequence, together.

    each step:
        admit waiting jobs to free slots     the slot whose cache shares the longest prefix with the
                                             prompt (the prompt cache), else the least recently used
        drop jobs whose client has gone      (cancellation takes effect within one step)
        one Decoder.forward over             every generating slot's last token (a decode step each)
                                             + chunks of prompts being prefilled, at most
                                               PREFILL_PER_STEP tokens while others generate, so
                                               their streams keep flowing (all 512 rows when none do)
        for each slot whose prompt is in     its own Sampler picks the next token (own generator,
                                             penalties, limits); its Reply turns it into text

Speculative decoding (text/speculative.py), per job: a generating slot brings its last token and the
tokens its drafter guesses follow it, all verified in the same pass as the other slots' rows; its
sampler then picks a token after each row while they agree with the drafts, and the slot forgets the
rejected ones. Each slot keeps its own drafters (their caches follow its sequence) and draft length.

A decode step is bound by reading the weights, and one forward pass reads them once for the whole
batch: N streams cost little more than one (bench/serve.py). Each slot has its own Cache, which may
grow to the whole context window: slots never divide the window between them. A hybrid model's slot
takes a snapshot of its DeltaNet state where the job says (the end of the prompt's last message), the
one point a chat's next turn is sure to share (Cache.snapshot).

The engine knows nothing of HTTP: a Job carries its prompt, Sampler, Reply, a `client_gone` check and
a queue, into which the engine puts a Token event per generated token and one End event.

Failures: an exception ends only the jobs it touched, with End(error=...), after its traceback goes to
the log: one job's, if its admission, client check or sampling raised; the batch's, if the forward pass
did (their slots start afresh, a cache may be half-updated). The engine then goes on. Should the
engine thread itself end (its recovery failed, e.g. out of memory), every job ends with an error, the
engine says why in `failure`, and `submit` refuses all jobs from then on (Stopped).
"""
from __future__ import annotations

import queue
import sys
import threading
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, TextIO

import numpy as np

from ..errors import ConfigError
from ..model import Model
from ..network.decoder import Sequence
from ..text.generation import Sampler
from ..text.reply import Delta, Reply
from ..text.speculative import DRAFT_TOKENS, DraftLength, settle

MAX_PARALLEL = 64  # slots: a decode batch up to 64 rows streams each weight once (kernels/linear.py
# FEW_TOKENS; any number with MINQWEN_PREFILL=bf16; GGML blocks, int8 / int4 included, up to INTEGER_TOKENS =
# 16); past it the products go to the prefill kernels
MAX_DRAFTS = 15  # tokens a slot may draft a step: with its last token, 16 rows, the integer kernels' batch
PREFILL_PER_STEP = 256  # prompt tokens a step takes while other slots generate: ~0.5-1 s of prefill on
# the 0.5B shape, the longest a running stream then waits for a token


@dataclass
class Token:
    token: int
    delta: Delta | None  # what the token added to the reply (None without a Reply)
    logprobs: tuple[float, list[tuple[int, float]]] | None  # log p(token), the top (id, log p)


@dataclass
class End:
    finish_reason: str | None  # "stop", "length", "cancelled", "shutdown"; None after an error
    delta: Delta | None = None  # the reply's held-back text, an unclosed tool call
    error: str | None = None


@dataclass
class Job:
    """One request as the engine sees it."""

    prompt: list[int]
    sampler: Sampler
    reply: Reply | None = None
    top_logprobs: int | None = None  # None: no log-probabilities; k: the chosen token's and the top k
    snapshot_at: int | None = None  # a hybrid model snapshots its state after this many prompt tokens
    client_gone: Callable[[], bool] = lambda: False  # polled every step by the engine thread
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: bool = False  # set by Engine.cancel, from the client's thread
    cached_tokens: int = 0  # prompt tokens found in the slot's cache
    speculative: str | None = None  # the drafter (Model.drafter's names), None: plain decoding
    drafted: int = 0  # tokens drafted for it, and of them accepted
    accepted: int = 0


class Busy(Exception):
    """Every slot is taken and the queue is full (or the engine is stopping)."""


class Stopped(Exception):
    """The engine thread has ended on an error (Engine.failure): no job will run again."""


class Slot:
    def __init__(self, sequence: Sequence):
        self.sequence = sequence
        self.job: Job | None = None
        self.pending: list[int] = []  # tokens to run next: the rest of the prompt, or the last new token
        self.prefilling = False
        self.used = 0  # the step it was last released at (least recently used slots are taken first)
        self.drafters: dict[str, object] = {}  # by name, made on first use: their caches follow the sequence
        self.drafter = None  # the job's
        self.drafts: list[int] = []  # verified in the pass under way, after pending
        self.length: DraftLength | None = None  # the job's, set when it is admitted

    def chunk_limit(self) -> int:
        """Tokens the next prefill chunk may take: up to the snapshot point, for a hybrid model."""
        cache, at = self.sequence.cache, self.job.snapshot_at
        if cache.deltanet_layers and at is not None and at > cache.length:
            return at - cache.length
        return len(self.pending)


class Engine:
    """`submit(job)` from any thread; `start()`, `stop()`. Runs jobs in `parallel` slots, keeps up to
    `queue_size` more waiting, and refuses the rest (Busy)."""

    def __init__(self, model: Model, parallel: int = 4, queue_size: int = 32,
                 prefill_per_step: int = PREFILL_PER_STEP, log: TextIO | None = None,
                 speculative: str | None = None, most_drafts: int = DRAFT_TOKENS):
        if not 1 <= parallel <= MAX_PARALLEL:
            raise ConfigError(f"parallel must be in [1, {MAX_PARALLEL}], got {parallel}")
        if not 1 <= most_drafts <= MAX_DRAFTS:
            raise ConfigError(f"the most tokens to draft must be in [1, {MAX_DRAFTS}], got {most_drafts}")
        if queue_size < 0:
            raise ConfigError(f"the queue size must be >= 0, got {queue_size}")
        self.model, self.rows = model, model.decoder.ws.rows
        self.slots = [Slot(model.sequence()) for _ in range(parallel)]
        self.queue_size, self.prefill_per_step, self.most_drafts = queue_size, prefill_per_step, most_drafts
        self.speculative = speculative  # the jobs' default drafter (the API's `speculative` field chooses)
        if speculative:
            model.drafter(speculative)  # a name it cannot draft with fails here, not in every job
        self.waiting: deque[Job] = deque()
        self.lock = threading.Condition()
        self.running = False
        self.thread: threading.Thread | None = None
        self.steps = 0
        self.cancelled = 0  # jobs ended because their client went away
        self.log = log or sys.stderr  # failures' tracebacks
        self.failure: str | None = None  # why the engine thread ended, if an error ended it

    def submit(self, job: Job):
        with self.lock:
            if self.failure is not None:
                raise Stopped(self.failure)
            if not self.running or len(self.waiting) + self.busy() >= len(self.slots) + self.queue_size:
                raise Busy()
            self.waiting.append(job)
            self.lock.notify()

    def cancel(self, job: Job):
        """From the client's thread: a waiting job leaves the queue now; a running one frees its slot at
        the next step."""
        with self.lock:
            job.cancelled = True
            if job in self.waiting:
                self.waiting.remove(job)
                self._end(job, End("cancelled"))

    def start(self):
        self.running = True
        self.thread = threading.Thread(target=self._run, name="minqwen-engine", daemon=True)
        self.thread.start()

    def stop(self):
        """Finish the step under way, then end every job ("shutdown")."""
        with self.lock:
            self.running = False
            self.lock.notify()
        if self.thread is not None:
            self.thread.join()
        for job in [*self.waiting, *(slot.job for slot in self.slots if slot.job is not None)]:
            job.events.put(End("shutdown"))
        self.waiting.clear()
        for slot in self.slots:
            slot.job = None

    def check(self, prompt: list[int], room: int):
        """Sequence.check, the one validation point: ids inside the vocabulary, and the prompt plus
        `room` new tokens inside one slot's context window."""
        self.slots[0].sequence.check(prompt, 0, room)

    def busy(self) -> int:
        """Jobs in slots."""
        return sum(slot.job is not None for slot in self.slots)

    def _run(self):
        try:
            while True:
                with self.lock:
                    while self.running and not self.waiting and not self.busy():
                        self.lock.wait()
                    if not self.running:
                        return
                    self._admit()
                try:
                    self.step()
                except Exception as e:  # outside the parts step guards (choosing the batch): every slot
                    self._fail(e, self.slots, "a step")
        except BaseException as e:  # the engine cannot go on: no job may wait for it for ever
            self._stop_for_good(e)

    def _admit(self):
        """Waiting jobs to free slots: the one with the longest reusable prefix, else the least recently
        used (its cache is the least likely to be wanted again)."""
        while self.waiting and not all(slot.job for slot in self.slots):
            job = self.waiting.popleft()
            if job.cancelled:
                self._end(job, End("cancelled"))
                continue
            free = [slot for slot in self.slots if slot.job is None]
            slot = free[0]  # where the job fails should choosing its slot fail
            try:
                slot = max(free, key=lambda s: (s.sequence.reusable_prefix(job.prompt), -s.used))
                slot.job = job
                job.cached_tokens = slot.sequence.rewind_to_reusable_prefix(job.prompt)
                slot.pending, slot.prefilling = job.prompt[job.cached_tokens:], True
                if job.speculative and job.speculative not in slot.drafters:
                    slot.drafters[job.speculative] = self.model.drafter(job.speculative)
                slot.drafter = slot.drafters.get(job.speculative)
                slot.drafts, slot.length = [], DraftLength(self.most_drafts)
                if job.snapshot_at == job.cached_tokens:
                    slot.sequence.cache.snapshot()
            except Exception as e:
                slot.job = job
                self._fail(e, [slot], "admitting a job")

    def step(self):
        """One forward pass over every slot that has tokens to run (see the module docstring)."""
        for slot in self.slots:
            try:
                gone = slot.job is not None and (slot.job.cancelled or slot.job.client_gone())
            except Exception as e:
                self._fail(e, [slot], "checking on a client")
                continue
            if gone:
                self._release(slot, End("cancelled"))
        active = [slot for slot in self.slots if slot.job is not None]
        decoding = [slot for slot in active if not slot.prefilling]
        rows_left = self.rows - len(decoding)
        for slot in decoding:
            try:
                slot.drafts = self._draft(slot, rows_left)
            except Exception as e:
                self._fail(e, [slot], "drafting")
            rows_left -= len(slot.drafts)
        decoding = [slot for slot in decoding if slot.job is not None]
        budget = min(self.prefill_per_step if decoding else self.rows, rows_left)
        batch = [(slot, slot.pending + slot.drafts) for slot in decoding]
        for slot in (s for s in active if s.prefilling):
            n = min(budget, slot.chunk_limit())
            if n > 0:
                batch.append((slot, slot.pending[:n]))
                budget -= n
        if not batch:
            return
        every_token = [bool(slot.drafts) for slot, _ in batch]  # verify passes: a token after each row
        try:
            logits = Sequence.extend_together([(s.sequence, tokens) for s, tokens in batch], every_token)
        except Exception as e:
            self._fail(e, [slot for slot, _ in batch], "a forward pass")
            return
        self.steps += 1
        hidden, first_logits, first_row = self.model.decoder.hidden, 0, 0
        for (slot, tokens), every in zip(batch, every_token):
            rows = logits[first_logits:first_logits + (len(tokens) if every else 1)]
            states = hidden[first_row:first_row + len(tokens)]  # for the drafter, which copies them
            first_logits, first_row = first_logits + len(rows), first_row + len(tokens)
            try:
                start = slot.sequence.cache.length - len(tokens)
                slot.pending = slot.pending[len(tokens) - len(slot.drafts):]
                if slot.job.snapshot_at == slot.sequence.cache.length and slot.sequence.cache.deltanet_layers:
                    slot.sequence.cache.snapshot()
                if slot.pending:  # a prompt's chunk, not its last
                    if slot.drafter is not None:
                        slot.drafter.observe(start, states)
                    continue
                prompt_done = slot.prefilling
                accepted = self._choose(slot, rows, start)
                if slot.drafter is not None and slot.job is not None:
                    slot.drafter.observe(start, states if prompt_done else states[:accepted + 1])
            except Exception as e:
                self._fail(e, [slot], "choosing a job's next token")

    def _draft(self, slot: Slot, rows_left: int) -> list[int]:
        """The tokens the slot's drafter guesses follow its pending token, at most as many as its draft
        length, the rows left in the pass and its job's token limit allow."""
        if slot.drafter is None:
            return []
        sampler = slot.job.sampler
        k = min(slot.length.next(), rows_left, sampler.max_new_tokens - sampler.generated - 1)
        return slot.drafter.draft([*slot.sequence.tokens, *slot.pending], k)

    def _choose(self, slot: Slot, rows: np.ndarray, start: int) -> int:
        """A token after each row while the tokens chosen agree with the drafts; forget the drafts after the
        first that does not (Sequence.truncate; the pass ran from position `start`). Returns how many
        drafts were accepted."""
        drafts, job = slot.drafts, slot.job
        accepted = 0
        for j, logits in enumerate(rows):
            token = self._next_token(slot, logits)
            if slot.job is None or j == len(drafts) or token != drafts[j]:
                break
            accepted += 1
        if drafts:
            settle(slot.sequence, slot.length, job, len(drafts), accepted, start)
        slot.drafts = []
        return accepted

    def _next_token(self, slot: Slot, logits: np.ndarray):
        job = slot.job
        log_p = log_softmax(logits) if job.top_logprobs is not None else None  # before the penalties
        if job.reply is not None:
            job.sampler.forced += job.reply.forced()
        token = job.sampler.next(logits)
        delta = job.reply.push(token) if job.reply is not None else None
        if job.reply is not None and job.reply.stopped:
            job.sampler.finish_reason = "stop"
        logprobs = None
        if log_p is not None:
            k = job.top_logprobs
            top = np.argpartition(-log_p, k)[:k] if k else np.zeros(0, np.int64)
            top = top[np.argsort(-log_p[top], kind="stable")]
            logprobs = (float(log_p[token]), [(int(i), float(log_p[i])) for i in top])
        job.events.put(Token(token, delta, logprobs))
        if job.sampler.finish_reason is not None:
            self._release(slot, End(job.sampler.finish_reason,
                                    job.reply.finish() if job.reply is not None else None))
        else:
            slot.pending, slot.prefilling = [token], False

    def _release(self, slot: Slot, end: End):
        job, slot.job, slot.pending, slot.used = slot.job, None, [], self.steps
        self._end(job, end)

    def _end(self, job: Job, end: End):
        if end.finish_reason == "cancelled":
            self.cancelled += 1
        job.events.put(end)

    def _fail(self, error: Exception, slots: list[Slot], doing: str):
        """`doing` something for `slots` raised `error`: log it, end their jobs with it, and give them fresh
        sequences (a pass cut short may have left a cache half-updated). Other slots go on."""
        jobs = sum(slot.job is not None for slot in slots)
        self._log_failure(f"engine: {doing} failed; {jobs} job(s) end with an error", error)
        for slot in slots:
            if slot.job is not None:
                self._release(slot, End(None, error=f"{type(error).__name__}: {error}"))
            slot.sequence = self.model.sequence()

    def _log_failure(self, headline: str, error: BaseException):
        """The headline and the traceback in one write: the connections' threads log their requests to the
        same stream, and a line of theirs between the two parted the cause from its traceback."""
        self.log.write(headline + "\n" + "".join(traceback.format_exception(error)))
        self.log.flush()

    def _stop_for_good(self, error: BaseException):
        """The engine thread is ending on `error`: every job ends with it, and so will every later
        submit (Stopped)."""
        with self.lock:
            self.failure = f"{type(error).__name__}: {error}"
            jobs = [*self.waiting, *(slot.job for slot in self.slots if slot.job is not None)]
            self.waiting.clear()
            for slot in self.slots:
                slot.job = None
        # logged before the jobs hear of it: whoever reads the log after their answer finds the cause
        self._log_failure(f"engine: stopped for good; {len(jobs)} job(s) end with an error", error)
        for job in jobs:
            job.events.put(End(None, error=f"the engine stopped: {self.failure}"))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log p of the model's own distribution: softmax of the raw logits, before penalties and temperature
    (what vLLM reports by default), in float64."""
    z = logits.astype(np.float64)
    z -= z.max()
    z -= np.log(np.exp(z).sum())
    return z
