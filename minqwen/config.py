"""config.json -> Config: one dataclass for every Qwen family, field names exactly as in config.json.

Qwen's families share one skeleton (embed -> N x [norm, mixer, norm, MLP] -> norm -> lm_head) and differ
in a few switches, so one dataclass holds them all; each group of fields below names the family that
uses it. Everything derived from the raw fields (per-layer attention kind, which layers are sparse, the
RoPE parameters in one canonical form) is computed once in `from_dict`, so the model never re-reads raw
config keys. Hub configs spell RoPE as `rope_theta` + `rope_scaling`; newer ones as `rope_parameters`;
both end up in `Config.rope`.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

from .errors import ConfigError, UnsupportedModelError

DENSE = ("qwen2", "qwen3")
SPARSE = ("qwen2_moe", "qwen3_moe")
HYBRID = ("qwen3_next", "qwen3_5_text", "qwen3_5_moe_text")
# Image-text checkpoints of the Qwen3.5 generation: the language model's config sits in `text_config`.
IMAGE_TEXT = {"qwen3_5": "qwen3_5_text", "qwen3_5_moe": "qwen3_5_moe_text"}
SUPPORTED = DENSE + SPARSE + HYBRID


@dataclass(frozen=True)
class Rope:
    """Rotary embedding parameters, canonical form of `rope_scaling` / `rope_parameters`."""

    rope_type: str = "default"  # default | linear | dynamic | yarn
    rope_theta: float = 10000.0
    factor: float = 1.0
    original_max_position_embeddings: int | None = None  # YaRN; defaults to max_position_embeddings
    attention_factor: float | None = None  # YaRN: scales cos and sin; derived from factor when absent
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    partial_rotary_factor: float = 1.0  # fraction of each head's dims that is rotated


@dataclass
class Config:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    head_dim: int = 0  # Qwen3+: may differ from hidden_size / num_attention_heads
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    # Qwen2 projects q/k/v with bias (o without); Qwen3 uses `attention_bias` for all four.
    attention_bias: bool = False
    qkv_bias: bool = False
    use_sliding_window: bool = False
    sliding_window: int | None = None
    max_window_layers: int = 0
    # Sparse mixture of experts (qwen2_moe, qwen3_moe, qwen3_next, qwen3_5_moe_text).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    # Hybrid generation (qwen3_next, qwen3_5*): Gated DeltaNet layers between gated full-attention ones.
    full_attention_interval: int = 4
    linear_conv_kernel_dim: int = 4
    linear_key_head_dim: int = 0
    linear_num_key_heads: int = 0
    linear_value_head_dim: int = 0
    linear_num_value_heads: int = 0
    attn_output_gate: bool = False
    eos_token_id: list[int] = field(default_factory=list)

    # Derived once in from_dict.
    rope: Rope = field(default_factory=Rope)
    layer_types: list[str] = field(default_factory=list)  # full_attention | sliding_attention | linear_attention
    has_vision_tower: bool = False  # an image-text checkpoint read as a text model

    @property
    def zero_centred_norms(self) -> bool:
        """The hybrid generation stores RMSNorm weights as w and scales by (1 + w)."""
        return self.model_type in HYBRID

    @property
    def sliding(self) -> list[bool]:
        return [t == "sliding_attention" for t in self.layer_types]

    @property
    def context_window(self) -> int:
        """Longest sequence the model is meant to see. Dynamic NTK and YaRN scaling stretch the trained
        context by `factor` (Qwen's YaRN configs keep max_position_embeddings at the original length)."""
        rope = self.rope
        if rope.rope_type == "dynamic":
            return int(self.max_position_embeddings * rope.factor)
        if rope.rope_type == "yarn":
            return max(self.max_position_embeddings, int(rope.original_max_position_embeddings * rope.factor))
        return self.max_position_embeddings

    def is_sparse(self, layer: int) -> bool:
        """A layer uses experts iff it is not listed as dense, there are experts, and it is on the step."""
        return (layer not in self.mlp_only_layers and self.num_experts > 0
                and (layer + 1) % self.decoder_sparse_step == 0)

    @classmethod
    def from_dict(cls, raw: dict) -> "Config":
        if not isinstance(raw, dict):
            raise ConfigError("config.json must hold a JSON object")
        model_type = raw.get("model_type")
        has_vision_tower = False
        if model_type in IMAGE_TEXT:
            if not isinstance(raw.get("text_config"), dict):
                raise ConfigError(f"{model_type} config has no text_config object")
            has_vision_tower = "vision_config" in raw
            text = raw["text_config"]
            raw = {**{k: v for k, v in raw.items() if k in ("tie_word_embeddings", "eos_token_id")}, **text}
            raw["model_type"] = IMAGE_TEXT[model_type]
            model_type = raw["model_type"]
        if model_type not in SUPPORTED:
            raise UnsupportedModelError(
                f"unsupported model_type {model_type!r}; minqwen runs: {', '.join(SUPPORTED + tuple(IMAGE_TEXT))}")

        method = (raw.get("quantization_config") or {}).get("quant_method")
        if method not in (None, "minqwen"):
            raise UnsupportedModelError(f"{method} quantised checkpoints are not supported (minqwen reads bf16, "
                                        "fp16, fp32 and its own int8/int4: `python -m minqwen quantize`)")
        names = {f.name for f in fields(cls)} - {"rope", "layer_types", "has_vision_tower"}
        known = {k: v for k, v in raw.items() if k in names}
        required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in required if not isinstance(known.get(k), int) or known[k] <= 0]
        if missing:
            raise ConfigError(f"config.json lacks a positive integer {', '.join(missing)}")
        known.setdefault("intermediate_size", 0)
        known.setdefault("max_position_embeddings", 32768)
        if known.get("num_key_value_heads") is None:
            known["num_key_value_heads"] = known["num_attention_heads"]
        if not known.get("head_dim"):
            known["head_dim"] = known["hidden_size"] // known["num_attention_heads"]
        eos = raw.get("eos_token_id")
        known["eos_token_id"] = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        known["mlp_only_layers"] = list(known.get("mlp_only_layers") or [])
        if model_type == "qwen2" and "qkv_bias" not in raw:
            known["qkv_bias"] = True  # Qwen2/2.5/1.5 always project q, k, v with bias
        if model_type == "qwen2_moe":
            known["qkv_bias"] = raw.get("qkv_bias", True)
        if model_type in HYBRID:
            # This generation always gates attention outputs and rotates a quarter of each head.
            known["attn_output_gate"] = True
            raw = {"partial_rotary_factor": 0.25, **raw}
            known.setdefault("norm_topk_prob", True)
        if model_type == "qwen3_5_moe_text":  # every layer is sparse and routing weights renormalised
            known.update(norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])
        if known.get("sliding_window") is None or not known.get("use_sliding_window"):
            known["sliding_window"] = None  # Qwen2.5 ships sliding_window with use_sliding_window: false
        try:
            config = cls(**known)
        except TypeError as e:
            raise ConfigError(f"config.json: {e}") from None
        config.has_vision_tower = has_vision_tower
        config.rope = _rope_from_config(raw, config)
        config.layer_types = _layer_types(raw, config)
        if config.num_attention_heads % config.num_key_value_heads:
            raise ConfigError("num_attention_heads must be a multiple of num_key_value_heads")
        if config.hidden_act != "silu":
            raise UnsupportedModelError(f"hidden_act {config.hidden_act!r} (only silu is implemented)")
        return config


