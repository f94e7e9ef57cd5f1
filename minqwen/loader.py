"""minqwen.load: a checkpoint -> Model. The file formats meet the network here.

A checkpoint is a Hugging Face folder (config.json, safetensors, tokenizer.json), a hub id in the local
cache, a GGUF file (llama.cpp, LM Studio) or ollama:NAME[:TAG]. Each format becomes the same three
things -- a Config, the tensors under their Hugging Face names, a tokenizer -- and from there one loader.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from .errors import ConfigError, ContextLengthError
from .formats.gguf import read_gguf
from .formats.gguf_names import gguf_config, gguf_tensors, mtp_file_beside
from .formats.hub import resolve
from .formats.safetensors import load_config, read_json, read_tensors
from .model import Model
from .network.config import Config
from .network.decoder import KV_CACHE_DTYPES
from .network.quantize import BITS
from .network.weights import TensorSource, load_weights
from .text.tokenizer import Tokenizer


class Checkpoint(NamedTuple):
    path: Path
    config: Config
    tensors: dict  # Hugging Face name -> array, or a quantised matrix (FP8 / GGML blocks), mapped
    tokenizer: Tokenizer | None
    generation_config: dict
    file_format: str  # "safetensors" or "gguf"


def open_checkpoint(path_or_hub_id) -> Checkpoint:
    """The config, tensors and tokenizer of a checkpoint, whatever its format (nothing read but headers)."""
    path = resolve(path_or_hub_id)
    if path.is_file():
        gguf = read_gguf(path)
        mtp_file = mtp_file_beside(gguf)  # a head converted apart (mtp-*.gguf), for a file without one
        config = Config.from_dict(gguf_config(gguf, mtp_file))
        tensors = gguf_tensors(gguf, config, mtp_file)
        return Checkpoint(path, config, tensors, Tokenizer.from_gguf(gguf), {}, "gguf")
    config = load_config(path)
    tokenizer = Tokenizer.from_dir(path) if (path / "tokenizer.json").exists() else None
    generation_path = path / "generation_config.json"
    generation_config = read_json(generation_path) if generation_path.exists() else {}
    return Checkpoint(path, config, read_tensors(path), tokenizer, generation_config, "safetensors")


def load(path_or_hub_id, context_length: int | None = None, quantize: str | None = None,
         kv_cache: str = "fp32") -> Model:
    """Load a checkpoint (see the module docstring); `quantize="int8"` or `"int4"` quantises the weights as
    they load (see quantize.py); `kv_cache="fp16"` halves the KV cache (see model.Cache)."""
    if kv_cache not in KV_CACHE_DTYPES:
        raise ConfigError(f"kv_cache must be one of {', '.join(KV_CACHE_DTYPES)}, got {kv_cache!r}")
    if quantize is not None and quantize not in BITS:
        raise ConfigError(f"quantize must be one of {', '.join(BITS)}, got {quantize!r}")
    checkpoint = open_checkpoint(path_or_hub_id)
    config = checkpoint.config
    if context_length is not None and not 0 < context_length <= config.context_window:
        raise ContextLengthError(f"context length {context_length} must be in [1, {config.context_window}]")
    source = TensorSource(checkpoint.tensors, BITS.get(quantize), config.fp8_block_rows)
    weights = load_weights(config, source)
    return Model(config, weights, checkpoint.tokenizer, checkpoint.generation_config, checkpoint.path,
                 context_length, kv_cache)
