"""Text <-> token ids, streaming detokenisation, and chat templates.

Qwen ships a byte-level BPE tokenizer in Hugging Face `tokenizer.json` format; the `tokenizers` library runs
it (BPE is not ours to re-implement). A GGUF file carries the same vocabulary as metadata instead
(`tokenizer.ggml.*`), from which `Tokenizer.from_gguf` rebuilds it the way llama.cpp tokenizes. This file
adds what an inference engine needs around it:

- `StreamDecoder`: turns generated ids into text piece by piece, never splitting a UTF-8 character.
- `apply_chat_template`: renders a conversation with the model's Jinja chat template exactly as
  transformers does (same sandbox, options, filters and globals), so the prompt ids match token for token.
"""

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import jinja2
import jinja2.ext
import jinja2.nodes
import numpy as np
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

from ..errors import CheckpointError, TemplateError

if TYPE_CHECKING:
    from ..formats.gguf import GGUFFile

# The named special tokens transformers passes to every chat template (`bos_token`, `eos_token`, ...).
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                        "mask_token")

# Names a message's reasoning may arrive under; transformers copies the first found to the first two.
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class Tokenizer:
    """A Qwen tokenizer: `tokenizers` BPE for text, Jinja for chat templates."""

    def __init__(self, backend: tokenizers.Tokenizer, chat_templates: dict[str, str],
                 template_vars: dict[str, str]):
        self.backend = backend
        self.chat_templates = chat_templates  # name -> Jinja source; the usual one is "default"
        self.template_vars = template_vars  # bos_token / eos_token / ... as tokenizer_config names them
        added = backend.get_added_tokens_decoder()  # id -> AddedToken
        self.special_ids = {i for i, token in added.items() if token.special}
        largest = max(backend.get_vocab(with_added_tokens=False).values(), default=-1)
        self.vocab_size = max(largest, max(added, default=-1)) + 1  # ids may have holes: not a count

    @classmethod
    def from_dir(cls, folder, chat_template: str | None = None) -> "Tokenizer":
        """Load tokenizer.json (+ tokenizer_config.json and chat_template.jinja if present) from a
        model folder.

        `chat_template` overrides the folder's template (Jinja source)."""
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(f"{path}: tokenizer.json not found")
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a bare Exception for any parse error
            raise CheckpointError(f"{path}: not a valid tokenizer.json ({one_line(e)})") from None

        config = {}
        config_path = folder / "tokenizer_config.json"
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{config_path}: not valid JSON ({one_line(e)})") from None

        # Template precedence, as in transformers: the argument, then chat_template.jinja, then the config.
        templates = {}
        raw = config.get("chat_template")
        if isinstance(raw, str):
            templates["default"] = raw
        elif isinstance(raw, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            templates = {t["name"]: t["template"] for t in raw}
        jinja_path = folder / "chat_template.jinja"
        if jinja_path.is_file():
            try:
                templates["default"] = jinja_path.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise CheckpointError(f"{jinja_path}: not UTF-8 text ({one_line(e)})") from None
        if chat_template is not None:
            templates = {"default": chat_template}

        # Special tokens are stored as "<|im_end|>" or a serialised AddedToken {"content": "<|im_end|>", ...}.
        # transformers also passes named model-specific tokens (extra_special_tokens given as a dict).
        named = {name: config.get(name) for name in NAMED_SPECIAL_TOKENS}
        if isinstance(config.get("extra_special_tokens"), dict):
            named.update(config["extra_special_tokens"])
        template_vars = {}
        for name, value in named.items():
            if isinstance(value, dict):
                value = value.get("content")
            if value is not None:
                template_vars[name] = str(value)
        return cls(backend, templates, template_vars)

    @classmethod
    def from_gguf(cls, gguf: "GGUFFile") -> "Tokenizer":
        """The tokenizer a GGUF file describes in its tokenizer.ggml.* metadata, tokenizing as llama.cpp
        does (see `gguf_backend`). Chat templates: tokenizer.chat_template, and
        tokenizer.chat_template.<name> (e.g. tool_use); `bos_token`, `eos_token`, `unk_token` and
        `pad_token` are the texts of the file's ids, as transformers passes them to the template."""
        backend = gguf_backend(gguf)
        templates = {}
        for key, value in gguf.metadata.items():
            if key == "tokenizer.chat_template" or key.startswith("tokenizer.chat_template."):
                if not isinstance(value, str):
                    raise CheckpointError(f"{gguf.path}: {key} is not a string")
                templates[key.removeprefix("tokenizer.chat_template").removeprefix(".") or "default"] = value
        template_vars = {name: backend.id_to_token(i) for name, i in (
            ("bos_token", gguf_token_id(gguf, "bos")), ("eos_token", gguf_token_id(gguf, "eos")),
            ("unk_token", gguf_token_id(gguf, "unknown")), ("pad_token", gguf_token_id(gguf, "padding")),
        ) if i is not None}
        return cls(backend, templates, template_vars)

    # ---- text <-> ids

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; special tokens written in the text become their ids. Qwen adds no BOS;
        add_special_tokens=True adds what the tokenizer's post-processor does (a GGUF's BOS when its
        add_bos_token says so), as transformers' `encode` does by default."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def stream_decoder(self, skip_special_tokens: bool = True) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens)

    # ---- chat templates

    @property
    def chat_template(self) -> str | None:
        return self.chat_templates.get("default")

    @property
    def has_chat_template(self) -> bool:
        return self.chat_template is not None

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True, tools=None, **kwargs):
        """Render `messages` with the chat template; token ids if `tokenize`, else the prompt text.

        Extra keyword arguments (e.g. enable_thinking=False) become template variables, as in transformers."""
        # transformers picks a "tool_use" template when tools are given and the model has one.
        template = self.chat_templates.get("tool_use") if tools is not None else None
        template = template or self.chat_template
        if template is None:
            raise TemplateError("this tokenizer has no chat template")
        if not messages:
            raise TemplateError("cannot apply a chat template to an empty conversation")
        if tools is not None and not all(isinstance(t, dict) for t in tools):
            raise TemplateError("tools must be JSON-schema dicts")
        text = render_chat(template, messages, tools, add_generation_prompt, {**self.template_vars, **kwargs})
        return self.encode(text) if tokenize else text

    def token_bytes(self, token: int) -> bytes:
        """The bytes a token stands for (maybe part of a UTF-8 character; the server's logprobs show them)."""
        piece = self.backend.id_to_token(token) or ""
        if token in self.special_ids or any(c not in BYTE_OF_CHAR for c in piece):
            return piece.encode()  # special tokens are stored as their text
        return bytes(BYTE_OF_CHAR[c] for c in piece)


