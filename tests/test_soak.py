"""A short soak of the server (bench/soak.py runs the long one): a few dozen mixed requests from
concurrent clients — streamed and not, random sampling options, clients that leave mid-stream,
malformed and oversized bodies, wrong API keys — on a tiny random-weight Qwen2.5; then the server is
healthy and idle, logged no failure, its memory stayed near its first plateau, and every greedy answer
equals the one the same request gets alone."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

import minqwen
from checkpoints import chat_checkpoint

BENCH = Path(__file__).resolve().parent.parent / "bench" / "soak.py"
RSS_GROWTH_MIB = 64  # generous: the tiny model's caches never outgrow their first allocation, so what
# grows past the plateau is allocator noise (thread arenas), or a leak of a few hundred kB per request


@pytest.fixture(scope="module")
def soak():
    """bench/soak.py, loaded from its file (bench/ is no package on the tests' path)."""
    spec = importlib.util.spec_from_file_location("soak_bench", BENCH)
    module = sys.modules["soak_bench"] = importlib.util.module_from_spec(spec)  # dataclasses look it up
    spec.loader.exec_module(module)
    return module


def test_a_short_soak_leaves_the_server_whole(soak, tmp_path):
    model = minqwen.load(chat_checkpoint(tmp_path, "qwen2.5"))
    results = soak.soak(model, requests=48, clients=16, parallel=4, seed=3, max_seconds=600)
    assert results["sent"] == 48, results  # all sent before the deadline (else the figures mean less)
    assert results["unexpected"] == [], results["unexpected"]
    assert set(results["statuses"]) == set(soak.MAKERS), results["statuses"]
    assert results["statuses"]["oversized"] == {"413": 4} and results["statuses"]["wrong_key"] == {"401": 4}
    assert results["health"] == 200 and results["idle"] and results["tracebacks"] == 0
    assert results["greedy_compared"] >= 10 and results["mismatches"] == [], results["mismatches"]
    assert results["growth_after_plateau_mib"] < RSS_GROWTH_MIB, results["rss_mib"]
