"""Tool calls constrained by the tools' schemas (text/constraints.py: tool_call_grammar): random-weight
models, whose calls are only valid if the constraint holds, make calls that Reply parses and whose
arguments validate against the function's parameters, in both Qwen forms (Qwen2.5/3's hermes JSON; the
XML of Qwen3.5/3.6 and Qwen3-Coder, each value typed by its schema), across seeds and sampling settings;
"required", a named function, "auto" once the model opens a call, parallel calls or one; through the
server too, where a tool whose parameters cannot be enforced is a 400 naming it."""
from __future__ import annotations

import json
import re
import shutil

import jsonschema
import numpy as np
import pytest
from test_constraints import SAMPLING, pointing_at
from test_server import client, raw, running

import minqwen
from checkpoints import DATA, chat_checkpoint
from minqwen.errors import ConstraintError
from minqwen.text.constraints import Constraint, xml_calls
from minqwen.text.generation import GenerationOptions, Sampler
from minqwen.text.reply import Reply

# Every value is bounded (enums, maxLength, maxItems, integer ranges), so a random model's calls end.
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object",
    "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 12},
                   "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                   "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "unit"], "additionalProperties": False}}}
BOOK = {"type": "function", "function": {"name": "book_room", "parameters": {
    "type": "object",
    "$defs": {"guest": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 18, "maximum": 99}},
        "required": ["name", "age"], "additionalProperties": False}},
    "properties": {"guest": {"$ref": "#/$defs/guest", "type": "object"},
                   "nights": {"type": "integer", "minimum": 1, "maximum": 14},
                   "extras": {"type": "array", "items": {"enum": ["breakfast", "parking"]}, "maxItems": 2},
                   "vip": {"type": "boolean"},
                   "code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]$"},
                   "note": {"type": ["string", "null"], "maxLength": 10},
                   "rate": {"type": "number", "minimum": 0, "maximum": 5}},
    "required": ["guest", "nights", "vip", "code"], "additionalProperties": False}}}
TOOLS = [WEATHER, BOOK]
USER = [{"role": "user", "content": "Book me a room and tell me the weather."}]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """Tiny random-weight Qwen3 models: one with its own template (hermes JSON calls), one with Qwen3.5's
    (XML calls, as Qwen3-Coder writes them too); and a Qwen2.5 (hermes)."""
    hermes = chat_checkpoint(tmp_path_factory.mktemp("qwen3"), "qwen3")
    xml = tmp_path_factory.mktemp("qwen3-xml") / "model"
    shutil.copytree(hermes, xml)
    shutil.copy(DATA / "templates" / "qwen3.5.jinja", xml / "chat_template.jinja")
    qwen25 = chat_checkpoint(tmp_path_factory.mktemp("qwen2.5"), "qwen2.5")
    for folder in (hermes, xml, qwen25):  # room for the tools' descriptions in the prompt
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 2048}))
    return {"hermes": minqwen.load(hermes), "xml": minqwen.load(xml), "qwen2.5": minqwen.load(qwen25)}


def prompt_of(model, tools=TOOLS) -> list[int]:
    return model.tokenizer.apply_chat_template(USER, tools=tools, enable_thinking=False)


def constraint_of(model, tools=TOOLS, **given) -> Constraint:
    return Constraint(model.tokenizer, model.config.vocab_size, model.eos_token_ids, tools=tools, **given)


def reply_to(model, constraint, tools=TOOLS, max_new=300, opening=(), **sampling) -> tuple[list, str, list]:
    """The model's reply under `constraint` (its first tokens `opening`, forced): its tool calls (without
    a last one cut by `max_new`: a random model may call and call again), its content, the tokens
    written."""
    prompt, tok = prompt_of(model, tools), model.tokenizer
    sampler = Sampler(GenerationOptions(**sampling), prompt, model.config.vocab_size, max_new,
                      model.eos_token_ids, constraint)
    sampler.forced = list(opening)
    reply, sequence, written = Reply(tok, prompt, [], tools), model.sequence(), []
    logits = sequence.extend(prompt)
    while sampler.finish_reason is None:
        written.append(sampler.next(logits))
        logits = sequence.extend(written[-1:])
    deltas = [reply.push(token) for token in written] + [reply.finish()]
    content, calls = "".join(d.content for d in deltas), reply.tool_calls
    if sampler.finish_reason == "length":  # parallel calls may go on: the last one is cut (and dropped)
        assert written.count(reply.markers.end_tool_call) >= 1, content
        assert content.startswith("<tool_call>") and "</tool_call>" not in content or not content, content
        content = ""
        calls = calls[:written.count(reply.markers.end_tool_call)]
    return calls, content, written


