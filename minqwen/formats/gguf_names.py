"""A GGUF file as a checkpoint: the config.json and the Hugging Face tensor names it stands for.

llama.cpp's converter (convert_hf_to_gguf.py) renames every tensor, moves the config into typed
metadata and transforms a few tensors. Here that is undone, in one place, so that the same loader
(weights.py) and network read a GGUF file as they read a safetensors folder -- the network never knows:

    metadata  <arch>.embedding_length, block_count, attention.head_count, ...  ->  config.json's fields
    names     token_embd, blk.N.attn_q, blk.N.ffn_gate_exps, output_norm, ... ->  model.embed_tokens,
              model.layers.N.self_attn.q_proj, model.layers.N.mlp.experts.E.gate_proj, model.norm, ...
    values    llama:      Q and K rows permuted for llama.cpp's RoPE, which pairs adjacent dims: put
                          back in the halves order of rotate_half (whole rows: quantised blocks move intact)
              hybrids:    RMSNorm weights stored as 1 + w: w again; A_log stored as -exp(A_log): log(-a)
              qwen3next:  ssm_ba's rows, per key head [b (G), a (G)]: split into in_proj_b and in_proj_a
    layout    qwen35, qwen35moe: the converter reorders the DeltaNet value heads from grouped to tiled
              (v head h reads key head h % Hk) in attn_qkv's v rows, attn_gate, ssm_alpha, ssm_beta, ssm_a,
              ssm_dt, ssm_conv1d's v channels and ssm_out's columns -- consistently, so nothing is moved
              back: the config says linear_value_head_order = "tiled", and the recurrence reads the heads
              in that order (kernels/deltanet.py)
    experts   stacked 3-D (E, F, D): per-expert 2-D views, read only when routed

Tensors stay views of the mapped file in their stored type (F32 / F16 / BF16 arrays, quantised blocks
as kernels/ggml.GgmlMatrix); only the permuted / split rows above are copies. A missing `output.weight`
means the embedding is tied. Routing follows llama.cpp: top-k weights renormalised for qwen3moe,
qwen3next and qwen35moe, not for qwen2moe. qwen35's rope.dimension_sections split the rotated dims among
interleaved MRoPE's (time, height, width) positions; text has the same position in all three, so that is
plain RoPE over rope.dimension_count dims, which is all minqwen reads.

Ollama's own qwen35 / qwen35moe blobs (its Go converter, convert/convert_qwen3next.go, as `ollama pull
qwen3.5` / `qwen3.6` fetch them) spell a few things their own way, read here too (its llama.cpp shim,
llama/compat/llama-ollama-compat.cpp, lists the same differences):
    attention.head_count_kv  one count per layer, 0 for the DeltaNet layers: the attention layers' count
                             (all must agree), and the layer kinds when attention.recurrent_layers is absent
    ssm.v_head_reordered     the value-head order: true is tiled (absent: tiled for qwen35 / qwen35moe,
                             as Ollama's engine defaults), false is grouped
    blk.N.ssm_dt             without .bias (read either way)
    rope.dimension_sections  3 entries, not 4; rope.mrope_interleaved: neither is read (see above)
    norm_top_k_prob          whether top-k routing weights are renormalised, when written
    v.*, mm.*                the vision tower in the same file: listed as model.visual.*, not loaded
    mtp.*                    the MTP head as mtp.fc, mtp.norm, mtp.layers.0.attn_q, ... and no
                             nextn_predict_layers, so the config counts no MTP layers: listed, not loaded
"""
from __future__ import annotations

import numpy as np

from ..errors import CheckpointError, UnsupportedModelError
from ..kernels.ggml import GGML_BLOCKS, GgmlMatrix
from ..network.weights import qwen3_next_rows
from ..text.tokenizer import gguf_end_of_generation_ids
from .gguf import GGML_TYPES, GGUFFile, read_gguf

# general.architecture -> model_type, and whether top-k routing weights are renormalised (llama.cpp's rule)
ARCHITECTURES = {"llama": ("llama", False), "qwen2": ("qwen2", False), "qwen3": ("qwen3", False),
                 "qwen2moe": ("qwen2_moe", False), "qwen3moe": ("qwen3_moe", True),
                 "qwen3next": ("qwen3_next", True), "qwen35": ("qwen3_5_text", True),
                 "qwen35moe": ("qwen3_5_moe_text", True)}
