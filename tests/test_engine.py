"""The continuous-batching engine without HTTP: batched slots decode the tokens each sequence decodes
alone, prompts are prefilled in chunks beside running streams, the prompt cache and the hybrid snapshot
are reused, cancelled jobs free their slot, a failing job ends alone, and a full engine says so."""
from __future__ import annotations

import io

import numpy as np
import pytest
from test_parity_hybrid import QWEN3_5

import minqwen
from checkpoints import build_checkpoint, chat_checkpoint
from minqwen.serve.engine import Busy, End, Engine, Job, Token
from minqwen.text.generation import GenerationOptions, Sampler

WAIT = 300  # seconds before a test fails instead of hanging: a bound, not a measurement


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return minqwen.load(chat_checkpoint(tmp_path_factory.mktemp("qwen25"), "qwen2.5"))


def job(model, prompt, n, **options) -> Job:
    return Job(list(prompt), Sampler(GenerationOptions(**options), prompt, model.config.vocab_size, n,
                                     model.eos_token_ids))


def collect(job: Job) -> tuple[list[int], End]:
    tokens = []
    while True:
        event = job.events.get(timeout=WAIT)
        if isinstance(event, Token):
            tokens.append(event.token)
        else:
            return tokens, event


def run_together(engine: Engine, jobs: list[Job]) -> list[tuple[list[int], End]]:
    engine.start()
    try:
        for j in jobs:
            engine.submit(j)
        return [collect(j) for j in jobs]
    finally:
        engine.stop()


def prompts(model, lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 151643, size=n).tolist() for n in lengths]


def test_batched_slots_decode_what_each_sequence_decodes_alone(model):
    """Five jobs on four slots (one waits for a slot), prompts prefilled 16 tokens a step beside the
    generating slots: each gets the greedy tokens it gets alone, and seeded sampling its own draws."""
    texts = prompts(model, (5, 40, 17, 3, 23))
    alone = [model.generate(p, max_new_tokens=10 + i) for i, p in enumerate(texts)]
    sampled = model.generate(texts[1], max_new_tokens=8, temperature=0.9, top_k=40, seed=11)
    jobs = [job(model, p, 10 + i) for i, p in enumerate(texts)]
    jobs.append(job(model, texts[1], 8, temperature=0.9, top_k=40, seed=11))
    engine = Engine(model, parallel=4, prefill_per_step=16)
    results = run_together(engine, jobs)
    assert [tokens for tokens, _ in results] == alone + [sampled]
    assert all(end.finish_reason == "length" for _, end in results)
    assert engine.steps < sum(len(p) + 10 + i for i, p in enumerate(texts))  # batched, not one by one


def test_a_new_prompt_goes_to_the_slot_holding_its_prefix(model):
    engine = Engine(model, parallel=2)
    first, other, rest = prompts(model, (30, 12, 6), seed=1)
    run_together(engine, [job(model, first, 4)])
    run_together(engine, [job(model, other, 4)])  # the least recently used (empty) slot
    follow_up = job(model, first + rest, 5)
    tokens, _ = run_together(engine, [follow_up])[0]
    assert follow_up.cached_tokens == len(first)
    assert tokens == model.generate(first + rest, max_new_tokens=5)


def test_a_hybrid_slot_comes_back_to_its_snapshot(tmp_path):
    """A hybrid model cannot rewind: the next prompt, sharing the history up to the snapshot point but
    not what followed it, restarts from the snapshot instead of from 0."""
    model = minqwen.load(build_checkpoint(tmp_path, QWEN3_5, "fp32"))
    rng = np.random.default_rng(2)
    history, turn, next_turn = (rng.integers(0, 300, size=n).tolist() for n in (20, 5, 7))
    engine = Engine(model, parallel=1, prefill_per_step=8)
    first = job(model, history + turn, 4)
    first.snapshot_at = len(history)
    run_together(engine, [first])
    second = job(model, history + next_turn, 4)
    tokens, _ = run_together(engine, [second])[0]
    assert second.cached_tokens == len(history)
    assert tokens == model.generate(history + next_turn, max_new_tokens=4)


def test_cancelled_jobs_free_their_slot_within_a_step(model):
    engine = Engine(model, parallel=1, queue_size=1)
    gone = {"after": 3}

    def client_gone():  # the engine asks once a step: the client leaves after 3 tokens
        gone["after"] -= 1
        return gone["after"] < 0

    leaving = job(model, prompts(model, (8,))[0], 400)
    leaving.client_gone = client_gone
    staying = job(model, prompts(model, (8,), seed=3)[0], 3)
    (tokens, end), (kept, end2) = run_together(engine, [leaving, staying])
    assert end.finish_reason == "cancelled" and len(tokens) == 3 and engine.cancelled == 1
    assert end2.finish_reason == "length" and len(kept) == 3


def test_a_full_engine_refuses_more_jobs(model):
    engine = Engine(model, parallel=1, queue_size=1)
    engine.start()
    try:
        long = [job(model, [1, 2, 3], 300), job(model, [4, 5, 6], 300)]
        for j in long:
            engine.submit(j)
        with pytest.raises(Busy):
            engine.submit(job(model, [7, 8], 3))
        for j in long:
            j.cancelled = True
        assert [collect(j)[1].finish_reason for j in long] == ["cancelled", "cancelled"]
        engine.submit(job(model, [7, 8], 3))  # room again
    finally:
        engine.stop()


class BrokenReply:
    """A Reply whose first token raises: a bug in one job's sampling."""

    stopped = False

    def forced(self) -> list[int]:
        return []

    def push(self, token: int):
        raise ValueError("injected failure at the first token")


def test_a_failing_job_ends_alone_and_the_engine_goes_on(model):
    """A job whose sampling raises, and one whose client check does, end with their error and their
    traceback in the log; the job batched beside them gets the tokens it gets alone; the engine serves
    the next job."""
    texts = prompts(model, (9, 14, 6), seed=4)
    broken, unreachable, fine = (job(model, p, 5) for p in texts)
    broken.reply = BrokenReply()

    def client_check_fails():
        raise OSError("injected failure checking on the client")

    unreachable.client_gone = client_check_fails
    log = io.StringIO()
    engine = Engine(model, parallel=3, log=log)
    (tokens, end), (none, end2), (kept, end3) = run_together(engine, [broken, unreachable, fine])
    assert tokens == [] and end.finish_reason is None
    assert end.error == "ValueError: injected failure at the first token"
    assert (none, end2.error) == ([], "OSError: injected failure checking on the client")
    assert kept == model.generate(texts[2], max_new_tokens=5) and end3.finish_reason == "length"
    assert log.getvalue().count("Traceback (most recent call last)") == 2 and engine.failure is None
    assert "engine: choosing a job's next token failed; 1 job(s) end with an error" in log.getvalue()
    again = job(model, texts[0], 5)
    assert run_together(engine, [again])[0][0] == model.generate(texts[0], max_new_tokens=5)
