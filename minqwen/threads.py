"""Thread pools, configured before NumPy (OpenBLAS) and Numba (OpenMP) start them: both read these once.

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
