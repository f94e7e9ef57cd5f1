"""Numba kernels: pure functions over arrays, output argument first, no model knowledge.

Each kernel's docstring gives the formula it computes; tests/reference.py holds a plain float64
NumPy version of each, and tests/test_kernels_*.py compare the two on random shapes.
"""
