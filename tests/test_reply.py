"""Generated tokens -> text (minqwen/text/reply.py): stop strings over a stand-in decoder; reasoning and
tool-call parsing on scripted token streams with the real Qwen tokenizers (random weights never write
these markers, so the scripts stand in for a model)."""
from __future__ import annotations

import json

import pytest

from checkpoints import DATA
from minqwen.text.reply import Delta, Reply, StopStrings, parse_tool_call, typed
from minqwen.text.tokenizer import Tokenizer

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather forecast",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"}, "hourly": {"type": "boolean"},
        "units": {"anyOf": [{"type": "string"}, {"type": "null"}]}, "hours": {"type": "array"},
        "scale": {"type": "number"}}, "required": ["city"]}}}
USER = [{"role": "user", "content": "Weather in Paris?"}]


class Pieces:
    """A stand-in stream decoder: token i decodes to pieces[i]."""

    def __init__(self, pieces):
        self.pieces = pieces

    def push(self, token):
        return self.pieces[token]

    def flush(self):
        return ""


def shown(pieces, stops, final=True):
    text = StopStrings(stops, Pieces(pieces))
    out = []
    for token in range(len(pieces)):
        out.append(text.push(token))
        if text.found is not None:
            break
    if final:
        out.append(text.flush())
    return out, text.found


def test_stop_string_is_cut_out_across_tokens():
    out, found = shown(["Hello", " wor", "ld. ", "More"], ["world"])
    assert "".join(out) == "Hello " and found == "world"


def test_text_that_may_start_a_stop_string_is_held_back():
    # " wor" could begin "world": it is not shown until the next piece settles it
    out, found = shown(["Hello", " wor", "m"], ["world"], final=False)
    assert out == ["Hello", " ", "worm"] and found is None


def test_held_text_is_released_at_the_end():
    out, found = shown(["abc", "wo"], ["world"])
    assert out == ["abc", "", "wo"] and found is None


def test_earliest_stop_string_wins_and_text_after_it_is_dropped():
    out, found = shown(["a STOP b END c"], ["END", "STOP"])
    assert "".join(out) == "a " and found == "STOP"


def test_no_stop_strings_is_a_plain_decoder():
    out, found = shown(["x", "y"], [])
    assert out == ["x", "y", ""] and found is None


@pytest.fixture(scope="module")
def tokenizers():
    return {name: Tokenizer.from_dir(DATA / "tokenizers" / name) for name in ("qwen2.5", "qwen3", "qwen3.5")}


def run(tokenizer, prompt, script, stop=(), tools=None, ids=None):
    """Feed the script's token ids one by one; returns (the whole reply, the deltas, the Reply)."""
    reply = Reply(tokenizer, prompt, list(stop), tools)
    deltas = []
    for token in ids if ids is not None else tokenizer.encode(script):
        deltas.append(reply.push(token))
        if reply.stopped:
            break
    deltas.append(reply.finish())
    whole = Delta("".join(d.reasoning for d in deltas), "".join(d.content for d in deltas),
                  [c for d in deltas for c in d.tool_calls])
    return whole, deltas, reply


def arguments(call):
    assert call["type"] == "function" and call["id"].startswith("call_") and len(call["id"]) == 29
    return call["function"]["name"], json.loads(call["function"]["arguments"])


def test_qwen3_writes_its_own_think_tag(tokenizers):
    tok = tokenizers["qwen3"]
    prompt = tok.apply_chat_template(USER)  # ends with "<|im_start|>assistant\n": the model opens <think>
    script = "<think>\nThe user asks.\nTwo lines.\n</think>\n\nIt is sunny.\n\nReally.<|im_end|>"
    whole, deltas, reply = run(tok, prompt, script)
    assert whole == Delta("The user asks.\nTwo lines.", "It is sunny.\n\nReally.")
    ids = tok.encode(script)
    assert reply.reasoning_tokens == ids.index(tok.token_to_id("</think>"))  # after <think>, to </think>
    assert not any("think>" in d.content + d.reasoning for d in deltas)


def test_qwen35_prompt_opens_think_and_the_model_only_closes_it(tokenizers):
    tok = tokenizers["qwen3.5"]
    prompt = tok.apply_chat_template(USER)
    assert tok.decode(prompt).endswith("<think>\n")
    whole, _, reply = run(tok, prompt, "Short thought.\n</think>\n\nSunny.")
    assert whole == Delta("Short thought.", "Sunny.")
    off = tok.apply_chat_template(USER, enable_thinking=False)  # "<think>\n\n</think>\n\n": content only
    assert run(tok, off, "Sunny.")[0] == Delta("", "Sunny.")


def test_reasoning_cut_by_the_length_limit_stays_reasoning(tokenizers):
    tok = tokenizers["qwen3.5"]
    whole = run(tok, tok.apply_chat_template(USER), "Still thinking about")[0]
    assert whole == Delta("Still thinking about", "")


def test_marker_text_spelled_in_pieces_is_content(tokenizers):
    tok = tokenizers["qwen3"]
    ids = tok.encode("Write <") + tok.encode("think>") + tok.encode(" in HTML.")
    assert tok.token_to_id("<think>") not in ids
    assert run(tok, tok.apply_chat_template(USER), "", ids=ids)[0] == Delta("", "Write <think> in HTML.")