def assert_valid_calls(calls: list[dict], names, tools=TOOLS):
    """There are calls; each names one of `names`, and its arguments validate."""
    assert calls, "no call"
    parameters = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    for call in calls:
        assert call["function"]["name"] in names
        jsonschema.validate(json.loads(call["function"]["arguments"]), parameters[call["function"]["name"]])


@pytest.mark.parametrize("sampling", SAMPLING)
@pytest.mark.parametrize("form", ["hermes", "xml", "qwen2.5"])
def test_required_and_named_calls_validate_across_seeds_and_sampling(models, form, sampling):
    model = models[form]
    assert xml_calls(model.tokenizer) == (form == "xml")
    for call, names in (("", ("get_weather", "book_room")), ("book_room", ("book_room",)),
                        ("get_weather", ("get_weather",))):
        for seed in range(3):
            parallel = seed != 1
            calls, content, _ = reply_to(model, constraint_of(model, call=call, parallel=parallel), seed=seed,
                                         **SAMPLING[sampling])
            assert_valid_calls(calls, names)
            assert content == ""  # nothing but calls
            assert parallel or len(calls) == 1


def test_calls_are_written_as_the_template_renders_them(models):
    """What the constrained model writes is what the chat template renders for the same calls."""
    for form in ("hermes", "xml"):
        model, tok = models[form], models[form].tokenizer
        calls, _, written = reply_to(model, constraint_of(model, call="get_weather", parallel=False), seed=3,
                                     temperature=1.0)
        message = {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": c["function"]["name"],
                                              "arguments": json.loads(c["function"]["arguments"])}}
            for c in calls]}
        rendered = tok.decode(tok.apply_chat_template(USER + [message], tools=TOOLS,
                                                      add_generation_prompt=False, enable_thinking=False))
        assert tok.decode(written[:-1]) in rendered, (tok.decode(written), rendered)


def allowed_after(constraint, prompt, tokens) -> np.ndarray:
    """Whether each token id may come after `tokens` (the answer so far)."""
    state = constraint.start(prompt)
    for token in tokens:
        state.consume(token)
    logits = np.zeros(constraint.vocab_size, np.float32)
    state.mask(logits)
    return logits == 0


@pytest.mark.parametrize("form", ["hermes", "xml"])
def test_parallel_calls_follow_each_other_unless_parallel_tool_calls_is_false(models, form):
    model, tok = models[form], models[form].tokenizer
    prompt = prompt_of(model)
    one_call = ('\n<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n<parameter=unit>\ncelsius\n'
                '</parameter>\n</function>\n' if form == "xml"
                else '\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}\n')
    call = [tok.token_to_id("<tool_call>"), *tok.encode(one_call), tok.token_to_id("</tool_call>")]
    newline, end = tok.encode("\n")[0], model.eos_token_ids[0]
    for parallel in (True, False):
        allowed = allowed_after(constraint_of(model, call="", parallel=parallel), prompt, call)
        assert allowed[end] and allowed[newline] == parallel
        assert allowed.sum() == 1 + parallel + (len(set(model.eos_token_ids)) - 1)
    # Parallel: a second call, then the end; a second call to another function than the one named is not
    assert allowed_after(constraint_of(model), prompt, call + [newline] + call)[end]
    named = allowed_after(constraint_of(model, call="book_room"), prompt, [call[0], *tok.encode(
        '\n<function=' if form == "xml" else '\n{"name": "')])
    assert not named[tok.encode("get")[0]]


@pytest.mark.parametrize("form", ["hermes", "xml"])
def test_auto_lets_the_model_answer_in_text_and_constrains_a_call_once_it_opens(models, form):
    model, tok = models[form], models[form].tokenizer
    constraint = constraint_of(model)  # "auto"
    prompt = prompt_of(model)
    text = allowed_after(constraint, prompt, tok.encode("Sure, one moment"))
    assert text[tok.encode(" please")[0]] and all(text[i] for i in model.eos_token_ids)
    assert text[tok.token_to_id("<tool_call>")]
    for seed in range(3):  # the model opens a call (forced), after some text or at once
        opening = tok.encode("Let me check.") * (seed % 2) + [tok.token_to_id("<tool_call>")]
        calls, content, _ = reply_to(model, constraint, opening=opening, seed=seed, temperature=1.0)
        assert_valid_calls(calls, ("get_weather", "book_room"))
        assert content == "Let me check." * (seed % 2)
    # with thinking on (Qwen3's template): a call the model opens inside <think> ends it, and is constrained
    think_prompt = model.tokenizer.apply_chat_template(USER, tools=TOOLS)
    sampler = Sampler(GenerationOptions(), think_prompt, model.config.vocab_size, 300, model.eos_token_ids,
                      constraint)
    hello = tok.encode("hello")[0]
    chosen = [sampler.next(pointing_at(model, t)) for t in (tok.token_to_id("<think>"), hello,
                                                            tok.token_to_id("<tool_call>"), hello, hello)]
    assert chosen[:3] == [tok.token_to_id("<think>"), hello, tok.token_to_id("<tool_call>")]
    assert hello not in chosen[3:] and tok.decode(chosen[3:]).startswith("\n")