class StreamDecoder:
    """Incremental detokenisation: push ids one at a time, get back the text they complete.

    Decoding one token alone is wrong in two ways: a byte-level BPE token can hold half of a UTF-8 character
    (decoding it gives U+FFFD), and some decoders change a token's text depending on what precedes it.
    So, as text-generation-inference does, we decode a short window: `ids[prefix:]` minus `ids[prefix:read]`,
    where `ids[prefix:read]` is the text already returned for the previous step. While the window's text ends
    in U+FFFD the last character is incomplete and we return nothing yet. The window only spans the tokens
    since the last returned piece, so each push costs O(1) amortised. (The one exception: a long run of
    invalid UTF-8 bytes keeps ending in U+FFFD, so it is held, and the window grows, until a valid character
    follows or flush() is called. The output stays exact.)
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = []  # the window: ids since `prefix`; older ids are dropped
        self.read = 0  # ids[:read] have been returned as text; ids[read:] are pending

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids, self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Append one id; return the newly completed text (possibly "")."""
        self.ids.append(int(token_id))
        prefix_text = self.decode(self.ids[: self.read])
        text = self.decode(self.ids)
        if len(text) <= len(prefix_text) or text.endswith("\ufffd"):
            return ""  # nothing new yet, or a character split across tokens: wait for the rest
        # ids[:read] ended on a character boundary (its text had no trailing U+FFFD): it becomes the prefix.
        self.ids = self.ids[self.read :]
        self.read = len(self.ids)
        return text[len(prefix_text) :]

    def flush(self) -> str:
        """Return whatever is still held back (an incomplete character decodes as U+FFFD) and reset."""
        text = self.decode(self.ids)[len(self.decode(self.ids[: self.read])) :]
        self.ids, self.read = [], 0
        return text


