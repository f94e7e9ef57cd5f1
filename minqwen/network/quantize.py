"""Weight-only int8 / int4 quantisation, as a model's weights load: GGML's Q8_0 and Q4_1 block formats.

Every matrix multiplied by activations (attention and DeltaNet projections, dense and shared-expert
MLPs, lm_head) is quantised in blocks of 32 weights, byte for byte as llama.cpp's Q8_0 (int8: an fp16
scale and 32 int8, 8.5 bits a weight) or Q4_1 (int4: an fp16 scale and minimum and 32 nibbles, 5 bits
a weight): kernels/ggml.py holds the formats, and the same kernels run these models and GGUF files.
What stays in its stored dtype, and why (KEEP, matched against checkpoint tensor names):
- the embedding table: one row is read per token, so its size costs no time;
- routers (`mlp.gate`, `shared_expert_gate`): tiny, and a flipped expert choice costs more than it saves;
- MoE experts, as stored: quantising 100+ GB of them at every load would take longer than reading them;
- the DeltaNet convolution (3-D, four taps a channel), and matrices whose input size is not a multiple
  of 32 (no real Qwen model has one).
The LM head takes at least 8 bits (HEAD_BITS), as llama.cpp's Q4_K_M keeps its output matrix at Q6_K: at
4 bits it was all of int4's loss on SmolLM2 (docs/gguf-and-quantisation.md, which also describes the
checkpoints `python -m minqwen quantize` writes in these blocks).
"""
from __future__ import annotations

from ..kernels.fp8 import Fp8Matrix, dequantize_fp8
from ..kernels.ggml import GgmlMatrix, dequantize_ggml, quantize_q4_1, quantize_q8_0

BITS = {"int8": 8, "int4": 4}
BLOCK = 32  # weights per block of both formats
HEAD_BITS = 8
KEEP = ("embed_tokens", "mlp.gate.", "shared_expert_gate", ".experts.")  # tensor-name parts: see docstring


def quantize_matrix(w, bits: int) -> GgmlMatrix:
    """w (stored dtype, FP8 or GGML blocks) as Q8_0 (bits 8) or Q4_1 (bits 4)."""
    if isinstance(w, Fp8Matrix):
        w = dequantize_fp8(w)
    elif isinstance(w, GgmlMatrix):
        w = dequantize_ggml(w)
    return quantize_q8_0(w) if bits == 8 else quantize_q4_1(w)


def quantizable(tensor_name: str, w) -> bool:
    """Whether the checkpoint tensor `tensor_name` is quantised (see the docstring)."""
    return len(w.shape) == 2 and w.shape[1] % BLOCK == 0 and not any(part in tensor_name for part in KEEP)


def bits_for(tensor_name: str, bits: int) -> int:
    return max(bits, HEAD_BITS) if tensor_name == "lm_head.weight" else bits
