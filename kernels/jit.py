"""The one place where the JIT flags of every kernel are set.

`jit` compiles a serial kernel, `pjit` one whose outermost `prange` loop runs on all threads.
fastmath lets LLVM reassociate float sums (vectorised reductions) and drop NaN/Inf checks;
we keep it off for nothing: every kernel is tested against a float64 reference with tolerances
that fastmath's reordering passes and a wrong kernel does not.
"""
import numba

FLAGS = dict(cache=True, fastmath=True, nogil=True, error_model="numpy")

jit = numba.njit(**FLAGS)
pjit = numba.njit(parallel=True, **FLAGS)