# ---- GGUF vocabularies: llama.cpp's tokenizer (src/llama-vocab.cpp) rebuilt with `tokenizers`

# The regexes llama.cpp cuts text with before BPE (llm_tokenizer_bpe), by tokenizer.ggml.pre.
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
# Llama 3, Qwen2 and Qwen3.5: contractions | words | numbers | punctuation | newlines | spaces.
CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|"
SPACES = r"|\s*[\r\n]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = CONTRACTIONS + r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*" + SPACES
QWEN2_SPLIT = CONTRACTIONS + r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*" + SPACES
QWEN35_SPLIT = CONTRACTIONS + r"[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*" + SPACES


class PreTokenizer(NamedTuple):
    """How llama.cpp prepares text for BPE, for one value of tokenizer.ggml.pre."""

    splits: tuple[str, ...]      # regexes applied in turn, each cutting the pieces the one before left
    ignore_merges: bool = False  # a piece that is itself a token is taken whole, not merged up from bytes
    add_bos: bool = False        # add_bos_token when the file does not say
    nfc: bool = False            # normalise to NFC first, as Qwen's own tokenizer.json does; llama.cpp
                                 # does not, so the two differ on text that is not already NFC


LLAMA3 = PreTokenizer((LLAMA3_SPLIT,), ignore_merges=True, add_bos=True)
PRE_TOKENIZERS = {
    "qwen2": PreTokenizer((QWEN2_SPLIT,), nfc=True),
    "qwen35": PreTokenizer((QWEN35_SPLIT,), nfc=True),
    "deepseek-r1-qwen": PreTokenizer((QWEN2_SPLIT,)),
    "smollm": PreTokenizer((r"\p{N}", GPT2_SPLIT)),
    "llama-bpe": LLAMA3, "llama3": LLAMA3, "llama-v3": LLAMA3,
    # llama.cpp also tidies the spaces around punctuation when decoding these two ("clean_spaces").
    "gpt-2": PreTokenizer((GPT2_SPLIT,)),
    "default": PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", GPT2_SPLIT, r"\p{N}+", "[0-9][0-9][0-9]")),
}

# tokenizer.ggml.token_type values (llama.cpp's gguf-py TokenType); the others, 5 UNUSED (the converter's
# "[PAD<id>]" fillers) and 6 BYTE (SentencePiece's "<0xNN>"), are plain vocabulary entries here.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED = 1, 2, 3, 4

