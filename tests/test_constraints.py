"""Structured outputs (text/constraints.py): random-weight models, whose output is only valid if the
constraint holds, write documents that validate, under every schema feature llguidance enforces, across
seeds and sampling settings; in the library, the CLI and the server. Broken grammars and schemas with
keywords that cannot be enforced are typed errors, one-line CLI errors and 400s. Thinking stays outside
the constraint. The real SmolLM2 answers a question in valid JSON."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import jsonschema
import numpy as np
import openai
import pytest
from test_server import client, raw, running, scripted

import minqwen
from checkpoints import chat_checkpoint
from minqwen.errors import ConstraintError
from minqwen.formats.gguf import read_gguf
from minqwen.text.constraints import MASKED, Constraint, llg_tokenizer
from minqwen.text.generation import GenerationOptions, Sampler, Stats, stream_tokens
from minqwen.text.speculative import NgramDrafter
from minqwen.text.tokenizer import Tokenizer

# Every schema is bounded (enums, maxLength, maxItems, integer ranges), so a random model's documents
# end: an unbounded string or number could go on past any token limit.
POINT = {"type": "object", "properties": {"x": {"type": "integer", "minimum": -5, "maximum": 5},
                                          "y": {"type": "integer", "minimum": 0, "maximum": 99}},
         "required": ["x", "y"], "additionalProperties": False}
SCHEMAS = {
    "nested objects, arrays, enums": {
        "type": "object",
        "properties": {
            "user": {"type": "object", "properties": {
                "id": {"type": "integer", "minimum": 1, "maximum": 999},
                "name": {"type": "string", "minLength": 1, "maxLength": 6},
                "admin": {"type": "boolean"}},
                "required": ["id", "name", "admin"], "additionalProperties": False},
            "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1,
                     "maxItems": 3}},
        "required": ["user", "tags"], "additionalProperties": False},
    "anyOf and $ref": {
        "$defs": {"point": POINT},
        "type": "object",
        "properties": {
            "shape": {"anyOf": [{"$ref": "#/$defs/point"},
                                {"type": "array", "items": {"$ref": "#/$defs/point"}, "minItems": 2,
                                 "maxItems": 2},
                                {"type": "null"}]},
            "kind": {"enum": ["dot", "line", "none"]}},
        "required": ["shape", "kind"], "additionalProperties": False},
    "pattern and integer range": {
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
                       "count": {"type": "integer", "minimum": 10, "maximum": 20},
                       "level": {"enum": [1, 2, 3]}},
        "required": ["code", "count", "level"], "additionalProperties": False},
    "array of objects": {
        "type": "array", "minItems": 2, "maxItems": 4,
        "items": {"type": "object", "properties": {"k": {"const": "v"}, "n": {"type": "integer", "minimum": 0,
                                                                                "maximum": 9}},
                  "required": ["k", "n"], "additionalProperties": False}},
}
SAMPLING = {
    "greedy": dict(temperature=0.0),
    "temperature 1": dict(temperature=1.0),
    "top-k": dict(temperature=1.0, top_k=5),
    "top-p, min-p, penalties": dict(temperature=1.2, top_p=0.9, min_p=0.01, repetition_penalty=1.3,
                                    presence_penalty=0.5),
}
WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                   "sunny": {"type": "boolean"}},
                  "required": ["city", "sunny"], "additionalProperties": False}


def chat_prompt(model, text="Answer in JSON.", **kwargs):
    return model.tokenizer.apply_chat_template([{"role": "user", "content": text}], **kwargs)


def document(model, tokens) -> str:
    """The text of a complete answer: it must end with an end-of-turn id."""
    assert tokens and tokens[-1] in model.eos_token_ids, f"cut short: {model.tokenizer.decode(tokens)!r}"
    return model.tokenizer.decode(tokens[:-1])


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """Tiny random-weight Qwen2.5 and Qwen3 chat models, with their real tokenizers and templates."""
    return {name: minqwen.load(chat_checkpoint(tmp_path_factory.mktemp(name), name))
            for name in ("qwen2.5", "qwen3")}


@pytest.fixture(scope="module")
def qwen25(models):
    return models["qwen2.5"]


@pytest.fixture(scope="module")
def qwen3(models):
    return models["qwen3"]


@pytest.mark.parametrize("sampling", SAMPLING)
@pytest.mark.parametrize("schema", SCHEMAS)
def test_every_schema_feature_is_enforced_across_seeds_and_sampling(qwen25, qwen3, schema, sampling):
    for model, kwargs in ((qwen25, {}), (qwen3, {"enable_thinking": False})):
        prompt = chat_prompt(model, **kwargs)
        for seed in range(3):
            tokens = model.generate(prompt, 200, json_schema=SCHEMAS[schema], seed=seed, **SAMPLING[sampling])
            jsonschema.validate(json.loads(document(model, tokens)), SCHEMAS[schema])


def test_any_json_object_regex_and_grammars(qwen25):
    prompt = chat_prompt(qwen25)
    for seed in range(3):
        tokens = qwen25.generate(prompt, 100, regex=r"(yes|no): [1-9][0-9]?", temperature=1.0, seed=seed)
        assert re.fullmatch(r"(yes|no): [1-9][0-9]?", document(qwen25, tokens))
        gbnf = 'root ::= answer " " num\nanswer ::= "yes" | "no"\nnum ::= [1-9] [0-9]?\n'
        tokens = qwen25.generate(prompt, 100, grammar=gbnf, temperature=1.0, seed=seed)
        assert re.fullmatch(r"(yes|no) [1-9][0-9]?", document(qwen25, tokens))
        lark = 'start: ANSWER "=" NUM\nANSWER: "yes" | "no"\nNUM: /[1-9][0-9]?/\n'
        tokens = qwen25.generate(prompt, 100, grammar=lark, temperature=1.0, seed=seed)
        assert re.fullmatch(r"(yes|no)=[1-9][0-9]?", document(qwen25, tokens))
        # Any JSON object: a random model may take long to close one; cut, it is still a JSON prefix.
        tokens = qwen25.generate(prompt, 30, json_schema={"type": "object"}, temperature=1.0, seed=seed)
        assert qwen25.tokenizer.decode(tokens).startswith("{")


@pytest.mark.parametrize("given, message", [
    (dict(json_schema={"type": "object", "properties": {"a": {"not": {"type": "string"}}}}), "not"),
    (dict(json_schema={"type": "strin"}), "strin"),
    (dict(json_schema={"$ref": "#/$defs/missing"}), "missing"),
    (dict(json_schema={"type": "string", "format": "no-such-format"}), "no-such-format"),
    (dict(json_schema="{not json"), "not JSON"),
    (dict(json_schema=[1, 2]), "JSON object"),
    (dict(regex="[a-"), "unclosed character class"),
    (dict(grammar="root ::= missing_rule"), "missing_rule"),
    (dict(grammar='root ::= ( "a"'), "Expected ')'"),
    (dict(grammar="start: foo"), "foo"),
    (dict(json_schema={"type": "object"}, regex="a"), "one of"),
])
def test_what_does_not_compile_or_cannot_be_enforced_is_a_typed_error(qwen25, given, message):
    with pytest.raises(ConstraintError, match=re.escape(message)):
        qwen25.generate(chat_prompt(qwen25), 5, **given)


def test_greedy_speculative_decoding_under_a_schema_is_plain_greedy(qwen25):
    """Drafts are verified by the same Sampler, row by row, and rejected ones never reach the constraint:
    the same tokens as without a drafter. The prompt repeats a document, so prompt lookup drafts it."""
    schema = SCHEMAS["array of objects"]
    example = json.dumps([{"k": "v", "n": 3}, {"k": "v", "n": 4}, {"k": "v", "n": 5}])
    prompt = chat_prompt(qwen25, f"Repeat {example} {example}")
    options = GenerationOptions(json_schema=schema)
    constraint = Constraint.of(options, qwen25.tokenizer, qwen25.config.vocab_size, qwen25.eos_token_ids)
    plain = qwen25.generate(prompt, 80, json_schema=schema)
    stats = Stats()
    drafted = [t for t, _ in stream_tokens(qwen25.sequence(), prompt, 80, options, qwen25.eos_token_ids,
                                           stats=stats, drafter=NgramDrafter(), constraint=constraint)]
    assert drafted == plain
    assert stats.drafted > 0, stats.line()
    jsonschema.validate(json.loads(document(qwen25, plain)), schema)


def greedy_sampler(model, prompt, constraint):
    return Sampler(GenerationOptions(), prompt, model.config.vocab_size, 100, model.eos_token_ids, constraint)


def pointing_at(model, token: int) -> np.ndarray:
    logits = np.zeros(model.config.vocab_size, np.float32)
    logits[token] = 10.0
    return logits


def test_thinking_stays_outside_the_constraint(qwen3):
    tok = qwen3.tokenizer
    think, end_think = tok.token_to_id("<think>"), tok.token_to_id("</think>")
    hello = tok.encode("hello")[0]
    constraint = Constraint(tok, qwen3.config.vocab_size, qwen3.eos_token_ids, json_schema=POINT)

    def choices(prompt, wanted, given=constraint) -> tuple[list[int], str]:
        """The tokens chosen when each step's logits point at `wanted`, and the text after thinking."""
        sampler = greedy_sampler(qwen3, prompt, given)
        chosen = [sampler.next(pointing_at(qwen3, t)) for t in wanted]
        after = chosen[chosen.index(end_think) + 1:] if end_think in chosen else chosen
        return chosen, tok.decode(after)

    # Qwen3 thinking on: the model may open <think> first; inside it anything goes, after it the schema.
    chosen, text = choices(chat_prompt(qwen3), (think, hello, hello, end_think, hello, hello))
    assert chosen[:4] == [think, hello, hello, end_think] and text.lstrip("\n").startswith('{"')
    # The blank line a model writes after </think> is allowed there, once; not later.
    blank = tok.encode("\n\n")[0]
    chosen, text = choices(chat_prompt(qwen3), (think, hello, end_think, blank, blank, hello))
    assert chosen[:4] == [think, hello, end_think, blank] and chosen[4] != blank
    assert text.startswith('\n\n{"x')
    # Thinking on, the model does not open it: constrained from the first token, <think> not allowed after.
    chosen, text = choices(chat_prompt(qwen3), (hello, think, think))
    assert think not in chosen and text.startswith('{"x')
    # enable_thinking false (the prompt closes it): constrained from the first token.
    chosen, text = choices(chat_prompt(qwen3, enable_thinking=False), (think, think))
    assert think not in chosen and text.startswith('{"x')
    # A prompt that opens <think> (Qwen3.5's templates): free until </think>.
    chosen, text = choices(chat_prompt(qwen3) + [think], (hello, end_think, hello, hello))
    assert chosen[:2] == [hello, end_think] and text.lstrip("\n").startswith('{"')
    # Without the chat template, no thinking: <think> is not allowed.
    raw_constraint = Constraint(tok, qwen3.config.vocab_size, qwen3.eos_token_ids, json_schema=POINT,
                                chat=False)
    chosen, text = choices(tok.encode("x"), (think, think), raw_constraint)
    assert think not in chosen and text.startswith('{"x')


