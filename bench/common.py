"""What every bench shares: the machine's read bandwidth and arithmetic peaks, random bf16 weights, timing,
the report."""
from __future__ import annotations

import json
import os
import platform
import resource
import time

import numba
import numpy as np
from numba import prange
from numba.extending import overload

from minqwen.kernels import isa
from minqwen.kernels.dtypes import bf16_bits
from minqwen.kernels.jit import pjit

GIB = 1 << 30

if isa.ISA != "generic":
    from minqwen.kernels.gemm import LANES, PAIRS, QUADS
    from minqwen.kernels.simd import (
        dot_bf16,
        dot_s16,
        dot_u8s8,
        fma,
        fzeros,
        hsum,
        izeros,
        load,
        splat,
        to_float,
    )

    @pjit
    def _fma_chains(out, steps):  # out: [threads] float32; 12 independent chains of FMAs per thread
        for t in prange(out.shape[0]):
            a, b = splat(1.0 + t * 1e-9, LANES), splat(0.9999999, LANES)
            c0 = c1 = c2 = c3 = c4 = c5 = c6 = c7 = c8 = c9 = c10 = c11 = fzeros(LANES)
            for _ in range(steps):
                c0, c1, c2, c3, c4, c5 = fma(a, b, c0), fma(a, b, c1), fma(a, b, c2), fma(a, b, c3), \
                    fma(a, b, c4), fma(a, b, c5)
                c6, c7, c8, c9, c10, c11 = fma(a, b, c6), fma(a, b, c7), fma(a, b, c8), fma(a, b, c9), \
                    fma(a, b, c10), fma(a, b, c11)
            out[t] = hsum(c0 + c1 + c2 + c3 + c4 + c5 + c6 + c7 + c8 + c9 + c10 + c11)

    def _self_dot(c, a):
        """c + a . a: dot_s16 of int16 pairs or dot_u8s8 of byte quads, by a's dtype"""

    @overload(_self_dot, inline="always")
    def _self_dot_for(c, a):
        if a.dtype.bitwidth == 16:
            return lambda c, a: dot_s16(c, load(a, 0, PAIRS), load(a, 0, PAIRS))
        return lambda c, a: dot_u8s8(c, load(a, 0, QUADS), load(a, 0, QUADS))

    @pjit
    def _dot_chains(out, a, steps):  # 12 independent chains of int16 or int8 dot products, by a's dtype
        for t in prange(out.shape[0]):
            c0 = c1 = c2 = c3 = c4 = c5 = c6 = c7 = c8 = c9 = c10 = c11 = izeros(LANES)
            for _ in range(steps):
                c0, c1, c2, c3, c4, c5 = _self_dot(c0, a), _self_dot(c1, a), _self_dot(c2, a), \
                    _self_dot(c3, a), _self_dot(c4, a), _self_dot(c5, a)
                c6, c7, c8, c9, c10, c11 = _self_dot(c6, a), _self_dot(c7, a), _self_dot(c8, a), \
                    _self_dot(c9, a), _self_dot(c10, a), _self_dot(c11, a)
            out[t] = hsum(to_float(c0 + c1 + c2 + c3 + c4 + c5 + c6 + c7 + c8 + c9 + c10 + c11))

    @pjit
    def _bf16_chains(out, a, steps):  # 12 independent chains of bf16 pair dot products (vdpbf16ps)
        for t in prange(out.shape[0]):
            w = load(a, 0, PAIRS)
            c0 = c1 = c2 = c3 = c4 = c5 = c6 = c7 = c8 = c9 = c10 = c11 = fzeros(LANES)
            for _ in range(steps):
                c0, c1, c2, c3, c4, c5 = dot_bf16(c0, w, w), dot_bf16(c1, w, w), dot_bf16(c2, w, w), \
                    dot_bf16(c3, w, w), dot_bf16(c4, w, w), dot_bf16(c5, w, w)
                c6, c7, c8, c9, c10, c11 = dot_bf16(c6, w, w), dot_bf16(c7, w, w), dot_bf16(c8, w, w), \
                    dot_bf16(c9, w, w), dot_bf16(c10, w, w), dot_bf16(c11, w, w)
            out[t] = hsum(c0 + c1 + c2 + c3 + c4 + c5 + c6 + c7 + c8 + c9 + c10 + c11)


