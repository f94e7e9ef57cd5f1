"""Tokenizer parity with transformers (the oracle) on the real Qwen2.5 / Qwen3 / Qwen3.5 vocabularies,
and the streaming decoder's guarantees."""

import re
import unicodedata
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minqwen.errors import CheckpointError
from minqwen.text.tokenizer import Tokenizer

DATA = Path(__file__).parent / "data" / "tokenizers"
NAMES = ("qwen2.5", "qwen3", "qwen3.5")

MIXED_TEXTS = [
    "",
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog. I'VE we'll they'd DON'T",
    "你好，世界！今天天气很好。日本語のテキストとカタカナ。한국어 문장입니다.",
    "emoji: 🌍🚀👍🏽 👩‍👩‍👧‍👦 🇫🇷🇯🇵 ❤️ 🫠",
    "rare planes: 𝒜𝓁𝓅𝒽𝒶 𐀀𐀁 𓀀 𝄞",
    "combining: e\u0301 a\u0308 n\u0303 \u1100\u1161 ज़ि क्षि",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n\n\n\tif x >= 10_000:\n\t\tpass\r\n",
    "whitespace runs:    \t\t  \n\n\n   \r\n\r\n       end   ",
    "numbers 1234567890 3.14159 -42 1e-9 0xFF",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><|im_start|><|im_end|><|im_start|><|im_start|>",
    "<think>\nsome reasoning\n</think>\n\nanswer <tool_call>{}</tool_call>",
    "almost special: <|im_start <|im_end|x <think > </ think>",
    "\u00a0\u2003\u3000 nbsp and wide spaces \ufeff\u200b zero width",
    "ÀÉÎÕÜ àéîõü ß ﬁ ℌ Ω ¼ ² Å",
    "\x00\x01\x1f\x7f control chars",
]


@pytest.fixture(scope="module")
def pairs():
    """name -> (ours, transformers') for every fixture tokenizer, loaded once."""
    from transformers import AutoTokenizer

    return {name: (Tokenizer.from_dir(DATA / name), AutoTokenizer.from_pretrained(DATA / name))
            for name in NAMES}


@pytest.mark.parametrize("name", NAMES)
def test_encode_decode_match_transformers(pairs, name):
    ours, theirs = pairs[name]
    for text in MIXED_TEXTS:
        ids = ours.encode(text)
        assert ids == theirs.encode(text, add_special_tokens=False), text
        for skip in (False, True):
            assert (ours.decode(ids, skip_special_tokens=skip)
                    == theirs.decode(ids, skip_special_tokens=skip)), text
        assert ours.decode(ids) == unicodedata.normalize("NFC", text)  # byte-level BPE is lossless after NFC


@pytest.mark.parametrize("name", NAMES)
def test_special_tokens_in_text_become_single_ids(pairs, name):
    ours, _ = pairs[name]
    im_start, im_end = ours.token_to_id("<|im_start|>"), ours.token_to_id("<|im_end|>")
    assert ours.encode("<|im_start|>user\nhi<|im_end|>")[0] == im_start
    assert ours.encode("<|im_start|>user\nhi<|im_end|>")[-1] == im_end
    assert ours.decode([im_start, im_end], skip_special_tokens=True) == ""


@pytest.mark.parametrize("name", NAMES)
def test_vocab_and_special_ids_match_transformers(pairs, name):
    ours, theirs = pairs[name]
    assert ours.vocab_size == len(theirs)
    assert ours.special_ids == {i for i, t in theirs.added_tokens_decoder.items() if t.special}
    for token in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "hello", "Ġworld", "ä½ł"):
        assert ours.token_to_id(token) == theirs.convert_tokens_to_ids(token), token
    assert ours.token_to_id("<certainly not a token>") is None


def test_known_qwen_ids(pairs):
    # Values from the official tokenizer_config.json files (see tests/data/tokenizers and SOURCES).
    q25, q3 = pairs["qwen2.5"][0], pairs["qwen3"][0]
    assert q25.token_to_id("<|endoftext|>") == 151643 and q25.token_to_id("<|im_end|>") == 151645
    assert q25.special_ids == set(range(151643, 151657))
    assert q25.vocab_size == 151665
    assert q3.token_to_id("<think>") == 151667 and q3.token_to_id("</think>") == 151668
    assert 151667 not in q3.special_ids and q3.vocab_size == 151669


