"""Checkpoint tensors -> the model's weights: the one place where tensors are named, checked and grouped.

Every tensor's shape is checked against the config, so a config that disagrees with the checkpoint
fails at load with the tensor's name, not later with garbage. Which tensors exist follows the config's
switches (decoder.py maps them): one the config switches off (q/k norms, biases, a shared expert) is
refused, not left unread; only how they are stored is recognised by tensor name (TensorSource). Matrices
stay memory-mapped unless quantised; only vectors (norm weights, biases: a few KB) are widened to float32.
Field names are the checkpoint's own (`q_proj` holds `self_attn.q_proj.weight`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba.typed import List

from ..errors import ConfigError
from ..kernels.dtypes import BF16, FP16, FP32, to_float32
from ..kernels.fp8 import BLOCK_COLS, Fp8Matrix
from ..kernels.ggml import GGML_BLOCKS, Q4_1, Q8_0, GgmlMatrix
from .config import Config
from .quantize import BLOCK, bits_for, quantizable, quantize_matrix

MATRIX_DTYPES = (BF16, FP16, FP32)


@dataclass
class AttentionWeights:
    """Softmax attention over a KV cache (Qwen2/Qwen3 and the full-attention layers of the hybrids)."""

    q_proj: np.ndarray  # (n_heads * head_dim [* 2 with an output gate], hidden)
    k_proj: np.ndarray  # (n_kv_heads * head_dim, hidden)
    v_proj: np.ndarray  # (n_kv_heads * head_dim, hidden)
    o_proj: np.ndarray  # (hidden, n_heads * head_dim)
    q_bias: np.ndarray | None  # qkv_bias: q, k, v biases; attention_bias: all four
    k_bias: np.ndarray | None
    v_bias: np.ndarray | None
    o_bias: np.ndarray | None
    q_norm: np.ndarray | None  # families with qk_norm: RMSNorm over each head's dims, before RoPE
    k_norm: np.ndarray | None


@dataclass
class DeltaNetWeights:
    """Gated DeltaNet (Qwen3-Next, Qwen3.5): linear attention with a [key_dim, value_dim] state per head.

    Stored as Qwen3.5 does (in_proj_qkv, in_proj_z, in_proj_b, in_proj_a). Qwen3-Next fuses them into
    in_proj_qkvz / in_proj_ba with rows interleaved per key head; rather than copying those matrices
    into Qwen3.5 order, we keep them mapped and reorder the projected vector (`*_order` below)."""

    in_proj_qkv: np.ndarray | None  # (2 Hk Dk + Hv Dv, hidden): q heads | k heads | v heads = conv channels
    in_proj_z: np.ndarray | None  # (Hv Dv, hidden): the output gate
    in_proj_b: np.ndarray | None  # (Hv, hidden): beta = sigmoid(b)
    in_proj_a: np.ndarray | None  # (Hv, hidden): the decay's input
    in_proj_qkvz: np.ndarray | None  # Qwen3-Next: (Hk (2 Dk + 2 G Dv), hidden), G = Hv / Hk
    in_proj_ba: np.ndarray | None  # Qwen3-Next: (2 Hv, hidden)
    qkvz_order: np.ndarray | None  # columns of in_proj_qkvz's output in [qkv | z] order
    ba_order: np.ndarray | None  # columns of in_proj_ba's output in [b | a] order
    conv1d: np.ndarray  # (channels, kernel): depthwise causal convolution taps
    A_log: np.ndarray  # (Hv,) float32: decay rate, log-parametrised
    dt_bias: np.ndarray  # (Hv,) float32
    norm: np.ndarray  # (Dv,) float32: gated RMSNorm weight (used as is, not 1 + w)
    out_proj: np.ndarray  # (hidden, Hv Dv)


@dataclass
class MLPWeights:
    """SwiGLU feed-forward: down(silu(gate x) * up x)."""

    gate_proj: np.ndarray  # (intermediate, hidden)
    up_proj: np.ndarray  # (intermediate, hidden)
    down_proj: np.ndarray  # (hidden, intermediate)


@dataclass
class MoEWeights:
    """A router picks num_experts_per_tok of num_experts SwiGLU experts per token (+ a gated shared expert
    in some families). The experts stay memory-mapped where the checkpoint stores them: typed lists of
    per-expert matrices (stacking them would copy the whole model into RAM)."""

    gate: np.ndarray  # router (num_experts, hidden)
    gate_projs: List  # numba typed List of (moe_intermediate, hidden), one per expert
    up_projs: List  # typed List of (moe_intermediate, hidden)
    down_projs: List  # typed List of (hidden, moe_intermediate)
    shared_expert: MLPWeights | None
    shared_expert_gate: np.ndarray | None  # (1, hidden)


@dataclass
class LayerWeights:
    input_layernorm: np.ndarray  # (hidden,) float32
    post_attention_layernorm: np.ndarray  # (hidden,) float32
    self_attn: AttentionWeights | None  # softmax attention layers
    linear_attn: DeltaNetWeights | None  # Gated DeltaNet layers of the hybrid generation
    mlp: MLPWeights | MoEWeights


@dataclass
class MtpWeights:
    """Multi-token prediction head (Qwen3-Next, Qwen3.5; `mtp.*`; mtp.py runs it): the embedding table and
    LM head are the trunk's; each layer is a full-attention decoder layer with the trunk's MLP kind."""

    fc: np.ndarray  # (hidden, 2 hidden): columns [embedding | hidden state]
    pre_fc_norm_embedding: np.ndarray  # (hidden,) float32, 1 + w like every norm of these families
    pre_fc_norm_hidden: np.ndarray  # (hidden,) float32
    layers: list[LayerWeights]  # mtp_num_hidden_layers of them (one in every published checkpoint)
    norm: np.ndarray  # (hidden,) float32


@dataclass
class Weights:
    embed_tokens: np.ndarray  # (vocab, hidden)
    layers: list[LayerWeights]
    norm: np.ndarray  # (hidden,) float32
    lm_head: np.ndarray  # (vocab, hidden): embed_tokens itself when tied (or its quantised copy)
    mtp: MtpWeights | None = None  # the checkpoint's MTP head, if it has one and the config counts it

    @property
    def fused_deltanet(self) -> bool:
        """Whether DeltaNet layers keep Qwen3-Next's fused in_proj_qkvz / in_proj_ba (see DeltaNetWeights)."""
        return any(getattr(layer.linear_attn, "in_proj_qkvz", None) is not None for layer in self.layers)


