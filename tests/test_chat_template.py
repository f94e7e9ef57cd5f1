"""Chat templates: our rendering must give the same token ids as transformers' apply_chat_template for every
official Qwen template, over conversations that exercise each branch (system, reasoning, tools, thinking)."""

import copy
import datetime
import itertools
import json
from pathlib import Path

import jinja2
import pytest
import tokenizers

from minqwen.errors import CheckpointError, TemplateError
from minqwen.text.tokenizer import Tokenizer

DATA = Path(__file__).parent / "data"

# template file -> the tokenizer folder it ships with
TEMPLATES = {
    "qwen2.5-instruct.jinja": "qwen2.5",
    "qwen3.jinja": "qwen3",
    "qwen3-initial-2025-04.jinja": "qwen3",
    "qwen3.5.jinja": "qwen3.5",
    "qwen3.5-nothink.jinja": "qwen3.5",
    "qwen3.6.jinja": "qwen3.5",
}

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city. Météo actuelle — 当前天气 <b>&</b>",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "City name"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "search",
            "description": "Search the web.",
            "parameters": {"type": "object",
                           "properties": {"query": {"type": "string"}, "top_k": {"type": "integer"}}},
        },
    },
]

SYSTEM = {"role": "system",
          "content": "You are a helpful assistant. Réponds en français si on te le demande."}
USER = {"role": "user", "content": "What's the weather in Paris? 巴黎天气怎么样？"}
CALL = {
    "role": "assistant",
    "content": "Let me check.",
    "tool_calls": [
        {"type": "function", "function": {"name": "get_weather",
                                          "arguments": {"city": "Paris", "unit": "celsius"}}},
        {"type": "function", "function": {"name": "search",
                                          "arguments": {"query": "Paris météo", "top_k": 3,
                                                        "filters": {"lang": ["fr", "en"]}}}},
    ],
}
RESULTS = [
    {"role": "tool", "content": json.dumps({"temperature": 21, "sky": "clear"})},
    {"role": "tool", "content": "1. Météo-France: 21 °C"},
]

CONVERSATIONS = {
    "single_user": [{"role": "user", "content": "Hi!"}],
    "system": [SYSTEM, {"role": "user", "content": "Hello 👋"}],
    "think_in_content": [
        SYSTEM,
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "<think>\nSimple arithmetic: 2+2=4.\n</think>\n\nIt is 4."},
        {"role": "user", "content": "And 3+3?"},
    ],
    "reasoning_field": [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "It is 4.", "reasoning_content": "2 plus 2 makes 4."},
        {"role": "user", "content": "And 3+3?"},
    ],
    "ends_with_reasoning_assistant": [
        {"role": "user", "content": "Name a prime."},
        {"role": "assistant", "content": "<think>\nsmallest one\n</think>\n\n2", "reasoning_content": None},
        {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": "3", "reasoning_content": "the next one after 2"},
    ],
    "tools": [SYSTEM, USER, CALL, *RESULTS],
    "tools_then_answer": [
        USER,
        {**CALL, "content": "", "reasoning_content": "I need the weather tool."},
        *RESULTS,
        {"role": "assistant", "content": "It is 21 °C and clear in Paris."},
        {"role": "user", "content": "Thanks!"},
    ],
    "tool_call_without_content": [USER,
                                  {"role": "assistant", "content": None, "tool_calls": CALL["tool_calls"]},
                                  RESULTS[0]],
}
USES_TOOLS = {"tools", "tools_then_answer", "tool_call_without_content"}
THINKING = {"unset": {}, "on": {"enable_thinking": True}, "off": {"enable_thinking": False},
            "preserve": {"preserve_thinking": True}}  # Qwen3.6 keeps earlier turns' reasoning on request


def tiny_backend() -> tokenizers.Tokenizer:
    """A byte-level BPE with no merges (one token per byte) and the ChatML specials: loads instantly."""
    alphabet = sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet())
    backend = tokenizers.Tokenizer(tokenizers.models.BPE({c: i for i, c in enumerate(alphabet)}, []))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    backend.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    return backend


@pytest.fixture()
def tiny_dir(tmp_path):
    tiny_backend().save(str(tmp_path / "tokenizer.json"))
    return tmp_path


@pytest.fixture(scope="module")
def pairs():
    """folder name -> (ours with the folder's template, transformers' tokenizer), loaded once."""
    from transformers import AutoTokenizer

    folders = sorted(set(TEMPLATES.values()))
    return {f: (Tokenizer.from_dir(DATA / "tokenizers" / f),
                AutoTokenizer.from_pretrained(DATA / "tokenizers" / f))
            for f in folders}


def with_template(tokenizer: Tokenizer, template: str) -> Tokenizer:
    """Our tokenizer with another template, without re-reading tokenizer.json (from_dir does the same)."""
    return Tokenizer(tokenizer.backend, {"default": template}, tokenizer.template_vars)


