"""Weight-only int8 / int4 quantisation: of a loaded model's weights, and as a checkpoint on disk.

Every matrix multiplied by activations (attention and DeltaNet projections, dense and shared-expert
MLPs, lm_head) is quantised in blocks of 32 weights (kernels/quant.py has the formats); what stays
in its stored dtype, and why:
- the embedding table: one row is read per token, so its size costs no time;
- routers (`mlp.gate`, `shared_expert_gate`): tiny, and a flipped expert choice costs more than it saves;
- MoE experts: the expert kernels read stored-dtype weights only (a quantised expert kernel is future
  work), so a sparse model's experts keep their dtype;
- matrices whose input size is not a multiple of 32 (no real Qwen model has one).

A quantised checkpoint stores `X.qweight` (int8, or uint8 holding two int4), `X.scales` and, for int4,
`X.mins` (fp16) instead of `X.weight`, and its config.json says `"quantization_config": {"quant_method":
"minqwen", "bits": ...}`. lm_head is always written out (untied), quantised.
"""
from __future__ import annotations

import json
import shutil
import struct
from dataclasses import fields, is_dataclass
from pathlib import Path

import numpy as np

from .errors import ConfigError
from .kernels.quant import BLOCK, Int4Matrix, Int8Matrix, quantize_int4, quantize_int8
from .weights import SparseMoE, Weights

BITS = {"int8": 8, "int4": 4}
KEEP = ("embed_tokens", "mlp.gate.", "shared_expert_gate", "conv1d", ".experts.")  # see the docstring


def quantize_matrix(w: np.ndarray, bits: int) -> Int8Matrix | Int4Matrix:
    return quantize_int8(w) if bits == 8 else quantize_int4(w)


def quantizable(name: str, w: np.ndarray) -> bool:
    return w.ndim == 2 and w.shape[1] % BLOCK == 0 and not any(k in name for k in KEEP)


def quantize_weights(weights: Weights, bits: int) -> Weights:
    """Replace every quantizable matrix of a loaded model by its int8 / int4 form (in place)."""
    def visit(obj):
        for f in fields(obj):
            value = getattr(obj, f.name)
            if isinstance(value, SparseMoE):  # router and experts stay; the shared expert is a plain MLP
                if value.shared_expert is not None:
                    visit(value.shared_expert)
            elif is_dataclass(value):
                visit(value)
            elif isinstance(value, np.ndarray) and quantizable(f.name, value):
                setattr(obj, f.name, quantize_matrix(value, bits))

    for layer in weights.layers:
        visit(layer)
    if weights.lm_head.shape[1] % BLOCK == 0:
        weights.lm_head = quantize_matrix(weights.lm_head, bits)
    return weights


def write_quantized_checkpoint(folder: Path, out: Path, bits: int):
    """Read a checkpoint, write its quantised copy (config, tokenizer and generation files copied)."""
    from .checkpoint import read_tensors
    from .config import load_config, read_json

    folder, out = Path(folder), Path(out)
    config = load_config(folder)
    tensors = read_tensors(folder)
    raw_config = read_json(folder / "config.json")
    if "quantization_config" in raw_config:
        raise ConfigError(f"{folder} is already quantised")
    out.mkdir(parents=True, exist_ok=True)
    prefix = "model.language_model." if "model.language_model.embed_tokens.weight" in tensors else "model."
    if "lm_head.weight" not in tensors:  # tied: lm_head becomes its own (quantised) tensor
        tensors = dict(tensors, **{"lm_head.weight": tensors[prefix + "embed_tokens.weight"]})
    written = {}
    for name, w in tensors.items():
        if name.endswith(".weight") and quantizable(name, w):
            stem = name[:-len(".weight")]
            parts = quantize_matrix(w, bits)
            written[stem + ".qweight"] = parts.q
            written[stem + ".scales"] = parts.scales
            if bits == 4:
                written[stem + ".mins"] = parts.mins
        else:
            written[name] = w
    write_safetensors(out / "model.safetensors", written)
    target = raw_config.get("text_config", raw_config) if config.has_vision_tower else raw_config
    target["tie_word_embeddings"] = False
    raw_config["tie_word_embeddings"] = False
    raw_config["quantization_config"] = {"quant_method": "minqwen", "bits": bits, "block_size": BLOCK}
    (out / "config.json").write_text(json.dumps(raw_config, indent=2))
    for extra in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"):
        if (folder / extra).exists():
            shutil.copy(folder / extra, out / extra)


SAFETENSORS_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.uint16): "BF16", np.dtype(np.int16): "F16",
                      np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8", np.dtype(np.int64): "I64",
                      np.dtype(np.int32): "I32", np.dtype(np.float64): "F64", np.dtype(np.bool_): "BOOL"}


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]):
    """The safetensors format: 8-byte header length, JSON header (dtype, shape, byte range of each
    tensor), then the raw bytes. Written by hand because the library's NumPy writer cannot say BF16 for
    our uint16 bits (and we keep fp16 as int16 bits: see kernels/dtypes.py)."""
    header, offset = {}, 0
    for name, w in tensors.items():
        header[name] = {"dtype": SAFETENSORS_DTYPES[w.dtype], "shape": list(w.shape),
                        "data_offsets": [offset, offset + w.nbytes]}
        offset += w.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # pad so the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for w in tensors.values():
            f.write(np.ascontiguousarray(w).tobytes())
