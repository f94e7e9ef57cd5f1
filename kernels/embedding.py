"""Token embedding: one row of the embedding table per token, widened (or dequantised) to float32."""
import numpy as np

from .dtypes import to_float32, widen
from .ggml import GgmlMatrix, dequantize_ggml_rows
from .jit import jit


@jit  # serial: a row copy is a few KB, less work than waking the threads
def embed_rows(out, table, ids):  # out: [T, D] float32, table: [V, D] bf16/fp16/fp32 bits, ids: [T] int64
    """out[t] = float32(table[ids[t]])    (the caller has checked 0 <= ids[t] < V)"""
    T, D = out.shape
    for t in range(T):
        for d in range(D):
            out[t, d] = widen(table[ids[t], d])


def embed(out, table, ids):  # table: an array, or GGML blocks (GGUF files quantise their embeddings)
    """out[t] = float32(table[ids[t]])"""
    if isinstance(table, GgmlMatrix):
        dequantize_ggml_rows(out, table.data[ids], table.ggml_type)  # copies T rows of blocks: a few KB
    else:
        embed_rows(out, table, ids)


def embed_reference(table, ids):  # [V, D] stored dtype, [T] -> [T, D] float64
    return to_float32(table).astype(np.float64)[ids]
