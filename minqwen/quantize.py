"""Weight-only int8 / int4 quantisation: of a model's weights as they load, and as a checkpoint on disk.

Every matrix multiplied by activations (attention and DeltaNet projections, dense and shared-expert
MLPs, lm_head) is quantised in blocks of 32 weights (kernels/quant.py has the formats); what stays
in its stored dtype, and why (KEEP, matched against checkpoint tensor names):
- the embedding table: one row is read per token, so its size costs no time;
- routers (`mlp.gate`, `shared_expert_gate`): tiny, and a flipped expert choice costs more than it saves;
- MoE experts: the expert kernels read stored-dtype weights only (a quantised expert kernel is future
  work), so a sparse model's experts keep their dtype;
- the DeltaNet convolution (3-D, four taps a channel), and matrices whose input size is not a multiple
  of 32 (no real Qwen model has one).

`python -m minqwen quantize` writes the same as a checkpoint (checkpoint.write_quantized_checkpoint):
`X.qweight` (int8, or uint8 holding two int4), `X.scales` and, for int4, `X.mins` (fp16) instead of
`X.weight`, and config.json says `"quantization_config": {"quant_method": "minqwen", "bits": ...}`.
"""
from __future__ import annotations

import numpy as np

from .kernels.quant import BLOCK, Int4Matrix, Int8Matrix, quantize_int4, quantize_int8

BITS = {"int8": 8, "int4": 4}
KEEP = ("embed_tokens", "mlp.gate.", "shared_expert_gate", ".experts.")  # tensor-name parts: see docstring


def quantize_matrix(w: np.ndarray, bits: int) -> Int8Matrix | Int4Matrix:
    return quantize_int8(w) if bits == 8 else quantize_int4(w)


def quantizable(tensor_name: str, w: np.ndarray) -> bool:
    """Whether the checkpoint tensor `tensor_name` is quantised (see the docstring)."""
    return len(w.shape) == 2 and w.shape[1] % BLOCK == 0 and not any(part in tensor_name for part in KEEP)
