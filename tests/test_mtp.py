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
from checkpoints import add_mtp_head, build_checkpoint, relative_error
from minqwen.cli import main as cli
from minqwen.errors import CheckpointError, ConfigError, UnsupportedModelError
from minqwen.formats.safetensors import write_quantized_checkpoint
from minqwen.kernels.activations import sigmoid_gate_reference, sigmoid_reference
from minqwen.kernels.dtypes import to_float32
from minqwen.kernels.embedding import embed_reference
from minqwen.kernels.ggml import Q8_0, GgmlMatrix
from minqwen.kernels.moe import expert_reference, moe_reference
from minqwen.kernels.norm import rmsnorm_reference
from minqwen.kernels.rope import apply_rope_reference
from minqwen.network.mtp import MtpHead

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
    assert f"MTP head: 1 full-attention layer, {len(written)} tensors" in out and "--speculative mtp" in out
    assert "not loaded" not in out and "unexpected" not in out


def test_a_config_without_mtp_layers_leaves_the_head_unloaded(checkpoint, tmp_path, capsys):
    folder, written = checkpoint
    copy = shutil.copytree(folder, tmp_path / "copy")
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps(dict(config, mtp_num_hidden_layers=0)))
    assert minqwen.load(copy).weights.mtp is None
    assert cli(["info", "--model", str(copy)]) == 0
    assert f"not loaded: multi-token prediction head: {len(written)} tensors" in capsys.readouterr().out


def test_a_checkpoint_without_the_head_has_none(tmp_path, capsys):
    folder = build_checkpoint(tmp_path, QWEN3_5)
    assert minqwen.load(folder).weights.mtp is None  # as save_pretrained writes
    assert cli(["info", "--model", str(folder)]) == 0
    assert "MTP head: none" in capsys.readouterr().out


def test_a_quantised_copy_keeps_the_head(tmp_path):
    folder = build_checkpoint(tmp_path / "hf", QWEN3_5)
    written = add_mtp_head(folder)
    write_quantized_checkpoint(folder, tmp_path / "int8", 8)
    int8 = minqwen.load(tmp_path / "int8")
    mtp = int8.weights.mtp
    assert isinstance(mtp.fc, GgmlMatrix) and mtp.fc.ggml_type == Q8_0
    np.testing.assert_array_equal(mtp.norm, written["mtp.norm.weight"].float().numpy() + np.float32(1))
    model, rng = minqwen.load(folder), np.random.default_rng(4)  # and it runs, as near as int8 allows
    hidden, next_tokens = rng.standard_normal((ROWS, model.config.hidden_size)), rng.integers(0, 200, ROWS)
    heads = [MtpHead(m.config, m.weights) for m in (model, int8)]
    ours, theirs = (head.extend(head.cache(64), hidden, next_tokens, every_token=True) for head in heads)
    assert relative_error(theirs, ours) <= 5e-2  # measured 1.1e-2; a misread fc or layer is ~1


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


# ---- The head's forward: MtpHead against a float64 reference ----------------------------------------

QWEN3_NEXT = dict(model_type="qwen3_next", architectures=["Qwen3NextForCausalLM"], vocab_size=200,
                  hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                  shared_expert_intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=16, num_experts=4, num_experts_per_tok=2,
                  norm_topk_prob=True, full_attention_interval=2, partial_rotary_factor=0.25,
                  rope_theta=10000.0, max_position_embeddings=256, tie_word_embeddings=False,
                  linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_num_key_heads=2,
                  linear_value_head_dim=8, linear_num_value_heads=4)
FAMILIES = {"qwen3_5": QWEN3_5, "qwen3_5_moe": QWEN3_5_MOE, "qwen3_next": QWEN3_NEXT}
HEAD_CASES = {f"{name}-{dtype}": (config, dtype)
              for name, config in FAMILIES.items() for dtype in ("fp32", "bf16")}
ROWS = 12  # the prompt's: rows of the head at positions 0..11
ROUNDING = 1e-5  # max|diff| / max|logit| that float32 arithmetic may cost; measured <= 4e-7 here


def f64(w) -> np.ndarray:
    return stored(w).astype(np.float64)


