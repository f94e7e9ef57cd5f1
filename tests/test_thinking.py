"""Thinking controls: the reasoning budget ends thinking at N tokens with Qwen's closing sentence and
</think> (library, CLI, server; a structured-output constraint then holds the answer), and what the
server renders into the prompt: chat_template_kwargs (enable_thinking, Qwen3.6's preserve_thinking)
and an assistant's reasoning_content sent back, where each template puts it."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from types import SimpleNamespace

import jsonschema
import pytest
from test_server import Scripted, decoder_replaced, raw, running

import minqwen
from checkpoints import DATA, chat_checkpoint
from minqwen.network.decoder import Decoder
from minqwen.serve.openai_api import chat_request
from minqwen.text.reply import THINKING_CUT_SHORT
from minqwen.text.tokenizer import Tokenizer

POINT = {"type": "object", "properties": {"x": {"type": "integer", "minimum": -5, "maximum": 5},
                                          "y": {"type": "integer", "minimum": 0, "maximum": 99}},
         "required": ["x", "y"], "additionalProperties": False}
THOUGHT = "\nOne two three four five six seven eight nine ten." * 6  # a model's thinking opens on a newline
USER = [{"role": "user", "content": "Think, then answer."}]


class ScriptedSequence(Scripted):
    """Scripted for the library's decode loop too (Sequence calls the decoder; the real __call__ runs
    on the stand-in's forward)."""

    __call__ = Decoder.__call__


def scripted(model, prompt, ids):
    return decoder_replaced(model, lambda real: ScriptedSequence(real, len(prompt), ids))


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    """A tiny random-weight Qwen3 with its real tokenizer and template (the model writes <think>), and
    the same with Qwen3.5's template (the prompt opens <think>)."""
    qwen3 = chat_checkpoint(tmp_path_factory.mktemp("qwen3"), "qwen3")
    opened = shutil.copytree(qwen3, tmp_path_factory.mktemp("opened") / "model")
    shutil.copy(DATA / "templates" / "qwen3.5.jinja", opened / "chat_template.jinja")
    return {"qwen3": qwen3, "opened": opened}


@pytest.fixture(scope="module")
def qwen3(folders):
    return minqwen.load(folders["qwen3"])


def ids(model, text: str) -> list[int]:
    return model.tokenizer.encode(text)


def closing(model, budget: int) -> list[int]:
    """What the budget forces: Qwen's sentence after a blank line and </think> on its own line; after no
    thinking at all, the newline and </think> of an empty block."""
    text = f"\n\n{THINKING_CUT_SHORT}\n" if budget else "\n"
    return ids(model, text) + [model.tokenizer.token_to_id("</think>")]


def script(model, opens: bool, budget: int, answer: str) -> tuple[list[int], list[int]]:
    """(what the stand-in model writes, what generation must give with the budget): it thinks on past
    the budget; the forced tokens take the place of its next ones, and its answer follows them."""
    think, end = (model.tokenizer.token_to_id(t) for t in ("<think>", "<|im_end|>"))
    head = [] if opens else [think]
    thought, forced = ids(model, THOUGHT), closing(model, budget)
    assert len(thought) >= budget + len(forced)
    written = head + thought[:budget + len(forced)] + ids(model, answer) + [end]
    return written, head + thought[:budget] + forced + ids(model, answer) + [end]


@pytest.mark.parametrize("opens", [False, True], ids=["model opens <think>", "prompt opens <think>"])
@pytest.mark.parametrize("budget", [0, 1, 5])
def test_the_library_ends_thinking_at_the_budget(qwen3, opens, budget):
    tok = qwen3.tokenizer
    prompt = tok.apply_chat_template(USER) + (ids(qwen3, "<think>\n") if opens else [])
    written, expected = script(qwen3, opens, budget, "The answer.")
    with scripted(qwen3, prompt, written):
        assert qwen3.generate(prompt, 120, reasoning_budget=budget) == expected
        assert qwen3.generate(prompt, 120) == written  # no budget: it thinks on
        assert qwen3.generate(prompt, 120, reasoning_budget=len(written)) == written  # never reached


def test_a_schema_holds_the_answer_after_the_forced_end_of_thinking(qwen3):
    """The forced sentence and </think> pass the constraint as thinking; the answer after them is the
    schema's, though the stand-in writes prose there (only the constraint makes it JSON)."""
    prompt = qwen3.tokenizer.apply_chat_template(USER)
    written, expected = script(qwen3, False, 3, "not JSON at all")
    forced_end = expected.index(qwen3.tokenizer.token_to_id("</think>")) + 1
    with scripted(qwen3, prompt, written):
        tokens = qwen3.generate(prompt, 120, reasoning_budget=3, json_schema=POINT)
    assert tokens[:forced_end] == expected[:forced_end]
    assert tokens[-1] in qwen3.eos_token_ids
    jsonschema.validate(json.loads(qwen3.tokenizer.decode(tokens[forced_end:-1])), POINT)


