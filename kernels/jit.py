"""The one place where the JIT flags of every kernel are set.

`jit` compiles a serial kernel, `pjit` one whose outermost `prange` loop runs on all threads.
fastmath lets LLVM reassociate float sums (vectorised reductions) and drop NaN/Inf checks;
we keep it off for nothing: every kernel is tested against a float64 reference with tolerances
that fastmath's reordering passes and a wrong kernel does not.

cache=True keeps each kernel's machine code on disk, keyed on its own file only: after editing a helper
that another file's kernels inline, clear it (docs/performance.md, "Start-up, threads and the KV cache").
"""
# The thread pools' spinning is set in minqwen/environment.py, which runs before NumPy and Numba load.
import numba

# OpenMP first: its ~2 us per parallel region is what decode (a few hundred regions a token) needs;
# the workqueue layer costs ~0.1 ms a region.
numba.config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]

FLAGS = dict(cache=True, fastmath=True, nogil=True, error_model="numpy")

jit = numba.njit(**FLAGS)
pjit = numba.njit(parallel=True, **FLAGS)
ijit = numba.njit(inline="always", **FLAGS)  # inlined where it is called: a constant argument specialises it
