"""Random-weight checkpoints with real shapes, written by transformers' own save_pretrained.

Every parameter is drawn at random — norm weights around 1, biases around 0, but none left at its
default — so a forgotten bias or norm weight cannot go unnoticed. Configs are written back exactly as
given (save_pretrained would rewrite them in its own spelling), so hub-style `rope_theta` +
`rope_scaling` configs are tested as users have them.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

DATA = Path(__file__).parent / "data"
TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def build_checkpoint(folder: Path, config: dict, dtype: str = "fp32", seed: int = 0,
                     shard_size: str | None = None, tokenizer: str | None = None,
                     generation_config: dict | None = None) -> Path:
    import torch
    from transformers import AutoConfig

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    hf_config = AutoConfig.from_pretrained(folder)
    torch.manual_seed(seed)
    model = _auto_class(config).from_config(hf_config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / np.sqrt(p.shape[-1]))
    model = model.to(getattr(torch, TORCH_DTYPES[dtype]))
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(folder, **kwargs)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if generation_config is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation_config))
    elif (folder / "generation_config.json").exists():
        (folder / "generation_config.json").unlink()
    if tokenizer:
        for f in (DATA / "tokenizers" / tokenizer).iterdir():
            shutil.copy(f, folder / f.name)
    return folder


def _auto_class(config: dict):
    """Image-text checkpoints (a text_config inside) are built and run as transformers' image-text models."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if "text_config" in config else AutoModelForCausalLM


def reference_model(folder: Path, dtype: str = "float32"):
    """The transformers model of a checkpoint, in float32 (or float64) — the oracle."""
    import torch

    config = json.loads((Path(folder) / "config.json").read_text())
    # The eager experts loop: transformers' grouped-matmul MoE path has no float64 kernel.
    return _auto_class(config).from_pretrained(folder, dtype=getattr(torch, dtype),
                                               experts_implementation="eager").eval()


def reference_logits(model, tokens: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()


def reference_greedy(model, tokens: list[int], n: int) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([tokens]), max_new_tokens=n, do_sample=False, min_new_tokens=n,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(tokens):].tolist()


TOLERANCE = {"fp32": 1e-4, "bf16": 5e-3, "fp16": 5e-3}  # max|diff| / max|logit|


def relative_error(ours: np.ndarray, theirs: np.ndarray) -> float:
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def assert_matches_transformers(name: str, folder: Path, dtype: str, prompt_length: int = 20,
                                new_tokens: int = 16, reference_dtype: str = "float32"):
    """Logits of every position within tolerance of transformers' logits, and identical greedy tokens
    (which run the KV cache / recurrent state: decode after prefill).

    With reference_dtype="float64" the oracle is transformers in float64, and the tolerance is the
    larger of TOLERANCE and 3x the distance between transformers' own fp32 and fp64 logits: on random
    weights some positions are ill-conditioned (in the hybrid models, up to ~1e-4 for transformers
    itself), and no fp32 engine can be held to less than a small multiple of the reference's own error."""
    import minqwen

    model = minqwen.load(folder)
    reference = reference_model(folder, reference_dtype)
    prompt = np.random.default_rng(1).integers(0, model.config.vocab_size, size=prompt_length).tolist()
    ours, theirs = model.logits(prompt), reference_logits(reference, prompt)
    assert ours.shape == theirs.shape == (len(prompt), model.config.vocab_size)
    error, tolerance, noise = relative_error(ours, theirs), TOLERANCE[dtype], 0.0
    if reference_dtype == "float64":
        noise = relative_error(reference_logits(reference_model(folder), prompt), theirs)
        tolerance = max(tolerance, 3 * noise)
    print(f"PARITY {name}: max|diff|/max|logit| = {error:.2e}, "
          f"mean|diff| = {np.abs(ours - theirs).mean():.2e}"
          + (f" (transformers fp32 vs fp64: {noise:.2e})" if noise else ""))
    assert error <= tolerance, f"{name}: relative logit error {error:.2e} > {tolerance:.2e}"
    assert (model.generate(prompt, max_new_tokens=new_tokens)
            == reference_greedy(reference, prompt, new_tokens))
    return model


def build_case(cases: dict, name: str, tmp_path_factory) -> tuple[str, Path, str]:
    """(name, folder, dtype) of a parity case given as (config, dtype[, shard size])."""
    config, dtype, *shard = cases[name]
    folder = build_checkpoint(tmp_path_factory.mktemp(name), config, dtype,
                              shard_size=shard[0] if shard else None)
    return name, folder, dtype


def published_config(name: str, **sizes) -> dict:
    return shrink(json.loads((DATA / "configs" / f"{name}.config.json").read_text()), **sizes)


def shrink(config: dict, **sizes) -> dict:
    """A published config with only its sizes made tiny: every other key kept as published."""
    small = dict(config)
    small.update(sizes)
    return small


