"""minqwen: a small, readable, fast CPU inference engine for Qwen language models."""
from .errors import (CheckpointError, ConfigError, ContextLengthError, MinqwenError, SamplingError,
                     TemplateError, TokenError, UnsupportedModelError)
from .model import Model, load

__all__ = ["load", "Model", "MinqwenError", "CheckpointError", "ConfigError", "UnsupportedModelError",
           "ContextLengthError", "TokenError", "SamplingError", "TemplateError"]