def test_padded_ids_are_never_allowed_and_every_end_id_ends_a_document(qwen3, qwen_tokenizer_ggufs):
    """For a folder's tokenizer and a GGUF's: no padded id, no marker token (the Reply would read it as
    one, not as the text it spells), every end-of-turn id once the document is complete."""
    vocab_size = qwen3.config.vocab_size
    assert vocab_size > qwen3.tokenizer.vocab_size  # Qwen pads the head past the tokenizer
    gguf_tokenizer = Tokenizer.from_gguf(read_gguf(qwen_tokenizer_ggufs["qwen3"]))
    assert gguf_tokenizer.token_to_id("[PAD151669]") == 151669  # the converter's fillers
    markers = [qwen3.tokenizer.token_to_id(t) for t in ("<think>", "</think>", "<tool_call>", "</tool_call>")]
    for tok in (qwen3.tokenizer, gguf_tokenizer):
        # A filler's text, "[PAD151669]", would match: it is blocked as a filler. So would the markers'.
        constraint = Constraint(tok, vocab_size, qwen3.eos_token_ids, regex=r"[A-Za-z0-9_<>/\[\] ]{1,40}",
                                chat=False)
        assert llg_tokenizer(tok, vocab_size, constraint.end_ids)[0] is \
            llg_tokenizer(tok, vocab_size, constraint.end_ids)[0]  # built once per Tokenizer
        state = constraint.start([])
        logits = np.zeros(vocab_size, np.float32)
        state.mask(logits)
        allowed = np.flatnonzero(logits == 0)
        assert len(allowed) > 1000 and allowed.max() < qwen3.tokenizer.vocab_size
        assert not set(markers) & set(allowed)
        assert (logits[qwen3.tokenizer.vocab_size:] == MASKED).all()
        assert not set(qwen3.eos_token_ids) & set(allowed)  # nothing yet: no document
        for token in tok.encode("just words"):
            state.consume(token)
        logits = np.zeros(vocab_size, np.float32)
        state.mask(logits)
        assert all(logits[i] == 0 for i in qwen3.eos_token_ids)