# Characters that BPE splits into several byte tokens, mixed with ordinary text.
TRICKY = st.sampled_from(
    ["🌍", "👩‍👩‍👧", "👍🏽", "🇯🇵", "𝒜", "𐀀", "𓀀", "𝄞", "中", "語", "한", "é", "e\u0301", "ज़", "\ufffd", "🫠",
     " ", "  ", "\n", "\t", "a", "the", " of", "<|im_end|>", "<think>", "123", "ß"]
)
TEXTS = st.one_of(
    st.text(max_size=60),
    st.lists(TRICKY, max_size=25).map("".join),
    st.lists(st.one_of(TRICKY, st.text(max_size=4)), max_size=20).map("".join),
)


@settings(deadline=None, max_examples=120, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=80))
def test_random_unicode_matches_transformers(pairs, text):
    for name in NAMES:
        ours, theirs = pairs[name]
        ids = ours.encode(text)
        assert ids == theirs.encode(text, add_special_tokens=False), name
        assert ours.decode(ids) == theirs.decode(ids) == unicodedata.normalize("NFC", text), name


def stream(tokenizer, ids, skip_special_tokens):
    decoder = tokenizer.stream_decoder(skip_special_tokens=skip_special_tokens)
    pieces = [decoder.push(i) for i in ids]
    return pieces + [decoder.flush()]


@settings(deadline=None, max_examples=120, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXTS, skip=st.booleans())
def test_stream_decoder_pieces_concatenate_to_decode(pairs, text, skip):
    for name in NAMES:
        ours = pairs[name][0]
        ids = ours.encode(text)
        full = ours.decode(ids, skip_special_tokens=skip)
        pieces = stream(ours, ids, skip)
        assert "".join(pieces) == full, (name, pieces)
        if "\ufffd" not in full:
            assert not any("\ufffd" in p for p in pieces), (name, pieces)


@settings(deadline=None, max_examples=120, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), skip=st.booleans())
def test_stream_decoder_on_arbitrary_ids(pairs, data, skip):
    """What a (bad) model may generate: byte tokens that form invalid UTF-8, special tokens, anything."""
    for name in NAMES:
        ours = pairs[name][0]
        byte_ids = st.integers(0, 255)  # ids 0-255 are the single-byte tokens of a byte-level BPE vocab
        any_ids = st.integers(0, ours.vocab_size - 1)
        specials = st.sampled_from(sorted(ours.special_ids))
        ids = data.draw(st.lists(st.one_of(byte_ids, any_ids, specials), max_size=40), label=name)
        full = ours.decode(ids, skip_special_tokens=skip)
        pieces = stream(ours, ids, skip)
        assert "".join(pieces) == full, (name, ids, pieces)
        if "\ufffd" not in full:
            assert not any("\ufffd" in p for p in pieces), (name, ids, pieces)


def test_stream_decoder_holds_back_split_characters(pairs):
    ours = pairs["qwen2.5"][0]
    ids = ours.encode("𝄞")  # one character, four bytes: several byte-level tokens
    assert len(ids) > 1
    decoder = ours.stream_decoder()
    assert [decoder.push(i) for i in ids] == [""] * (len(ids) - 1) + ["𝄞"]
    assert decoder.flush() == ""
    # An unfinished character is only released by flush, as U+FFFD (what decode gives too).
    decoder = ours.stream_decoder()
    assert decoder.push(ids[0]) == "" and decoder.flush() == ours.decode(ids[:1]) == "\ufffd"


def test_stream_decoder_window_stays_small(pairs):
    """O(1) amortised per token: the decoder only keeps the ids since its last returned piece."""
    ours = pairs["qwen3.5"][0]
    ids = ours.encode(" ".join(MIXED_TEXTS) * 20)
    assert len(ids) > 3000
    decoder = ours.stream_decoder(skip_special_tokens=False)
    longest = 0
    pieces = []
    for i in ids:
        pieces.append(decoder.push(i))
        longest = max(longest, len(decoder.ids))
    assert "".join(pieces) + decoder.flush() == ours.decode(ids)
    assert longest <= 12, longest


def test_missing_tokenizer_json_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_corrupt_tokenizer_json_is_a_checkpoint_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": ')
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / "tokenizer.json"))):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / "tokenizer.json"))):
        Tokenizer.from_dir(tmp_path)
