"""Ollama's own qwen3.5 / qwen3.6 GGUF blobs: written by Ollama's Go converter (convert/convert_qwen3next.go),
not llama.cpp's, they spell the same model differently. Each llama.cpp-converted Qwen3.5 file of
test_gguf_qwen35 (dense and MoE, Q8_0, with the MTP block) is rewritten here in Ollama's spelling, as that
converter wrote it up to ollama commit 9db4bdbad (the blobs `ollama pull qwen3.5` fetches; Ollama's
llama.cpp shim, llama/compat/llama-ollama-compat.cpp, undoes the same differences):

    attention.head_count_kv   one count per layer, 0 for the DeltaNet layers; no attention.recurrent_layers
                              and no full_attention_interval (Ollama writes the interval only when
                              config.json has one), so the layer kinds come from those counts alone
    rope.dimension_sections   3 entries (mrope_section as config.json has it), plus mrope_sections,
                              rope.mrope_section and rope.mrope_interleaved
    ssm.v_head_reordered      true; and norm_top_k_prob for the MoE
    blk.N.ssm_dt              without .bias
    mtp.*                     the MTP head under Ollama's names, no nextn_predict_layers, block_count the
                              trunk's
    v.*, mm.*                 a vision tower in the same file, and <arch>.vision.* keys

The rewritten blob is the same model: its logits equal the llama.cpp file's exactly, also when it is
run as `ollama:qwen3.5:9b` from an Ollama store whose manifest lists a projector layer too.
"""
from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pytest
from gguf_files import convert_with_llama_cpp, write_gguf
from test_gguf_qwen35 import MODELS, converter, prompt  # noqa: F401 (converter: a fixture used here)

import minqwen
from checkpoints import add_mtp_head, build_checkpoint
from minqwen.errors import CheckpointError
from minqwen.formats.gguf import read_gguf
from minqwen.formats.gguf_names import gguf_config

NEXTN = {"eh_proj": "mtp.fc", "enorm": "mtp.pre_fc_norm_embedding", "hnorm": "mtp.pre_fc_norm_hidden",
         "shared_head_norm": "mtp.norm"}  # blk.L.nextn.<llama.cpp> -> Ollama's (the checkpoint's) name
EXPERTS = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}


def typed(value) -> tuple:
    """A metadata value as read_gguf gives it -> (type, value) or (ARRAY, values, element type), as
    write_gguf takes it. Both converters write every integer scalar of these files as u32, every float
    as f32."""
    from gguf import GGUFValueType as T

    if isinstance(value, (bool, int, float, str)):  # bool before int: a bool is an int
        return next((t, value) for kind, t in ((bool, T.BOOL), (int, T.UINT32), (float, T.FLOAT32),
                                               (str, T.STRING)) if isinstance(value, kind))
    if isinstance(value, list):  # the tokens and merges
        return T.ARRAY, value, T.STRING
    element = {np.int32: T.INT32, np.uint32: T.UINT32, np.float32: T.FLOAT32, np.bool_: T.BOOL}
    return T.ARRAY, value.tolist(), element[value.dtype.type]