def _rope_from_config(raw: dict, config: Config) -> Rope:
    """Merge `rope_theta`, `rope_scaling` / `rope_parameters` and `partial_rotary_factor` into one Rope."""
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ConfigError("rope_scaling / rope_parameters must be a JSON object")
    if any(isinstance(v, dict) for v in params.values()):
        raise UnsupportedModelError("per-layer-type RoPE parameters are not supported")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", "linear", "dynamic", "yarn"):
        raise UnsupportedModelError(f"RoPE type {rope_type!r} (supported: default, linear, dynamic, yarn)")
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    partial = params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
    factor = params.get("factor", 1.0)
    if rope_type != "default" and (not isinstance(factor, (int, float)) or factor <= 0):
        raise ConfigError(f"RoPE {rope_type} needs a positive factor, got {factor!r}")
    original = params.get("original_max_position_embeddings")
    if rope_type == "yarn" and original is None:
        original = config.max_position_embeddings
    get = lambda key, default: default if params.get(key) is None else params[key]  # noqa: E731
    return Rope(rope_type=rope_type, rope_theta=float(theta), factor=float(factor),
                original_max_position_embeddings=original, attention_factor=params.get("attention_factor"),
                beta_fast=float(get("beta_fast", 32.0)), beta_slow=float(get("beta_slow", 1.0)),
                mscale=params.get("mscale"), mscale_all_dim=params.get("mscale_all_dim"),
                truncate=bool(params.get("truncate", True)), partial_rotary_factor=float(partial))


def _layer_types(raw: dict, config: Config) -> list[str]:
    """Per-layer attention kind: from `layer_types` when the config lists it, else each family's rule."""
    n = config.num_hidden_layers
    types = raw.get("layer_types")
    if types is not None:
        if not isinstance(types, list) or len(types) != n:
            raise ConfigError(f"layer_types must list {n} entries")
        allowed = {"full_attention", "sliding_attention", "linear_attention"}
        if not set(types) <= allowed:
            raise ConfigError(f"unknown layer types {sorted(set(types) - allowed)}")
        if "sliding_attention" in types and config.sliding_window is None:
            # transformers keeps the window off unless use_sliding_window is set, whatever layer_types says.
            types = ["full_attention" if t == "sliding_attention" else t for t in types]
        return list(types)
    if config.model_type in HYBRID:
        k = config.full_attention_interval
        return ["full_attention" if (i + 1) % k == 0 else "linear_attention" for i in range(n)]
    if config.sliding_window is None:
        return ["full_attention"] * n
    if config.model_type == "qwen2_moe":  # its own rule: odd-numbered layers below max_window_layers
        return ["sliding_attention" if (i + 1) % 2 and i < config.max_window_layers else "full_attention"
                for i in range(n)]
    return ["sliding_attention" if i >= config.max_window_layers else "full_attention" for i in range(n)]


def read_json(path: Path, error=ConfigError) -> dict:
    """A JSON object from `path`, or `error` naming the file and what is wrong with it."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"{path}: cannot read ({e})") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise error(f"{path}: must hold a JSON object")
    return value


def load_config(folder: Path) -> Config:
    return Config.from_dict(read_json(Path(folder) / "config.json"))


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0