def theirs_apply(theirs, messages, **kwargs):
    return theirs.apply_chat_template(copy.deepcopy(messages), return_dict=False, **kwargs)


# The first Qwen3 template reads message.content unconditionally, so it fails (in transformers too) on an
# assistant turn with tool calls and no content; every other template renders every conversation.
FAILS_IN_TRANSFORMERS = {("qwen3-initial-2025-04.jinja", "tool_call_without_content")}


@pytest.mark.parametrize("template_file", TEMPLATES)
def test_chat_template_matches_transformers(pairs, template_file):
    template = (DATA / "templates" / template_file).read_text()
    ours, theirs = pairs[TEMPLATES[template_file]]
    ours = with_template(ours, template)
    rendered = 0
    for (conv, messages), (mode, thinking), generation_prompt in itertools.product(
        CONVERSATIONS.items(), THINKING.items(), (True, False)
    ):
        tools = TOOLS if conv in USES_TOOLS else None
        kwargs = dict(tools=tools, add_generation_prompt=generation_prompt, **thinking)
        where = (template_file, conv, mode, generation_prompt)
        if (template_file, conv) in FAILS_IN_TRANSFORMERS:
            with pytest.raises(jinja2.TemplateError):
                theirs_apply(theirs, messages, chat_template=template, **kwargs)
            with pytest.raises(TemplateError):
                ours.apply_chat_template(messages, **kwargs)
            continue
        expected_text = theirs_apply(theirs, messages, chat_template=template, tokenize=False, **kwargs)
        expected_ids = theirs_apply(theirs, messages, chat_template=template, tokenize=True, **kwargs)
        original = copy.deepcopy(messages)
        assert ours.apply_chat_template(messages, tokenize=False, **kwargs) == expected_text, where
        assert ours.apply_chat_template(messages, **kwargs) == expected_ids, where
        assert messages == original, "apply_chat_template must not modify the caller's messages"
        rendered += 1
    assert rendered >= (len(CONVERSATIONS) - 1) * len(THINKING) * 2


@pytest.mark.parametrize("template_file",
                         ["qwen2.5-instruct.jinja", "qwen3.jinja", "qwen3-initial-2025-04.jinja"])
