"""Tokenizers rebuilt from GGUF metadata: the real SmolLM2 file against transformers' GGUF tokenizer, Qwen
vocabularies written as llama.cpp's converter writes them against the original tokenizer.json, and each
pre-tokenizer against llama.cpp's own regexes."""
from __future__ import annotations

import unicodedata
from pathlib import Path

import numpy as np
import pytest
import regex
from gguf import GGUFValueType as T
from gguf_files import write_gguf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_tokenizer import MIXED_TEXTS, TEXTS
from tokenizers import Regex, pre_tokenizers

from minqwen.errors import CheckpointError
from minqwen.formats.gguf import GGUFFile, read_gguf
from minqwen.text.tokenizer import PRE_TOKENIZERS, Tokenizer, gguf_end_of_generation_ids

DATA = Path(__file__).parent / "data" / "tokenizers"
QWEN = ("qwen2.5", "qwen3", "qwen3.5")
NUMERIC = regex.compile(r"\p{N}")
SETTINGS = settings(deadline=None, max_examples=150,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"}, {"role": "user", "content": "And <|im_end|> 3+3?"}]


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    """(ours, transformers' GGUF tokenizer, transformers' with SmolLM2's own pre-tokenizer) for the real
    SmolLM2 file.

    transformers ignores tokenizer.ggml.pre = "smollm" and splits as GPT-2 does; llama.cpp, and
    SmolLM2's own tokenizer.json, first cut every digit out alone (Digits(individual_digits) there,
    \\p{N} in llama.cpp). So ours matches the third exactly, and the second wherever no digit is
    involved."""
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    own = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    own.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    return Tokenizer.from_gguf(read_gguf(smollm2_gguf)), theirs, own


def test_smollm2_encodes_and_decodes_as_transformers(smollm2):
    ours, theirs, own = smollm2
    for text in MIXED_TEXTS + ["Hello world, 123 456789!", "x  1", "½ of 2²", "<|im_start|>user\n9"]:
        ids = ours.encode(text)
        assert ids == own.encode(text, add_special_tokens=False), text
        if not NUMERIC.search(text):
            assert ids == theirs.encode(text, add_special_tokens=False), text
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)
    # Where the two splits differ: two spaces before a digit are one token here, as in llama.cpp.
    assert ours.encode("x  1") == [104, 256, 33] != theirs.encode("x  1", add_special_tokens=False)


@SETTINGS
@given(text=TEXTS)
def test_smollm2_random_text(smollm2, text):
    ours, theirs, own = smollm2
    ids = ours.encode(text)
    assert ids == own.encode(text, add_special_tokens=False)
    if not NUMERIC.search(text):
        assert ids == theirs.encode(text, add_special_tokens=False)
    assert ours.decode(ids) == theirs.decode(ids)


def test_smollm2_specials_template_and_end_ids(smollm2, smollm2_gguf):
    ours, theirs, _ = smollm2
    assert ours.vocab_size == 49152 and ours.special_ids == set(range(17))
    assert ours.template_vars == {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                                  "unk_token": "<|endoftext|>", "pad_token": "<|im_end|>"}
    question = [{"role": "user", "content": "What is the capital of France?"}]
    for messages in (question, CHAT):
        text = ours.apply_chat_template(messages, tokenize=False)
        assert text == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(question) == [  # as transformers and llama.cpp tokenize it
        1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712,
        8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]
    # eos = <|im_end|>; <|endoftext|> ends generation too. add_bos_token is false: nothing is added.
    assert gguf_end_of_generation_ids(read_gguf(smollm2_gguf)) == [0, 2]
    assert ours.encode("Hi", add_special_tokens=True) == ours.encode("Hi")


@pytest.fixture(scope="module")
def qwen_pairs(qwen_tokenizer_ggufs):
    """name -> (ours from the GGUF, ours from the original tokenizer.json folder)."""
    return {name: (Tokenizer.from_gguf(read_gguf(path)), Tokenizer.from_dir(DATA / name))
            for name, path in qwen_tokenizer_ggufs.items()}


