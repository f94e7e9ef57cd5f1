"""Shared test settings: hypothesis without deadlines (Numba compiles on first call)."""
from hypothesis import settings

settings.register_profile("minqwen", deadline=None, print_blob=True)
settings.load_profile("minqwen")
