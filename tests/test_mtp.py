"""The multi-token prediction head (`mtp.*` in Qwen3.5 / Qwen3-Next checkpoints) loads into MtpWeights:
every tensor read, shape-checked and where the head's fields say, the norms as 1 + w. save_pretrained
leaves the head out, so checkpoints.add_mtp_head writes it under the published names. GGUF files made by
llama.cpp's converter from such a checkpoint load the same head: from their nextn block, or, converted
with --no-mtp, from the mtp-*.gguf that --mtp writes beside them."""
from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
from gguf_files import convert_with_llama_cpp, llama_cpp_converter

import minqwen
from checkpoints import add_mtp_head, build_checkpoint
from minqwen.cli import main as cli
from minqwen.errors import CheckpointError, ConfigError
from minqwen.formats.safetensors import write_quantized_checkpoint
from minqwen.kernels.dtypes import to_float32
from minqwen.kernels.ggml import Q8_0, GgmlMatrix

# 2 value heads per key head, one full-attention layer among DeltaNet ones, as the published shapes
QWEN3_5 = dict(model_type="qwen3_5_text", architectures=["Qwen3_5ForCausalLM"], vocab_size=200,
               hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=1, head_dim=16, max_position_embeddings=256, tie_word_embeddings=False,
               layer_types=["linear_attention", "full_attention"], mtp_num_hidden_layers=1,
               rope_parameters={"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5},
               linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_num_key_heads=2,
               linear_value_head_dim=8, linear_num_value_heads=4)
QWEN3_5_MOE = dict(QWEN3_5, model_type="qwen3_5_moe_text", architectures=["Qwen3_5MoeForCausalLM"],
                   moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=4,
                   num_experts_per_tok=2)
CASES = {"dense-fp32": (QWEN3_5, "fp32", "per-expert"), "moe-bf16": (QWEN3_5_MOE, "bf16", "per-expert"),
         "moe-fused-fp32": (QWEN3_5_MOE, "fp32", "fused")}
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module", params=sorted(CASES))
def checkpoint(request, tmp_path_factory):
    config, dtype, experts = CASES[request.param]
    folder = build_checkpoint(tmp_path_factory.mktemp(request.param), config, dtype)
    return folder, add_mtp_head(folder, experts=experts)


def stored(w) -> np.ndarray:
    return to_float32(np.asarray(w))


def test_every_mtp_tensor_loads_where_its_name_says(checkpoint):
    folder, written = checkpoint
    config = json.loads((folder / "config.json").read_text())
    weights = minqwen.load(folder).weights
    assert len(weights.layers) == config["num_hidden_layers"]  # the head is no trunk layer
    mtp, want = weights.mtp, {name: t.float().numpy() for name, t in written.items()}
    assert mtp is not None and len(mtp.layers) == 1
    layer = mtp.layers[0]

    def same(w, name):
        np.testing.assert_array_equal(stored(w), want[name], err_msg=name)

    same(mtp.fc, "mtp.fc.weight")
    for field, name in ((mtp.pre_fc_norm_embedding, "pre_fc_norm_embedding"),
                        (mtp.pre_fc_norm_hidden, "pre_fc_norm_hidden"), (mtp.norm, "norm"),
                        (layer.input_layernorm, "layers.0.input_layernorm"),
                        (layer.post_attention_layernorm, "layers.0.post_attention_layernorm"),
                        (layer.self_attn.q_norm, "layers.0.self_attn.q_norm"),
                        (layer.self_attn.k_norm, "layers.0.self_attn.k_norm")):
        np.testing.assert_array_equal(field, want[f"mtp.{name}.weight"] + np.float32(1))  # zero-centred
    assert layer.linear_attn is None
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        same(getattr(layer.self_attn, proj), f"mtp.layers.0.self_attn.{proj}.weight")
    mlp, p = layer.mlp, "mtp.layers.0.mlp."
    if not config.get("num_experts"):
        for proj in PROJECTIONS:
            same(getattr(mlp, proj), f"{p}{proj}.weight")
        return
    same(mlp.gate, p + "gate.weight")
    f = config["moe_intermediate_size"]
    for e in range(config["num_experts"]):
        if p + "experts.gate_up_proj" in want:
            gate, up = np.split(want[p + "experts.gate_up_proj"][e], [f])
            down = want[p + "experts.down_proj"][e]
        else:
            gate, up, down = (want[f"{p}experts.{e}.{proj}.weight"] for proj in PROJECTIONS)
        np.testing.assert_array_equal(stored(mlp.gate_projs[e]), gate)
        np.testing.assert_array_equal(stored(mlp.up_projs[e]), up)
        np.testing.assert_array_equal(stored(mlp.down_projs[e]), down)
    for proj in PROJECTIONS:
        same(getattr(mlp.shared_expert, proj), f"{p}shared_expert.{proj}.weight")
    same(mlp.shared_expert_gate, p + "shared_expert_gate.weight")


def test_info_says_the_head_is_loaded(checkpoint, capsys):
    folder, written = checkpoint
    assert cli(["info", "--model", str(folder)]) == 0
    out = capsys.readouterr().out
    assert f"MTP head: 1 full-attention layer, {len(written)} tensors" in out
    assert "not loaded" not in out and "unexpected" not in out


def test_a_config_without_mtp_layers_leaves_the_head_unloaded(checkpoint, tmp_path, capsys):
    folder, written = checkpoint
    copy = shutil.copytree(folder, tmp_path / "copy")
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps(dict(config, mtp_num_hidden_layers=0)))
    assert minqwen.load(copy).weights.mtp is None
    assert cli(["info", "--model", str(copy)]) == 0
    assert f"not loaded: multi-token prediction head: {len(written)} tensors" in capsys.readouterr().out


