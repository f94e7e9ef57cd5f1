"""The benches' checkpoints: random bf16 weights with the real shapes of published Qwen models.

Built once with transformers (from_config + save_pretrained, so the files are exactly what the hub
ships), the published config.json written back verbatim, and the real tokenizer copied beside them so
llama.cpp's converter accepts the folder. Nothing is downloaded.

Weights are N(0, 1/fan_in): every projection keeps activations at unit scale, so no layer blows up or
underflows into bf16 denormals (which some kernels run ~3x slower, and which would flatter nobody).
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
}
DONE = "bench-checkpoint.json"  # written last: a folder without it is an interrupted build


def bench_checkpoint(work: Path, shape: str, seed: int = 0) -> Path:
    """The checkpoint folder of `shape` under `work`, built on first use."""
    folder = Path(work).expanduser() / shape
    if not (folder / DONE).exists():
        config_name, tokenizer = SHAPES[shape]
        config = json.loads((DATA / "configs" / f"{config_name}.config.json").read_text())
        print(f"building the random bf16 {shape} checkpoint in {folder} (once)", flush=True)
        build_random_checkpoint(folder, config, DATA / "tokenizers" / tokenizer, seed)
    return folder


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
            if p.ndim == 2:
                x /= p.shape[1] ** 0.5  # fan_in = columns of an (out, in) matrix
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
