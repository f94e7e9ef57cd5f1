"""GGUF files as models: the one real trained model (SmolLM2-135M-Instruct, Q4_1, llama architecture)
against transformers, and GGUFs of the Qwen architectures written as llama.cpp's converter writes them,
from the random checkpoints the parity tests build, against the same checkpoints' safetensors folders
(themselves parity-tested against transformers) and, where transformers reads the GGUF, against it."""
from __future__ import annotations

import subprocess
import sys
import zlib

import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType as GGML
from gguf_files import model_gguf

import minqwen
from checkpoints import build_checkpoint, relative_error
from minqwen.formats.gguf import U32, U64, read_gguf
from minqwen.kernels import isa
from minqwen.kernels import linear as linear_module
from minqwen.kernels.ggml import Q8_0, GgmlMatrix
from minqwen.kernels.linear import INTEGER_TYPES
from minqwen.network.quantize import quantize_matrix

if isa.ISA != "generic":
    from minqwen.kernels.gemm import matmul_panels

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
REAL_TEXT = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named "
    "after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889. "
    "Locally nicknamed \"La dame de fer\" (French for \"Iron Lady\"), it was constructed as the "
    "centrepiece of the 1889 World's Fair, and to crown the centennial anniversary of the French Revolution. "
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n"
    "Photosynthesis converts light energy into chemical energy that, through cellular respiration, can "
    "later be released to fuel the organism's activities. 光合作用是植物利用光能的过程。")


def kl_divergence(p_logits, q_logits):
    def log_softmax(z):
        z = z.astype(np.float64) - z.max(axis=-1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    log_p, log_q = log_softmax(p_logits), log_softmax(q_logits)
    return (np.exp(log_p) * (log_p - log_q)).sum(axis=-1)


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return minqwen.load(smollm2_gguf)


@pytest.fixture(scope="module")
def smollm2_transformers(smollm2_gguf):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                dtype=torch.float32).eval()


def transformers_logits(model, ids):
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def test_smollm2_matches_transformers(smollm2, smollm2_transformers):
    """The real model read from its Q4_1 file: logits of a chat prompt against transformers' dequantised
    model, and greedy tokens (decode after prefill)."""
    import torch

    ids = smollm2.tokenizer.apply_chat_template(QUESTION)
    error = relative_error(smollm2.logits(ids), transformers_logits(smollm2_transformers, ids))
    print(f"PARITY smollm2 gguf: {error:.2e}")
    assert error <= 2e-3
    with torch.no_grad():
        theirs = smollm2_transformers.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
    assert smollm2.generate(ids, max_new_tokens=12) == theirs[0, len(ids):].tolist()


@pytest.mark.skipif(isa.ISA == "generic", reason="the integer prefill needs AVX2")
def test_int16_prefill_on_the_real_model(smollm2, smollm2_transformers, monkeypatch):
    """MINQWEN_PREFILL=int16 (kernels/isa.py): the chat prompt's prefill on int16 dot products, x and the
    Q4_1 weights rounded to int16 per block of 32, against transformers' dequantised model, and greedy
    tokens (measured 1.2e-3 of the logits' range; the float prefill: 2.4e-6)."""
    import torch

    calls = []

    def counted(out, x, w, xtype):
        calls.append(xtype)
        return matmul_panels(out, x, w, xtype)
    monkeypatch.setattr(isa, "PREFILL", "int16")
    monkeypatch.setattr(linear_module, "matmul_panels", counted)
    ids = smollm2.tokenizer.apply_chat_template(QUESTION)
    error = relative_error(smollm2.logits(ids), transformers_logits(smollm2_transformers, ids))
    print(f"PARITY smollm2 gguf, int16 prefill: {error:.2e}")
    assert len(calls) >= 7 * smollm2.config.num_hidden_layers and all(c is np.int16 for c in calls)  # int16
    assert error <= 2e-3
    with torch.no_grad():
        theirs = smollm2_transformers.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
    assert smollm2.generate(ids, max_new_tokens=12) == theirs[0, len(ids):].tolist()