def ollama_spelling(path, target):
    """The llama.cpp-converted qwen35 / qwen35moe file at `path` rewritten as Ollama's converter spells it
    (see the module docstring); every weight keeps its stored bytes."""
    from gguf import GGMLQuantizationType
    from gguf import GGUFValueType as T

    gguf = read_gguf(path)
    metadata = {key: typed(value) for key, value in gguf.metadata.items()}
    arch = gguf.metadata["general.architecture"]
    layers = metadata[f"{arch}.block_count"][1] - metadata.pop(f"{arch}.nextn_predict_layers")[1]
    recurrent = metadata.pop(f"{arch}.attention.recurrent_layers")[1][:layers]
    kv_heads = metadata[f"{arch}.attention.head_count_kv"][1]
    del metadata[f"{arch}.full_attention_interval"]
    sections = metadata[f"{arch}.rope.dimension_sections"][1][:3]
    metadata.update({
        f"{arch}.block_count": (T.UINT32, layers),
        f"{arch}.attention.head_count_kv": (T.ARRAY, [0 if r else kv_heads for r in recurrent], T.UINT32),
        f"{arch}.rope.dimension_sections": (T.ARRAY, sections, T.INT32),
        f"{arch}.rope.mrope_section": (T.ARRAY, sections, T.INT32),
        f"{arch}.mrope_sections": (T.ARRAY, sections, T.INT32),
        f"{arch}.rope.mrope_interleaved": (T.BOOL, True),
        f"{arch}.ssm.v_head_reordered": (T.BOOL, True),
        f"{arch}.vision.block_count": (T.UINT32, 1),
        f"{arch}.vision.embedding_length": (T.UINT32, 8),
        f"{arch}.image_token_id": (T.UINT32, 248056),
    })
    if f"{arch}.expert_count" in metadata:
        metadata[f"{arch}.norm_top_k_prob"] = (T.BOOL, True)

    tensors = {}
    for name, t in gguf.tensors.items():
        parts, stored_type = name.split("."), GGMLQuantizationType(t.type.id)
        if parts[:3] == ["blk", str(layers), "nextn"]:
            tensors[".".join([NEXTN[parts[3]], *parts[4:]])] = (t.data, stored_type)
        elif parts[:2] == ["blk", str(layers)] and parts[2] in EXPERTS:  # Ollama kept these apart
            for e, expert in enumerate(t.data):
                tensors[f"mtp.layers.0.mlp.experts.{e}.{EXPERTS[parts[2]]}.weight"] = (expert, stored_type)
        elif parts[:2] == ["blk", str(layers)]:
            tensors[".".join(["mtp.layers.0", *parts[2:]])] = (t.data, stored_type)
        elif parts[2:] == ["ssm_dt", "bias"]:
            tensors[f"blk.{parts[1]}.ssm_dt"] = (t.data, stored_type)
        else:
            tensors[name] = (t.data, stored_type)
    rng = np.random.default_rng(0)
    for name in ("v.patch_embd.weight", "v.blk.0.attn_q.weight", "v.merger.linear_fc1.weight", "mm.0.weight"):
        tensors[name] = rng.standard_normal((8, 8)).astype(np.float32)
    return write_gguf(target, metadata, tensors)


@pytest.fixture(scope="module", params=sorted(MODELS))
def blobs(request, converter, tmp_path_factory):  # noqa: F811 (the imported fixture)
    """(arch, llama.cpp's Q8_0 file, the same in Ollama's spelling, the llama.cpp file's model)."""
    arch = request.param
    folder = build_checkpoint(tmp_path_factory.mktemp(arch), MODELS[arch][0], "bf16", tokenizer="qwen3.5")
    add_mtp_head(folder)
    llama_cpp = convert_with_llama_cpp(converter, folder, folder.parent / f"{arch}-q8_0.gguf", "q8_0")
    return arch, llama_cpp, ollama_spelling(llama_cpp, folder.parent / f"{arch}-ollama.gguf"), \
        minqwen.load(llama_cpp)


def test_ollama_blob_is_the_llama_cpp_file(blobs):
    """Same config (layer kinds from the per-layer head counts, tiled value heads), same weights: the
    logits are equal, not close. The MTP head under Ollama's names is not loaded (no layer counts it)."""
    arch, _, ollama, theirs = blobs
    ours = minqwen.load(ollama)
    gguf = read_gguf(ollama)
    assert gguf.metadata[f"{arch}.rope.dimension_sections"].shape == (3,) and "blk.0.ssm_dt" in gguf.tensors
    for field in ("layer_types", "num_key_value_heads", "num_hidden_layers", "linear_value_head_order",
                  "norm_topk_prob"):
        assert getattr(ours.config, field) == getattr(theirs.config, field), field
    assert ours.config.layer_types == ["linear_attention", "full_attention"] * 2
    assert ours.config.linear_value_head_order == "tiled"
    assert theirs.weights.mtp is not None and ours.weights.mtp is None
    ids = prompt()
    np.testing.assert_array_equal(ours.logits(ids), theirs.logits(ids))