@pytest.mark.parametrize("name", ["qwen2.5", "qwen3"])
def test_hermes_tool_calls(tokenizers, name):
    tok = tokenizers[name]
    prompt = tok.apply_chat_template(USER, tools=[WEATHER])
    script = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}'
              '\n</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lyon"}}\n'
              "</tool_call><|im_end|>")
    whole, deltas, _ = run(tok, prompt, script, tools=[WEATHER])
    assert whole.content == "Let me check." and whole.reasoning == ""
    assert [arguments(c) for c in whole.tool_calls] == [("get_weather", {"city": "Paris", "days": 2}),
                                                        ("get_weather", {"city": "Lyon"})]
    assert sum(1 for d in deltas if d.tool_calls) == 2  # each call whole, in the delta of its closing tag
    # without tools in the request, the same text is content
    assert "<tool_call>" in run(tok, prompt, script)[0].content


def test_qwen35_xml_tool_call_typed_by_the_schema(tokenizers):
    tok = tokenizers["qwen3.5"]
    prompt = tok.apply_chat_template(USER, tools=[WEATHER])
    script = ("I need the forecast.\n</think>\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\n"
              "Paris\n</parameter>\n<parameter=days>\n2\n</parameter>\n<parameter=hourly>\nTrue\n</parameter>\n"
              "<parameter=units>\nnull\n</parameter>\n<parameter=hours>\n[9, 12]\n</parameter>\n"
              "<parameter=scale>\n1.5\n</parameter>\n<parameter=note>\nline one\n</parameter> stays\n"
              "</parameter>\n</function>\n</tool_call>")
    whole, _, _ = run(tok, prompt, script, tools=[WEATHER])
    assert whole.reasoning == "I need the forecast." and whole.content == ""
    assert arguments(whole.tool_calls[0]) == ("get_weather", {
        "city": "Paris", "days": 2, "hourly": True, "units": None, "hours": [9, 12], "scale": 1.5,
        "note": "line one\n</parameter> stays"})


def test_a_tool_call_inside_reasoning_ends_it(tokenizers):
    tok = tokenizers["qwen3.5"]
    script = ("Call it.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nRome\n</parameter>\n"
              "</function>\n</tool_call>")
    whole, _, _ = run(tok, tok.apply_chat_template(USER, tools=[WEATHER]), script, tools=[WEATHER])
    assert whole.reasoning == "Call it."
    assert arguments(whole.tool_calls[0]) == ("get_weather", {"city": "Rome"})


def test_a_call_that_does_not_parse_is_returned_as_content(tokenizers):
    tok = tokenizers["qwen3"]
    script = '<tool_call>\n{"name": "get_weather", "arguments": {"city": \n</tool_call>'
    whole, _, _ = run(tok, tok.apply_chat_template(USER, enable_thinking=False), script, tools=[WEATHER])
    assert whole.tool_calls == [] and whole.content == script


def test_stop_string_ends_the_reply_before_it(tokenizers):
    tok = tokenizers["qwen3"]
    whole, _, reply = run(tok, tok.apply_chat_template(USER, enable_thinking=False),
                          "The answer is 4. Next question", stop=["Next"])
    assert reply.stopped and whole == Delta("", "The answer is 4. ")


def test_completions_keep_everything_as_text(tokenizers):
    tok = tokenizers["qwen3"]
    reply = Reply(tok, [1, 2], [], chat=False)
    text = "<think>\nx\n</think>\n\ny"
    pieces = [reply.push(t).content for t in tok.encode(text)] + [reply.finish().content]
    assert "".join(pieces) == text


def test_parse_tool_call_rejects_what_is_not_a_call():
    assert parse_tool_call('{"arguments": {}}', []) is None  # no name
    assert parse_tool_call('{"name": "{{ name }}", "arguments": {}}', []) is None  # unrendered template
    assert parse_tool_call("<function=>\n</function>", []) is None
    as_text = parse_tool_call('{"name": "f", "arguments": "{\\"a\\": 1}"}', [])
    assert as_text == {"name": "f", "arguments": '{"a": 1}'}
    assert parse_tool_call('{"name": "f"}', []) == {"name": "f", "arguments": "{}"}


@pytest.mark.parametrize("value, schema, expected", [
    ("12", {"type": "integer"}, 12), ("twelve", {"type": "integer"}, "twelve"),
    ("2.0", {"type": "number"}, 2),
    ("false", {"type": "boolean"}, False), ('{"a": [1]}', {"type": "object"}, {"a": [1]}),
    ("{'a': 1}", {"type": "object"}, {"a": 1}), ("null", {"type": "string"}, "null"),
    ("null", {"type": ["string", "null"]}, None), ("None", {"type": "integer"}, None),
    ("inf", {"type": "number"}, "inf"), ("007", None, "007"), ("[1, 2", {"type": "array"}, "[1, 2"),
])
def test_parameter_values_take_their_schema_type(value, schema, expected):
    assert typed(value, schema) == expected and type(typed(value, schema)) is type(expected)
