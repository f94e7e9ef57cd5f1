"""The one place where the JIT flags of every kernel are set.

`jit` compiles a serial kernel, `pjit` one whose outermost `prange` loop runs on all threads.
fastmath lets LLVM reassociate float sums (vectorised reductions) and drop NaN/Inf checks;
we keep it off for nothing: every kernel is tested against a float64 reference with tolerances
that fastmath's reordering passes and a wrong kernel does not.
"""
import os

# OpenMP threads spin after each parallel region before sleeping (libgomp's default: ~300k spins).
# Between two Numba regions that is what makes back-to-back kernels cheap, but during prefill the
# spinning threads fight OpenBLAS's threads for the cores (measured 2-3x slower matmuls on 2 cores).
# A short spin keeps decode's region-to-region handoff fast and lets BLAS have the cores. Must be
# set before Numba starts its OpenMP runtime, i.e. before the first parallel kernel runs.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import numba  # noqa: E402

# OpenMP first: its ~2 us per parallel region is what decode (a few hundred regions a token) needs;
# the workqueue layer costs ~0.1 ms a region.
numba.config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]

FLAGS = dict(cache=True, fastmath=True, nogil=True, error_model="numpy")

jit = numba.njit(**FLAGS)
pjit = numba.njit(parallel=True, **FLAGS)