def assert_batch_matches_alone(model, sizes=(3, 11, 7)):
    """Several sequences in one forward pass (each weight read once for all of them) get the logits each
    gets alone, whatever their lengths: a decode step each, and a fresh sequence's prefill beside them.
    To float rounding only: in a batch, a sparse layer may take the by-expert path where a sequence alone
    streams its experts one token at a time (measured: 3e-5 apart)."""
    from minqwen.network.decoder import Cache

    rng = np.random.default_rng(4)
    prompts = [rng.integers(0, model.config.vocab_size, size=n).tolist() for n in sizes]
    alone, caches = [], []
    for prompt in prompts:
        sequence = model.sequence()
        sequence.reset_to(prompt)
        alone.append(sequence.extend([5]).copy())
        cache = Cache(model.config, 64)
        model.decoder(cache, np.array(prompt))
        caches.append(cache)
    batch = ([(cache, np.array([5])) for cache in caches]
             + [(Cache(model.config, 64), np.array(prompts[0] + [5]))])
    together = model.decoder.forward(batch)
    scale = np.abs(np.array(alone)).max()
    for i, logits in enumerate(alone + [alone[0]]):
        error = np.abs(together[i] - logits).max() / scale
        assert error <= TOLERANCE["fp32"], f"sequence {i} of the batch: relative logit error {error:.2e}"


CHAT_SIZES = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=512)
CHAT_MODELS = {"qwen2.5": ("qwen2.5-0.5b-instruct", {}), "qwen3": ("qwen3-0.6b", {"head_dim": 16})}


def chat_checkpoint(folder: Path, tokenizer: str) -> Path:
    """A tiny bf16 checkpoint of a published instruct config (its generation_config.json too), with the
    real tokenizer and chat template of `tokenizer` ("qwen2.5" or "qwen3")."""
    name, extra = CHAT_MODELS[tokenizer]
    config = shrink(json.loads((DATA / "configs" / f"{name}.config.json").read_text()), **CHAT_SIZES, **extra)
    generation = json.loads((DATA / "configs" / f"{name}.generation_config.json").read_text())
    return build_checkpoint(folder, config, "bf16", tokenizer=tokenizer, generation_config=generation)


def add_mtp_head(folder: Path, seed: int = 1, experts: str = "per-expert") -> dict:
    """Add a multi-token prediction head to a save_pretrained Qwen3.5 / Qwen3-Next checkpoint (which leaves
    it out) under the names Qwen publishes (`mtp.fc`, `mtp.pre_fc_norm_*`, `mtp.layers.0.*`, `mtp.norm`;
    the experts one matrix each, as Qwen3.5-35B-A3B stores them, or `fused` as gate_up_proj / down_proj),
    random and in the checkpoint's dtype, into a shard of their own as published. Returns them."""
    import safetensors.torch
    import torch

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    text = config.get("text_config", config)
    d, hd, heads = text["hidden_size"], text["head_dim"], text["num_attention_heads"]
    kv = text["num_key_value_heads"] * hd
    shapes = {"fc.weight": (d, 2 * d), "pre_fc_norm_embedding.weight": (d,),
              "pre_fc_norm_hidden.weight": (d,), "norm.weight": (d,)}
    layer = {"input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,),
             "self_attn.q_proj.weight": (2 * heads * hd, d), "self_attn.k_proj.weight": (kv, d),
             "self_attn.v_proj.weight": (kv, d), "self_attn.o_proj.weight": (d, heads * hd),
             "self_attn.q_norm.weight": (hd,), "self_attn.k_norm.weight": (hd,)}
    n, f = text.get("num_experts", 0), text.get("moe_intermediate_size", 0)
    if not n:
        f = text["intermediate_size"]
        layer.update({"mlp.gate_proj.weight": (f, d), "mlp.up_proj.weight": (f, d),
                      "mlp.down_proj.weight": (d, f)})
    else:
        layer["mlp.gate.weight"] = (n, d)
        if experts == "fused":
            layer.update({"mlp.experts.gate_up_proj": (n, 2 * f, d), "mlp.experts.down_proj": (n, d, f)})
        else:
            for e in range(n):
                layer.update({f"mlp.experts.{e}.gate_proj.weight": (f, d),
                              f"mlp.experts.{e}.up_proj.weight": (f, d),
                              f"mlp.experts.{e}.down_proj.weight": (d, f)})
        if shared := text.get("shared_expert_intermediate_size", 0):
            layer.update({"mlp.shared_expert.gate_proj.weight": (shared, d),
                          "mlp.shared_expert.up_proj.weight": (shared, d),
                          "mlp.shared_expert.down_proj.weight": (d, shared),
                          "mlp.shared_expert_gate.weight": (1, d)})
    shapes.update({f"layers.0.{name}": shape for name, shape in layer.items()})
    existing = safetensors.torch.load_file(next(folder.glob("*.safetensors")))
    dtype = next(iter(existing.values())).dtype
    generator = torch.Generator().manual_seed(seed)
    scale = {name: 0.2 if len(shape) == 1 else 1 / np.sqrt(shape[-1]) for name, shape in shapes.items()}
    mtp = {f"mtp.{name}": (scale[name] * torch.randn(shape, generator=generator)).to(dtype)
           for name, shape in shapes.items()}  # norm weights near 0: they are zero-centred (1 + w)
    safetensors.torch.save_file(mtp, folder / "model-mtp.safetensors")
    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").exists():  # one file: make it a shard of an index, as published
        (folder / "model.safetensors").rename(folder / "model-00001.safetensors")
        weight_map = {name: "model-00001.safetensors" for name in existing}
    else:
        weight_map = json.loads(index.read_text())["weight_map"]
    weight_map.update({name: "model-mtp.safetensors" for name in mtp})
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    return mtp
