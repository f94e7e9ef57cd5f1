"""--model as a hub id (found in the local Hugging Face cache, else a clear error: no network here), a GGUF
file, or a model in a (fake) Ollama store."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from gguf_files import tokenizer_metadata, write_gguf

from minqwen.errors import CheckpointError
from minqwen.formats.hub import resolve
from minqwen.loader import open_checkpoint
from minqwen.network.weights import TensorSource, load_weights, unread_tensors


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
PROJECTOR = "application/vnd.ollama.image.projector"
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


PULLED = {  # where `ollama pull` puts a manifest under manifests/ -> the name that finds it
    "registry.ollama.ai/library/qwen3/8b": "qwen3:8b",
    "registry.ollama.ai/library/qwen3/latest": "qwen3",
    "registry.ollama.ai/someone/tiny/q4": "someone/tiny:q4",
    "hf.co/unsloth/Qwen3-8B-GGUF/Q4_K_M": "hf.co/unsloth/Qwen3-8B-GGUF:Q4_K_M",
    "registry.ollama.ai/library/qwen3.5/9b": "qwen3.5:9b",  # dots in names, dashes and underscores in tags
    "registry.ollama.ai/library/qwen3.6/35b-a3b-q4_K_M": "qwen3.6:35b-a3b-q4_K_M",
    "registry.ollama.ai/someone/qwen3.5-abliterated/latest": "someone/qwen3.5-abliterated",
}


def test_ollama_names_resolve_to_their_gguf_blob(store):
    template = ("application/vnd.ollama.image.template", blob(store, b"{{ .Prompt }}"))
    for path in PULLED:
        pull(store, path, f"GGUF {path}".encode(), "manifests", template)
    for path, name in PULLED.items():
        assert resolve(f"ollama:{name}").read_bytes() == f"GGUF {path}".encode()
    assert resolve("ollama:registry.ollama.ai/library/qwen3:8b") == resolve("ollama:qwen3:8b")
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
    with pytest.raises(CheckpointError, match=r"^ollama:qwen3:4b is not in .*; it has: .*qwen3:8b"):
        resolve("ollama:qwen3:4b")  # a model pulled, but not this tag
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


def test_a_projector_layer_is_skipped_with_a_warning(store):
    """An image-text model whose vision tower is a second GGUF (a projector layer): its text model loads,
    and one warning says the projector does not. The projector's blob is never opened."""
    projector = (PROJECTOR, "sha256:" + "5" * 64)  # no such blob: not needed
    pull(store, "registry.ollama.ai/library/llava/7b", b"GGUF llava's text model", "manifests", projector)
    with pytest.warns(UserWarning) as caught:
        assert resolve("ollama:llava:7b").read_bytes() == b"GGUF llava's text model"
    assert [str(w.message) for w in caught] == [
        "ollama:llava:7b: its vision projector is not loaded; minqwen runs the text model"]
    pull(store, "registry.ollama.ai/library/qwen3.5/9b", b"GGUF qwen3.5, vision inside")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no projector layer, no warning
        assert resolve("ollama:qwen3.5:9b").read_bytes() == b"GGUF qwen3.5, vision inside"



def test_a_lora_adapter_layer_is_refused(store):
    """A model made with an ADAPTER line answers as base model + LoRA: running the base alone would
    silently answer as another model, so it is refused, naming the adapter."""
    adapter = ("application/vnd.ollama.image.adapter", "sha256:" + "6" * 64)
    pull(store, "registry.ollama.ai/library/tuned/latest", b"GGUF base model", "manifests", adapter)
    with pytest.raises(CheckpointError, match="ollama:tuned applies a LoRA adapter"):
        resolve("ollama:tuned")


# ---- Ollama's image-text models as minqwen loads them