@pytest.mark.parametrize("name", QWEN)
def test_qwen_gguf_matches_its_tokenizer_json(qwen_pairs, name):
    from_gguf, from_json = qwen_pairs[name]
    for text in MIXED_TEXTS:
        ids = from_gguf.encode(text)
        assert ids == from_json.encode(text), text
        assert from_gguf.decode(ids) == unicodedata.normalize("NFC", text)
        # The converter types every <|...|> token CONTROL, so it skips a few more than tokenizer.json
        # (<|fim_prefix|>, ... are not "special" there); none of those are in these texts.
        for skip in (False, True):
            assert from_gguf.decode(ids, skip) == from_json.decode(ids, skip), text
    assert from_gguf.special_ids >= from_json.special_ids
    assert from_gguf.apply_chat_template(CHAT) == from_json.apply_chat_template(CHAT)
    assert from_gguf.apply_chat_template(CHAT, tokenize=False, enable_thinking=False) == \
        from_json.apply_chat_template(CHAT, tokenize=False, enable_thinking=False)


@SETTINGS
@given(text=st.one_of(st.text(max_size=80), TEXTS))
def test_qwen_gguf_random_text(qwen_pairs, text):
    for name in QWEN:
        from_gguf, from_json = qwen_pairs[name]
        ids = from_gguf.encode(text)
        assert ids == from_json.encode(text), name
        assert from_gguf.decode(ids) == from_json.decode(ids), name


def test_qwen_padding_and_end_ids(qwen_pairs, qwen_tokenizer_ggufs):
    from_gguf, from_json = qwen_pairs["qwen2.5"]
    # The converter pads the vocabulary to the model's 151936 rows with UNUSED "[PAD<id>]" tokens.
    assert from_gguf.vocab_size == 151936 and from_gguf.token_to_id("[PAD151665]") == 151665
    assert from_gguf.encode("[PAD151665]") != [151665]  # never produced from text
    # <|im_end|> (the file's eos) and <|endoftext|>; not "</s>", an ordinary token in Qwen's vocabulary
    # that llama.cpp would also stop at.
    assert gguf_end_of_generation_ids(read_gguf(qwen_tokenizer_ggufs["qwen2.5"])) == [151643, 151645]
    assert from_gguf.token_to_id("</s>") == 128247 and 128247 not in from_gguf.special_ids
    assert from_gguf.encode("a</s>b") == from_json.encode("a</s>b")


# ---- the pre-tokenizers, against llama.cpp's regexes (src/llama-vocab.cpp, llm_tokenizer_bpe)

GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
         r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA_CPP_REGEXES = {
    "qwen2": [QWEN2],
    "deepseek-r1-qwen": [QWEN2],
    "qwen35": [r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+"
               r"|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
    "smollm": [r"\p{N}", GPT2],
    "llama-bpe": [r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
                  r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
    "gpt-2": [GPT2],
    "default": [r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", "[0-9][0-9][0-9]"],
}
LLAMA_CPP_REGEXES["llama3"] = LLAMA_CPP_REGEXES["llama-v3"] = LLAMA_CPP_REGEXES["llama-bpe"]


def llama_cpp_pieces(text: str, regexes: list[str]) -> list[str]:
    """llama.cpp's unicode_regex_split: each regex cuts every piece the one before left into its
    matches and the spans between them."""
    pieces = [text]
    for pattern in regexes:
        cut = []
        for piece in pieces:
            start = 0
            for match in regex.finditer(pattern, piece):
                cut += [piece[start:match.start()]] * (match.start() > start) + [match.group()]
                start = match.end()
            cut += [piece[start:]] * (start < len(piece))
        pieces = cut
    return pieces


def known_characters(text: str) -> str:
    """text with the code points Python's Unicode tables (14.0) leave unassigned replaced by '?': the
    `regex` module (Unicode 17) calls some of them letters (U+323B0, CJK Extension J) where the `tokenizers`
    library's regex engine does not, and the test compares cuts, not Unicode versions."""
    return "".join(c if unicodedata.category(c) not in ("Cn", "Cs") else "?" for c in text)


@settings(deadline=None, max_examples=300)
@given(text=st.one_of(st.text(st.characters(exclude_categories=["Cn", "Cs"]), max_size=60),
                      TEXTS).map(known_characters))
def test_pre_tokenizers_cut_as_llama_cpp(text):
    assert set(PRE_TOKENIZERS) == set(LLAMA_CPP_REGEXES)
    for name, spec in PRE_TOKENIZERS.items():
        ours = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated")
                                        for split in spec.splits])
        assert [piece for piece, _ in ours.pre_tokenize_str(text)] == \
            llama_cpp_pieces(text, LLAMA_CPP_REGEXES[name]), name


# ---- a small vocabulary, for what the real files do not show

def small_vocabulary(**changes) -> dict:
    """Five byte tokens, one merge, a control and a user-defined token; `changes` replace or (None)
    remove keys."""
    tokens = ["a", "b", "ab", "Ġ", "1", "<|bos|>", "<think>", "<|end|>"]
    types = [1, 1, 1, 1, 1, 3, 4, 3]
    metadata = {
        "tokenizer.ggml.model": (T.STRING, "gpt2"), "tokenizer.ggml.pre": (T.STRING, "llama-bpe"),
        "tokenizer.ggml.tokens": (T.ARRAY, tokens, T.STRING),
        "tokenizer.ggml.token_type": (T.ARRAY, types, T.INT32),
        "tokenizer.ggml.merges": (T.ARRAY, ["a b"], T.STRING),
        "tokenizer.ggml.bos_token_id": (T.UINT32, 5), "tokenizer.ggml.eos_token_id": (T.UINT32, 7),
        "tokenizer.chat_template": (T.STRING, "{{ bos_token }}{{ messages[0]['content'] }}{{ eos_token }}"),
        "tokenizer.chat_template.tool_use": (T.STRING, "tools!"),
    }
    metadata.update(changes)
    return {key: value for key, value in metadata.items() if value is not None}


def small(tmp_path, **changes) -> Tokenizer:
    return Tokenizer.from_gguf(read_gguf(write_gguf(tmp_path / "small.gguf", small_vocabulary(**changes))))


def test_added_tokens_bos_and_templates(tmp_path):
    tokenizer = small(tmp_path)
    assert tokenizer.encode("ab<think>a<|end|>") == [2, 6, 0, 7]
    assert tokenizer.special_ids == {5, 7}
    # llama-bpe adds BOS unless the file says otherwise (add_special_tokens=True, as transformers' encode).
    assert tokenizer.encode("ab", add_special_tokens=True) == [5, 2]
    assert small(tmp_path, **{"tokenizer.ggml.add_bos_token": (T.BOOL, False)}).encode(
        "ab", add_special_tokens=True) == [2]
    assert small(tmp_path, **{"tokenizer.ggml.add_eos_token": (T.BOOL, True)}).encode(
        "ab", add_special_tokens=True) == [5, 2, 7]
    text = tokenizer.apply_chat_template([{"role": "user", "content": "ab"}], tokenize=False)
    assert text == "<|bos|>ab<|end|>"
    assert tokenizer.chat_templates["tool_use"] == "tools!"


@pytest.mark.parametrize("changes, message", [
    ({"tokenizer.ggml.model": (T.STRING, "llama")}, "model is 'llama'"),
    ({"tokenizer.ggml.pre": (T.STRING, "made-up")}, "'made-up', which minqwen does not know; known: qwen2"),
    ({"tokenizer.ggml.model": (T.ARRAY, ["gpt2"], T.STRING)}, "model is ['gpt2']"),
    ({"tokenizer.ggml.pre": None}, "pre is missing"),
    ({"tokenizer.ggml.pre": (T.ARRAY, [1], T.INT32)}, "pre is array([1]"),
    ({"tokenizer.ggml.tokens": None}, "tokens is missing"),
    ({"tokenizer.ggml.tokens": (T.ARRAY, [1, 2], T.INT32)}, "tokens is not an array of strings"),
    ({"tokenizer.ggml.merges": (T.ARRAY, ["ab"], T.STRING)}, "merges[0] = 'ab' is not two tokens"),
    ({"tokenizer.ggml.merges": (T.ARRAY, ["a c"], T.STRING)}, "tokenizer.ggml.merges"),
    ({"tokenizer.ggml.token_type": (T.ARRAY, [1, 1], T.INT32)}, "token_type is not 8 integers"),
    ({"tokenizer.ggml.token_type": (T.ARRAY, [1.0] * 8, T.FLOAT32)}, "token_type is not 8 integers"),
    ({"tokenizer.ggml.eos_token_id": (T.UINT32, 8)}, "eos_token_id = 8 is not a token id"),
    ({"tokenizer.ggml.bos_token_id": (T.STRING, "5")}, "bos_token_id = '5' is not a token id"),
    ({"tokenizer.ggml.bos_token_id": None}, "add_bos_token is set, but tokenizer.ggml.bos_token_id is"),
    ({"tokenizer.ggml.add_bos_token": (T.UINT8, 1)}, "add_bos_token is 1, not a bool"),
    ({"tokenizer.chat_template": (T.UINT32, 1)}, "tokenizer.chat_template is not a string"),
])
def test_bad_vocabulary_is_refused(tmp_path, changes, message):
    with pytest.raises(CheckpointError) as error:
        small(tmp_path, **changes)
    assert message in str(error.value) and str(error.value).startswith(str(tmp_path / "small.gguf"))


def test_end_ids_from_named_keys(tmp_path):
    changes = {"tokenizer.ggml.eot_token_id": (T.UINT32, 6), "tokenizer.ggml.fim_pad_token_id": (T.UINT32, 1)}
    path = write_gguf(tmp_path / "small.gguf", small_vocabulary(**changes))
    assert gguf_end_of_generation_ids(read_gguf(path)) == [1, 6, 7]  # <|end|> is spelled as an end too



@settings(deadline=None, max_examples=500)
@given(data=st.data())
def test_any_vocabulary_builds_or_is_refused(data):
    """Metadata is untrusted too: random vocabularies, merges, types and ids give a working tokenizer or
    a CheckpointError, never another exception (nor a panic in `tokenizers`)."""
    tokens = data.draw(st.lists(st.text(max_size=4), min_size=1, max_size=8), label="tokens")
    pairs = st.tuples(st.sampled_from(tokens), st.sampled_from(tokens)).map(" ".join)
    metadata = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": data.draw(st.sampled_from(sorted(PRE_TOKENIZERS)), label="pre"),
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": np.array(data.draw(st.lists(st.integers(0, 7), min_size=len(tokens),
                                                                 max_size=len(tokens))), np.int32),
        "tokenizer.ggml.merges": data.draw(st.lists(st.one_of(pairs, st.text(max_size=5)), max_size=5)),
    }
    for name in ("bos", "eos", "eot", "padding"):
        if data.draw(st.booleans(), label=name):
            metadata[f"tokenizer.ggml.{name}_token_id"] = data.draw(st.integers(0, len(tokens)))
    for flag in ("add_bos_token", "add_eos_token"):
        if data.draw(st.booleans(), label=flag):
            metadata[f"tokenizer.ggml.{flag}"] = data.draw(st.booleans())
    file = GGUFFile(Path("vocabulary.gguf"), 3, 32, metadata, {})
    try:
        tokenizer = Tokenizer.from_gguf(file)
        gguf_end_of_generation_ids(file)
    except CheckpointError:
        return
    ids = tokenizer.encode(data.draw(st.text(max_size=10), label="text"), add_special_tokens=True)
    tokenizer.decode(ids)