# Control token texts llama.cpp ends generation at, whatever the file's eos id says (llama-vocab.cpp,
# special_eog_ids). llama.cpp takes them even when the file types them as ordinary tokens; we do not: in
# Qwen's vocabulary "</s>" is the ordinary HTML tag, and a model writing HTML must not stop at it.
END_OF_TURN_TEXTS = frozenset((
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<\uff5cend\u2581of\u2581sentence\uff5c>", "[e~[",
))


def gguf_backend(gguf: "GGUFFile") -> tokenizers.Tokenizer:
    """A byte-level BPE tokenizer (tokenizer.ggml.model "gpt2") from a GGUF's metadata:

        tokens       id -> text, in GPT-2's byte alphabet       merges      "left right", by rank
        token_type   CONTROL / UNKNOWN -> special added tokens, USER_DEFINED -> added tokens (both matched
                     whole in the text, before pre-tokenization, as llama.cpp does); NORMAL, UNUSED -> BPE
        pre          the pre-tokenizer, from PRE_TOKENIZERS; an unknown one is refused, not guessed
        add_bos_token, add_eos_token   what encode(add_special_tokens=True) adds
    """
    meta, path = gguf.metadata, gguf.path
    model = meta.get("tokenizer.ggml.model")
    if not (isinstance(model, str) and model == "gpt2"):
        raise CheckpointError(f"{path}: tokenizer.ggml.model is {model!r}; minqwen reads byte-level BPE "
                              "vocabularies (\"gpt2\") only")
    pre = meta.get("tokenizer.ggml.pre")
    if not (isinstance(pre, str) and pre in PRE_TOKENIZERS):
        said = "is missing (llama.cpp would guess, warning that quality degrades)" if pre is None \
            else f"is {pre!r}, which minqwen does not know"
        raise CheckpointError(f"{path}: tokenizer.ggml.pre {said}; known: {', '.join(PRE_TOKENIZERS)}")
    spec = PRE_TOKENIZERS[pre]
    tokens = _strings(gguf, "tokenizer.ggml.tokens")
    merges = _strings(gguf, "tokenizer.ggml.merges")
    types = _token_types(gguf, len(tokens))
    vocab = {token: i for i, token in enumerate(tokens)}
    pairs = [tuple(merge.split(" ", 1)) for merge in merges]
    # `tokenizers` panics (an uncatchable BaseException) at a merge whose result is not a token: check.
    if not (all(map((2).__eq__, map(len, pairs))) and all(map(vocab.__contains__, map("".join, pairs)))):
        bad = next(i for i, pair in enumerate(pairs) if len(pair) != 2 or "".join(pair) not in vocab)
        raise CheckpointError(f"{path}: tokenizer.ggml.merges[{bad}] = {merges[bad][:40]!r} is not two "
                              "tokens, separated by a space, that join into a third")
    try:
        backend = tokenizers.Tokenizer(models.BPE(vocab, pairs, ignore_merges=spec.ignore_merges))
    except Exception as e:  # the Rust side raises a bare Exception, e.g. for a merge of unknown tokens
        raise CheckpointError(f"{path}: tokenizer.ggml.merges: {one_line(e)}") from None
    if spec.nfc:
        backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split), behavior="isolated") for split in spec.splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    special = (types == CONTROL) | (types == UNKNOWN)
    backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                for i in np.flatnonzero(special)])
    backend.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                        for i in np.flatnonzero((types == USER_DEFINED) & ~special)])
    backend.post_processor = _bos_and_eos(gguf, tokens, spec.add_bos)
    return backend


def _bos_and_eos(gguf: "GGUFFile", tokens: list[str], add_bos: bool) -> processors.TemplateProcessing | None:
    """What encode(add_special_tokens=True) puts around the text: BOS and EOS as add_bos_token and
    add_eos_token say, else as llama.cpp defaults (`add_bos`, no EOS)."""
    single, special = ["$A"], []
    for name, default in (("bos", add_bos), ("eos", False)):
        key = f"tokenizer.ggml.add_{name}_token"
        add = gguf.metadata.get(key, default)
        if not isinstance(add, bool):
            raise CheckpointError(f"{gguf.path}: {key} is {add!r}, not a bool")
        if add:
            i = gguf_token_id(gguf, name)
            if i is None:
                raise CheckpointError(f"{gguf.path}: {key} is set, but tokenizer.ggml.{name}_token_id "
                                      "is missing")
            # The template names the token: its text could hold the template syntax's ':'.
            single = [name, *single] if name == "bos" else [*single, name]
            special.append({"id": name, "ids": [i], "tokens": [tokens[i]]})
    return processors.TemplateProcessing(single=single, special_tokens=special) if special else None


def gguf_token_id(gguf: "GGUFFile", name: str) -> int | None:
    """tokenizer.ggml.<name>_token_id (bos, eos, eot, eom, unknown, padding, ...), checked against the
    vocabulary; None when the file has none."""
    key = f"tokenizer.ggml.{name}_token_id"
    value = gguf.metadata.get(key)
    tokens = gguf.metadata.get("tokenizer.ggml.tokens")
    n_tokens = len(tokens) if isinstance(tokens, list) else 0
    if value is not None and not (type(value) is int and 0 <= value < n_tokens):
        raise CheckpointError(f"{gguf.path}: {key} = {value!r} is not a token id of the "
                              f"{n_tokens}-token vocabulary")
    return value