def test_smollm2_answers_the_question(smollm2):
    ids = smollm2.tokenizer.apply_chat_template(QUESTION)
    answer = smollm2.tokenizer.decode(smollm2.generate(ids, max_new_tokens=20), skip_special_tokens=True)
    print(f"ANSWER {answer!r}")
    assert "Paris" in answer


def quality(reference, logits):
    agreement = (reference.argmax(-1) == logits.argmax(-1)).mean()
    return float(agreement), float(kl_divergence(reference, logits).mean())


@pytest.mark.parametrize("scheme, min_agreement, max_kl", [("int8", 0.9, 1e-2), ("int4", 0.9, 1e-2)])
def test_quantisation_quality_on_real_weights(smollm2_gguf, smollm2, scheme, min_agreement, max_kl):
    """minqwen's int8 / int4 (Q8_0 / Q4_1 re-quantised from the file's dequantised weights, LM head at 8
    bits) against the model as stored, on real text: top-1 agreement and mean KL (the figures in
    docs/gguf-and-quantisation.md).
    This file's layers are Q4_1 already, so int4 re-quantises them exactly; what int4 could lose is
    the LM head (the tied Q8_0 embedding), kept at 8 bits: the same model with a 4-bit head shows why."""
    ids = smollm2.tokenizer.encode(REAL_TEXT)
    reference = smollm2.logits(ids)
    quantised = minqwen.load(smollm2_gguf, quantize=scheme)
    assert isinstance(quantised.weights.lm_head, GgmlMatrix) and quantised.weights.lm_head.ggml_type == Q8_0
    agreement, kl = quality(reference, quantised.logits(ids))
    print(f"QUALITY smollm2 {scheme}: {len(ids)} tokens, top-1 agreement {agreement:.3f}, mean KL {kl:.2e}")
    assert agreement >= min_agreement and kl <= max_kl
    answer = quantised.generate(quantised.tokenizer.apply_chat_template(QUESTION), max_new_tokens=20)
    assert "Paris" in quantised.tokenizer.decode(answer, skip_special_tokens=True)
    if scheme == "int4":
        quantised.weights.lm_head = quantize_matrix(quantised.weights.embed_tokens, 4)
        agreement_4, kl_4 = quality(reference, quantised.logits(ids))
        print(f"QUALITY smollm2 int4 with a 4-bit LM head: top-1 agreement {agreement_4:.3f}, "
              f"mean KL {kl_4:.2e}")
        assert kl_4 > 10 * max(kl, 1e-4)  # the head's bits are most of int4's loss


