"""minqwen: a small, readable, fast CPU inference engine for Qwen language models."""
from typing import TYPE_CHECKING

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
from .kernels import InstructionPathError

if TYPE_CHECKING:
    from .loader import load
    from .model import Model

__all__ = ["load", "Model", "MinqwenError", "CheckpointError", "ConfigError", "UnsupportedModelError",
           "ContextLengthError", "TokenError", "SamplingError", "TemplateError"]


def __getattr__(name: str):
    # load and Model are imported on first use, not with the package: they import the kernels, which refuse
    # a MINQWEN_ISA this CPU cannot run (kernels/isa.py), and `python -m minqwen` imports this package
    # before the CLI can report that as one line (__main__.py). Here it becomes the API's ConfigError.
    if name not in ("load", "Model"):
        raise AttributeError(f"module 'minqwen' has no attribute {name!r}")
    try:
        from .loader import load
        from .model import Model
    except InstructionPathError as e:
        raise ConfigError(str(e)) from None
    return load if name == "load" else Model
