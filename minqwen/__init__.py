"""minqwen: a small, readable, fast CPU inference engine for Qwen language models."""
from . import environment  # noqa: F401  (first: sets what NumPy and Numba read when they load)
from .errors import (
    CheckpointError,
    ConfigError,
    ContextLengthError,
    MinqwenError,
    SamplingError,
    TemplateError,
    TokenError,
    UnsupportedModelError,
)
from .loader import load
from .model import Model

__all__ = ["load", "Model", "MinqwenError", "CheckpointError", "ConfigError", "UnsupportedModelError",
           "ContextLengthError", "TokenError", "SamplingError", "TemplateError"]
