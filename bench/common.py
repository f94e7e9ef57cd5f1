"""What every bench shares: the machine's read bandwidth, random bf16 weights, timing, the report."""
from __future__ import annotations

import json
import platform
import time

import numba
import numpy as np
from numba import prange

from minqwen.kernels.dtypes import bf16_bits
from minqwen.kernels.jit import pjit


@pjit
def _read_all(a):  # a: [N] float32
    total = np.float32(0.0)
    for i in prange(a.size):
        total += a[i]
    return total


def read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """GB/s of a parallel read-only sum over `gib` GiB (well beyond any cache), median of `repeats`."""
    a = np.ones(int(gib * 2**30) // 4, np.float32)
    _read_all(a)
    return a.nbytes / median_seconds(lambda: _read_all(a), repeats) / 1e9


def median_seconds(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


class RandomBF16:
    """Random N(0, 1/sqrt(fan_in)) weights as bf16 bits, cut from one shared pool (fast to make)."""

    def __init__(self, seed: int = 0, pool: int = 1 << 24):
        rng = np.random.default_rng(seed)
        self.pool = bf16_bits(rng.standard_normal(pool).astype(np.float32))
        self.offset = 0

    def matrix(self, rows: int, cols: int) -> np.ndarray:
        n = rows * cols
        start = self.offset % self.pool.size
        self.offset += 7919  # a different slice of the pool for every matrix
        reps = -(-(start + n) // self.pool.size)
        flat = np.tile(self.pool, reps)[start:start + n] if reps > 1 else self.pool[start:start + n].copy()
        # scale 1/sqrt(cols) by shifting the exponent field: bf16 bits of x * 2^-k = bits - (k << 7)
        shift = int(round(np.log2(np.sqrt(cols))))
        nonzero = (flat & 0x7FFF) > (shift << 7)
        flat = np.where(nonzero, flat - np.uint16(shift << 7), 0).astype(np.uint16)
        return flat.reshape(rows, cols)

    @staticmethod
    def vector(size: int, around: float = 1.0) -> np.ndarray:
        return np.full(size, around, np.float32)


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "threads": numba.get_num_threads(), "threading_layer": _threading_layer()}


def _threading_layer() -> str:
    try:
        return numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet
        return "not started"


def report(name: str, results: dict):
    """The bench's last stdout line: one JSON document with everything."""
    print(json.dumps({"bench": name, "machine": machine(), **results}))
