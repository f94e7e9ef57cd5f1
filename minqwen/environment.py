"""What must be set before NumPy (OpenBLAS) and Numba start, because they read it once: the thread pools'
spinning, and the instructions Numba compiles for when MINQWEN_ISA forces a path (kernels/isa.py).

Imported first by minqwen/__init__.py.
"""
import os

# Decode runs Numba's parallel regions back to back; prefill alternates them with OpenBLAS's sgemm. A
# pool that keeps spinning after its work holds a core the other one needs: OpenBLAS's threads spin
# ~0.1 s after each call (measured: the first decode step after a prefill took 95-119 ms instead of
# 30), libgomp's ~300k spins fight OpenBLAS during prefill (2-3x slower matmuls on 2 cores). Short
# spins keep decode's region-to-region handoff fast. A value the user exported wins; with NumPy
# already imported before minqwen, OpenBLAS has read its settings and this one comes too late.
THREAD_SETTINGS = {"OPENBLAS_THREAD_TIMEOUT": "4",  # 2**4 cycles of spinning, then sleep
                   "GOMP_SPINCOUNT": "10000"}
SET_BY_MINQWEN = [name for name in THREAD_SETTINGS if name not in os.environ]  # (benches undo them for peers)
os.environ.update({name: THREAD_SETTINGS[name] for name in SET_BY_MINQWEN})

# MINQWEN_ISA=avx2 on a CPU with more (AVX-512, VNNI, AMX): Numba compiles for that CPU without them, so
# that the plain loops are vectorised as on an AVX2 machine too and the benches compare paths, not
# compilers. A NUMBA_CPU_FEATURES the user exported wins. The features are named here, not taken from
# kernels/isa.py's PATHS, for two reasons. Order: isa.py learns the target by asking Numba, and Numba fixes
# its target (reading NUMBA_CPU_FEATURES) as it starts, so this must run before anything imports isa.py.
# Breadth: an AVX2 machine lacks more than the four features the avx512 path needs; every AVX-512
# extension, AVX-VNNI and AMX go, or LLVM could still use them in the plain loops.
if os.environ.get("MINQWEN_ISA") == "avx2" and "NUMBA_CPU_FEATURES" not in os.environ:
    import llvmlite.binding

    host = llvmlite.binding.get_host_cpu_features()
    beyond_avx2 = ("avx512", "avxvnni", "amx")
    flags = (("+" if on and not name.startswith(beyond_avx2) else "-") + name for name, on in host.items())
    os.environ["NUMBA_CPU_FEATURES"] = ",".join(flags)
