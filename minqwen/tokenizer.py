"""Text <-> token ids, streaming detokenisation, and chat templates.

Qwen ships a byte-level BPE tokenizer in Hugging Face `tokenizer.json` format; the `tokenizers` library runs
it (BPE is not ours to re-implement). This file adds what an inference engine needs around it:

- `StreamDecoder`: turns generated ids into text piece by piece, never splitting a UTF-8 character.
- `apply_chat_template`: renders a conversation with the model's Jinja chat template exactly as
  transformers does (same sandbox, options, filters and globals), so the prompt ids match token for token.
"""

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.nodes
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import CheckpointError, TemplateError

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

    # ---- text <-> ids

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`. Qwen adds no BOS; special tokens written in the text become their ids."""
        return self.backend.encode(text, add_special_tokens=False).ids

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