def run_cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "minqwen", *args], capture_output=True, text=True,
                          input=stdin, timeout=300)


def test_cli_schema_grammar_regex_and_their_errors(qwen25, tmp_path):
    model = ["--model", str(qwen25.path), "--prompt", "Hi", "--max-new-tokens", "120", "--temperature", "1",
             "--seed", "3"]
    schema = SCHEMAS["pattern and integer range"]
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    for given in (json.dumps(schema), f"@{tmp_path / 'schema.json'}"):
        result = run_cli("generate", *model, "--json-schema", given)
        assert result.returncode == 0, result.stderr
        jsonschema.validate(json.loads(result.stdout), schema)
    (tmp_path / "answer.gbnf").write_text('root ::= ("yes" | "no") "!"\n')
    result = run_cli("generate", *model, "--grammar-file", str(tmp_path / "answer.gbnf"))
    assert result.returncode == 0 and result.stdout.strip() in ("yes!", "no!"), result.stderr
    result = run_cli("generate", *model, "--regex", "[0-9]{3}")
    assert result.returncode == 0 and re.fullmatch("[0-9]{3}", result.stdout.strip()), result.stderr

    (tmp_path / "broken.gbnf").write_text('root ::= ( "a"\n')
    for bad in (["--grammar-file", str(tmp_path / "broken.gbnf")], ["--grammar-file", str(tmp_path / "no")],
                ["--json-schema", '{"type": "object", "not": {}}'], ["--regex", "(a"]):
        result = run_cli("generate", *model, *bad)
        assert result.returncode == 2 and result.stdout == ""
        lines = result.stderr.strip().splitlines()
        assert lines[0].startswith("error: ") and len(lines) == 1, result.stderr


