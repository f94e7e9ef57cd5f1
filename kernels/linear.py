"""out = x W^T for a weight matrix in any stored format: the one place that picks the product kernel.

    stored format        1 token                2 .. FEW_TOKENS      more tokens
    bf16 / fp16          matvec                 matmul_few           gemm.matmul_panels
    fp8 (Fp8Matrix)      matvec_fp8             matmul_panels        matmul_panels
    GGML (GgmlMatrix)    matmul_integer up to INTEGER_TOKENS     matmul_panels
                         (intdot.py, the types in its INTEGER_TYPES; else matvec_ggml, float)

matmul_panels (avx2 and up, K % 32 == 0) multiplies in float32, or on int16 / int8 dot products where
MINQWEN_PREFILL=int16 / int8 (isa.py); =bf16 puts gemm.matmul_bf16 (matmul_amx where isa.AMX) in its and
matmul_few's place. Elsewhere (generic path, fp32 weights, other K) matmul / matmul_fp8 / matmul_ggml send
tiles of W, as float32, to BLAS.

minqwen's own int8 / int4 (`--quantize`) are GGML's Q8_0 / Q4_1, so one set of kernels serves them and
GGUF files. `row_dot` is linear's counterpart for compiled kernels (MoE streams the rows its tokens chose).
"""
import numpy as np
from numba import types
from numba.extending import overload

from . import isa
from .dtypes import FP32
from .fp8 import Fp8Matrix, fp8_row_dot, matmul_fp8, matvec_fp8
from .ggml import GgmlMatrix, ggml_row_dot, matmul_ggml, matvec_ggml
from .matmul import float_row_dot, matmul, matmul_few, matvec

INTEGER_TYPES = ()  # the GGML types with an integer dot-product decode kernel, where the CPU has them
if isa.ISA != "generic":  # kernels on the instruction layer: imported only where the CPU has it
    from .gemm import XTYPES, matmul_amx, matmul_bf16, matmul_panels
    from .intdot import INTEGER_TYPES, matmul_integer
    BF16_PRODUCT = matmul_amx if isa.AMX else matmul_bf16  # MINQWEN_PREFILL=bf16's kernel

# matmul_few (W streamed once, no panels to pack) beats the float panels up to FEW_TOKENS tokens, and
# matmul_integer (sequences decoding together) up to INTEGER_TOKENS: performance.md
FEW_TOKENS, INTEGER_TOKENS = 256, 16
ACTIVATIONS = np.dtype(isa.DECODE)  # what decode rounds x to (MINQWEN_DECODE): int16, or int8


def linear(out, x, w):
    # out: [T, N] float32, x: [T, K] float32, w: [N, K] stored dtype, Fp8Matrix or GgmlMatrix
    """out = x @ w.T  (no bias: the caller adds it)"""
    (T, K), fp8, ggml = x.shape, isinstance(w, Fp8Matrix), isinstance(w, GgmlMatrix)
    if fp8 and T == 1:
        matvec_fp8(out[0], w.q, w.scales, x[0], w.block_rows)
    elif ggml and w.ggml_type in INTEGER_TYPES and T <= INTEGER_TOKENS:
        matmul_integer(out, w.data, w.ggml_type, x, ACTIVATIONS)
    elif ggml and T == 1:
        matvec_ggml(out[0], w.data, w.ggml_type, x[0])
    elif T == 1:
        matvec(out[0], w, x[0])
    elif isa.PREFILL == "bf16" and K % 32 == 0 and getattr(w, "dtype", None) != FP32:
        BF16_PRODUCT(out, np.ascontiguousarray(x), w)
    elif T <= FEW_TOKENS and not (fp8 or ggml):
        matmul_few(out, x, w)
    elif isa.ISA != "generic" and K % 32 == 0 and getattr(w, "dtype", None) != FP32:
        matmul_panels(out, np.ascontiguousarray(x), w, XTYPES[isa.PREFILL])  # the type they round x to
    else:  # tiles of W widened or dequantised to float32, through BLAS
        (matmul_fp8 if fp8 else matmul_ggml if ggml else matmul)(out, x, w)


def row_dot(w, r, x):
    """sum_k W[r, k] x[k] for W in any format row_dot knows (callable from compiled kernels only)"""
    raise NotImplementedError("row_dot is only callable from compiled kernels")


@overload(row_dot, inline="always")
def _row_dot(w, r, x):
    if isinstance(w, types.Array):
        return lambda w, r, x: float_row_dot(w[r], x)
    if isinstance(w, types.BaseNamedTuple) and w.instance_class is Fp8Matrix:
        return lambda w, r, x: fp8_row_dot(w.q[r], w.scales[r // w.block_rows], x)
    if isinstance(w, types.BaseNamedTuple) and w.instance_class is GgmlMatrix:
        return lambda w, r, x: ggml_row_dot(w.data[r], w.ggml_type, x)
    return None
