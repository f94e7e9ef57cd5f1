"""out = x W^T for a weight matrix in any stored format: the one place that picks the product kernel.

    stored format        1 token            2 .. FEW_TOKENS      more tokens
    bf16                 matvec             matmul_few           gemm.matmul_bf16 (micro-kernel; avx2 and up)
    bf16 / fp16 / fp32   matvec             matmul_few           matmul (tiles widened for BLAS)
    fp8 (Fp8Matrix)      matvec_fp8         matmul_fp8           matmul_fp8 (tiles dequantised for BLAS)
    GGML (GgmlMatrix)    matvec_ggml        matmul_ggml          matmul_ggml (tiles dequantised for BLAS)
    int8                 matvec_int8        matmul_int8          matmul_int8
    int4                 matvec_int4        matmul_int4          matmul_int4

and `row_dot`, its counterpart inside compiled kernels: one row of W times x, for the formats MoE
experts come in (the MoE kernel streams the rows of the experts a token chose).
"""
import numpy as np
from numba import types
from numba.extending import overload

from . import isa
from .dtypes import BF16
from .fp8 import Fp8Matrix, fp8_row_dot, matmul_fp8, matvec_fp8
from .ggml import GgmlMatrix, ggml_row_dot, matmul_ggml, matvec_ggml
from .matmul import float_row_dot, matmul, matmul_few, matvec
from .quant import Int4Matrix, Int8Matrix, matmul_int4, matmul_int8, matvec_int4, matvec_int8

if isa.ISA != "generic":  # kernels on the instruction layer: imported only where the CPU has it
    from .gemm import matmul_bf16

FEW_TOKENS = 64  # up to this many tokens matmul_few beats widening + BLAS (bench/kernels.py "few tokens"):
# 48-64-token prompts of the 0.5B shape ran at 232-248 tok/s, against 197-208 through AVX2 sgemm; an
# AVX-512 sgemm (twice as fast) lowers the crossover.


def linear(out, x, w):
    # out: [T, N] float32, x: [T, K] float32, w: [N, K] stored dtype, Fp8Matrix, GgmlMatrix, Int8/Int4Matrix
    """out = x @ w.T  (no bias: the caller adds it)"""
    one_token = x.shape[0] == 1
    if isinstance(w, Fp8Matrix):
        matvec_fp8(out[0], w.q, w.scales, x[0], w.block_rows) if one_token else matmul_fp8(out, x, w)
    elif isinstance(w, GgmlMatrix):
        matvec_ggml(out[0], w.data, w.ggml_type, x[0]) if one_token else matmul_ggml(out, x, w)
    elif isinstance(w, Int8Matrix):
        matvec_int8(out[0], w.q, w.scales, x[0]) if one_token else matmul_int8(out, x, w.q, w.scales)
    elif isinstance(w, Int4Matrix):
        if one_token:
            matvec_int4(out[0], w.q, w.scales, w.mins, x[0])
        else:
            matmul_int4(out, x, w.q, w.scales, w.mins)
    elif one_token:
        matvec(out[0], w, x[0])
    elif x.shape[0] <= FEW_TOKENS:
        matmul_few(out, x, w)
    elif w.dtype == BF16 and isa.ISA != "generic":
        matmul_bf16(out, np.ascontiguousarray(x), w)
    else:
        matmul(out, x, w)


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
