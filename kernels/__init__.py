"""Numba kernels: pure functions over arrays, output argument first, no model knowledge.

Each kernel's docstring gives the formula it computes, and a plain float64 NumPy version of it,
`<kernel>_reference`, sits right beside it in the same file (kernels computing one formula two ways
share one: attention_reference, matmul_reference for matmul and matmul_few); tests/test_kernels_*.py
compare the two on random shapes. JIT flags live in jit.py, the stored-dtype conventions in dtypes.py,
the choice of instructions in isa.py.
"""


class InstructionPathError(ValueError):
    """MINQWEN_ISA names no instruction path, or one the compile target lacks: raised by importing isa.py.

    Defined here, which imports nothing and so always imports, for code around that import to catch it
    (minqwen reports it as a ConfigError)."""
