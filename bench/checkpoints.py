"""The benches' checkpoints: random bf16 weights with the real shapes of published Qwen models.

Built once with transformers (from_config + save_pretrained, so the files are exactly what the hub
ships), the published config.json written back verbatim, and the real tokenizer copied beside them so
llama.cpp's converter accepts the folder. Nothing is downloaded.

Weights are N(0, 1/fan_in): every projection keeps activations at unit scale, so no layer blows up or
underflows into bf16 denormals (which some kernels run ~3x slower, and which would flatter nobody).

A published model too big for this machine is scaled down in SCALED and named for what it is. The
Qwen3.5-35B-A3B shape keeps everything one token costs in one layer -- hidden size 2048, the attention
and DeltaNet head shapes (16 key / 32 value heads of 128: two value heads per key head), expert width
512, 8 experts per token plus the shared expert, the 248k vocabulary and its untied lm_head -- but has 8
of the 40 layers (two of the ten linear, linear, linear, full groups) and 64 of the 256 experts: ~2.9 B
parameters, 5.8 GB in bf16, where the published model is ~70 GB. Decode reads the same bytes per layer
(8 experts of any number; the router, a quarter of its size, is 0.5 MB per layer); with 8 layers the
lm_head is a larger share of a token than in the 40-layer model. Prefill gives each expert 4x the tokens
it would get of 256, which larger matrix products run faster in both engines alike. The checkpoint is the
text model (Qwen3_5MoeForCausalLM, as a Qwen3.5 GGUF holds it) and has no MTP block (transformers builds
none; neither engine runs it when decoding), so llama.cpp's converter is run with --no-mtp.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"

# bench name -> (published config in tests/data/configs, tokenizer folder in tests/data/tokenizers)
SHAPES = {
    "qwen2.5-0.5b": ("qwen2.5-0.5b-instruct", "qwen2.5"),
    "qwen3-0.6b": ("qwen3-0.6b", "qwen3"),
    "qwen3.5-35b-a3b-8layers-64experts": ("qwen3.5-35b-a3b", "qwen3.5"),
}
# bench name -> the (text) config's fields changed from the published ones, so that it fits this machine
SCALED = {"qwen3.5-35b-a3b-8layers-64experts": {"num_hidden_layers": 8, "num_experts": 64}}
DONE = "bench-checkpoint.json"  # written last: a folder without it is an interrupted build


def bench_checkpoint(work: Path, shape: str, seed: int = 0) -> Path:
    """The checkpoint folder of `shape` under `work`, built on first use."""
    folder = Path(work).expanduser() / shape
    if not (folder / DONE).exists():
        config, tokenizer = shape_config(shape), SHAPES[shape][1]
        print(f"building the random bf16 {shape} checkpoint in {folder} (once)", flush=True)
        build_random_checkpoint(folder, config, DATA / "tokenizers" / tokenizer, seed)
    return folder


def shape_config(shape: str) -> dict:
    """The config.json of `shape`: the published one, its text model only when it also has a vision
    tower, with SCALED's changes (layer_types cut to the layers kept)."""
    config = json.loads((DATA / "configs" / f"{SHAPES[shape][0]}.config.json").read_text())
    if "text_config" in config:  # an image-text checkpoint: the text model, as a GGUF of it holds it
        architecture = config["architectures"][0].replace("ForConditionalGeneration", "ForCausalLM")
        config = {**config["text_config"], "architectures": [architecture],
                  "tie_word_embeddings": config.get("tie_word_embeddings", False)}
    config.update(SCALED.get(shape, {}))
    if "layer_types" in config:
        config["layer_types"] = config["layer_types"][:config["num_hidden_layers"]]
    return config


def converter_options(folder: Path) -> list[str]:
    """What llama.cpp's converter needs beside the folder: --no-mtp when the config counts an MTP block
    (these checkpoints have none; the converter would otherwise count it as a layer)."""
    config = json.loads((Path(folder) / "config.json").read_text())
    return ["--no-mtp"] if config.get("mtp_num_hidden_layers") else []


def build_random_checkpoint(folder: Path, config: dict, tokenizer_dir: Path, seed: int = 0) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    generator = torch.Generator().manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():  # a tied lm_head is the embedding: drawn once
            x = torch.randn(p.shape, generator=generator)
            if p.ndim >= 2:  # (out, in) matrices, stacked (experts, out, in), convolutions (channels, 1, k)
                x /= p.shape[-1] ** 0.5  # fan_in = the last dimension
            elif "norm" in name:
                x = 1 + 0.1 * x
            else:
                x *= 0.02  # biases
            p.copy_(x)
    model.save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(config, indent=2))  # as published, not re-spelled
    (folder / "generation_config.json").unlink(missing_ok=True)  # every engine gets explicit settings
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, folder / f.name)
    params = sum(p.numel() for p in model.parameters())
    (folder / DONE).write_text(json.dumps({"config": config.get("architectures"), "parameters": params,
                                           "seed": seed, "init": "N(0, 1/fan_in) bf16"}))
    return folder