def test_cli_chat_keeps_the_schema_for_every_turn(qwen25):
    schema = SCHEMAS["anyOf and $ref"]
    result = run_cli("chat", "--model", str(qwen25.path), "--max-new-tokens", "150", "--temperature", "1",
                     "--seed", "1", "--json-schema", json.dumps(schema), stdin="one\ntwo\n")
    assert result.returncode == 0, result.stderr
    answers = [line for line in result.stdout.splitlines() if line.strip("> ")]
    assert len(answers) == 2
    for answer in answers:
        jsonschema.validate(json.loads(answer.removeprefix("> ")), schema)


def ask_json(api, **fields):
    return api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "JSON please"}],
                                       **{"temperature": 1.0, "seed": 7, "max_tokens": 150, **fields})


def test_server_structured_output_fields(qwen25):
    schema = SCHEMAS["nested objects, arrays, enums"]
    response_format = {"type": "json_schema",
                       "json_schema": {"name": "user", "schema": schema, "strict": True}}
    with running(qwen25) as server:
        api = client(server)
        whole = ask_json(api, response_format=response_format)
        assert whole.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(whole.choices[0].message.content), schema)
        chunks = list(ask_json(api, response_format=response_format, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
            whole.choices[0].message.content

        cut = ask_json(api, response_format=response_format, max_tokens=4)
        assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 4

        anything = ask_json(api, response_format={"type": "json_object"}, max_tokens=20)
        assert anything.choices[0].message.content.startswith("{")
        assert ask_json(api, response_format={"type": "text"}, max_tokens=3).usage.completion_tokens <= 3

        fields = {  # llama.cpp's and vLLM's spellings
            "json_schema": (POINT, lambda s: jsonschema.Draft202012Validator(POINT).is_valid(json.loads(s))),
            "grammar": ('root ::= "a" [0-9]', lambda s: re.fullmatch("a[0-9]", s)),
            "structured_outputs": ({"regex": "[xyz]{2}"}, lambda s: re.fullmatch("[xyz]{2}", s))}
        for name, (value, check) in fields.items():
            answer = ask_json(api, extra_body={name: value}).choices[0].message.content
            assert check(answer), (name, answer)
        jsonschema.validate(json.loads(structured(api, "json", POINT)), POINT)
        assert re.fullmatch("b[0-9]", structured(api, "grammar", 'root ::= "b" [0-9]'))
        assert structured(api, "choice", ["left", "right"]) in ("left", "right")
        guided = ask_json(api, extra_body={"guided_regex": "[0-9]{3}"}).choices[0].message.content
        assert re.fullmatch("[0-9]{3}", guided)
        completion = api.completions.create(model="tiny", prompt="Number:", max_tokens=20, temperature=1.0,
                                            extra_body={"structured_outputs": {"regex": "[0-9]{4}"}})
        assert re.fullmatch("[0-9]{4}", completion.choices[0].text)


def test_server_constrains_the_answer_after_the_thinking(qwen3):
    """A stand-in decoder writes the script: its thinking (no JSON) goes by unconstrained, its answer
    after </think> is the schema's; with thinking off, its <think> is masked out from the first token."""
    messages = [{"role": "user", "content": "JSON please"}]
    prompt = qwen3.tokenizer.apply_chat_template(messages)
    script = '<think>\nThe user wants {x, y}: easy.\n</think>\n\n{"x": 3, "y": 7}<|im_end|>'  # Qwen3's layout
    body = {"messages": messages, "max_tokens": 60, "temperature": 0, "json_schema": POINT}
    with scripted(qwen3, prompt, script), running(qwen3) as server:
        status, _, answer = raw(server, "POST", "/v1/chat/completions", body)
        message = answer["choices"][0]["message"]
        assert status == 200 and message["reasoning_content"] == "The user wants {x, y}: easy.", answer
        assert json.loads(message["content"]) == {"x": 3, "y": 7}
    off = {**body, "chat_template_kwargs": {"enable_thinking": False}}
    prompt = qwen3.tokenizer.apply_chat_template(messages, enable_thinking=False)
    with scripted(qwen3, prompt, script), running(qwen3) as server:
        status, _, answer = raw(server, "POST", "/v1/chat/completions", off)
        message = answer["choices"][0]["message"]
        assert status == 200 and "reasoning_content" not in message, answer
        jsonschema.validate(json.loads(message["content"]), POINT)


def structured(api, kind, value) -> str:
    return ask_json(api, extra_body={"structured_outputs": {kind: value}}).choices[0].message.content


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"json_schema": {"type": "strin"}}, "json_schema"),
    ({"grammar": 'root ::= ( "a"'}, "grammar"),
    ({"grammar": "root ::= undefined"}, "grammar"),
    ({"structured_outputs": {"regex": "(a"}}, "structured_outputs"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs"),
    ({"structured_outputs": {"yaml": "a"}}, "structured_outputs"),
    ({"json_schema": POINT, "grammar": 'root ::= "a"'}, "grammar"),
    ({"json_schema": POINT, "ignore_eos": True}, "json_schema"),
    ({"guided_choice": "left"}, "guided_choice"),
])
def test_server_refuses_what_does_not_compile_with_a_400_naming_the_field(qwen25, body, param):
    with running(qwen25) as server:
        status, _, answer = raw(server, "POST", "/v1/chat/completions",
                                {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **body})
        assert status == 400 and answer["error"]["param"] == param, answer
        assert answer["error"]["type"] == "invalid_request_error"
        with pytest.raises(openai.BadRequestError):
            client(server).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                   extra_body=body)


def test_the_real_smollm2_answers_a_question_in_valid_json(smollm2_gguf):
    model = minqwen.load(smollm2_gguf)
    schema = {"type": "object", "properties": {"capital": {"type": "string", "maxLength": 30},
                                               "country": {"type": "string", "maxLength": 30}},
              "required": ["capital", "country"], "additionalProperties": False}
    prompt = model.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of "
                                                   "France? Answer in JSON with keys capital and country."}])
    answer = json.loads(document(model, model.generate(prompt, 60, json_schema=schema)))
    jsonschema.validate(answer, schema)
    assert "Paris" in answer["capital"], answer
