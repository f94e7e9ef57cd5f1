"""config.json -> Config: one dataclass for every Qwen family, field names exactly as in config.json.

Qwen's families share one skeleton (embed -> N x [norm, mixer, norm, MLP] -> norm -> lm_head) and differ
in a few switches, each declared here once: a family's own in its FAMILIES row, the rest as config.json
fields, some with a family default or fixed value; decoder.py's docstring maps each to where it acts.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from ..errors import ConfigError, UnsupportedModelError


@dataclass(frozen=True)
class Family:
    """What sets one model_type apart from the shared skeleton."""

    qk_norm: bool = False  # RMSNorm over each query and key head, before RoPE
    output_gate: bool = False  # q_proj also yields a per-head gate: attention output * sigmoid(gate)
    zero_centred_norms: bool = False  # RMSNorm weights stored as w, applied as (1 + w)
    layer_kinds: str = "window_from"  # each layer's mixer when config.json has no layer_types: _layer_types
    defaults: dict = field(default_factory=dict)  # values the family implies when config.json is silent
    fixed: dict = field(default_factory=dict)  # values the family always uses, whatever the file says


HYBRID_SWITCHES = dict(qk_norm=True, output_gate=True, zero_centred_norms=True, layer_kinds="interval")
HYBRID_DEFAULTS = dict(partial_rotary_factor=0.25, norm_topk_prob=True)
FAMILIES = {
    # Llama, Qwen2's parent (read from GGUF files, where the one trained model the tests run lives).
    "llama": Family(),
    # Dense: Qwen1.5 / Qwen2 / Qwen2.5 project q, k, v with biases; Qwen3 normalises q and k per head.
    "qwen2": Family(defaults=dict(qkv_bias=True)),
    "qwen3": Family(qk_norm=True),
    # Sparse MoE: top-k experts; Qwen2-MoE adds a gated shared expert and has its own sliding-window rule.
    "qwen2_moe": Family(layer_kinds="window_odd_below", defaults=dict(qkv_bias=True)),
    "qwen3_moe": Family(qk_norm=True),
    # Hybrid: Gated DeltaNet layers between gated full-attention layers that rotate a quarter of each head.
    # Qwen3-Next's configs do not count the layers of its MTP head (mtp.*); its checkpoints hold one.
    "qwen3_next": Family(**HYBRID_SWITCHES, defaults=dict(HYBRID_DEFAULTS, mtp_num_hidden_layers=1)),
    "qwen3_5_text": Family(**HYBRID_SWITCHES, defaults=HYBRID_DEFAULTS),
    "qwen3_5_moe_text": Family(**HYBRID_SWITCHES, defaults=HYBRID_DEFAULTS,
                               fixed=dict(norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])),
}
# Image-text checkpoints of the Qwen3.5 generation: the language model's config sits in `text_config`.
IMAGE_TEXT = {"qwen3_5": "qwen3_5_text", "qwen3_5_moe": "qwen3_5_moe_text"}
# Other spellings of our fields, as published configs or newer transformers write them -> ours; where a
# config has both, theirs wins, as in transformers (whose attribute_map reads it first). The synonyms of
# docs/checkpoints.md's list that need no entry meet in _rope and _layer_types.
SPELLINGS = {"num_local_experts": "num_experts"}  # qwen3_moe from transformers >= 5.8
LAYER_KINDS = ("full_attention", "sliding_attention", "linear_attention")


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
    vocab_size: int = 0  # these four are required: from_dict says which is missing
    hidden_size: int = 0
    num_hidden_layers: int = 0
    num_attention_heads: int = 0
    intermediate_size: int = 0  # dense MLP width (0 when every layer is sparse)
    num_key_value_heads: int = 0  # 0: as many as query heads
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    head_dim: int = 0  # 0: hidden_size / num_attention_heads (Qwen3+ set it independently)
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    qkv_bias: bool = False  # q, k, v projections carry biases (o does not)
    attention_bias: bool = False  # q, k, v and o projections carry biases (Qwen3 and later)
    use_sliding_window: bool = False
    sliding_window: int | None = None
    max_window_layers: int = 0
    # Sparse mixture of experts.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0  # 0: no shared expert
    norm_topk_prob: bool = False  # renormalise the top-k routing weights to sum to 1
    decoder_sparse_step: int = 1  # every step-th layer is sparse ...
    mlp_only_layers: list[int] = field(default_factory=list)  # ... except these
    # Gated DeltaNet (linear attention) layers of the hybrid generation.
    full_attention_interval: int = 4
    linear_conv_kernel_dim: int = 4
    linear_key_head_dim: int = 0
    linear_num_key_heads: int = 0
    linear_value_head_dim: int = 0
    linear_num_value_heads: int = 0
    # Which key head each value head reads: "grouped" or "tiled" (kernels/deltanet.py; gguf_names sets it).
    linear_value_head_order: str = "grouped"
    mtp_num_hidden_layers: int = 0  # layers of the multi-token prediction head (mtp.*): weights.MtpWeights
    eos_token_id: list[int] = field(default_factory=list)
    layer_types: list[str] = field(default_factory=list)  # per layer: one of LAYER_KINDS
    quantization_config: dict = field(default_factory=dict)  # fp8 blocks, or minqwen's int8 / int4
    # Not config.json fields: filled in by from_dict.
    rope: Rope = field(default_factory=Rope)
    has_vision_tower: bool = False  # an image-text checkpoint read as a text model

    @property
    def family(self) -> Family:
        return FAMILIES[self.model_type]

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

    @property
    def rotary_dims(self) -> int:
        """Dims of each head that RoPE rotates (the rest carry no position)."""
        return int(self.head_dim * self.rope.partial_rotary_factor)

    @property
    def windows(self) -> list[int]:
        """Per layer: how many positions back attention sees, 0 for all of them."""
        return [self.sliding_window if kind == "sliding_attention" else 0 for kind in self.layer_types]

    @property
    def attention_layers(self) -> list[int]:
        return [i for i, kind in enumerate(self.layer_types) if kind != "linear_attention"]

    @property
    def deltanet_layers(self) -> list[int]:
        return [i for i, kind in enumerate(self.layer_types) if kind == "linear_attention"]

    @property
    def deltanet_key_dim(self) -> int:  # all key heads: q and k each have this many channels
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def deltanet_value_dim(self) -> int:  # all value heads: v, z and the output have this many channels
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def deltanet_conv_channels(self) -> int:  # the causal convolution runs over [q | k | v]
        return 2 * self.deltanet_key_dim + self.deltanet_value_dim

    @property
    def fp8_block_rows(self) -> int:
        """Rows per FP8 scale block (0: not FP8); columns are always 128 (_check_quantization)."""
        q = self.quantization_config
        return q["weight_block_size"][0] if q.get("quant_method") == "fp8" else 0

    def is_sparse(self, layer: int) -> bool:
        """A layer uses experts iff it is not listed as dense, there are experts, and it is on the step."""
        return (layer not in self.mlp_only_layers and self.num_experts > 0
                and (layer + 1) % self.decoder_sparse_step == 0)

    @classmethod
    def from_dict(cls, raw: dict) -> Config:
        if not isinstance(raw, dict):
            raise ConfigError("config.json must hold a JSON object")
        raw, has_vision_tower = _text_config(raw)
        raw = {**raw, **{ours: raw[theirs] for theirs, ours in SPELLINGS.items() if theirs in raw}}
        model_type = raw.get("model_type")
        if model_type not in FAMILIES:
            supported = ", ".join(list(FAMILIES) + list(IMAGE_TEXT))
            raise UnsupportedModelError(f"unsupported model_type {model_type!r}; minqwen runs: {supported}")
        _check_quantization(raw)
        family = FAMILIES[model_type]
        raw = {**family.defaults, **raw, **family.fixed}
        names = {f.name for f in fields(cls)} - {"rope", "has_vision_tower"}
        known = {k: v for k, v in raw.items() if k in names and v is not None}
        known["eos_token_id"] = [known["eos_token_id"]] if isinstance(known.get("eos_token_id"), int) \
            else list(known.get("eos_token_id") or [])
        config = cls(**known, has_vision_tower=has_vision_tower)
        required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in required if type(getattr(config, k)) is not int or getattr(config, k) <= 0]
        if missing:
            raise ConfigError(f"config.json lacks a positive integer {', '.join(missing)}")
        config.num_key_value_heads = config.num_key_value_heads or config.num_attention_heads
        config.head_dim = config.head_dim or config.hidden_size // config.num_attention_heads
        if not config.use_sliding_window:
            config.sliding_window = None  # Qwen2.5 ships sliding_window with use_sliding_window: false
        config.mlp_only_layers = list(config.mlp_only_layers)
        config.rope = _rope(raw, config)
        config.layer_types = _layer_types(config)
        _check_shapes(config)
        return config


def _text_config(raw: dict) -> tuple[dict, bool]:
    """An image-text config's language model, as a text config of its own (and whether a vision tower
    was there); any other config as it is."""
    model_type = raw.get("model_type")
    if model_type not in IMAGE_TEXT:
        return raw, False
    text = raw.get("text_config")
    if not isinstance(text, dict):
        raise ConfigError(f"{model_type} config has no text_config object")
    # transformers reads quantization_config at either level; FP8 image-text checkpoints keep it outside.
    outer = {k: raw[k] for k in ("tie_word_embeddings", "eos_token_id", "quantization_config") if k in raw}
    return {**outer, **text, "model_type": IMAGE_TEXT[model_type]}, "vision_config" in raw


def _check_quantization(raw: dict):
    """FP8 blocks as Qwen publishes them (e4m3, [rows, 128]), or minqwen's own int8 / int4; nothing else."""
    q = raw.get("quantization_config")
    method = q.get("quant_method") if isinstance(q, dict) else None
    if method == "fp8":
        block = q.get("weight_block_size")
        if q.get("fmt", "e4m3") != "e4m3":
            raise UnsupportedModelError(f"FP8 format {q.get('fmt')!r} (minqwen reads e4m3)")
        if not (isinstance(block, list) and len(block) == 2 and all(type(b) is int and b > 0 for b in block)
                and block[1] == 128):
            raise UnsupportedModelError(f"FP8 weight_block_size {block!r} (minqwen reads [rows, 128] blocks, "
                                        "as Qwen's FP8 checkpoints have)")
    elif q is not None and method != "minqwen":
        raise UnsupportedModelError(f"{method} quantised checkpoints are not supported (minqwen reads bf16, "
                                    "fp16, fp32, Qwen's FP8 blocks and its own int8/int4: "
                                    "`python -m minqwen quantize`)")