# The vision tower as Ollama writes it into a qwen3.5 model's own GGUF (convert_qwen35.go, and the names
# llama.cpp forks rename in Ollama's qwen35moe blobs): model.visual.* as v.*, blocks as blk, q / k / v
# split, the patch embedding 4-D and F16
BUNDLED_VISION = {"v.patch_embed.weight": np.zeros((48, 2, 4, 4), np.float16),
                  "v.pos_embed.weight": np.zeros((4, 16), np.float32),
                  **{f"v.blk.0.attn_{x}.{part}": np.zeros((16, 16) if part == "weight" else 16, np.float32)
                     for x in ("q", "k", "v", "out") for part in ("weight", "bias")},
                  "v.blk.0.norm1.weight": np.zeros(16, np.float32),
                  "v.blk.0.mlp.linear_fc1.weight": np.zeros((32, 16), np.float32),
                  "v.merger.linear_fc1.weight": np.zeros((8, 64), np.float32)}
TOKENIZERS = Path(__file__).parent / "data" / "tokenizers"


def tiny_gguf(path, extra_tensors: dict | None = None) -> bytes:
    """A one-layer Qwen2 GGUF (the architecture does not matter here) with the Qwen2.5 tokenizer."""
    import gguf

    T, rng = gguf.GGUFValueType, np.random.default_rng(0)
    hidden, ffn, vocab = 8, 16, 151936
    metadata = {"general.architecture": (T.STRING, "qwen2"), "qwen2.block_count": (T.UINT32, 1),
                "qwen2.context_length": (T.UINT32, 64), "qwen2.embedding_length": (T.UINT32, hidden),
                "qwen2.feed_forward_length": (T.UINT32, ffn), "qwen2.attention.head_count": (T.UINT32, 2),
                "qwen2.attention.head_count_kv": (T.UINT32, 1),
                **tokenizer_metadata(TOKENIZERS / "qwen2.5", "qwen2", "<|im_end|>", vocab_size=vocab)}
    shapes = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,),
              "blk.0.attn_norm.weight": (hidden,), "blk.0.attn_q.weight": (hidden, hidden),
              "blk.0.attn_k.weight": (4, hidden), "blk.0.attn_v.weight": (4, hidden),
              "blk.0.attn_output.weight": (hidden, hidden), "blk.0.ffn_norm.weight": (hidden,),
              "blk.0.ffn_gate.weight": (ffn, hidden), "blk.0.ffn_up.weight": (ffn, hidden),
              "blk.0.ffn_down.weight": (hidden, ffn)}
    tensors = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    return write_gguf(path, metadata, {**tensors, **(extra_tensors or {})}).read_bytes()


def test_a_vision_tower_inside_the_model_gguf_is_left_unread(store, tmp_path):
    """Newer image-text models (qwen3.5, qwen3.6) keep the vision tower in the model's own GGUF, with no
    projector layer: the text model loads and the v.* tensors are all that is left unread (`info` lists
    them as not loaded)."""
    pull(store, "registry.ollama.ai/library/qwen3.5/9b", tiny_gguf(tmp_path / "m.gguf", BUNDLED_VISION))
    checkpoint = open_checkpoint("ollama:qwen3.5:9b")
    source = TensorSource(checkpoint.tensors)
    load_weights(checkpoint.config, source)
    unread = [name for names in unread_tensors(source).values() for name in names]
    assert len(unread) == len(BUNDLED_VISION)  # the vision tensors, under whatever names gguf_names gives


def test_the_cli_says_in_one_line_that_the_projector_is_not_loaded(store, tmp_path):
    projector = (PROJECTOR, blob(store, b"GGUF a CLIP projector"))
    pull(store, "registry.ollama.ai/library/llava/7b", tiny_gguf(tmp_path / "m.gguf"), "manifests", projector)
    result = subprocess.run([sys.executable, "-m", "minqwen", "info", "--model", "ollama:llava:7b"],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OLLAMA_MODELS": str(store)})
    assert result.returncode == 0, result.stderr
    assert result.stderr == "warning: ollama:llava:7b: its vision projector is not loaded; " \
                            "minqwen runs the text model\n"
    assert "checkpoint: " + str(store / "blobs") in result.stdout
