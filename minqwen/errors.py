"""Typed exceptions: every way a user's input can be wrong has its own class.

The CLI prints `error: <message>` for any MinqwenError and exits non-zero, without a traceback.
A message that shows a value read from a file shows it through `quoted`.
"""


def quoted(value, limit: int = 80) -> str:
    """repr() cut to one short line: names and values read from a file can be megabytes long."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


class MinqwenError(Exception):
    """Base class of every error minqwen raises on bad input."""


class CheckpointError(MinqwenError):
    """A checkpoint folder or file is missing, unreadable, truncated or corrupt."""


class ConfigError(MinqwenError):
    """config.json is not JSON, or disagrees with itself or with the tensors."""


class UnsupportedModelError(MinqwenError):
    """The checkpoint's model_type / architecture is not one minqwen runs."""


class ContextLengthError(MinqwenError):
    """The prompt (plus generated tokens) does not fit in the model's context window."""


class TokenError(MinqwenError):
    """A token id lies outside the vocabulary."""


class SamplingError(MinqwenError):
    """A sampling or generation parameter is out of range (e.g. temperature < 0)."""


class TemplateError(MinqwenError):
    """The chat template is missing or failed to render."""


class ConstraintError(MinqwenError):
    """A JSON schema, regular expression or grammar that does not compile, or asks for what the
    constraint engine cannot enforce (an unsupported schema keyword): never ignored."""
