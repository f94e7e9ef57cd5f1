"""Which instructions the kernels use: the best path the compile target has, or the one MINQWEN_ISA names.

    generic   plain Numba loops only (Numba still vectorises them for the CPU it compiles for)
    avx2      + kernels/intdot.py: GGML blocks times int16 activations on integer dot products
                (vpmaddwd), and kernels/gemm.py: prefill micro-kernels; 32-byte vectors
    avx512    the same kernels with AVX512-VNNI: each pair of dot products is one vpdpwssd, and the
                prefill's vectors 64 bytes

The choice is made here, once, at import, and the other files ask it: linear.py imports the kernels of
the chosen path only (a path not chosen is never imported, so never compiled: a CPU never meets an
instruction it lacks), and simd.py's dot products are vpdpwssd where VNNI_BITS says. It is made from the
features Numba compiles for (the host's, unless NUMBA_CPU_NAME / NUMBA_CPU_FEATURES say otherwise).
MINQWEN_ISA=<path> forces a path the CPU has (naming one it lacks, or no path, fails this import);
minqwen/environment.py then also narrows Numba's target to that path's features, so that a forced avx2
on an AVX-512 CPU compiles every kernel, plain loops included, as an AVX2 machine would.
"""
import ctypes
import os

from numba.core.registry import cpu_target

from . import InstructionPathError

PATHS = {"generic": set(), "avx2": {"avx2", "fma", "f16c"}}  # path: the CPU features it needs
PATHS["avx512"] = PATHS["avx2"] | {"avx512f", "avx512bw", "avx512vl", "avx512vnni"}


def usable_paths(features: set[str]) -> list[str]:
    return [path for path, needs in PATHS.items() if needs <= features]


def choose(requested: str | None, features: set[str]) -> str:
    """The requested path, or with none requested the best the CPU has; InstructionPathError if the CPU
    lacks it or it is no path (a silent fallback would run, and measure, another path than asked for)."""
    usable = usable_paths(features)
    if not requested:
        return usable[-1]
    runs = f"paths this CPU runs: {', '.join(usable)}"
    if requested not in PATHS:
        raise InstructionPathError(f"MINQWEN_ISA={requested!r} is not a path ({runs})")
    if requested not in usable:
        missing = ", ".join(sorted(PATHS[requested] - features))
        raise InstructionPathError(f"MINQWEN_ISA={requested} needs {missing}, which this CPU (as Numba "
                                   f"targets it) lacks ({runs})")
    return requested


_features = cpu_target.target_context.codegen()._tm_features  # Numba fixes its target when it starts
FEATURES = {f[1:] for f in _features.split(",") if f.startswith("+")}  # the features it compiles for
ISA = choose(os.environ.get("MINQWEN_ISA"), FEATURES)

# The widths (bits) of the vectors whose integer dot products (simd.dot_s16) are one vpdpwssd: AVX512-VNNI's
# on the avx512 path; on the avx2 path AVX-VNNI's (256 bits only), which Intel's CPUs since Alder Lake have
# without AVX-512. Elsewhere a dot product is vpmaddwd + vpaddd (which LLVM itself fuses into vpdpwssd if
# the target has VNNI: that is why a forced avx2 also narrows the target, see minqwen/environment.py).
VNNI_BITS = {"avx512": (256, 512), "avx2": (256,) if "avxvnni" in FEATURES else ()}.get(ISA, ())

# Prefill on dot products (kernels/gemm.py) is opt-in, as it moves the logits past the tests' bars
# (docs/gguf-and-quantisation.md): MINQWEN_PREFILL=int16 (vpdpwssd), int8 (vpdpbusd, where the prefill's width
# has VNNI) or bf16: vdpbf16ps (AVX512-BF16), or AMX tiles (gemm.matmul_amx) where the CPU has them and Linux
# grants this process their state (arch_prctl, syscall 158: ARCH_REQ_XCOMP_PERM 0x1023 for XTILEDATA, 18).
AMX = (ISA == "avx512" and {"amx-tile", "amx-bf16"} <= FEATURES
       and ctypes.CDLL(None).syscall(158, 0x1023, 18) == 0)
PREFILLS = ["float"] + ["int16"] * (ISA != "generic")  # the prefills this CPU runs
PREFILLS += ["bf16"] * (ISA == "avx512" and ("avx512bf16" in FEATURES or AMX))
PREFILLS += ["int8"] * ({"avx512": 512}.get(ISA, 256) in VNNI_BITS)
# Decode on int8 activations (vpdpbusd, kernels/intdot.py) is opt-in, MINQWEN_DECODE=int8, where the path has
# 256-bit VNNI: int16's steps are 258x finer (why int16 is the default: intdot.py's docstring).
DECODES = ["int16"] + ["int8"] * (256 in VNNI_BITS)  # the decodes this CPU runs
PREFILL, DECODE = os.environ.get("MINQWEN_PREFILL") or "float", os.environ.get("MINQWEN_DECODE") or "int16"
for name, mode, runs in (("prefill", PREFILL, PREFILLS), ("decode", DECODE, DECODES)):
    if mode not in runs:
        raise InstructionPathError(f"MINQWEN_{name.upper()}={mode!r} is not a {name} this CPU runs "
                                   f"({', '.join(runs)})")
