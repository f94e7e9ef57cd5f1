"""Numba kernels: pure functions over arrays, output argument first, no model knowledge.

Each kernel's docstring gives the formula it computes, and a plain float64 NumPy version of it,
`<kernel>_reference`, sits right beside it in the same file; tests/test_kernels_*.py compare the two
on random shapes. JIT flags live in jit.py, the stored-dtype conventions in dtypes.py.
"""
