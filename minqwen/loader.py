"""minqwen.load: a checkpoint folder (or a hub id) -> Model. The file formats meet the network here."""
from __future__ import annotations

from .checkpoint import read_tensors
from .config import load_config, read_json
from .errors import ConfigError, ContextLengthError
from .hub import resolve
from .kernels import isa
from .model import KV_CACHE_DTYPES, Model
from .quantize import BITS
from .tokenizer import Tokenizer
from .weights import TensorSource, load_weights


def load(path_or_hub_id, context_length: int | None = None, quantize: str | None = None,
         kv_cache: str = "fp32") -> Model:
    """Load a checkpoint folder (or a hub id found in the local Hugging Face cache); `quantize="int8"` or
    `"int4"` quantises the weights as they load (see quantize.py); `kv_cache="fp16"` halves the KV cache
    (see model.Cache)."""
    if isa.PROBLEM:
        raise ConfigError(isa.PROBLEM)
    if kv_cache not in KV_CACHE_DTYPES:
        raise ConfigError(f"kv_cache must be one of {', '.join(KV_CACHE_DTYPES)}, got {kv_cache!r}")
    if quantize is not None and quantize not in BITS:
        raise ConfigError(f"quantize must be one of {', '.join(BITS)}, got {quantize!r}")
    folder = resolve(path_or_hub_id)
    config = load_config(folder)
    if context_length is not None and not 0 < context_length <= config.context_window:
        raise ContextLengthError(f"context length {context_length} must be in [1, {config.context_window}]")
    weights = load_weights(config, TensorSource(read_tensors(folder), BITS.get(quantize),
                                                config.fp8_block_rows))
    tokenizer = Tokenizer.from_dir(folder) if (folder / "tokenizer.json").exists() else None
    gen_path = folder / "generation_config.json"
    generation_config = read_json(gen_path) if gen_path.exists() else {}
    return Model(config, weights, tokenizer, generation_config, folder, context_length, kv_cache)
