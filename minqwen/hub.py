"""`--model` as a folder or a Hugging Face hub id (`Qwen/Qwen2.5-0.5B-Instruct`).

A hub id is looked up in the local Hugging Face cache first; if it is not there and the optional
`huggingface_hub` package is installed, it is downloaded (when the network allows). Nothing else is
guessed: a clear CheckpointError says how to get the files.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import CheckpointError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
NEEDED = ("config.json", "*.safetensors", "*.json", "*.jinja", "*.txt")


def resolve(path_or_hub_id) -> Path:
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; --model takes a checkpoint folder or a hub id")
    name = str(path_or_hub_id)
    if not HUB_ID.match(name):
        raise CheckpointError(f"{name}: no such checkpoint folder")
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