def mtp_reference(config, weights, hidden, next_tokens):
    """The head's forward in float64 straight from its formula (network/mtp.py) and the kernels' float64
    references, rows at positions 0..n-1 of an empty cache: (logits (n, vocab), final normed states)."""
    mtp, eps, hd, T = weights.mtp, config.rms_norm_eps, config.head_dim, len(next_tokens)
    n_q, n_kv = config.num_attention_heads, config.num_key_value_heads

    def norm(x, w):  # over the last axis
        return rmsnorm_reference(x.reshape(-1, x.shape[-1]), w, eps).reshape(x.shape)

    x = np.concatenate([norm(embed_reference(weights.embed_tokens, next_tokens), mtp.pre_fc_norm_embedding),
                        norm(np.asarray(hidden, np.float64), mtp.pre_fc_norm_hidden)], axis=1) @ f64(mtp.fc).T
    rotary = config.rotary_dims
    angles = np.arange(T)[:, None] * config.rope.rope_theta ** (-np.arange(0, rotary, 2) / rotary)[None, :]
    causal = np.triu(np.ones((T, T), bool), 1)
    for layer in mtp.layers:
        a, h = layer.self_attn, norm(x, layer.input_layernorm)
        q_and_gate = (h @ f64(a.q_proj).T).reshape(T, n_q, 2 * hd)  # [q_h, gate_h] per head
        q = apply_rope_reference(norm(q_and_gate[..., :hd], a.q_norm), np.cos(angles), np.sin(angles))
        k = apply_rope_reference(norm((h @ f64(a.k_proj).T).reshape(T, n_kv, hd), a.k_norm), np.cos(angles),
                                 np.sin(angles))
        k, v = (np.repeat(kv, n_q // n_kv, axis=1) for kv in (k, (h @ f64(a.v_proj).T).reshape(T, n_kv, hd)))
        scores = np.where(causal, -np.inf, np.einsum("thd,shd->hts", q, k) * hd ** -0.5)
        p = np.exp(scores - scores.max(axis=-1, keepdims=True))
        attention = np.einsum("hts,shd->thd", p / p.sum(axis=-1, keepdims=True), v)
        x = x + sigmoid_gate_reference(attention, q_and_gate[..., hd:]).reshape(T, -1) @ f64(a.o_proj).T
        h, mlp = norm(x, layer.post_attention_layernorm), layer.mlp
        if not config.num_experts:
            x = x + expert_reference(h, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
            continue
        shared = mlp.shared_expert
        x = x + moe_reference(h, mlp.gate_projs, mlp.up_projs, mlp.down_projs, mlp.gate,
                              config.num_experts_per_tok, config.norm_topk_prob)
        x = x + sigmoid_reference(h @ f64(mlp.shared_expert_gate).T) * expert_reference(
            h, shared.gate_proj, shared.up_proj, shared.down_proj)
    x = norm(x, mtp.norm)
    return x @ f64(weights.lm_head).T, x


def transformers_head(folder, written: dict):
    """The head in float64 as its sources define it, for checking mtp_reference: fc over the two norms written
    out from the checkpoint's tensors (vLLM's qwen3_5_mtp.py; transformers skips mtp.*), then transformers'
    own code for the rest, a one-layer model of the family's class holding the head's layer, the head's
    norm as its final norm and the model's LM head. (Its RMSNorms round through float32.)"""
    import safetensors.torch
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = json.loads((folder / "config.json").read_text())
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(  # eager experts: no float64 grouped mm
        **dict(raw, num_hidden_layers=1, layer_types=["full_attention"])), dtype=torch.float64,
        experts_implementation="eager")
    trunk = safetensors.torch.load_file(folder / "model-00001.safetensors")
    state = {name: trunk[name] for name in ("model.embed_tokens.weight", "lm_head.weight")}
    state["model.norm.weight"] = written["mtp.norm.weight"]
    state.update({name.replace("mtp.", "model.", 1): w for name, w in written.items() if ".layers." in name})
    experts = "model.layers.0.mlp.experts."
    if raw.get("num_experts"):  # one matrix each, as published: transformers holds them fused
        taken = [[state.pop(f"{experts}{e}.{proj}.weight") for proj in PROJECTIONS]
                 for e in range(raw["num_experts"])]
        state[experts + "gate_up_proj"] = torch.stack([torch.cat([gate, up]) for gate, up, _ in taken])
        state[experts + "down_proj"] = torch.stack([down for _, _, down in taken])
    model.load_state_dict({name: w.double() for name, w in state.items()})
    w, eps = {name: t.double() for name, t in written.items()}, raw.get("rms_norm_eps", 1e-6)

    def norm(v, name):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps) * (1 + w[name])

    def head(hidden, next_tokens) -> np.ndarray:  # logits (n, vocab)
        e = norm(model.model.embed_tokens(torch.as_tensor(next_tokens)), "mtp.pre_fc_norm_embedding.weight")
        x = torch.cat([e, norm(torch.as_tensor(hidden), "mtp.pre_fc_norm_hidden.weight")], -1)  # float64
        with torch.no_grad():
            return model(inputs_embeds=(x @ w["mtp.fc.weight"].T)[None]).logits[0].numpy()
    return head


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_reference_is_the_head_the_sources_define(family, tmp_path):
    folder = build_checkpoint(tmp_path, FAMILIES[family])
    head = transformers_head(folder, add_mtp_head(folder))
    model = minqwen.load(folder)
    rng = np.random.default_rng(3)
    hidden, next_tokens = rng.standard_normal((ROWS, model.config.hidden_size)), rng.integers(0, 200, ROWS)
    logits, _ = mtp_reference(model.config, model.weights, hidden, next_tokens)
    assert relative_error(logits, head(hidden, next_tokens)) <= ROUNDING


@pytest.fixture(scope="module", params=sorted(HEAD_CASES))
def head_case(request, tmp_path_factory):
    """(folder, model, its MtpHead, the model's final normed states over a prompt, the token after each)."""
    config, dtype = HEAD_CASES[request.param]
    folder = build_checkpoint(tmp_path_factory.mktemp(request.param), config, dtype)
    add_mtp_head(folder)
    model = minqwen.load(folder)
    prompt = np.random.default_rng(2).integers(0, config["vocab_size"], ROWS + 1)
    model.logits(prompt[:-1])  # the head reads what the model computed: its final normed states
    return folder, model, MtpHead(model.config, model.weights), model.decoder.hidden.copy(), prompt[1:]


def test_the_head_matches_its_float64_reference(head_case):
    _, model, head, hidden, next_tokens = head_case
    cache = head.cache(model.context_length)
    logits = head.extend(cache, hidden, next_tokens, every_token=True)
    want, states = mtp_reference(model.config, model.weights, hidden, next_tokens)
    assert cache.length == ROWS and logits.shape == (ROWS, model.config.vocab_size)
    assert relative_error(logits, want) <= ROUNDING
    assert relative_error(head.hidden, states) <= ROUNDING  # what chaining feeds back
    last = head.extend(head.cache(model.context_length), hidden, next_tokens)  # only the last row's logits
    assert relative_error(last, logits[-1]) <= ROUNDING


def test_row_by_row_continues_the_cache(head_case):
    """Some rows at once, then one at a time, as decoding feeds the head: the same as all rows at once."""
    _, model, head, hidden, next_tokens = head_case
    together = head.extend(head.cache(model.context_length), hidden, next_tokens, every_token=True)
    cache = head.cache(model.context_length)
    first = head.extend(cache, hidden[:5], next_tokens[:5], every_token=True)
    rows = [head.extend(cache, hidden[i:i + 1], next_tokens[i:i + 1]) for i in range(5, ROWS)]
    assert cache.length == ROWS
    assert relative_error(np.concatenate([first, rows]), together) <= ROUNDING


def test_several_sequences_in_one_pass_match_each_alone(head_case):
    """The server's batch: two sequences' rows in one pass, each at its own positions in its own cache."""
    _, model, head, hidden, next_tokens = head_case
    together = head.extend(head.cache(model.context_length), hidden, next_tokens, every_token=True)
    a, b = head.cache(model.context_length), head.cache(model.context_length)
    head.extend(a, hidden[:5], next_tokens[:5])
    head.extend(b, hidden[:3], next_tokens[:3])
    logits = head.forward([(a, hidden[5:9], next_tokens[5:9]), (b, hidden[3:4], next_tokens[3:4])],
                          every_token=True)
    assert (a.length, b.length) == (9, 4)
    assert relative_error(logits, together[[5, 6, 7, 8, 3]]) <= ROUNDING


def test_a_head_of_two_layers_is_refused(head_case):
    """vLLM runs a deeper head's layers one per draft step (layers[step % n]), not stacked: none published."""
    _, model, *_ = head_case
    deeper = dataclasses.replace(model.weights.mtp, layers=model.weights.mtp.layers * 2)
    with pytest.raises(UnsupportedModelError, match="MTP head of 2 layers"):
        MtpHead(model.config, dataclasses.replace(model.weights, mtp=deeper))


def test_chained_the_head_reads_its_own_state_one_position_on(head_case):
    """k > 1: the head's own final normed state of its last row, with the token drafted from it, is the next
    row, one position on; the reference, chained on its own states, gives the same logits."""
    _, model, head, hidden, next_tokens = head_case
    cache = head.cache(model.context_length)
    logits = head.extend(cache, hidden, next_tokens)
    rows, tokens = np.asarray(hidden, np.float64), list(next_tokens)
    _, states = mtp_reference(model.config, model.weights, rows, np.asarray(tokens))
    for _ in range(3):
        tokens.append(int(np.argmax(logits)))
        logits = head.extend(cache, head.hidden[-1:], np.asarray(tokens[-1:], np.int64))
        rows = np.concatenate([rows, states[-1:]])
        want, states = mtp_reference(model.config, model.weights, rows, np.asarray(tokens))
        assert relative_error(logits, want[-1]) <= ROUNDING
    assert cache.length == ROWS + 3


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
    models, rng = [minqwen.load(folder), minqwen.load(path)], np.random.default_rng(5)  # and drafts the same
    hidden, next_tokens = rng.standard_normal((4, models[0].config.hidden_size)), rng.integers(0, 248320, 4)
    heads = [MtpHead(m.config, m.weights) for m in models]
    ours, theirs = (head.extend(head.cache(64), hidden, next_tokens, every_token=True) for head in heads)
    assert relative_error(theirs, ours) <= ROUNDING


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
