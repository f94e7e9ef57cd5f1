"""What every bench shares: the machine's read bandwidth, random bf16 weights, timing, the report."""
from __future__ import annotations

import json
import os
import platform
import resource
import time

import numba
import numpy as np
from numba import prange

from minqwen.kernels import isa
from minqwen.kernels.dtypes import bf16_bits
from minqwen.kernels.jit import pjit

GIB = 1 << 30


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
    print(f"{machine()['cpu']}, kernels {isa.ISA}, read bandwidth {bandwidth.median:.1f} GB/s", flush=True)
    results = measure()
    for _ in range(3):
        bandwidth.sample()
    report(name, {"isa": isa.ISA, "read_gb_s": bandwidth.median, **results})
