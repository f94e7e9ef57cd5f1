"""Checkpoints laid out as published, not as save_pretrained writes them: the config spellings of other
transformers versions, Qwen3.5/3.6 MoE's fused experts next to MTP weights, and the official FP8 block
checkpoints. transformers stays the oracle: it loads the fused layout, and FP8 is compared with it on the
dequantised weights."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

import minqwen
from checkpoints import (
    DATA,
    add_mtp_head,
    assert_matches_transformers,
    build_checkpoint,
    published_config,
    reference_greedy,
    reference_logits,
    reference_model,
    relative_error,
    shrink,
)
from minqwen.errors import ConfigError, UnsupportedModelError
from minqwen.formats.safetensors import write_quantized_checkpoint
from minqwen.kernels.fp8 import Fp8Matrix
from minqwen.kernels.ggml import Q8_0, GgmlMatrix
from minqwen.network.config import Config

RESAVED = DATA / "configs" / "transformers-5.23"  # the published configs as transformers >= 5.8 writes them


# ---- config spellings ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(p.name for p in RESAVED.glob("*.config.json")))
def test_every_spelling_reads_the_same(name):
    """num_experts / num_local_experts, full_attention_interval / layer_types, rope_theta + rope_scaling /
    rope_parameters, torch_dtype / dtype: the published file and its transformers re-save agree."""
    published = json.loads((DATA / "configs" / name).read_text())
    resaved = json.loads((RESAVED / name).read_text())
    assert Config.from_dict(published) == Config.from_dict(resaved)


def test_num_local_experts_checkpoint_matches_transformers(tmp_path):
    config = json.loads((RESAVED / "qwen3-30b-a3b.config.json").read_text())
    assert "num_local_experts" in config and "num_experts" not in config
    config = shrink(config, hidden_size=48, intermediate_size=64, moe_intermediate_size=16,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    num_local_experts=6, num_experts_per_tok=2, vocab_size=300)
    model = assert_matches_transformers("qwen3_moe, num_local_experts", build_checkpoint(tmp_path, config),
                                        "fp32")
    assert model.config.num_experts == 6


# ---- fused experts, MTP and vision tensors ---------------------------------------------------------

def read_state(folder: Path) -> dict[str, torch.Tensor]:
    state = {}
    for path in sorted(folder.glob("*.safetensors")):
        state.update(safetensors.torch.load_file(path))
    return state


def write_state(folder: Path, state: dict[str, torch.Tensor]):
    for path in folder.glob("*.safetensors*"):
        path.unlink()
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors")


def publish_fused(folder: Path, experts: int):
    """Rewrite a save_pretrained Qwen3.5-MoE checkpoint as Qwen publishes its bf16 ones: each layer's
    experts as experts.gate_up_proj (E, 2F, D), gate rows then up rows, and experts.down_proj (E, D, F),
    no `.weight` suffix; plus the multi-token-prediction head (per expert, as Qwen3.5-35B-A3B's MTP)."""
    state = read_state(folder)
    layers = sorted({name.split(".mlp.experts.")[0] for name in state if ".mlp.experts.0.gate_proj" in name})
    assert layers, "the checkpoint has no per-expert experts to fuse"
    for layer in layers:
        per = {p: [state.pop(f"{layer}.mlp.experts.{e}.{p}.weight") for e in range(experts)]
               for p in ("gate_proj", "up_proj", "down_proj")}
        state[f"{layer}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([g, u]) for g, u in zip(per["gate_proj"], per["up_proj"])])
        state[f"{layer}.mlp.experts.down_proj"] = torch.stack(per["down_proj"])
    write_state(folder, state)
    add_mtp_head(folder)


def published_qwen35_moe() -> dict:
    config = json.loads((DATA / "configs" / "qwen3.5-35b-a3b.config.json").read_text())
    text = dict(config["text_config"], hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=32, linear_key_head_dim=16,
                linear_num_key_heads=2, linear_value_head_dim=16, linear_num_value_heads=4, vocab_size=400,
                moe_intermediate_size=16, shared_expert_intermediate_size=16, num_experts=8)
    text["layer_types"] = text["layer_types"][:4]
    vision = dict(config["vision_config"], depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                  num_position_embeddings=16, patch_size=4, out_hidden_size=64, deepstack_visual_indexes=[])
    return dict(config, text_config=text, vision_config=vision)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_fused_qwen35_moe_as_published(tmp_path, dtype):
    folder = build_checkpoint(tmp_path / "ckpt", published_qwen35_moe(), dtype)
    publish_fused(folder, experts=8)
    model = assert_matches_transformers(f"qwen3.5-moe fused {dtype}", folder, dtype, prompt_length=70,
                                        reference_dtype="float64")
    # The experts are views of the mapped file: slices of the fused tensors, no copy in RAM.
    moe = next(layer.mlp for layer in model.weights.layers if hasattr(layer.mlp, "gate_projs"))
    gate, up = moe.gate_projs[0], moe.up_projs[0]
    assert not gate.flags.owndata and not up.flags.owndata and np.shares_memory(gate, up) is False
    info = subprocess.run([sys.executable, "-m", "minqwen", "info", "--model", str(folder)],
                          capture_output=True, text=True, timeout=300)
    assert info.returncode == 0, info.stderr
    assert "stored fused" in info.stdout
    assert "MTP head: 1 full-attention layer" in info.stdout and "vision tower:" in info.stdout
    assert "unexpected" not in info.stdout


def test_unexpected_tensors_are_reported(tmp_path):
    config = published_config("qwen3-0.6b", hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=100)
    folder = build_checkpoint(tmp_path, config)
    state = read_state(folder)
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    write_state(folder, state)
    minqwen.load(folder)  # a tensor no rule reads does not stop loading ...
    info = subprocess.run([sys.executable, "-m", "minqwen", "info", "--model", str(folder)],
                          capture_output=True, text=True, timeout=300)
    assert ("unexpected tensors: 1" in info.stdout
            and "rotary_emb.inv_freq" in info.stdout)  # ... nor goes unseen


TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16, vocab_size=100)


@pytest.mark.parametrize("name, sizes, tensor, shape, why", [
    ("qwen2.5-0.5b-instruct", {}, "self_attn.q_norm.weight", (16,), "qwen2 has no qk_norm"),
    ("qwen3-0.6b", {}, "self_attn.o_proj.bias", (32,), "attention_bias is false"),
    ("qwen3-30b-a3b", dict(moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2),
     "mlp.shared_expert_gate.weight", (1, 32), "shared_expert_intermediate_size is 0"),
])
def test_a_tensor_the_config_switches_off_is_refused(tmp_path, name, sizes, tensor, shape, why):
    """A q/k norm, bias or shared expert the config's switches leave out is not left unread (the logits
    would be another model's): loading names the tensor and the switch."""
    folder = build_checkpoint(tmp_path, published_config(name, **TINY, **sizes))
    minqwen.load(folder)  # as built, the checkpoint loads
    state = read_state(folder)
    state[f"model.layers.0.{tensor}"] = torch.ones(shape)
    write_state(folder, state)
    with pytest.raises(ConfigError, match=f"model.layers.0.{tensor}.*{why}"):
        minqwen.load(folder)


# ---- FP8 block checkpoints -------------------------------------------------------------------------

FP8_KEEP = ("embed_tokens", "lm_head", "norm", "mlp.gate.", "shared_expert_gate")  # bf16 in published FP8


def block_quantize(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) -> e4m3 (N, K) and one scale a block of 128 x 128 (edges partial): scale = amax / 448."""
    N, K = w.shape
    nb, kb = -(-N // block), -(-K // block)
    padded = torch.zeros(nb * block, kb * block, dtype=torch.float32)
    padded[:N, :K] = w.float()
    blocks = padded.reshape(nb, block, kb, block)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
    q = (blocks / scale[:, None, :, None]).reshape(nb * block, kb * block)[:N, :K].to(torch.float8_e4m3fn)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, block: int = 128) -> torch.Tensor:
    grid = scale.float().repeat_interleave(block, 0).repeat_interleave(block, 1)
    return q.float() * grid[:q.shape[0], :q.shape[1]]


def publish_fp8(folder: Path, fp8: Path, dequantized: Path, scale_dtype: torch.dtype):
    """As Qwen publishes its FP8 models: every projection (experts per expert) as e4m3 with a
    `weight_scale_inv` block grid; embeddings, LM head, norms and routers kept. And the same model with
    the dequantised weights, for transformers."""
    state, q_state, d_state = read_state(folder), {}, {}
    for name, w in state.items():
        if w.ndim == 2 and name.endswith(".weight") and not any(k in name for k in FP8_KEEP):
            q, scale = block_quantize(w)
            scale = scale.to(scale_dtype)
            q_state[name], q_state[name[:-len(".weight")] + ".weight_scale_inv"] = q, scale
            d_state[name] = dequantize(q, scale)
        else:
            q_state[name], d_state[name] = w, w.float()
    config = json.loads((folder / "config.json").read_text())
    for out, tensors, extra in ((fp8, q_state, {"quantization_config": {
            "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
            "weight_block_size": [128, 128]}}),
                                (dequantized, d_state, {})):
        out.mkdir()
        write_state(out, tensors)
        (out / "config.json").write_text(json.dumps(dict(config, **extra)))


# Widths of 160 and 288 (multiples of 32, not of 128): partial FP8 blocks, and still int8-quantisable.
QWEN3 = dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], vocab_size=300, hidden_size=160,
             intermediate_size=288, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=40, max_position_embeddings=256, rope_theta=1e6, tie_word_embeddings=False,
             attention_bias=False)
FP8_CASES = {  # dims not multiples of 128 (partial blocks), each scale dtype the published ones use
    "qwen3-f32-scales": (QWEN3, torch.float32),
    "qwen3_moe-bf16-scales": (dict(QWEN3, model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"],
                                   moe_intermediate_size=96, num_experts=4, num_experts_per_tok=2,
                                   norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[]),
                              torch.bfloat16),
    "qwen2.5-f16-scales": (published_config("qwen2.5-0.5b-instruct", hidden_size=160, intermediate_size=288,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            vocab_size=300), torch.float16),
}


@pytest.fixture(scope="module", params=sorted(FP8_CASES))
def fp8_case(request, tmp_path_factory):
    config, scale_dtype = FP8_CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    folder = build_checkpoint(root / "bf16", config, "bf16")
    publish_fp8(folder, root / "fp8", root / "dequantized", scale_dtype)
    return request.param, root


def test_fp8_matches_transformers_on_the_dequantized_weights(fp8_case):
    name, root = fp8_case
    model = minqwen.load(root / "fp8")
    assert isinstance(model.weights.layers[0].self_attn.q_proj, Fp8Matrix)  # read as stored, 1 byte a weight
    reference = reference_model(root / "dequantized")
    prompt = np.random.default_rng(1).integers(0, model.config.vocab_size, size=20).tolist()
    error = relative_error(model.logits(prompt), reference_logits(reference, prompt))
    print(f"PARITY fp8 {name}: max|diff|/max|logit| = {error:.2e}")
    assert error <= 1e-3, f"{name}: relative logit error {error:.2e}"
    assert model.generate(prompt, max_new_tokens=16) == reference_greedy(reference, prompt, 16)


def test_fp8_requantized_to_int8(fp8_case):
    """--quantize int8 on an FP8 checkpoint re-quantises from the dequantised weights: the same model as
    int8 made from a checkpoint of those weights."""
    name, root = fp8_case
    from_fp8, from_dequantized = (minqwen.load(root / folder, quantize="int8")
                                  for folder in ("fp8", "dequantized"))
    q_proj = from_fp8.weights.layers[0].self_attn.q_proj
    assert isinstance(q_proj, GgmlMatrix) and q_proj.ggml_type == Q8_0
    prompt = list(range(1, 21))
    assert relative_error(from_fp8.logits(prompt), from_dequantized.logits(prompt)) <= 1e-5
    with pytest.raises(ConfigError, match="already quantised.*--quantize int8"):  # not as a second file
        write_quantized_checkpoint(root / "fp8", root / "int8", 8)


def test_transformers_own_fp8_loader_agrees(tmp_path):
    """transformers reads FP8 on the CPU by dequantising into bf16 (it needs accelerate; its block size
    comes from the scale grid, right only for multiples of 128: an aligned model). It must read the file
    as the dequantised checkpoint the FP8 tests compare with: the same weights, once rounded to bf16."""
    pytest.importorskip("accelerate",
                        reason="transformers' FP8 loader needs accelerate (the test extra has it)")
    folder = build_checkpoint(tmp_path / "bf16",
                              dict(QWEN3, hidden_size=256, intermediate_size=384, head_dim=64), "bf16")
    publish_fp8(folder, tmp_path / "fp8", tmp_path / "dequantized", torch.float32)
    prompt = list(range(1, 21))
    theirs_fp8, theirs_dequantized = (reference_logits(reference_model(tmp_path / name, "bfloat16").float(),
                                                       prompt)
                                      for name in ("fp8", "dequantized"))
    assert relative_error(theirs_fp8, theirs_dequantized) <= 1e-5


def test_fp8_config_errors(tmp_path):
    config = dict(QWEN3, quantization_config={"quant_method": "fp8", "fmt": "e4m3",
                                              "weight_block_size": [128, 64]})
    with pytest.raises(UnsupportedModelError, match="weight_block_size"):
        Config.from_dict(config)
    config["quantization_config"].update(weight_block_size=[128, 128], fmt="e5m2")
    with pytest.raises(UnsupportedModelError, match="e5m2"):
        Config.from_dict(config)
    image_text = published_qwen35_moe()
    image_text["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    assert Config.from_dict(image_text).fp8_block_rows == 128  # read outside text_config, too
    folder = build_checkpoint(tmp_path / "bf16", QWEN3, "bf16")
    publish_fp8(folder, tmp_path / "fp8", tmp_path / "dequantized", torch.float32)
    shutil.copy(folder / "config.json", tmp_path / "fp8" / "config.json")  # scales but no quantization_config
    with pytest.raises(ConfigError, match="does not say fp8"):
        minqwen.load(tmp_path / "fp8")
