"""Token embedding: one row of the (possibly 16-bit) embedding table per token."""
import numpy as np

from .dtypes import to_float32, widen
from .jit import jit


@jit
def embed(out, table, ids):  # out: [T, D] float32, table: [V, D] any stored dtype, ids: [T] int64
    """out[t] = float32(table[ids[t]])    (the caller has checked 0 <= ids[t] < V)"""
    T, D = out.shape
    # Serial: a row copy is a few KB, less work than waking the threads.
    for t in range(T):
        row = ids[t]
        for d in range(D):
            out[t, d] = widen(table[row, d])


def embed_reference(table, ids):  # [V, D] stored dtype, [T] -> [T, D] float64
    return to_float32(table).astype(np.float64)[ids]