def test_info_lists_the_vision_tower_and_the_head_as_not_loaded(blobs, capsys):
    from minqwen.cli import main

    _, _, ollama, _ = blobs
    assert main(["info", "--model", str(ollama)]) == 0
    out = capsys.readouterr().out
    assert "vision tower: 4 tensors" in out and "multi-token prediction head:" in out
    assert "in tiled order" in out
    assert "unexpected" not in out


def test_ollama_name_runs(blobs, tmp_path, monkeypatch):
    """`ollama:qwen3.5:9b` from a store as `ollama pull` leaves it, its manifest listing a projector layer
    too: the text model runs (the projector is skipped with a warning), and is the llama.cpp file's."""
    _, _, ollama, theirs = blobs
    store = tmp_path / "models"
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    (store / "blobs").mkdir(parents=True)
    layers = []
    for media_type, content in (("application/vnd.ollama.image.model", ollama.read_bytes()),
                                ("application/vnd.ollama.image.projector", b"GGUF projector")):
        digest = hashlib.sha256(content).hexdigest()
        (store / "blobs" / f"sha256-{digest}").write_bytes(content)
        layers.append({"mediaType": media_type, "digest": f"sha256:{digest}"})
    manifest = store / "manifests" / "registry.ollama.ai" / "library" / "qwen3.5" / "9b"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"schemaVersion": 2, "config": {}, "layers": layers,
                                    "mediaType": "application/vnd.docker.distribution.manifest.v2+json"}))
    with pytest.warns(UserWarning, match="projector is not loaded"):
        model = minqwen.load("ollama:qwen3.5:9b")
    ids = prompt()
    assert model.generate(ids, max_new_tokens=4) == theirs.generate(ids, max_new_tokens=4)


@pytest.mark.parametrize("counts", [[0, 1, 0, 2], [0, 0, 0, 0], [0, 1, 0]])  # disagree, no attention, short
def test_per_layer_head_counts_that_do_not_agree_are_refused(blobs, counts):
    arch, _, ollama, _ = blobs
    gguf = read_gguf(ollama)
    metadata = dict(gguf.metadata)
    metadata[f"{arch}.attention.head_count_kv"] = np.array(counts, np.uint32)
    with pytest.raises(CheckpointError, match=re.escape(f"head_count_kv is {counts}; minqwen reads one")):
        gguf_config(gguf._replace(metadata=metadata))


def test_the_files_flags_are_its_word(blobs):
    """ssm.v_head_reordered says the value-head order; absent, qwen35 / qwen35moe files are tiled (Ollama's
    engine's default, and what llama.cpp's converter writes without the key). norm_top_k_prob says
    whether the MoE renormalises its top-k routing weights; absent, it does (llama.cpp's rule)."""
    arch, _, ollama, _ = blobs
    gguf = read_gguf(ollama)

    def config(**keys):
        metadata = {k: v for k, v in gguf.metadata.items()
                    if k not in (f"{arch}.ssm.v_head_reordered", f"{arch}.norm_top_k_prob")}
        metadata.update({f"{arch}.{key}": value for key, value in keys.items()})
        return gguf_config(gguf._replace(metadata=metadata))

    assert config()["linear_value_head_order"] == "tiled"
    assert config(**{"ssm.v_head_reordered": True})["linear_value_head_order"] == "tiled"
    assert config(**{"ssm.v_head_reordered": False})["linear_value_head_order"] == "grouped"
    with pytest.raises(CheckpointError, match="v_head_reordered is 1, not true or false"):
        config(**{"ssm.v_head_reordered": 1})
    if arch == "qwen35moe":
        assert config()["norm_topk_prob"] is True
        assert config(norm_top_k_prob=False)["norm_topk_prob"] is False