def test_the_server_ends_thinking_at_the_requests_budget_or_its_own(qwen3):
    tok = qwen3.tokenizer
    prompt = tok.apply_chat_template(USER)
    written, _ = script(qwen3, False, 4, "The answer.")
    thought = tok.decode(ids(qwen3, THOUGHT)[:4]).strip()
    body = {"messages": USER, "max_tokens": 100, "temperature": 0}
    with scripted(qwen3, prompt, written), running(qwen3) as server:
        for field in ("thinking_budget_tokens", "thinking_token_budget"):  # llama.cpp's name, vLLM's
            status, _, answer = raw(server, "POST", "/v1/chat/completions", {**body, field: 4})
            message = answer["choices"][0]["message"]
            assert status == 200 and message["reasoning_content"] == f"{thought}\n\n{THINKING_CUT_SHORT}"
            assert message["content"] == "The answer."
            reasoning_tokens = answer["usage"]["completion_tokens_details"]["reasoning_tokens"]
            assert reasoning_tokens == 4 + len(closing(qwen3, 4))
        status, _, free = raw(server, "POST", "/v1/chat/completions", body)
        assert THINKING_CUT_SHORT not in free["choices"][0]["message"]["reasoning_content"]
        server.api.reasoning_budget = 4  # serve --reasoning-budget 4: every request's default ...
        status, _, answer = raw(server, "POST", "/v1/chat/completions", body)
        assert answer["choices"][0]["message"]["reasoning_content"].endswith(THINKING_CUT_SHORT)
        status, _, free = raw(server, "POST", "/v1/chat/completions", {**body, "thinking_budget_tokens": -1})
        assert THINKING_CUT_SHORT not in free["choices"][0]["message"]["reasoning_content"]  # ... its own
        status, _, answer = raw(server, "POST", "/v1/chat/completions",
                                {**body, "thinking_budget_tokens": 3, "json_schema": POINT})
        message = answer["choices"][0]["message"]
        assert status == 200 and message["reasoning_content"].endswith(THINKING_CUT_SHORT)
        jsonschema.validate(json.loads(message["content"]), POINT)


def test_a_required_tool_call_follows_the_forced_end_of_thinking(qwen3):
    """tool_choice "required" is a constraint too: after the forced </think> the answer is a call whose
    arguments validate, though the stand-in writes prose there."""
    clock = {"type": "function", "function": {"name": "clock", "parameters": {
        "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
        "additionalProperties": False}}}
    prompt = qwen3.tokenizer.apply_chat_template(USER, tools=[clock])
    written, _ = script(qwen3, False, 3, "Just prose, no call.")
    body = {"messages": USER, "max_tokens": 100, "temperature": 0, "tools": [clock],
            "tool_choice": "required", "thinking_budget_tokens": 3}
    with scripted(qwen3, prompt, written), running(qwen3) as server:
        status, _, answer = raw(server, "POST", "/v1/chat/completions", body)
    message = answer["choices"][0]["message"]
    assert status == 200 and message["reasoning_content"].endswith(THINKING_CUT_SHORT), answer
    call = message["tool_calls"][0]["function"]
    assert call["name"] == "clock" and json.loads(call["arguments"])["zone"] in ("UTC", "CET")


@pytest.mark.parametrize("fields, param", [
    ({"thinking_budget_tokens": -2}, "thinking_budget_tokens"),
    ({"thinking_budget_tokens": 1.5}, "thinking_budget_tokens"),
    ({"thinking_budget_tokens": "8"}, "thinking_budget_tokens"),
    ({"thinking_budget_tokens": True}, "thinking_budget_tokens"),
    ({"thinking_token_budget": -3}, "thinking_token_budget"),
    ({"thinking_budget_tokens": 8, "thinking_token_budget": 8}, "thinking_token_budget"),
])
def test_a_budget_that_is_not_an_integer_from_minus_one_is_a_400(qwen3, fields, param):
    with running(qwen3) as server:
        status, _, answer = raw(server, "POST", "/v1/chat/completions", {"messages": USER, **fields})
        assert status == 400 and answer["error"]["param"] == param, answer


@pytest.mark.parametrize("field", ["thinking_budget_tokens", "thinking_token_budget"])
def test_a_budget_for_a_raw_prompt_is_a_400_not_ignored(qwen3, field):
    with running(qwen3) as server:
        status, _, answer = raw(server, "POST", "/v1/completions", {"prompt": "Hi", field: 8})
        assert status == 400 and answer["error"]["param"] == field, answer


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "minqwen", *args], capture_output=True, text=True,
                          timeout=300)


