"""The step-wise generation state (Sampler), without a model."""
from __future__ import annotations

import numpy as np
import pytest

from minqwen.text.generation import GenerationOptions, Sampler


def sampler(vocab=8, prompt=(0,), max_new=5, **options):
    return Sampler(GenerationOptions(**options), list(prompt), vocab, max_new, eos_ids=[7])


def test_presence_and_frequency_count_generated_tokens_only():
    # id 0 is in the prompt only: presence does not push it down (OpenAI, vLLM), repetition does
    flat = np.zeros(8, np.float32)
    assert sampler(presence_penalty=1.0, frequency_penalty=1.0).next(flat.copy()) == 0
    assert sampler(repetition_penalty=2.0).next(np.ones(8, np.float32)) == 1
    s = sampler(presence_penalty=0.5)
    logits = np.array([0, 1.0, 0.7, 0, 0, 0, 0, 0], np.float32)
    assert s.next(logits.copy()) == 1  # then 1 has been generated: 1 - 0.5 < 0.7
    assert s.next(logits.copy()) == 2


def test_frequency_grows_with_each_repeat():
    s = sampler(frequency_penalty=0.3, max_new=10)
    logits = np.array([0, 1.0, 0.5, 0, 0, 0, 0, 0], np.float32)
    # 1 wins until its count c makes 1 - 0.3 c < 0.5, i.e. twice; then 2 and 1 take turns
    assert [s.next(logits.copy()) for _ in range(4)] == [1, 1, 2, 1]


@pytest.mark.parametrize("logits, reason, n", [(np.eye(8, dtype=np.float32)[7], "stop", 1),
                                               (np.eye(8, dtype=np.float32)[3], "length", 5)])
def test_finish_reasons(logits, reason, n):
    s = sampler()
    tokens = []
    while s.finish_reason is None:
        tokens.append(s.next(logits.copy()))
    assert s.finish_reason == reason and len(tokens) == n and s.generated == n


def test_same_seed_same_draws():
    logits = np.linspace(0, 1, 8).astype(np.float32)
    draws = [[s.next(logits.copy()) for _ in range(5)] for s in
             (sampler(temperature=2.0, seed=3, max_new=9), sampler(temperature=2.0, seed=3, max_new=9))]
    assert draws[0] == draws[1]