def _peak(repeats: int, kernel, ops_per_step: int, *args) -> float:  # the best of `repeats` runs
    out, steps = np.empty(numba.get_num_threads(), np.float32), 1 << 22
    kernel(out, *args, 1)  # compile, start the threads
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        kernel(out, *args, steps)
        best = max(best, out.shape[0] * steps * ops_per_step / (time.perf_counter() - start) / 1e9)
    return best


def fp32_fma_peak(repeats: int = 7) -> float | None:
    """GFLOP/s of float32 FMAs (2 flops each) on all Numba threads, 12 independent chains of full vectors
    per thread: the ceiling of any float32 matrix product here (BLAS tiles, the float panels). The best
    of `repeats` runs (other processes only ever lower it); None on the generic path (no vectors)."""
    return None if isa.ISA == "generic" else _peak(repeats, _fma_chains, 12 * LANES * 2)


def int16_dot_peak(repeats: int = 7) -> float | None:
    """GOP/s of int16 dot products (vpdpwssd / vpmaddwd: a multiply and an add per int16 pair) on all
    Numba threads, measured as fp32_fma_peak: the ceiling of the int16 panels."""
    return None if isa.ISA == "generic" else _peak(repeats, _dot_chains, 12 * PAIRS * 2,
                                                  np.ones(PAIRS, np.int16))


def int8_dot_peak(repeats: int = 7) -> float | None:
    """GOP/s of int8 dot products (vpdpbusd: a multiply and an add per byte pair) on all Numba threads,
    measured as fp32_fma_peak: the ceiling of the int8 panels. None where the prefill has no int8
    (isa.PREFILLS: VNNI at the prefill's width)."""
    return _peak(repeats, _dot_chains, 12 * QUADS * 2, np.ones(QUADS, np.uint8)) if "int8" in isa.PREFILLS \
        else None


def bf16_dot_peak(repeats: int = 7) -> float | None:
    """GFLOP/s of bf16 pair dot products (vdpbf16ps: a multiply and an add per bf16 pair, in float32) on all
    Numba threads, measured as fp32_fma_peak: the ceiling of gemm.matmul_bf16 and of a bf16 prefill. None
    where the prefill has no bf16 (isa.PREFILLS: AVX512-BF16)."""
    one = np.full(PAIRS, 0x3F80, np.uint16)  # bf16 1.0: the sums grow by 2 a step, exactly, up to 2^24
    return _peak(repeats, _bf16_chains, 12 * PAIRS * 2, one) if "bf16" in isa.PREFILLS else None


@pjit
def _read_all(a):  # a: [N] float32
    """sum_i a[i]: one streaming read of a, the fastest any kernel can consume weights"""
    total = np.float32(0.0)
    for i in prange(a.size):
        total += a[i]
    return total