def _check_shapes(config: Config):
    if config.num_attention_heads % config.num_key_value_heads:
        raise ConfigError("num_attention_heads must be a multiple of num_key_value_heads")
    if config.num_experts and not 0 < config.num_experts_per_tok <= config.num_experts:
        raise ConfigError(f"num_experts_per_tok must be in [1, num_experts = {config.num_experts}], "
                          f"got {config.num_experts_per_tok}")
    if config.linear_value_head_order not in ("grouped", "tiled"):
        raise ConfigError(f"linear_value_head_order must be grouped or tiled, "
                          f"got {config.linear_value_head_order!r}")
    if config.hidden_act != "silu":
        raise UnsupportedModelError(f"hidden_act {config.hidden_act!r} (only silu is implemented)")


def _rope(raw: dict, config: Config) -> Rope:
    """Merge `rope_theta`, `rope_scaling` / `rope_parameters` and `partial_rotary_factor` into one Rope."""
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ConfigError("rope_scaling / rope_parameters must be a JSON object")
    if any(isinstance(v, dict) for v in params.values()):
        raise UnsupportedModelError("per-layer-type RoPE parameters are not supported")

    def get(key, default):  # a parameter from rope_scaling / rope_parameters, else top level, else default
        value = params.get(key, raw.get(key))
        return default if value is None else value

    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", "linear", "dynamic", "yarn"):
        raise UnsupportedModelError(f"RoPE type {rope_type!r} (supported: default, linear, dynamic, yarn)")
    factor = params.get("factor", 1.0)
    if rope_type != "default" and (not isinstance(factor, (int, float)) or factor <= 0):
        raise ConfigError(f"RoPE {rope_type} needs a positive factor, got {factor!r}")
    original = params.get("original_max_position_embeddings")
    if rope_type == "yarn" and original is None:
        original = config.max_position_embeddings
    return Rope(rope_type=rope_type, rope_theta=float(get("rope_theta", 10000.0)), factor=float(factor),
                original_max_position_embeddings=original, attention_factor=params.get("attention_factor"),
                beta_fast=float(get("beta_fast", 32.0)), beta_slow=float(get("beta_slow", 1.0)),
                mscale=params.get("mscale"), mscale_all_dim=params.get("mscale_all_dim"),
                truncate=bool(params.get("truncate", True)),
                partial_rotary_factor=float(get("partial_rotary_factor", 1.0)))