def test_auto_with_a_response_format_answers_in_the_schema_or_calls(models):
    model, tok = models["hermes"], models["hermes"].tokenizer
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    constraint = constraint_of(model, json_schema=schema)
    prompt = prompt_of(model)
    first = allowed_after(constraint, prompt, [])
    assert first[tok.token_to_id("<tool_call>")] and first[tok.encode('{"')[0]]
    assert not first[tok.encode("Sure")[0]]
    for seed in range(3):
        calls, content, _ = reply_to(model, constraint, opening=tok.encode('{"') if seed else [], seed=seed,
                                     temperature=1.0)
        if seed:
            assert not calls and json.loads(content)["ok"] in (True, False)
        else:
            assert calls or json.loads(content)


@pytest.mark.parametrize("parameters, message", [
    ({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}, "get_time: "),
    ({"type": "object", "properties": {"when": {"type": "string", "format": "date-time"}}},
     "get_time: parameter 'when': format"),
    ({"type": "object", "properties": {"n": {"type": ["integer", "string"]}}}, "get_time: parameter 'n'"),
    ({"type": "object", "properties": {"p": {"$ref": "#/$defs/p"}}, "$defs": {"p": {"type": "integer"}}},
     "get_time: parameter 'p': $ref"),
    ({"type": "object", "minProperties": 1}, "get_time: parameters with keywords minProperties"),
])
def test_a_tool_whose_parameters_cannot_be_enforced_is_a_typed_error_naming_it(models, parameters, message):
    tool = {"type": "function", "function": {"name": "get_time", "parameters": parameters}}
    xml_only = "parameter '" in message or "keywords" in message
    for form in ("xml",) if xml_only else ("hermes", "xml"):
        with pytest.raises(ConstraintError, match=re.escape(message)):
            constraint_of(models[form], tools=[WEATHER, tool], call="")


def test_server_required_and_named_calls_validate_and_an_unenforceable_tool_is_a_400(models):
    no_thinking = {"chat_template_kwargs": {"enable_thinking": False}}
    for form in ("hermes", "xml"):
        with running(models[form]) as server:
            api = client(server)
            named = {"type": "function", "function": {"name": "book_room"}}
            for seed, choice in enumerate(("required", named)):
                fields = dict(model="tiny", messages=USER, tools=TOOLS, tool_choice=choice, temperature=1.0,
                              seed=seed, max_tokens=300, parallel_tool_calls=False, extra_body=no_thinking)
                answer = api.chat.completions.create(**fields).choices[0]
                assert answer.finish_reason == "tool_calls" and not answer.message.content
                calls = [c.model_dump() for c in answer.message.tool_calls]
                assert_valid_calls(calls, ("book_room",) if seed else ("get_weather", "book_room"))
                chunks = list(api.chat.completions.create(**fields, stream=True))
                streamed = [c.function for chunk in chunks for c in chunk.choices[0].delta.tool_calls or []]
                assert [c.model_dump() for c in streamed] == [c["function"] for c in calls]
                assert chunks[-1].choices[0].finish_reason == "tool_calls"
            unenforceable = {"type": "function", "function": {"name": "get_time", "parameters": {
                "type": "object", "properties": {"zone": {"type": "string", "not": {"const": "UTC"}}}}}}
            request = {"messages": USER, "tools": [WEATHER, unenforceable], "tool_choice": "required"}
            status, _, body = raw(server, "POST", "/v1/chat/completions", request)
            assert status == 400 and body["error"]["param"] == "tools", body
            assert "get_time" in body["error"]["message"]
            status, _, body = raw(server, "POST", "/v1/chat/completions",
                                  {"messages": USER, "tools": TOOLS, "parallel_tool_calls": "no"})
            assert status == 400 and body["error"]["param"] == "parallel_tool_calls", body