HYBRIDS = ("qwen3next", "qwen35", "qwen35moe")  # Gated DeltaNet layers between full-attention ones
TILED_VALUE_HEADS = ("qwen35", "qwen35moe")  # the converter's value-head order (see the docstring)
GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
LAYER_NAMES = {  # blk.N.<gguf> -> model.layers.N.<hf>
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj", "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj", "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
    "attn_qkv": "linear_attn.in_proj_qkv", "attn_gate": "linear_attn.in_proj_z",
    "ssm_conv1d": "linear_attn.conv1d",
    "ssm_dt": "linear_attn.dt_bias", "ssm_norm": "linear_attn.norm", "ssm_out": "linear_attn.out_proj",
    "ssm_alpha": "linear_attn.in_proj_a", "ssm_beta": "linear_attn.in_proj_b",
}
# Ollama's names for the vision tower ("v" for "model.visual"; its projector "mm"), kept under the
# checkpoint's prefix, which loading lists as the vision tower
VISION_TOWER = {"v": "model.visual.", "mm": "model.visual.mm."}
EXPERT_STACKS = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}


def gguf_config(gguf: GGUFFile, mtp_file: GGUFFile | None = None) -> dict:
    """config.json of the model a GGUF file holds, in transformers' spelling (`mtp_file`: see
    mtp_file_beside)."""
    arch = gguf.metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise UnsupportedModelError(f"{gguf.path}: GGUF architecture {arch!r} is not supported "
                                    f"(minqwen reads {', '.join(ARCHITECTURES)})")
    model_type, renormalise = ARCHITECTURES[arch]
    meta = _Metadata(gguf, arch)
    embed = gguf.tensors.get("token_embd.weight")
    if embed is None:
        raise CheckpointError(f"{gguf.path}: no token_embd.weight tensor")
    layers = meta.integer("block_count") - meta.integer("nextn_predict_layers", 0)
    heads = meta.integer("attention.head_count")
    kv_heads, attention_layers = _key_value_heads(meta, heads, layers)
    config = {
        "model_type": model_type, "vocab_size": embed.shape[0],
        "hidden_size": meta.integer("embedding_length"),
        "num_hidden_layers": layers, "num_attention_heads": heads,
        "mtp_num_hidden_layers": _mtp_layers(gguf, mtp_file),
        "num_key_value_heads": kv_heads,
        "intermediate_size": meta.integer("feed_forward_length", 0),
        "max_position_embeddings": meta.integer("context_length"),
        "rms_norm_eps": meta.number("attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": meta.number("rope.freq_base", 10000.0),
        "tie_word_embeddings": "output.weight" not in gguf.tensors,
        "eos_token_id": gguf_end_of_generation_ids(gguf),
        # llama files carry no biases; Qwen2's q/k/v biases are in the file when the model has them
        "qkv_bias": "blk.0.attn_q.bias" in gguf.tensors,
        "attention_bias": "blk.0.attn_output.bias" in gguf.tensors,
    }
    head_dim = meta.integer("attention.key_length", 0)
    if head_dim:
        config["head_dim"] = head_dim
    rotated = meta.integer("rope.dimension_count", 0)
    if rotated:
        config["partial_rotary_factor"] = rotated / (head_dim or config["hidden_size"] // heads)
    scaling = meta.text("rope.scaling.type", "none")
    if scaling in ("linear", "yarn"):
        original = meta.integer("rope.scaling.original_context_length", config["max_position_embeddings"])
        config["rope_scaling"] = {"rope_type": scaling, "factor": meta.number("rope.scaling.factor"),
                                  "original_max_position_embeddings": original}
    elif scaling != "none":
        raise UnsupportedModelError(f"{gguf.path}: RoPE scaling {scaling!r}")
    if meta.integer("expert_count", 0):
        config.update(num_experts=meta.integer("expert_count"),
                      num_experts_per_tok=meta.integer("expert_used_count"),
                      moe_intermediate_size=meta.integer("expert_feed_forward_length"),
                      shared_expert_intermediate_size=meta.integer("expert_shared_feed_forward_length", 0),
                      norm_topk_prob=meta.flag("norm_top_k_prob", renormalise))
    if arch in HYBRIDS:
        value_heads = meta.integer("ssm.time_step_rank")
        tiled = meta.flag("ssm.v_head_reordered", arch in TILED_VALUE_HEADS)
        config.update(linear_conv_kernel_dim=meta.integer("ssm.conv_kernel"),
                      linear_key_head_dim=meta.integer("ssm.state_size"),
                      linear_num_key_heads=meta.integer("ssm.group_count"),
                      linear_num_value_heads=value_heads,
                      linear_value_head_dim=meta.integer("ssm.inner_size") // value_heads,
                      linear_value_head_order="tiled" if tiled else "grouped")
        # llama.cpp's converter lists the layer kinds when config.json did; Ollama's gives the DeltaNet
        # layers no key / value heads; else the interval rule says them.
        recurrent = meta.value("attention.recurrent_layers", None)
        if recurrent is not None:
            config["layer_types"] = ["linear_attention" if r else "full_attention"
                                     for r in list(recurrent)[:layers]]
        elif attention_layers is not None:
            config["layer_types"] = ["full_attention" if a else "linear_attention" for a in attention_layers]
        else:
            config["full_attention_interval"] = meta.integer("full_attention_interval")
    return config


def _key_value_heads(meta: _Metadata, heads: int, layers: int) -> tuple[int, list[bool] | None]:
    """attention.head_count_kv: (the count, None), or from Ollama's one count per layer (0 for a layer
    without attention) (the attention layers' count, which layers of the trunk have attention)."""
    key = "attention.head_count_kv"
    if not isinstance(meta.value(key, heads), np.ndarray):
        return meta.integer(key, heads), None
    per_layer = meta.counts(key)
    counts = set(per_layer[:layers]) - {0}
    if len(per_layer) < layers or len(counts) != 1 or (0 in per_layer[:layers] and meta.arch not in HYBRIDS):
        raise CheckpointError(f"{meta.gguf.path}: GGUF {meta.arch}.{key} is {per_layer}; minqwen reads one "
                              f"count of key/value heads shared by the attention layers among the {layers}, "
                              f"and 0 only for a Gated DeltaNet layer ({', '.join(HYBRIDS)})")
    return counts.pop(), [count > 0 for count in per_layer[:layers]]


def _matrix(tensor, data):  # float tensors as arrays; block-quantised ones as GgmlMatrix (cols known)
    return data if tensor.type.block_size == 1 else GgmlMatrix(data, tensor.type.id, tensor.shape[-1])


def _check_type(gguf: GGUFFile, name: str, tensor):
    if tensor.type.block_size > 1 and tensor.type.id not in GGML_BLOCKS:
        readable = ", ".join(GGML_TYPES[t].name for t in sorted(GGML_BLOCKS))
        raise UnsupportedModelError(f"{gguf.path}: tensor {name} is {tensor.type.name}, a type minqwen does "
                                    f"not read (it reads F32, F16, BF16, {readable})")


def gguf_tensors(gguf: GGUFFile, config, mtp_file: GGUFFile | None = None) -> dict[str, np.ndarray]:
    """The file's tensors under their Hugging Face names, as weights.py reads a safetensors folder, and the
    MTP head of `mtp_file` (see mtp_file_beside)."""
    arch = gguf.metadata["general.architecture"]
    layers = config.num_hidden_layers
    tensors = {}
    for name, tensor in gguf.tensors.items():
        _check_type(gguf, name, tensor)
        value = _matrix(tensor, tensor.data)
        parts = name.split(".")
        if parts[0] in GLOBAL_NAMES:
            tensors[".".join([GLOBAL_NAMES[parts[0]], *parts[1:]])] = value
            continue
        if parts[0] in VISION_TOWER:  # Ollama's blobs hold the vision tower too: listed, not loaded
            tensors[VISION_TOWER[parts[0]] + ".".join(parts[1:])] = value
            continue
        if parts[0] != "blk" or len(parts) < 3 or not parts[1].isdigit():
            tensors[name] = value  # nothing a rule reads: info lists it
            continue
        layer, kind, suffix = int(parts[1]), parts[2], parts[3:]
        # layers past num_hidden_layers are the multi-token prediction head's: mtp.layers.*
        prefix = f"model.layers.{layer}." if layer < layers else f"mtp.layers.{layer - layers}."
        if kind in EXPERT_STACKS:  # (E, rows, cols): one 2-D view per expert
            for e in range(tensor.shape[0]):
                expert = f"{prefix}mlp.experts.{e}.{EXPERT_STACKS[kind]}.{'.'.join(suffix)}"
                tensors[expert] = _matrix(tensor, tensor.data[e])
        elif kind == "ssm_a":  # -exp(A_log), no .weight suffix
            tensors[prefix + "linear_attn.A_log"] = np.log(-tensor.data.astype(np.float32))
        elif kind == "ssm_dt":  # blk.N.ssm_dt.bias (Ollama's: blk.N.ssm_dt) is linear_attn.dt_bias
            tensors[prefix + "linear_attn.dt_bias"] = value
        elif kind == "ssm_conv1d":  # (channels, kernel): transformers' (channels, 1, kernel), squeezed
            tensors[prefix + "linear_attn.conv1d.weight"] = value.reshape(value.shape[0], 1, value.shape[1])
        elif kind == "ssm_ba":
            tensors.update(_split_ba(prefix, value, config))
        elif kind == "nextn" and suffix[0] in NEXTN_NAMES:  # the MTP head's own (in its first block)
            tensors[".".join([NEXTN_NAMES[suffix[0]], *suffix[1:]])] = value
        elif kind == "ffn_gate_inp_shexp" and value.ndim == 1:  # [hidden] from llama.cpp's quantiser and
            # older converters, [1, hidden] from today's: the same vector (1-D tensors are never quantised)
            tensors[prefix + "mlp.shared_expert_gate.weight"] = value.reshape(1, -1)
        else:
            hf = LAYER_NAMES.get(kind, kind)
            tensors[".".join([prefix + hf, *suffix])] = value
    if arch == "llama":
        _undo_llama_permutation(tensors, config)
    if config.family.zero_centred_norms:  # stored as 1 + w: every RMSNorm but the DeltaNet's gated one
        norms = [n for n in tensors if n.endswith("norm.weight") or n.startswith("mtp.pre_fc_norm_")]
        for name in [n for n in norms if "linear_attn.norm" not in n]:
            tensors[name] = tensors[name] - np.float32(1)
    if mtp_file is not None:  # only its head: the embedding and output it repeats are this file's
        head = gguf_tensors(mtp_file, config)
        tensors.update({name: t for name, t in head.items() if name.startswith("mtp.")})
    return tensors


# ---- the multi-token prediction (nextn) block -----------------------------------------------------------
# The converter appends Qwen3-Next's and Qwen3.5's MTP head (mtp.*) as the last block(s): block_count
# counts them, <arch>.nextn_predict_layers says how many; their attention layer and MLP under the trunk's
# names, fc and the head's norms (stored 1 + w like the others) as these:
NEXTN_NAMES = {"eh_proj": "mtp.fc", "enorm": "mtp.pre_fc_norm_embedding", "hnorm": "mtp.pre_fc_norm_hidden",
               "shared_head_norm": "mtp.norm"}  # blk.N.nextn.<gguf> -> <hf>
MTP_ONLY = ("{path}: this GGUF holds only a multi-token prediction head (llama.cpp's converter writes such "
            "mtp-*.gguf files with --mtp); load the model file it was converted with (--no-mtp), which "
            "reads this head when it sits beside it")


def mtp_file_beside(gguf: GGUFFile) -> GGUFFile | None:
    """For a file converted without its MTP head (`--no-mtp`): the head that the converter's `--mtp` wrote
    as mtp-<name>.gguf (embedding, output and the nextn block only), found in the same folder -- the one
    of the same architecture, width, vocabulary and trunk depth. None when the file has its own head, or
    no such file is there; several are refused (which one belongs to it is not written anywhere)."""
    arch = gguf.metadata.get("general.architecture")
    ours = _Metadata(gguf, arch)
    if arch not in ARCHITECTURES or ours.integer("nextn_predict_layers", 0):
        return None

    def vocabulary(f):
        return getattr(f.tensors.get("token_embd.weight"), "shape", None)

    fits = []
    for path in sorted(gguf.path.parent.glob("mtp-*.gguf")):
        other = read_gguf(path)
        theirs = _Metadata(other, arch)  # keys of another architecture are absent: no head
        nextn = theirs.integer("nextn_predict_layers", 0)
        if (nextn and theirs.integer("block_count", 0) - nextn == ours.integer("block_count", -1)
                and theirs.integer("embedding_length", 0) == ours.integer("embedding_length", -1)
                and vocabulary(other) == vocabulary(gguf)):
            fits.append(other)
    if len(fits) > 1:
        raise CheckpointError(f"{gguf.path}: several MTP heads beside it fit it "
                              f"({', '.join(f.path.name for f in fits)}); keep the one converted with it")
    return fits[0] if fits else None


def _mtp_layers(gguf: GGUFFile, mtp_file: GGUFFile | None) -> int:
    """Layers of the file's own MTP head, else of `mtp_file`'s; refuses a file that holds nothing else."""
    arch = gguf.metadata["general.architecture"]
    own = _Metadata(gguf, arch).integer("nextn_predict_layers", 0)
    if own and not any(name.startswith("blk.0.") for name in gguf.tensors):
        raise CheckpointError(MTP_ONLY.format(path=gguf.path))
    return own or (_Metadata(mtp_file, arch).integer("nextn_predict_layers") if mtp_file else 0)


def _split_ba(prefix: str, ba, config) -> dict:
    """ssm_ba (2 Hv, D), rows per key head [b (G), a (G)] -> in_proj_b (Hv, D), in_proj_a (Hv, D) (copies)."""
    hk, group = config.linear_num_key_heads, config.linear_num_value_heads // config.linear_num_key_heads
    b_rows, a_rows = qwen3_next_rows(hk, (group, group))
    return {prefix + "linear_attn.in_proj_b.weight": _rows(ba, b_rows),
            prefix + "linear_attn.in_proj_a.weight": _rows(ba, a_rows)}


def _undo_llama_permutation(tensors: dict, config):
    """llama.cpp stores each Q / K head's rows as interleaved pairs [x0, y0, x1, y1, ...] for a RoPE that
    rotates adjacent dims; rotate_half pairs dim i with i + d/2: rows [x0, x1, ... | y0, y1, ...]."""
    d = config.head_dim
    for layer in range(config.num_hidden_layers):
        for proj, heads in (("q_proj", config.num_attention_heads), ("k_proj", config.num_key_value_heads)):
            order = np.arange(heads * d).reshape(heads, d // 2, 2).swapaxes(1, 2).ravel()
            for suffix in ("weight", "bias"):
                name = f"model.layers.{layer}.self_attn.{proj}.{suffix}"
                if name in tensors:
                    tensors[name] = _rows(tensors[name], order)


def _rows(w, order):  # rows of a matrix in any stored form, copied in `order`
    return GgmlMatrix(np.ascontiguousarray(w.data[order]), w.ggml_type, w.cols) if isinstance(w, GgmlMatrix) \
        else np.ascontiguousarray(w[order])


class _Metadata:
    """Typed access to <arch>.* keys: a missing or mistyped key is a CheckpointError naming it."""

    def __init__(self, gguf: GGUFFile, arch: str):
        self.gguf, self.arch = gguf, arch

    def value(self, key: str, default=KeyError):
        full = f"{self.arch}.{key}"
        if full in self.gguf.metadata:
            return self.gguf.metadata[full]
        if default is KeyError:
            raise CheckpointError(f"{self.gguf.path}: GGUF metadata lacks {full}")
        return default

    def integer(self, key: str, default=KeyError) -> int:
        value = self.value(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise CheckpointError(f"{self.gguf.path}: GGUF {self.arch}.{key} is {value!r}, not a count")
        return int(value)

    def counts(self, key: str) -> list[int]:  # an array of counts
        value = self.value(key)
        if not (isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype.kind in "iu"
                and (value >= 0).all()):
            raise CheckpointError(f"{self.gguf.path}: GGUF {self.arch}.{key} is {value!r}, not counts")
        return [int(v) for v in value]

    def flag(self, key: str, default=KeyError) -> bool:
        value = self.value(key, default)
        if not isinstance(value, (bool, np.bool_)):
            raise CheckpointError(f"{self.gguf.path}: GGUF {self.arch}.{key} is {value!r}, not true or false")
        return bool(value)

    def number(self, key: str, default=KeyError) -> float:
        value = self.value(key, default)
        numeric = isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
        if not numeric or not np.isfinite(value):
            raise CheckpointError(f"{self.gguf.path}: GGUF {self.arch}.{key} is {value!r}, not a number")
        return float(value)

    def text(self, key: str, default=KeyError) -> str:
        value = self.value(key, default)
        if not isinstance(value, str):
            raise CheckpointError(f"{self.gguf.path}: GGUF {self.arch}.{key} is {value!r}, not a string")
        return value