def test_cli_generate_and_chat_end_thinking_at_the_budget(folders):
    """A random model never closes its thinking itself: with the prompt opening <think>, the CLI shows its
    first N tokens of thought, the sentence, </think> and an answer, as the library gives them; chat does
    so on every turn."""
    model = minqwen.load(folders["opened"])
    prompt = model.tokenizer.apply_chat_template(USER)
    tokens = model.generate(prompt, 40, reasoning_budget=3)
    assert tokens[3:3 + len(closing(model, 3))] == closing(model, 3)
    result = run_cli("generate", "--model", str(folders["opened"]), "--prompt", USER[0]["content"],
                     "--temperature", "0", "--repetition-penalty", "1", "--max-new-tokens", "40",
                     "--reasoning-budget", "3")
    assert result.returncode == 0, result.stderr
    reasoning = model.tokenizer.decode(tokens[:3 + len(closing(model, 3)) - 1], skip_special_tokens=True)
    reasoning = reasoning.strip("\n")
    assert result.stdout.startswith(f"<think>\n{reasoning}\n</think>\n")
    assert reasoning.endswith(THINKING_CUT_SHORT)
    chat = subprocess.run([sys.executable, "-m", "minqwen", "chat", "--model", str(folders["opened"]),
                           "--max-new-tokens", "30", "--reasoning-budget", "2"], input="one\ntwo\n",
                          capture_output=True, text=True, timeout=300)
    assert chat.returncode == 0 and chat.stdout.count(f"{THINKING_CUT_SHORT}\n</think>") == 2, chat.stderr
    for bad in (["generate", "--prompt", "x", "--reasoning-budget", "-2"],
                ["generate", "--prompt", "x", "--no-chat", "--reasoning-budget", "2"],
                ["serve", "--reasoning-budget", "-5"]):
        result = run_cli(*bad, "--model", str(folders["opened"]))
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr


# ---- what the server renders: chat_template_kwargs and reasoning_content, through its request parsing

def prompt_text(tokenizer: Tokenizer, body: dict) -> str:
    """The prompt the server's chat endpoint renders for `body` (chat_request, the request parsing)."""
    model = SimpleNamespace(tokenizer=tokenizer, context_length=4096, generation_config={})
    engine = SimpleNamespace(check=lambda prompt, room: None, speculative=None)
    return tokenizer.decode(chat_request(body, model, engine).prompt)


@pytest.fixture(scope="module")
def tokenizers() -> dict:
    qwen35 = Tokenizer.from_dir(DATA / "tokenizers" / "qwen3.5")
    qwen36 = Tokenizer.from_dir(DATA / "tokenizers" / "qwen3.5",
                                chat_template=(DATA / "templates" / "qwen3.6.jinja").read_text())
    return {"qwen3": Tokenizer.from_dir(DATA / "tokenizers" / "qwen3"), "qwen3.5": qwen35, "qwen3.6": qwen36}


def conversation(field: str = "reasoning_content") -> list[dict]:
    """Two turns: the first answered after reasoning R1; the second, after the last user query, calls a
    tool after reasoning R2, and the tool has answered."""
    call = {"id": "c1", "type": "function", "function": {"name": "clock", "arguments": "{}"}}
    return [{"role": "user", "content": "Q1"},
            {"role": "assistant", "content": "A1", field: "R1"},
            {"role": "user", "content": "Q2"},
            {"role": "assistant", "content": "", field: "R2", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "content": "noon"}]


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning", "thinking"])
@pytest.mark.parametrize("name", ["qwen3", "qwen3.5", "qwen3.6"])
def test_reasoning_sent_back_is_rendered_after_the_last_user_query(tokenizers, name, field):
    """Every template renders the reasoning of the turn after the last user query (R2), and drops the
    earlier (R1) unless Qwen3.6's preserve_thinking keeps it."""
    text = prompt_text(tokenizers[name], {"messages": conversation(field)})
    assert "<think>\nR2\n</think>\n\n" in text and "R1" not in text
    assert text.index("Q2") < text.index("R2") < text.index("clock")
    kept = prompt_text(tokenizers[name], {"messages": conversation(field),
                                          "chat_template_kwargs": {"preserve_thinking": True}})
    if name == "qwen3.6":
        assert "<think>\nR1\n</think>\n\nA1" in kept and "<think>\nR2\n</think>\n\n" in kept
    else:
        assert kept == text  # the variable means nothing to the other templates


@pytest.mark.parametrize("name", ["qwen3", "qwen3.5", "qwen3.6"])
def test_enable_thinking_reaches_the_template(tokenizers, name):
    body = {"messages": USER}
    default, on, off, qwen_api, effort = (prompt_text(tokenizers[name], {**body, **extra}) for extra in (
        {}, {"chat_template_kwargs": {"enable_thinking": True}},
        {"chat_template_kwargs": {"enable_thinking": False}}, {"enable_thinking": False},
        {"reasoning_effort": "none"}))
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n") and off == qwen_api == effort
    # thinking on: Qwen3 leaves <think> to the model, Qwen3.5/3.6 open it in the prompt
    assert on == default and on.endswith("<|im_start|>assistant\n" + ("" if name == "qwen3" else "<think>\n"))