class TensorSource:
    """Takes tensors out of the checkpoint by name, checking each one's shape and dtype, and remembers
    which it took (so `info` can say what no rule read). Matrices come out in the format the kernels
    read: as stored (bf16 / fp16 / fp32 arrays, GGML blocks from a GGUF file), as FP8 blocks (`X.weight`
    e4m3 + `X.weight_scale_inv`), as minqwen's int8 / int4 (`X.qweight`), or, with `quantize_bits`,
    quantised as they load when quantize.quantizable says so."""

    def __init__(self, tensors: dict[str, np.ndarray], quantize_bits: int | None = None,
                 fp8_block_rows: int = 0):
        self.tensors, self.quantize_bits, self.fp8_block_rows = tensors, quantize_bits, fp8_block_rows
        self.read: set[str] = set()
        self.expert_layouts: set[str] = set()  # "per-expert" and/or "fused", as _moe found them

    def matrix(self, name: str, shape: tuple[int, ...]):
        stem = name[:-len(".weight")] if name.endswith(".weight") else None
        if stem and name not in self.tensors and stem + ".qweight" in self.tensors:
            return self._minqwen_quantized(stem, shape)
        w = self.get(name, shape)
        if stem and stem + ".weight_scale_inv" in self.tensors:
            w = self._fp8(stem, w)
        elif not isinstance(w, GgmlMatrix) and w.dtype not in MATRIX_DTYPES:
            raise ConfigError(f"tensor {name} has dtype {w.dtype}; expected bf16, fp16 or fp32")
        if self.quantize_bits and quantizable(name, w):
            return quantize_matrix(w, bits_for(name, self.quantize_bits))
        return w

    def vector(self, name: str, size: int) -> np.ndarray:
        return np.ascontiguousarray(to_float32(self.matrix(name, (size,))))

    def absent(self, name: str, why: str) -> None:
        """None, for a tensor the config's switches leave out (`why`); refused if the checkpoint has it."""
        if name in self.tensors:
            raise ConfigError(f"checkpoint has {name}, which the config leaves out ({why})")

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """The tensor as stored, of exactly this shape."""
        if name not in self.tensors:
            raise ConfigError(f"checkpoint has no tensor {name} (the config implies it)")
        w = self.tensors[name]
        if w.shape != tuple(shape):
            raise ConfigError(f"tensor {name} has shape {w.shape}; the config implies {tuple(shape)}")
        self.read.add(name)
        return w

    def _fp8(self, stem: str, q: np.ndarray) -> Fp8Matrix:
        """An FP8 matrix of an official FP8 checkpoint: e4m3 bytes and a float32 / bf16 / fp16 scale per
        block of fp8_block_rows x 128 (see kernels/fp8.py)."""
        rows = self.fp8_block_rows
        if not rows:
            raise ConfigError(f"tensor {stem}.weight has an FP8 scale, but config.json's quantization_config "
                              "does not say fp8")
        if q.dtype != np.uint8 or q.ndim != 2:
            raise ConfigError(f"tensor {stem}.weight has dtype {q.dtype}; an FP8 weight (with a scale) "
                              "must be a matrix of F8_E4M3 bytes")
        n, k = q.shape
        scales = self.get(stem + ".weight_scale_inv", (-(-n // rows), -(-k // BLOCK_COLS)))
        if scales.dtype not in MATRIX_DTYPES:
            raise ConfigError(f"tensor {stem}.weight_scale_inv has dtype {scales.dtype}; "
                              "expected f32, bf16 or f16")
        return Fp8Matrix(q, np.ascontiguousarray(to_float32(scales)), rows)

    def _minqwen_quantized(self, stem: str, shape: tuple[int, int]) -> GgmlMatrix:
        """A matrix written by `minqwen quantize`: Q8_0 or Q4_1 blocks, uint8 [N, K / 32 * bytes]; the
        row length says which."""
        n, k = shape
        if stem + ".scales" in self.tensors:
            raise ConfigError(f"tensor {stem}.qweight is in the int8 / int4 format of an earlier minqwen; "
                              "quantise the original checkpoint again")
        q = self.tensors[stem + ".qweight"]
        for ggml_type in (Q8_0, Q4_1):
            row_bytes = k // BLOCK * GGML_BLOCKS[ggml_type][1]
            if q.dtype == np.uint8 and k % BLOCK == 0 and q.shape == (n, row_bytes):
                self.read.add(stem + ".qweight")
                return GgmlMatrix(q, ggml_type, k)
        raise ConfigError(f"tensor {stem}.qweight has shape {q.shape} and dtype {q.dtype}; the config "
                          f"implies Q8_0 or Q4_1 blocks of a ({n}, {k}) matrix")


def load_weights(config: Config, src: TensorSource) -> Weights:
    lm, d, v = language_model_prefix(src.tensors), config.hidden_size, config.vocab_size
    embed = src.matrix(lm + "embed_tokens.weight", (v, d))  # never quantised: see quantize.py
    layers = [_layer(config, src, f"{lm}layers.{i}.", config.layer_types[i], config.is_sparse(i))
              for i in range(config.num_hidden_layers)]
    tied = config.tie_word_embeddings  # the head is the embedding table itself, or its quantised copy
    lm_head = embed if tied else src.matrix("lm_head.weight", (v, d))
    if tied and src.quantize_bits and quantizable("lm_head.weight", embed):
        lm_head = quantize_matrix(embed, bits_for("lm_head.weight", src.quantize_bits))
    return Weights(embed_tokens=embed, layers=layers, norm=_norm(config, src, lm + "norm.weight", d),
                   lm_head=lm_head, mtp=_mtp(config, src))


def _mtp(config: Config, src: TensorSource) -> MtpWeights | None:
    """The `mtp.*` head (see MtpWeights), or None: a checkpoint without one (save_pretrained leaves it
    out), or a config that counts no MTP layers (its mtp.* tensors are then listed as not loaded)."""
    if not (config.mtp_num_hidden_layers and any(name.startswith("mtp.") for name in src.tensors)):
        return None
    d = config.hidden_size
    return MtpWeights(
        fc=src.matrix("mtp.fc.weight", (d, 2 * d)),
        pre_fc_norm_embedding=_norm(config, src, "mtp.pre_fc_norm_embedding.weight", d),
        pre_fc_norm_hidden=_norm(config, src, "mtp.pre_fc_norm_hidden.weight", d),
        layers=[_layer(config, src, f"mtp.layers.{i}.", "full_attention", config.num_experts > 0)
                for i in range(config.mtp_num_hidden_layers)],
        norm=_norm(config, src, "mtp.norm.weight", d))


# Tensors of published checkpoints that no rule reads on purpose, by what they are (an MTP head: see _mtp).
IGNORED = {"mtp.": "multi-token prediction head", "model.visual.": "vision tower"}


def unread_tensors(src: TensorSource) -> dict[str, list[str]]:
    """The checkpoint's tensors that loading did not read: {IGNORED kind or "unexpected": names}."""
    unread: dict[str, list[str]] = {}
    for name in sorted(set(src.tensors) - src.read):
        kind = next((what for prefix, what in IGNORED.items() if name.startswith(prefix)), "unexpected")
        unread.setdefault(kind, []).append(name)
    return unread


def language_model_prefix(names) -> str:
    """Text models keep the decoder under `model.`; Qwen3.5 image-text ones under `model.language_model.`."""
    return "model.language_model." if "model.language_model.embed_tokens.weight" in names else "model."


def _norm(config: Config, src: TensorSource, name: str, size: int) -> np.ndarray:
    """An RMSNorm weight as the kernels use it: x / rms(x) * weight (zero-centred: 1 + w, exact in fp32)."""
    weight = src.vector(name, size)
    return weight + np.float32(1) if config.family.zero_centred_norms else weight


def _layer(config: Config, src: TensorSource, p: str, kind: str, sparse: bool) -> LayerWeights:
    d, deltanet = config.hidden_size, kind == "linear_attention"
    return LayerWeights(input_layernorm=_norm(config, src, p + "input_layernorm.weight", d),
                        post_attention_layernorm=_norm(config, src, p + "post_attention_layernorm.weight", d),
                        self_attn=None if deltanet else _attention(config, src, p + "self_attn."),
                        linear_attn=_deltanet(config, src, p + "linear_attn.") if deltanet else None,
                        mlp=_moe(config, src, p + "mlp.") if sparse
                        else _mlp(src, p + "mlp.", d, config.intermediate_size))


def _attention(config: Config, src: TensorSource, p: str) -> AttentionWeights:
    d, hd, family = config.hidden_size, config.head_dim, config.family
    q_out, kv_out = config.num_attention_heads * hd, config.num_key_value_heads * hd
    # each bias: (loaded or not, why not)
    qkv_bias = (config.qkv_bias or config.attention_bias, "qkv_bias and attention_bias are false")
    o_bias = (config.attention_bias, "attention_bias is false")

    def bias(name, size, present, why):
        return src.vector(p + name + ".bias", size) if present else src.absent(p + name + ".bias", why)

    def head_norm(name):
        return (_norm(config, src, p + name + ".weight", hd) if family.qk_norm
                else src.absent(p + name + ".weight", f"{config.model_type} has no qk_norm"))

    return AttentionWeights(
        q_proj=src.matrix(p + "q_proj.weight", (q_out * (2 if family.output_gate else 1), d)),
        k_proj=src.matrix(p + "k_proj.weight", (kv_out, d)),
        v_proj=src.matrix(p + "v_proj.weight", (kv_out, d)),
        o_proj=src.matrix(p + "o_proj.weight", (d, q_out)),
        q_bias=bias("q_proj", q_out, *qkv_bias), k_bias=bias("k_proj", kv_out, *qkv_bias),
        v_bias=bias("v_proj", kv_out, *qkv_bias), o_bias=bias("o_proj", d, *o_bias),
        q_norm=head_norm("q_norm"), k_norm=head_norm("k_norm"))


def _deltanet(config: Config, src: TensorSource, p: str) -> DeltaNetWeights:
    d, hk, hv = config.hidden_size, config.linear_num_key_heads, config.linear_num_value_heads
    dk, dv = config.linear_key_head_dim, config.linear_value_head_dim
    if not (hk and hv and dk and dv) or hv % hk:
        raise ConfigError("linear attention needs linear_num_{key,value}_heads (value a multiple of key) "
                          "and linear_{key,value}_head_dim")
    channels, value_dim, group = config.deltanet_conv_channels, config.deltanet_value_dim, hv // hk
    fused = p + "in_proj_qkvz.weight" in src.tensors

    def separate(name, rows):
        return None if fused else src.matrix(p + name + ".weight", (rows, d))

    conv = src.matrix(p + "conv1d.weight", (channels, 1, config.linear_conv_kernel_dim))
    return DeltaNetWeights(
        in_proj_qkv=separate("in_proj_qkv", channels), in_proj_z=separate("in_proj_z", value_dim),
        in_proj_b=separate("in_proj_b", hv), in_proj_a=separate("in_proj_a", hv),
        in_proj_qkvz=src.matrix(p + "in_proj_qkvz.weight", (channels + value_dim, d)) if fused else None,
        in_proj_ba=src.matrix(p + "in_proj_ba.weight", (2 * hv, d)) if fused else None,
        qkvz_order=np.concatenate(qwen3_next_rows(hk, (dk, dk, group * dv, group * dv))) if fused else None,
        ba_order=np.concatenate(qwen3_next_rows(hk, (group, group))) if fused else None,
        conv1d=conv.reshape(channels, config.linear_conv_kernel_dim),
        A_log=src.vector(p + "A_log", hv), dt_bias=src.vector(p + "dt_bias", hv),
        norm=src.vector(p + "norm.weight", dv), out_proj=src.matrix(p + "out_proj.weight", (d, value_dim)))


def qwen3_next_rows(heads: int, sizes: tuple[int, ...]) -> list[np.ndarray]:
    """Qwen3-Next fuses projections per key head: its rows are [block 0 (sizes[0] rows) | block 1 | ...] for
    head 0, then the same for head 1, ...; returns, block by block, that block's rows of every head in head
    order -- the rows of Qwen3.5's separate matrices. in_proj_qkvz: blocks q (Dk), k (Dk), v (G Dv), z (G Dv);
    in_proj_ba (and GGUF's ssm_ba): b (G), a (G)."""
    starts, offsets = np.arange(heads)[:, None] * sum(sizes), np.cumsum((0, *sizes[:-1]))  # of heads, blocks
    return [(starts + offset + np.arange(size)).ravel() for offset, size in zip(offsets, sizes)]


def _mlp(src: TensorSource, p: str, d: int, f: int) -> MLPWeights:
    return MLPWeights(gate_proj=src.matrix(p + "gate_proj.weight", (f, d)),
                      up_proj=src.matrix(p + "up_proj.weight", (f, d)),
                      down_proj=src.matrix(p + "down_proj.weight", (d, f)))


def _moe(config: Config, src: TensorSource, p: str) -> MoEWeights:
    d, f, n = config.hidden_size, config.moe_intermediate_size, config.num_experts
    if p + "experts.gate_up_proj" in src.tensors:  # fused, as Qwen3.5/3.6 MoE publish their bf16 experts
        src.expert_layouts.add("fused")
        gate_up = src.matrix(p + "experts.gate_up_proj", (n, 2 * f, d))  # expert e: gate rows, then up rows
        down = src.matrix(p + "experts.down_proj", (n, d, f))
        experts = {"gate_proj": [gate_up[e, :f] for e in range(n)],  # contiguous views, no copy
                   "up_proj": [gate_up[e, f:] for e in range(n)],
                   "down_proj": [down[e] for e in range(n)]}
    else:
        src.expert_layouts.add("per-expert")
        shapes = {"gate_proj": (f, d), "up_proj": (f, d), "down_proj": (d, f)}
        experts = {name: [src.matrix(f"{p}experts.{e}.{name}.weight", shape) for e in range(n)]
                   for name, shape in shapes.items()}
    for name, matrices in experts.items():  # a typed List holds one type: one format, one dtype
        if len({_stored_format(m) for m in matrices}) > 1:
            raise ConfigError(f"{p}experts.*.{name} mix dtypes")
    shared, shared_gate = config.shared_expert_intermediate_size, p + "shared_expert_gate.weight"  # 0: none
    return MoEWeights(gate=src.matrix(p + "gate.weight", (n, d)),
                      gate_projs=List(experts["gate_proj"]), up_projs=List(experts["up_proj"]),
                      down_projs=List(experts["down_proj"]),
                      shared_expert=_mlp(src, p + "shared_expert.", d, shared) if shared else None,
                      shared_expert_gate=src.matrix(shared_gate, (1, d)) if shared
                      else src.absent(shared_gate, "shared_expert_intermediate_size is 0"))


def _stored_format(w):  # what a typed List of expert matrices must share
    if isinstance(w, Fp8Matrix):
        return Fp8Matrix, w.q.dtype
    if isinstance(w, GgmlMatrix):
        return GgmlMatrix, w.ggml_type
    return np.ndarray, w.dtype