class Bandwidth:
    """Read bandwidth of this machine, sampled as often as a bench likes: one sample is one parallel
    read-only sum over `gib` GiB of float32 (far beyond any cache). On a shared VM the bandwidth moves
    by 10-30% from second to second, so benches sample it between their own timed runs and compare
    medians taken over the same stretch of time."""

    def __init__(self, gib: float = 1.0):
        self.array = np.ones(int(gib * GIB) // 4, np.float32)
        _read_all(self.array[:1024])  # compile, start the threads
        self.samples: list[float] = []

    def sample(self) -> float:
        start = time.perf_counter()
        _read_all(self.array)
        self.samples.append(self.array.nbytes / (time.perf_counter() - start) / 1e9)
        return self.samples[-1]

    @property
    def median(self) -> float:
        return float(np.median(self.samples))

    @property
    def best(self) -> float:
        return float(max(self.samples))


def read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """GB/s of a parallel read-only sum over `gib` GiB, median of `repeats`."""
    bandwidth = Bandwidth(gib)
    for _ in range(repeats):
        bandwidth.sample()
    return bandwidth.median


def seconds_each(run, repeats: int) -> list[float]:
    """Wall time of each of `repeats` calls of run()."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


def median_seconds(run, repeats: int) -> float:
    return float(np.median(seconds_each(run, repeats)))


def context_switches() -> int:
    """Times this process blocked so far. A thread blocking inside a parallel region means another
    process held a core: the region then waits for it and the timing measures the scheduler."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw


def warn_if_contended(switches: int, calls: int):
    """A quiet machine blocks far less than once per timed call (measured here: 5 in 30 decode steps;
    with other processes on the cores, ~900)."""
    if switches > calls:
        print(f"WARNING: {switches} context switches in {calls} timed calls: other processes were using the "
              "cores, so parallel regions waited for them. Rerun on a quiet machine.")


class RandomBF16:
    """Random weights ~ N(0, std^2), std = 1/sqrt(fan_in) unless given, as bf16 bits, copied out of one
    random pool per std.

    Drawing gigabytes of fresh normals would take minutes; copying slices of a 32 MB pool at random
    offsets takes a memcpy. The copies repeat values, which no kernel's speed depends on, but each
    matrix is its own memory, so the caches cannot serve one matrix from another's reads."""

    def __init__(self, seed: int = 0, pool: int = 1 << 24):
        self.rng = np.random.default_rng(seed)
        self.size = pool
        self.pools: dict[float, np.ndarray] = {}

    def matrix(self, rows: int, cols: int, std: float | None = None) -> np.ndarray:  # [rows, cols] bf16 bits
        std = cols ** -0.5 if std is None else std
        pool = self.pools.get(std)
        if pool is None:
            normal = self.rng.standard_normal(self.size, dtype=np.float32) * np.float32(std)
            pool = self.pools[std] = bf16_bits(normal)
        out = np.empty(rows * cols, np.uint16)
        done, start = 0, int(self.rng.integers(self.size))
        while done < out.size:  # wrap around the pool as often as the matrix needs
            n = min(out.size - done, self.size - start)
            out[done:done + n] = pool[start:start + n]
            done, start = done + n, 0
        return out.reshape(rows, cols)

    @staticmethod
    def vector(size: int, around: float = 1.0) -> np.ndarray:  # norm weights: float32, like the loader's
        return np.full(size, around, np.float32)


def _cpuinfo(field: str) -> str | None:  # the first value of `field` in /proc/cpuinfo (None off Linux)
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith(field)), None)
    except OSError:
        return None


def cpu_model() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    return set((_cpuinfo("flags") or "").split())


def machine() -> dict:
    return {"cpu": cpu_model(), "threads": numba.get_num_threads(), "threading_layer": _threading_layer(),
            "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
            "numba": numba.__version__, "numpy": np.__version__, "python": platform.python_version()}


def _threading_layer() -> str:
    try:
        return numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet
        return "not started"


def warn_if_slow_blas():
    """Prefill multiplies through NumPy's OpenBLAS, which picks its kernels for the CPU unless
    OPENBLAS_CORETYPE names a core (some machine images set Haswell everywhere, for identical results).
    On an AVX-512 CPU that halves sgemm: 240 vs 430 GFLOP/s measured here (Zen 5, 2 threads)."""
    core = os.environ.get("OPENBLAS_CORETYPE")
    if (core and core.lower() in ("haswell", "zen", "sandybridge", "nehalem", "prescott")
            and "avx512f" in cpu_flags()):
        print(f"NOTE: OPENBLAS_CORETYPE={core} makes OpenBLAS use AVX2 kernels on this AVX-512 CPU: sgemm, "
              "and so minqwen's prefill, runs below the machine's speed. "
              "`env -u OPENBLAS_CORETYPE ...` lifts it.")


def warn_if_workqueue():
    if _threading_layer() == "workqueue":
        print("WARNING: Numba's 'workqueue' threading layer costs ~0.1 ms per parallel region; "
              "decode times below are dominated by it. Install a Numba with OpenMP or TBB.")


def report(name: str, results: dict):
    """The bench's last stdout line: one JSON document with everything."""
    print(json.dumps({"bench": name, "machine": machine(), **results}))


def report_between_bandwidths(name: str, measure):
    """Sample the read bandwidth, print the machine's line (CPU, kernel path, bandwidth), run `measure()`
    (-> the results), sample again and report the results with the kernel path and the median bandwidth
    of the whole stretch: the figures and the bandwidth they ran at come from one run."""
    bandwidth = Bandwidth()
    for _ in range(3):
        bandwidth.sample()
    path = isa.ISA + " (bf16 prefill on AMX tiles)" * isa.AMX
    print(f"{machine()['cpu']}, kernels {path}, read bandwidth {bandwidth.median:.1f} GB/s", flush=True)
    results = measure()
    for _ in range(3):
        bandwidth.sample()
    report(name, {"isa": isa.ISA, "amx": isa.AMX, "read_gb_s": bandwidth.median, **results})
