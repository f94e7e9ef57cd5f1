"""`--model` as a folder, a GGUF file, a model in Ollama's store, or a Hugging Face hub id.

A folder, or a GGUF file (a .gguf name or the GGUF magic: LM Studio keeps plain .gguf files, Ollama
nameless blobs), is itself. `ollama:NAME[:TAG]` is looked up in Ollama's store (`ollama_model`). A hub id
(`Qwen/Qwen2.5-0.5B-Instruct`) is looked up in the local Hugging Face cache first; if it is not there and
the optional `huggingface_hub` package is installed, it is downloaded (when the network allows).
Nothing else is guessed: a clear CheckpointError says how to get the files.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

from ..errors import CheckpointError
from .gguf import MAGIC

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
NEEDED = ("config.json", "*.safetensors", "*.json", "*.jinja", "*.txt")


def resolve(path_or_hub_id) -> Path:
    name = str(path_or_hub_id)
    if name.startswith("ollama:"):
        return ollama_model(name.removeprefix("ollama:"))
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir() or (path.is_file() and _is_gguf(path)):
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file but not a GGUF; --model takes a checkpoint folder, a .gguf "
                              "file, ollama:NAME or a hub id")
    if not HUB_ID.match(name):
        raise CheckpointError(f"{name}: no such checkpoint folder or file")
    cached = _from_local_cache(name)
    if cached is not None:
        return cached
    try:
        import huggingface_hub
    except ImportError:
        raise CheckpointError(
            f"{name} is not a folder and is not in the Hugging Face cache; download it with "
            f"`pip install huggingface_hub && hf download {name}` or pass a local folder") from None
    try:
        return Path(huggingface_hub.snapshot_download(name, allow_patterns=list(NEEDED)))
    except Exception as e:  # network down, repository missing or gated: say so in one line
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot download {name} from the Hugging Face hub: {first_line}") from None


def _is_gguf(path: Path) -> bool:
    if path.suffix.lower() == ".gguf":
        return True  # read_gguf says what is wrong with it, if anything
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def _from_local_cache(hub_id: str) -> Path | None:
    """The newest snapshot of hub_id in the Hugging Face cache (HF_HUB_CACHE, HF_HOME, ~/.cache)."""
    hf_home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    cache = Path(os.environ.get("HF_HUB_CACHE", hf_home / "hub"))
    repo = cache / ("models--" + hub_id.replace("/", "--"))
    ref = repo / "refs" / "main"
    if ref.is_file():
        snapshot = repo / "snapshots" / ref.read_text().strip()
        if (snapshot / "config.json").exists():
            return snapshot
    snapshots = sorted((repo / "snapshots").glob("*/config.json"), key=lambda p: p.stat().st_mtime)
    return snapshots[-1].parent if snapshots else None


# ---- Ollama's store (ollama/ollama: envconfig.Models, types/model/name.go, manifest/)
#
#     $OLLAMA_MODELS (default ~/.ollama/models)
#         manifests/<host>/<namespace>/<model>/<tag>   JSON: {"layers": [{"mediaType", "digest"}, ...]}
#         blobs/sha256-<hex>                           each layer; the application/vnd.ollama.image.model
#                                                      layer is the GGUF file
#
# Image-text models keep their vision tower in one of two places: older ones (llava, minicpm-v) in a
# second GGUF, an application/vnd.ollama.image.projector layer, which is not loaded (a warning says so);
# newer ones (gemma3, qwen3-vl, qwen3.5, qwen3.6) inside the model's GGUF as v.* tensors, which the
# loader leaves unread (`info` lists them).
#
# A name is [host/][namespace/]model[:tag], by default registry.ollama.ai/library/<model>:latest. Newer
# Ollama versions also write the default host as ollama.com, keep named manifests in manifests-v2/ (a
# host:port's ':' spelled %3A there), and may store a list of manifests, one per runner and format.

OLLAMA_NAME = re.compile(r"(?:(?:(?P<host>\w[\w.:-]*)/)?(?P<namespace>\w[\w-]*)/)?(?P<model>\w[\w.-]*)"
                         r"(?::(?P<tag>\w[\w.-]*))?", re.ASCII)
OLLAMA_HOSTS = ("registry.ollama.ai", "ollama.com")
OLLAMA_GGUF = "application/vnd.ollama.image.model"
OLLAMA_PROJECTOR = "application/vnd.ollama.image.projector"
OLLAMA_ADAPTER = "application/vnd.ollama.image.adapter"  # a LoRA, which changes every answer
OLLAMA_LIST = "application/vnd.ollama.manifest.list.v2+json"
OLLAMA_DIGEST = re.compile(r"sha256[:-](?P<hex>[0-9a-fA-F]{64})")


def ollama_model(name: str) -> Path:
    """The GGUF blob of an Ollama model name, e.g. "qwen3:8b" or "hf.co/unsloth/Qwen3-8B-GGUF:Q4_K_M"."""
    root = Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models").expanduser()
    parts = OLLAMA_NAME.fullmatch(name)
    if parts is None:
        raise CheckpointError(f"ollama:{name} is not an Ollama model name ([host/][namespace/]model[:tag])")
    host, namespace = parts["host"], parts["namespace"] or "library"
    hosts = OLLAMA_HOSTS if host is None or host.lower() in OLLAMA_HOSTS else (host,)
    places = [root / folder / (h.replace(":", "%3A") if folder == "manifests-v2" else h) / namespace /
              parts["model"] / (parts["tag"] or "latest")
              for folder in ("manifests-v2", "manifests") for h in hosts]
    manifest_path = next((p for p in places if p.is_file()), None)
    if manifest_path is None:
        if not root.is_dir():
            raise CheckpointError(f"ollama:{name}: no Ollama store at {root} (set OLLAMA_MODELS to the "
                                  "folder where Ollama keeps its models)")
        pulled = _ollama_names(root)
        raise CheckpointError(f"ollama:{name} is not in the Ollama store at {root}; "
                              + (f"it has: {', '.join(pulled)}" if pulled else "it has no models"))
    manifest = _ollama_json(manifest_path)
    if manifest.get("mediaType") == OLLAMA_LIST:  # one manifest per runner: take the GGUF one
        child = next((m for m in manifest.get("manifests") or [] if isinstance(m, dict)
                      and m.get("format", "gguf") == "gguf"), None)
        if child is None:
            raise CheckpointError(f"{manifest_path}: ollama:{name} is stored for other runners, not as GGUF")
        if "layers" not in child:  # a reference to a manifest kept as a blob
            child = _ollama_json(_ollama_blob(root, child.get("digest"), manifest_path))
        manifest = child
    layers = [layer for layer in manifest.get("layers") or [] if isinstance(layer, dict)]
    models = [layer for layer in layers if layer.get("mediaType") == OLLAMA_GGUF]
    if len(models) != 1:
        raise CheckpointError(f"{manifest_path}: ollama:{name} has {len(models)} GGUF model layers; "
                              "minqwen reads models stored as one GGUF file")
    if any(layer.get("mediaType") == OLLAMA_ADAPTER for layer in layers):
        raise CheckpointError(f"ollama:{name} applies a LoRA adapter, which minqwen does not read: running "
                              "its base model alone would answer as another model")
    model = _ollama_blob(root, models[0].get("digest"), manifest_path)
    if any(layer.get("mediaType") == OLLAMA_PROJECTOR for layer in layers):
        warnings.warn(f"ollama:{name}: its vision projector is not loaded; minqwen runs the text model",
                      stacklevel=2)
    return model


def _ollama_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable Ollama manifest ({e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: not an Ollama manifest (a JSON {type(value).__name__})")
    return value


def _ollama_blob(root: Path, digest, manifest_path: Path) -> Path:
    match = OLLAMA_DIGEST.fullmatch(digest) if isinstance(digest, str) else None
    if match is None:
        raise CheckpointError(f"{manifest_path}: layer digest {digest!r} is not sha256:<64 hex digits>")
    blob = root / "blobs" / f"sha256-{match['hex']}"
    if not blob.is_file():
        raise CheckpointError(f"{manifest_path}: its blob {blob} is missing (an unfinished pull?)")
    return blob


def _ollama_names(root: Path) -> list[str]:
    """The models in the store, named as `ollama list` shows them (default host and namespace left out)."""
    names = set()
    for folder in ("manifests", "manifests-v2"):
        for manifest in filter(Path.is_file, (root / folder).glob("*/*/*/*")):
            host, namespace, model, tag = manifest.relative_to(root / folder).parts
            host = host.replace("%3A", ":")
            if host.lower() not in OLLAMA_HOSTS:
                namespace = f"{host}/{namespace}"
            names.add(f"{model}:{tag}" if namespace == "library" else f"{namespace}/{model}:{tag}")
    return sorted(names)
