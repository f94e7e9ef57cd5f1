"""out = x W^T for a weight matrix in any stored format: the one place that picks the product kernel.

    format \\ tokens     1                  2 .. FEW_TOKENS      more
    bf16 / fp16 / fp32   matvec             matmul_few           matmul (tiles widened for BLAS)
    int8                 matvec_int8        matmul_int8          matmul_int8
    int4                 matvec_int4        matmul_int4          matmul_int4
"""
from .matmul import matmul, matmul_few, matvec
from .quant import Int4Matrix, Int8Matrix, matmul_int4, matmul_int8, matvec_int4, matvec_int8

FEW_TOKENS = 64  # up to this many tokens matmul_few beats widening + BLAS (bench/kernels.py "few tokens"):
# 48-64-token prompts of the 0.5B shape ran at 232-248 tok/s, against 197-208 through AVX2 sgemm; an
# AVX-512 sgemm (twice as fast) lowers the crossover.


def linear(out, x, w):
    # out: [T, N] float32, x: [T, K] float32, w: [N, K] stored dtype, Int8Matrix or Int4Matrix
    """out = x @ w.T  (no bias: the caller adds it)"""
    one_token = x.shape[0] == 1
    if isinstance(w, Int8Matrix):
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
    else:
        matmul(out, x, w)
