"""Which instructions the kernels use: the best path the compile target has, or the one MINQWEN_ISA names.

    generic     plain Numba loops only (Numba still vectorises them for the CPU it compiles for)
    avx2        + kernels/intdot.py: GGML blocks times int16 activations on integer dot products
                  (vpmaddwd), and kernels/gemm.py: the bf16 prefill micro-kernel; 32-byte vectors
    avx512      the same kernels with AVX512-VNNI: each pair of dot products is one vpdpwssd
    avx512bf16  avx512 + AVX512-BF16 (the prefill GEMM does not use vdpbf16ps yet: see the README)

The choice is made once, at import, from the features Numba compiles for (the host's, unless
NUMBA_CPU_NAME / NUMBA_CPU_FEATURES say otherwise). MINQWEN_ISA=<path> forces a path the CPU has;
minqwen/environment.py then also narrows Numba's target to that path's features, so that a forced avx2
on an AVX-512 CPU compiles every kernel, plain loops included, as an AVX2 machine would. Kernels of a
path not chosen are never imported, so never compiled: a CPU never meets an instruction it lacks.
"""
import os

from .simd import target_features

PATHS = {"generic": set(), "avx2": {"avx2", "fma", "f16c"}}
PATHS["avx512"] = PATHS["avx2"] | {"avx512f", "avx512bw", "avx512vl", "avx512vnni"}
PATHS["avx512bf16"] = PATHS["avx512"] | {"avx512bf16"}


def usable_paths(features: set[str]) -> list[str]:
    return [path for path, needs in PATHS.items() if needs <= features]


def choose(requested: str | None, features: set[str]) -> tuple[str, str | None]:
    """(path, problem): the requested path if the CPU has it, else the best one and what was wrong."""
    usable = usable_paths(features)
    if not requested:
        return usable[-1], None
    if requested not in PATHS:
        return usable[-1], f"MINQWEN_ISA={requested!r} is not a path (paths: {', '.join(PATHS)})"
    if requested not in usable:
        missing = ", ".join(sorted(PATHS[requested] - features))
        return usable[-1], (f"MINQWEN_ISA={requested} needs {missing}, "
                            "which this CPU (as Numba targets it) lacks")
    return requested, None


ISA, PROBLEM = choose(os.environ.get("MINQWEN_ISA"), target_features())
