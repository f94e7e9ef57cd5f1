"""--model as a hub id (found in the local Hugging Face cache, else a clear error: no network here), a GGUF
file, or a model in a (fake) Ollama store."""
from __future__ import annotations

import hashlib
import json
import sys

import pytest

from minqwen.errors import CheckpointError
from minqwen.formats.hub import resolve


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


def test_folders_and_gguf_files_are_themselves_other_files_are_refused(tmp_path):
    assert resolve(tmp_path) == tmp_path
    (tmp_path / "model.gguf").write_bytes(b"anything: read_gguf will say what is wrong")
    assert resolve(tmp_path / "model.gguf") == tmp_path / "model.gguf"
    (tmp_path / "blob").write_bytes(b"GGUF\x03\x00\x00\x00")  # a GGUF without the extension
    assert resolve(tmp_path / "blob") == tmp_path / "blob"
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="is a file but not a GGUF"):
        resolve(tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        resolve(str(tmp_path / "missing" / "deeper"))


# ---- Ollama's store

GGUF = "application/vnd.ollama.image.model"
MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"


def blob(store, content: bytes) -> str:
    """Put content in the store's blobs/ as Ollama does; return its digest."""
    digest = hashlib.sha256(content).hexdigest()
    (store / "blobs").mkdir(parents=True, exist_ok=True)
    (store / "blobs" / f"sha256-{digest}").write_bytes(content)
    return f"sha256:{digest}"


def manifest(*layers) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": MANIFEST, "config": {},
                       "layers": [{"mediaType": m, "digest": d} for m, d in layers]}).encode()


def pull(store, name: str, content: bytes, folder="manifests", *extra_layers) -> str:
    """A model as `ollama pull` leaves it: its GGUF blob, and a manifest at <folder>/<name>."""
    digest = blob(store, content)
    path = store / folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(manifest(*extra_layers, (GGUF, digest)))
    return digest


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "models"))
    return tmp_path / "models"


def test_ollama_names_resolve_to_their_gguf_blob(store):
    template = ("application/vnd.ollama.image.template", blob(store, b"{{ .Prompt }}"))
    pull(store, "registry.ollama.ai/library/qwen3/8b", b"GGUF qwen3 8b", "manifests", template)
    pull(store, "registry.ollama.ai/library/qwen3/latest", b"GGUF qwen3 latest")
    pull(store, "registry.ollama.ai/someone/tiny/q4", b"GGUF someone's")
    pull(store, "hf.co/unsloth/Qwen3-8B-GGUF/Q4_K_M", b"GGUF from hf.co")
    assert resolve("ollama:qwen3:8b").read_bytes() == b"GGUF qwen3 8b"
    assert resolve("ollama:qwen3").read_bytes() == b"GGUF qwen3 latest"
    assert resolve("ollama:registry.ollama.ai/library/qwen3:8b").read_bytes() == b"GGUF qwen3 8b"
    assert resolve("ollama:someone/tiny:q4").read_bytes() == b"GGUF someone's"
    assert resolve("ollama:hf.co/unsloth/Qwen3-8B-GGUF:Q4_K_M").read_bytes() == b"GGUF from hf.co"
    assert resolve("ollama:qwen3:8b").parent == store / "blobs"


def test_newer_ollama_layouts(store):
    """ollama.com as the default host, manifests-v2/ holding links to manifests stored as blobs, and
    manifest lists with one entry per runner."""
    pull(store, "ollama.com/library/qwen3/1b", b"GGUF under ollama.com")
    assert resolve("ollama:qwen3:1b").read_bytes() == b"GGUF under ollama.com"

    gguf_digest = blob(store, b"GGUF in v2")
    linked = store / "blobs" / ("sha256-" + blob(store, manifest((GGUF, gguf_digest)))[7:])
    (store / "manifests-v2" / "ollama.com" / "library" / "qwen3").mkdir(parents=True)
    (store / "manifests-v2" / "ollama.com" / "library" / "qwen3" / "4b").symlink_to(linked)
    assert resolve("ollama:qwen3:4b").read_bytes() == b"GGUF in v2"

    mlx = {"mediaType": MANIFEST, "runner": "mlx", "format": "safetensors", "digest": blob(store, b"{}")}
    gguf_child = {"mediaType": MANIFEST, "runner": "llamacpp", "format": "gguf",
                  "digest": linked.name.replace("-", ":")}
    listing = {"schemaVersion": 2, "mediaType": "application/vnd.ollama.manifest.list.v2+json",
               "manifests": [mlx, gguf_child]}
    (store / "manifests-v2" / "ollama.com" / "library" / "qwen3" / "list").write_text(json.dumps(listing))
    assert resolve("ollama:qwen3:list").read_bytes() == b"GGUF in v2"
    listing["manifests"] = [mlx]
    (store / "manifests-v2" / "ollama.com" / "library" / "qwen3" / "list").write_text(json.dumps(listing))
    with pytest.raises(CheckpointError, match="stored for other runners, not as GGUF"):
        resolve("ollama:qwen3:list")


def test_a_missing_model_lists_those_there_are(store, tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="no Ollama store at .*models .set OLLAMA_MODELS"):
        resolve("ollama:qwen3")
    pull(store, "registry.ollama.ai/library/qwen3/8b", b"GGUF")
    pull(store, "registry.ollama.ai/someone/tiny/q4", b"GGUF 2")
    pull(store, "localhost%3A5000/ns/m/t", b"GGUF 3", "manifests-v2")
    with pytest.raises(CheckpointError, match=r"ollama:qwen3 is not in .*; it has: localhost:5000/ns/m:t, "
                                              r"qwen3:8b, someone/tiny:q4$"):
        resolve("ollama:qwen3")
    monkeypatch.delenv("OLLAMA_MODELS")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the default store: ~/.ollama/models
    with pytest.raises(CheckpointError, match=f"no Ollama store at {tmp_path}/home/.ollama/models"):
        resolve("ollama:qwen3")


@pytest.mark.parametrize("name", ["", "../etc", "a/b/c/d", "qwen3:", ".hidden", "a b", "qwen3:8b/x"])
def test_bad_ollama_names(store, name):
    with pytest.raises(CheckpointError, match="is not an Ollama model name"):
        resolve(f"ollama:{name}")


@pytest.mark.parametrize("content, message", [
    (b"{not json", "not a readable Ollama manifest"),
    (b"[]", "not an Ollama manifest .a JSON list"),
    (manifest(("application/vnd.ollama.image.template", "sha256:" + "0" * 64)), "has 0 GGUF model layers"),
    (manifest((GGUF, "sha256:" + "0" * 64), (GGUF, "sha256:" + "1" * 64)), "has 2 GGUF model layers"),
    (manifest((GGUF, "sha256:../../../etc/passwd")), "is not sha256:<64 hex digits>"),
    (manifest((GGUF, "sha256:" + "0" * 64)), "blob .*sha256-0000.* is missing"),
])
def test_bad_manifests(store, content, message):
    path = store / "manifests" / "registry.ollama.ai" / "library" / "qwen3" / "latest"
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        resolve("ollama:qwen3")