def test_tool_call_arguments_as_json_string(pairs, template_file):
    # OpenAI-style APIs send arguments as a JSON string; the Qwen2.5/3 templates print it verbatim.
    template = (DATA / "templates" / template_file).read_text()
    ours, theirs = pairs[TEMPLATES[template_file]]
    call = {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Zürich"}'}}
    messages = [USER, {"role": "assistant", "content": "", "tool_calls": [call]}, RESULTS[0]]
    expected = theirs_apply(theirs, messages, chat_template=template, tools=TOOLS, add_generation_prompt=True)
    assert with_template(ours, template).apply_chat_template(messages, tools=TOOLS) == expected


def test_reasoning_under_other_names_is_aliased(pairs):
    # transformers copies `thinking` / `reasoning` to `reasoning_content`, which the Qwen templates read.
    ours, theirs = pairs["qwen3"]
    for field in ("thinking", "reasoning"):
        messages = [USER, {"role": "assistant", "content": "Sunny.", field: "I looked it up."}]
        expected = theirs_apply(theirs, messages, add_generation_prompt=False, tokenize=False)
        assert "I looked it up." in expected
        assert ours.apply_chat_template(messages, add_generation_prompt=False, tokenize=False) == expected


@pytest.mark.parametrize("folder", ["qwen2.5", "qwen3", "qwen3.5"])
def test_folder_template_is_used_by_default(pairs, folder):
    ours, theirs = pairs[folder]
    assert ours.has_chat_template and ours.chat_template == theirs.chat_template
    messages = CONVERSATIONS["think_in_content"]
    assert ours.apply_chat_template(messages) == theirs_apply(theirs, messages, add_generation_prompt=True)


def test_multimodal_text_parts_match_transformers(pairs):
    ours, theirs = pairs["qwen3.5"]
    messages = [{"role": "user", "content": [{"type": "text", "text": "Describe "},
                                             {"type": "text", "text": "this."}]}]
    assert ours.apply_chat_template(messages) == theirs_apply(theirs, messages, add_generation_prompt=True)


def test_template_raise_exception_becomes_template_error(pairs):
    ours, theirs = pairs["qwen3.5"]
    messages = [SYSTEM]  # the Qwen3.5 template requires a user query
    with pytest.raises(jinja2.TemplateError, match="No user query found"):
        theirs_apply(theirs, messages)
    with pytest.raises(TemplateError, match="No user query found in messages"):
        ours.apply_chat_template(messages)


@pytest.mark.parametrize(
    "template, pattern",
    [
        ("{% for m in messages %}{{ m.content }", "line 1"),  # syntax error
        ("{% if %}\n{% endif %}", "line 1"),
        ("{{ messages[0].content.nope.deeper }}", "has no attribute 'nope'"),
        ("{{ messages.__class__.__mro__ }}", "unsafe"),  # the sandbox hides private attributes
        ("{{ raise_exception('bad\nrole') }}", "bad role"),
    ],
)
def test_template_errors_are_one_line_template_errors(tiny_dir, template, pattern):
    ours = Tokenizer.from_dir(tiny_dir, chat_template=template)
    with pytest.raises(TemplateError, match=pattern) as error:
        ours.apply_chat_template([{"role": "user", "content": "x"}])
    assert "\n" not in str(error.value)


def test_sandbox_rejects_unsafe_calls(tiny_dir):
    ours = Tokenizer.from_dir(tiny_dir, chat_template="{{ messages.append(1) }}")  # immutable sandbox
    with pytest.raises(TemplateError):
        ours.apply_chat_template([{"role": "user", "content": "x"}])


def test_environment_features_match_transformers(pairs):
    """tojson arguments, loop controls, generation blocks, special-token variables, kwargs:
    as transformers."""
    ours, theirs = pairs["qwen2.5"]
    template = (
        "{{ bos_token is defined }} {{ eos_token }} {{ pad_token }} {{ custom }}\n"
        "{{ messages[0] | tojson }}\n{{ messages[0] | tojson(indent=2, sort_keys=true) }}\n"
        "{{ tools | tojson(separators=(',', ':')) }}\n{{ messages[0].content | tojson(ensure_ascii=true) }}\n"
        "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
        "{% if m.role == 'system' %}{% continue %}{% endif %}[{{ m.content }}]{% endfor %}\n"
        "{% generation %}{{ messages[-1].content | trim }}{% endgeneration %}\n"
        "{{ add_generation_prompt }} {{ documents }}\n"
        "{% for m in messages %}\n    {% if m.role != 'system' %}\n  {{ m.role }}\n"
        "    {% endif %}\n{% endfor %}\n"
    )
    # "gone": None is dropped before rendering (APIs send content=None), so tojson must not show it.
    messages = [{"role": "user", "content": "<b>é & 中\"'</b>", "z": 1, "a": [1.5, None, True], "gone": None},
                SYSTEM, {"role": "user", "content": "  last  "}]
    kwargs = dict(tools=TOOLS, add_generation_prompt=False, custom={"k": "v"})
    expected = theirs_apply(theirs, messages, chat_template=template, tokenize=False, **kwargs)
    assert "<|im_end|>" in expected and "False" in expected
    assert with_template(ours, template).apply_chat_template(messages, tokenize=False, **kwargs) == expected


def test_strftime_now(tiny_dir):
    ours = Tokenizer.from_dir(tiny_dir, chat_template="{{ strftime_now('%Y-%m-%d') }}")
    before = datetime.date.today().isoformat()
    text = ours.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    assert text in (before, datetime.date.today().isoformat())


def test_template_sources_and_precedence(tiny_dir):
    user = [{"role": "user", "content": "x"}]
    ours = Tokenizer.from_dir(tiny_dir)
    assert not ours.has_chat_template and ours.chat_template is None
    with pytest.raises(TemplateError, match="no chat template"):
        ours.apply_chat_template(user)

    config = {"eos_token": {"content": "<|im_end|>", "special": True}, "bos_token": None,
              "chat_template": [{"name": "default", "template": "D{{ eos_token }}{{ bos_token is defined }}"},
                                {"name": "tool_use", "template": "T"}]}
    (tiny_dir / "tokenizer_config.json").write_text(json.dumps(config))
    ours = Tokenizer.from_dir(tiny_dir)
    assert ours.has_chat_template and ours.chat_template.startswith("D")
    assert ours.apply_chat_template(user, tokenize=False) == "D<|im_end|>False"
    # transformers' named-template rule
    assert ours.apply_chat_template(user, tokenize=False, tools=TOOLS) == "T"
    assert ours.apply_chat_template(user) == ours.encode("D<|im_end|>False")
    assert ours.apply_chat_template(user)[1] == ours.token_to_id("<|im_end|>")

    (tiny_dir / "chat_template.jinja").write_text("J{{ messages | length }}")
    assert Tokenizer.from_dir(tiny_dir).apply_chat_template(user, tokenize=False) == "J1"
    override = Tokenizer.from_dir(tiny_dir, chat_template="O{{ add_generation_prompt }}")
    assert override.chat_template == "O{{ add_generation_prompt }}"
    assert override.apply_chat_template(user, tokenize=False) == "OTrue"
    with pytest.raises(TemplateError, match="empty"):
        override.apply_chat_template([])


def test_corrupt_tokenizer_config_is_a_checkpoint_error(tiny_dir):
    (tiny_dir / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="tokenizer_config.json"):
        Tokenizer.from_dir(tiny_dir)
