"""--model as a hub id: found in the local Hugging Face cache, else a clear error (no network here)."""
from __future__ import annotations

import sys

import pytest

from minqwen.errors import CheckpointError
from minqwen.hub import resolve


def test_hub_id_resolves_to_the_cached_snapshot(tmp_path, monkeypatch):
    repo = tmp_path / "hub" / "models--Qwen--Qwen2.5-0.5B-Instruct"
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve("Qwen/Qwen2.5-0.5B-Instruct") == snapshot


def test_uncached_hub_id_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if not installed
    with pytest.raises(CheckpointError, match="hf download Qwen/Qwen3-0.6B"):
        resolve("Qwen/Qwen3-0.6B")


def test_a_folder_wins_and_a_file_is_refused(tmp_path):
    assert resolve(tmp_path) == tmp_path
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="is a file"):
        resolve(tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        resolve(str(tmp_path / "missing" / "deeper"))