def gguf_end_of_generation_ids(gguf: "GGUFFile") -> list[int]:
    """The ids that end generation, chosen as llama.cpp chooses them (special_eog_ids): the file's eos,
    eot and eom ids, the fill-in-the-middle pad/rep/sep ids, and the control tokens spelled like an end
    of turn (END_OF_TURN_TEXTS). Files name one of several: SmolLM2's says eos = <|im_end|>, and its
    <|endoftext|> ends generation too."""
    tokens = _strings(gguf, "tokenizer.ggml.tokens")
    types = _token_types(gguf, len(tokens))
    named = (gguf_token_id(gguf, name) for name in ("eos", "eot", "eom", "fim_pad", "fim_rep", "fim_sep"))
    spelled = {i for i, token in enumerate(tokens) if token in END_OF_TURN_TEXTS and types[i] == CONTROL}
    return sorted({i for i in named if i is not None} | spelled)


def _token_types(gguf: "GGUFFile", n_tokens: int) -> np.ndarray:
    """tokenizer.ggml.token_type, one per token; all NORMAL when the file has none."""
    types = gguf.metadata.get("tokenizer.ggml.token_type", np.full(n_tokens, NORMAL))
    if not (isinstance(types, np.ndarray) and types.dtype.kind in "iu" and types.shape == (n_tokens,)):
        raise CheckpointError(f"{gguf.path}: tokenizer.ggml.token_type is not {n_tokens} integers, "
                              "one per token")
    return types


def _strings(gguf: "GGUFFile", key: str) -> list[str]:
    value = gguf.metadata.get(key)
    if not (isinstance(value, list) and all(isinstance(s, str) for s in value)):
        what = "missing" if value is None else "not an array of strings"
        raise CheckpointError(f"{gguf.path}: {key} is {what}")
    return value


# ---- chat template rendering, mirroring transformers/utils/chat_template_utils.py


class GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks in transformers;
    for rendering it is transparent, but templates using it must still parse."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("render_body"), [], [], body).set_lineno(lineno)

    def render_body(self, caller):
        return caller()


def raise_exception(message):
    raise TemplateError(f"chat template: {one_line(message)}")


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML (<, >, &, ') and sorts keys; templates expect plain json.dumps.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def strftime_now(format):
    return datetime.now().strftime(format)


@lru_cache
def compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)


def plain(value):
    """A deep copy made of plain JSON types, so the template can neither see rich objects nor edit ours."""
    if isinstance(value, dict):
        return {plain(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def prepare_message(message: dict) -> dict:
    """What transformers does to each message before rendering: drop None values (APIs send content=None)
    and copy the reasoning, under whichever name it came, to both `reasoning_content` and `thinking`."""
    if not isinstance(message, dict):
        raise TemplateError(f"chat messages must be dicts, got {type(message).__name__}")
    message = {k: plain(v) for k, v in message.items() if v is not None}
    reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message


def render_chat(source: str, messages, tools, add_generation_prompt: bool, variables: dict) -> str:
    """Render a chat template; any Jinja failure becomes a one-line TemplateError."""
    try:
        return compile_template(source).render(
            messages=[prepare_message(m) for m in messages],
            tools=plain(tools),
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **plain(variables),
        )
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"chat template line {e.lineno}: {one_line(e.message)}") from None
    except TemplateError:  # from raise_exception: the template's own message
        raise
    except Exception as e:  # undefined variables, sandbox violations, a filter given the wrong type, ...
        raise TemplateError(f"chat template: {type(e).__name__}: {one_line(e)}") from None


def one_line(error) -> str:
    return " ".join(str(error).split())


def byte_of_char() -> dict[str, int]:
    """GPT-2's byte-level BPE (Qwen's) spells every byte as a printable character: the printable
    Latin-1 bytes as themselves, the others as chr(256), chr(257), ... in order. This undoes it."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


BYTE_OF_CHAR = byte_of_char()  # the characters of a byte-level vocabulary -> the bytes they spell