def _layer_types(config: Config) -> list[str]:
    """Per-layer mixer: config.json's `layer_types` when it lists them, else the family's rule."""
    n, types = config.num_hidden_layers, config.layer_types
    if types:
        if not isinstance(types, list) or len(types) != n:
            raise ConfigError(f"layer_types must list {n} entries")
        if not set(types) <= set(LAYER_KINDS):
            raise ConfigError(f"unknown layer types {sorted(set(types) - set(LAYER_KINDS))}")
        if config.sliding_window is None:
            # transformers keeps the window off unless use_sliding_window is set, whatever layer_types says.
            types = ["full_attention" if t == "sliding_attention" else t for t in types]
        return list(types)
    rule = config.family.layer_kinds
    if rule == "interval":  # every k-th layer full attention, the others Gated DeltaNet
        k = config.full_attention_interval
        return ["full_attention" if (i + 1) % k == 0 else "linear_attention" for i in range(n)]
    if config.sliding_window is None:
        return ["full_attention"] * n
    if rule == "window_odd_below":  # Qwen2-MoE: odd-numbered layers below max_window_layers slide
        return ["sliding_attention" if (i + 1) % 2 and i < config.max_window_layers else "full_attention"
                for i in range(n)]
    # window_from: the layers from max_window_layers on slide
    return ["sliding_attention" if i >= config.max_window_layers else "full_attention" for i in range(n)]