def test_info_on_a_gguf(smollm2_gguf):
    result = subprocess.run([sys.executable, "-m", "minqwen", "info", "--model", str(smollm2_gguf)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "llama" in result.stdout and "q4_1" in result.stdout and "q8_0" in result.stdout


def test_quantize_refuses_a_gguf(smollm2_gguf, tmp_path):
    result = subprocess.run([sys.executable, "-m", "minqwen", "quantize", "--model", str(smollm2_gguf),
                             "--out", str(tmp_path / "out"), "--bits", "8"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "GGUF" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


# ---- Qwen architectures, written as llama.cpp's converter writes them ----------------------------------

SIZES = dict(vocab_size=151936, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, rope_theta=1e6,
             intermediate_size=96)
ARCHITECTURES = {
    "qwen2": dict(SIZES, model_type="qwen2", architectures=["Qwen2ForCausalLM"]),
    "llama": dict(SIZES, model_type="llama", architectures=["LlamaForCausalLM"]),
    "qwen3": dict(SIZES, model_type="qwen3", architectures=["Qwen3ForCausalLM"], head_dim=32),
    "qwen2_moe": dict(SIZES, model_type="qwen2_moe", architectures=["Qwen2MoeForCausalLM"],
                      moe_intermediate_size=64, shared_expert_intermediate_size=64, num_experts=4,
                      num_experts_per_tok=2, norm_topk_prob=False),
    "qwen3_moe": dict(SIZES, model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"],
                      moe_intermediate_size=64, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
                      head_dim=32),
    "qwen3_next": dict(SIZES, model_type="qwen3_next", architectures=["Qwen3NextForCausalLM"],
                       moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=4,
                       num_experts_per_tok=2, norm_topk_prob=True, head_dim=32, num_hidden_layers=4,
                       full_attention_interval=2, partial_rotary_factor=0.25, linear_conv_kernel_dim=4,
                       linear_key_head_dim=16, linear_num_key_heads=2, linear_value_head_dim=16,
                       linear_num_value_heads=4),
}


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def architecture(request, tmp_path_factory):
    folder = build_checkpoint(tmp_path_factory.mktemp(request.param), ARCHITECTURES[request.param], "fp32",
                              tokenizer="qwen2.5")
    return request.param, folder


def test_f32_gguf_is_its_checkpoint(architecture, tmp_path):
    """Written as F32 (lossless), the GGUF is the same model as the folder it was written from: the
    renames, llama's Q / K permutation, stacked experts and Qwen3-Next's stored transforms undone."""
    name, folder = architecture
    gguf = model_gguf(folder, tmp_path / f"{name}.gguf")
    prompt = np.random.default_rng(3).integers(0, 151643, size=24).tolist()
    from_gguf, from_folder = minqwen.load(gguf), minqwen.load(folder)
    error = relative_error(from_gguf.logits(prompt), from_folder.logits(prompt))
    print(f"GGUF {name} f32 vs its safetensors: {error:.2e}")
    assert error <= 1e-5
    assert from_gguf.generate(prompt, max_new_tokens=8) == from_folder.generate(prompt, max_new_tokens=8)
    assert from_gguf.tokenizer.encode("Hello, world!") == from_folder.tokenizer.encode("Hello, world!")


def test_a_shared_expert_gate_stored_as_a_vector_is_the_same_gate(tmp_path):
    """The converter writes ffn_gate_inp_shexp as [1, hidden] (test_f32_gguf_is_its_checkpoint reads
    that); llama.cpp's quantiser and older converters as [hidden], as in the Qwen1.5-MoE / Qwen2-57B
    files users download: the same model."""
    folder = build_checkpoint(tmp_path / "hf", ARCHITECTURES["qwen2_moe"], "fp32", tokenizer="qwen2.5")
    gguf = model_gguf(folder, tmp_path / "qwen2_moe.gguf", vector_shared_expert_gate=True)
    assert read_gguf(gguf).tensors["blk.0.ffn_gate_inp_shexp.weight"].shape == (64,)
    prompt = np.random.default_rng(3).integers(0, 151643, size=12).tolist()
    error = relative_error(minqwen.load(gguf).logits(prompt), minqwen.load(folder).logits(prompt))
    print(f"GGUF qwen2_moe, [hidden] shared expert gate, vs its safetensors: {error:.2e}")
    assert error <= 1e-5


@pytest.mark.parametrize("quantization", [GGML.Q8_0, GGML.Q4_0, GGML.Q4_1, GGML.Q5_0, GGML.Q5_1])
@pytest.mark.parametrize("name", ["qwen2", "llama"])
def test_quantised_gguf_matches_transformers(name, quantization, tmp_path):
    """The block types gguf-py writes, read by transformers (which dequantises the whole model) and by
    minqwen (which reads the blocks in place)."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = build_checkpoint(tmp_path / "hf", ARCHITECTURES[name], "fp32", tokenizer="qwen2.5")
    gguf = model_gguf(folder, tmp_path / f"{name}.gguf", quantization)
    ours = minqwen.load(gguf)
    theirs = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    theirs.eval()
    prompt = np.random.default_rng(4).integers(0, 151643, size=20).tolist()
    prefill = ours.logits(prompt)
    error = relative_error(prefill, transformers_logits(theirs, prompt))
    print(f"GGUF {name} {quantization.name} vs transformers: {error:.2e}")
    assert error <= 2e-3
    # decoding one token at a time takes the integer kernels (x rounded to int16): the same logits
    sequence = ours.sequence()
    sequence.extend(prompt[:-3])
    decoded = np.stack([sequence.extend([token]) for token in prompt[-3:]])
    decode_error = relative_error(decoded, prefill[-3:])
    print(f"GGUF {name} {quantization.name} decode vs prefill: {decode_error:.2e}")
    assert decode_error <= 1e-3
    # greedy: ours decoding step by step, transformers recomputing the whole sequence each step
    logits, ours_greedy = sequence.reset_to(prompt), []
    for _ in range(8):
        ours_greedy.append(int(np.argmax(logits)))
        logits = sequence.extend(ours_greedy[-1:])
    theirs_greedy = []
    for _ in range(8):
        theirs_greedy.append(int(np.argmax(transformers_logits(theirs, prompt + theirs_greedy)[-1])))
    assert ours_greedy == theirs_greedy


def test_info_sizes_the_blocks_it_does_not_load(tmp_path):
    """Layers past block_count are multi-token prediction's, never loaded: info reports them with their
    size, GGML blocks as well as arrays (here the last layer of a Q8_0 file, block_count lowered by one)."""
    folder = build_checkpoint(tmp_path / "hf", ARCHITECTURES["qwen2"], "fp32", tokenizer="qwen2.5")
    path = model_gguf(folder, tmp_path / "qwen2.gguf", GGML.Q8_0)
    data = bytearray(path.read_bytes())
    key = b"qwen2.block_count"
    at = data.index(U64.pack(len(key)) + key) + 8 + len(key) + 4  # then the value's type, then the value
    U32.pack_into(data, at, U32.unpack_from(data, at)[0] - 1)
    path.write_bytes(data)
    result = subprocess.run([sys.executable, "-m", "minqwen", "info", "--model", str(path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "not loaded: multi-token prediction head: " in result.stdout
    assert "unexpected" not in result.stdout


# ---- the codebook types (IQ4_NL, IQ4_XS, MXFP4, the i-quant grids), which gguf-py cannot quantise to ----

CODEBOOK_TYPES = [GGML.IQ4_NL, GGML.MXFP4, GGML.IQ4_XS, GGML.IQ2_XXS, GGML.IQ2_XS, GGML.IQ2_S, GGML.IQ3_XXS,
                  GGML.IQ3_S]


def codebook_blocks(value, t):  # [..., K] float32 -> [..., K / E * bytes] uint8 blocks of type t
    """Random valid blocks, scaled so that their weights have about the rms of the weights they stand
    for (so the model stays a model); the same tensor always gets the same blocks (seeded by its bytes)."""
    import gguf

    E, B = gguf.GGML_QUANT_SIZES[t]
    rows = value.reshape(-1, value.shape[-1])
    N, n = rows.shape[0], rows.shape[1] // E
    rng = np.random.default_rng(zlib.crc32(rows.tobytes()))
    blocks = rng.integers(0, 256, (N, n, B), dtype=np.uint8)
    unit = 127 if t == GGML.MXFP4 else 1.0  # scale 2^(e - 128) = 1/2, resp. fp16 d = 1
    if t == GGML.MXFP4:
        blocks[..., 0] = unit
    else:
        blocks[..., :2] = np.array([unit], np.float16).view(np.uint8)
    sample = gguf.quants.dequantize(blocks[:8].reshape(min(N, 8), -1), t).astype(np.float64)
    unit_rms = np.sqrt((sample ** 2).mean())  # of the blocks at unit scale
    scale = np.sqrt((rows.reshape(N, n, E).astype(np.float64) ** 2).mean(-1)) / unit_rms
    if t == GGML.MXFP4:
        blocks[..., 0] = np.clip(unit + np.round(np.log2(np.maximum(scale, 2.0**-100))), 0, 254)
    else:
        blocks[..., :2] = scale.astype(np.float16)[..., None].view(np.uint8)
    return blocks.reshape(*value.shape[:-1], -1)


@pytest.fixture(scope="module")
def moe_256(tmp_path_factory):  # a Qwen3-MoE checkpoint whose matrices have rows of 256 (a K-quant block)
    config = dict(ARCHITECTURES["qwen3_moe"], hidden_size=256, moe_intermediate_size=256, head_dim=64)
    return build_checkpoint(tmp_path_factory.mktemp("moe_256"), config, "fp32", tokenizer="qwen2.5")


def codebook_gguf(folder, path, t, monkeypatch, twin=False):
    """The converter's GGUF of `folder` with every 2-D weight whose rows fit t's blocks (experts,
    attention, the embedding) in random blocks of type t, or (twin) as F32 holding those blocks' weights
    as gguf-py dequantises them."""
    import gguf

    E = gguf.GGML_QUANT_SIZES[t][0]

    def quantize(value, qtype):
        if qtype == t:
            return codebook_blocks(value, t)
        if value.shape[-1] % E:
            return value
        return gguf.quants.dequantize(codebook_blocks(value, t), t).reshape(value.shape)

    with monkeypatch.context() as patch:
        patch.setattr(gguf.quants, "quantize", quantize)
        return model_gguf(folder, path, GGML.F32 if twin else t)


@pytest.mark.parametrize("t", CODEBOOK_TYPES, ids=lambda t: t.name)
def test_codebook_gguf_is_its_dequantised_model(moe_256, t, tmp_path, monkeypatch):
    """A Qwen3-MoE GGUF whose experts, attention and embedding are IQ4_NL, MXFP4, IQ4_XS or an i-quant
    grid type (as unsloth's low-bit files store experts) loads and runs on the stored blocks: prefill,
    decode and greedy tokens as the same model in F32 with gguf-py's dequantisation of the blocks.
    Float kernels: to float32 rounding; integer ones (IQ4_NL / IQ4_XS, up to INTEGER_TOKENS tokens): x
    rounded to int16 per block of 32 (measured 3e-5 / 8e-5)."""
    ours = minqwen.load(codebook_gguf(moe_256, tmp_path / "blocks.gguf", t, monkeypatch))
    assert isinstance(ours.weights.embed_tokens, GgmlMatrix) and ours.weights.embed_tokens.ggml_type == t
    twin = minqwen.load(codebook_gguf(moe_256, tmp_path / "twin.gguf", t, monkeypatch, twin=True))
    prompt = np.random.default_rng(5).integers(0, 151643, size=12).tolist()
    prefill, reference = ours.logits(prompt), twin.logits(prompt)
    error = relative_error(prefill, reference)
    print(f"GGUF qwen3_moe {t.name} vs its dequantised F32 twin: {error:.2e}")
    bound = 1e-3 if t in INTEGER_TYPES else 1e-5  # (float kernels: measured <= 1.5e-6)
    assert error <= bound
    sequence = ours.sequence()
    sequence.extend(prompt[:-2])
    decoded = np.stack([sequence.extend([token]) for token in prompt[-2:]])
    assert relative_error(decoded, reference[-2:]) <= bound
    assert ours.generate(prompt, max_new_tokens=4) == twin.generate(prompt, max_new_tokens=4)


def test_a_type_minqwen_does_not_read_is_refused(moe_256, tmp_path, monkeypatch):
    """TQ2_0 (ternary) has IQ2_XXS's block size and bytes: the same file with one tensor's type id
    changed is a valid GGUF that minqwen must refuse by name, not read as IQ2_XXS."""
    path = codebook_gguf(moe_256, tmp_path / "iq2_xxs.gguf", GGML.IQ2_XXS, monkeypatch)
    data = bytearray(path.read_bytes())
    name = b"blk.0.attn_output.weight"
    at = data.index(U64.pack(len(name)) + name) + 8 + len(name)  # then n_dims, ne[n_dims], type
    n_dims = U32.unpack_from(data, at)[0]
    type_at = at + 4 + 8 * n_dims
    assert U32.unpack_from(data, type_at)[0] == GGML.IQ2_XXS
    U32.pack_into(data, type_at, GGML.TQ2_0)
    path.write_bytes(bytes(data))
    with pytest.raises(minqwen.UnsupportedModelError, match="blk.0.attn_output.weight is TQ2_0"):
        minqwen.load(path)