def test_a_checkpoint_without_the_head_has_none(tmp_path):
    assert minqwen.load(build_checkpoint(tmp_path, QWEN3_5)).weights.mtp is None  # as save_pretrained writes


def test_a_quantised_copy_keeps_the_head(tmp_path):
    folder = build_checkpoint(tmp_path / "hf", QWEN3_5)
    written = add_mtp_head(folder)
    write_quantized_checkpoint(folder, tmp_path / "int8", 8)
    mtp = minqwen.load(tmp_path / "int8").weights.mtp
    assert isinstance(mtp.fc, GgmlMatrix) and mtp.fc.ggml_type == Q8_0
    np.testing.assert_array_equal(mtp.norm, written["mtp.norm.weight"].float().numpy() + np.float32(1))


@pytest.mark.parametrize("change", ["missing", "shape"])
def test_a_broken_head_is_refused_by_name(tmp_path, change):
    import safetensors.torch

    folder = build_checkpoint(tmp_path, QWEN3_5)
    mtp = add_mtp_head(folder)
    name = "mtp.layers.0.self_attn.k_proj.weight"
    if change == "missing":
        del mtp[name]
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        del index["weight_map"][name]
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        mtp[name] = mtp[name][:-1]
    safetensors.torch.save_file(mtp, folder / "model-mtp.safetensors")
    with pytest.raises(ConfigError, match=name.replace(".", r"\.")):
        minqwen.load(folder)


# ---- GGUF: the converter's nextn block ----------------------------------------------------------------

def assert_same_head(ours, theirs, where="mtp"):
    """Two MtpWeights (or parts of them) hold the same numbers, field by field."""
    if dataclasses.is_dataclass(ours):
        for field in dataclasses.fields(ours):
            assert_same_head(getattr(ours, field.name), getattr(theirs, field.name), f"{where}.{field.name}")
    elif isinstance(ours, (list, tuple)) or type(ours).__name__ == "List":
        assert len(ours) == len(theirs), where
        for i, (a, b) in enumerate(zip(ours, theirs)):
            assert_same_head(a, b, f"{where}[{i}]")
    elif ours is None or theirs is None:
        assert ours is None and theirs is None, where
    else:
        np.testing.assert_array_equal(stored(ours), stored(theirs), err_msg=where)


@pytest.fixture(scope="module")
def converter():
    return llama_cpp_converter()


@pytest.fixture(scope="module", params=["qwen35", "qwen35moe"])
def gguf_checkpoint(request, converter, tmp_path_factory):
    """(checkpoint folder with an MTP head, the real Qwen3.5 tokenizer, and its whole GGUF beside it)."""
    config = dict(QWEN3_5 if request.param == "qwen35" else QWEN3_5_MOE, vocab_size=248320,
                  eos_token_id=248044)
    folder = build_checkpoint(tmp_path_factory.mktemp(request.param) / "hf", config, "bf16",
                              tokenizer="qwen3.5")
    add_mtp_head(folder)
    return folder, convert_with_llama_cpp(converter, folder, folder.parent / "model.gguf", "f32")


def test_the_nextn_block_is_the_mtp_head(gguf_checkpoint):
    folder, path = gguf_checkpoint
    from_folder, from_gguf = minqwen.load(folder).weights, minqwen.load(path).weights
    assert len(from_gguf.layers) == len(from_folder.layers)  # block_count counts the head: no trunk layer
    assert from_gguf.mtp is not None
    assert_same_head(from_gguf.mtp, from_folder.mtp)


def test_a_head_converted_apart_is_read_from_beside_the_model(gguf_checkpoint, converter, tmp_path, capsys):
    """--no-mtp writes the model without its head, --mtp the head alone (embedding, output and the nextn
    block): loading the model reads the head from the mtp-*.gguf in its folder; loading the head alone is
    refused with what to load instead."""
    folder, _ = gguf_checkpoint
    model = convert_with_llama_cpp(converter, folder, tmp_path / "model.gguf", "f32", "--no-mtp")
    assert minqwen.load(model).weights.mtp is None  # nothing beside it yet
    head = convert_with_llama_cpp(converter, folder, tmp_path / "mtp-model.gguf", "f32", "--mtp")
    assert_same_head(minqwen.load(model).weights.mtp, minqwen.load(folder).weights.mtp)
    assert cli(["info", "--model", str(model)]) == 0
    assert "MTP head: 1 full-attention layer" in capsys.readouterr().out
    with pytest.raises(CheckpointError, match="only a multi-token prediction head"):
        minqwen.load(head)
    shutil.copy(head, tmp_path / "mtp-model-copy.gguf")
    with pytest.raises(CheckpointError, match="several MTP heads"):
        minqwen.load(model)
