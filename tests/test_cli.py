"""The command line and the generation API on a checkpoint with the real Qwen2.5 / Qwen3 tokenizers."""
from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import minqwen
from checkpoints import DATA, build_checkpoint, relative_error, shrink
from minqwen.cli import DIM, RESET, Printer
from minqwen.text.reply import Reply
from minqwen.text.tokenizer import Tokenizer

SIZES = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, max_position_embeddings=512)


@pytest.fixture(scope="module")
def qwen25(tmp_path_factory):
    config = shrink(json.loads((DATA / "configs" / "qwen2.5-0.5b-instruct.config.json").read_text()), **SIZES)
    generation = json.loads((DATA / "configs" / "qwen2.5-0.5b-instruct.generation_config.json").read_text())
    return build_checkpoint(tmp_path_factory.mktemp("qwen25"), config, "bf16", tokenizer="qwen2.5",
                            generation_config=generation)


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    config = shrink(json.loads((DATA / "configs" / "qwen3-0.6b.config.json").read_text()), head_dim=16,
                    **SIZES)
    generation = json.loads((DATA / "configs" / "qwen3-0.6b.generation_config.json").read_text())
    return build_checkpoint(tmp_path_factory.mktemp("qwen3"), config, "bf16", tokenizer="qwen3",
                            generation_config=generation)


def run_cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "minqwen", *args], capture_output=True, text=True,
                          input=stdin, timeout=300)


def test_generate_streams_the_greedy_completion(qwen25):
    model = minqwen.load(qwen25)
    prompt = model.tokenizer.apply_chat_template([{"role": "user", "content": "Hello there"}])
    expected = model.generate(prompt, max_new_tokens=12)
    result = run_cli("generate", "--model", str(qwen25), "--prompt", "Hello there", "--temperature", "0",
                     "--repetition-penalty", "1", "--max-new-tokens", "12")
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip("\n") == model.tokenizer.decode(expected, skip_special_tokens=True)
    stats = result.stderr.strip().splitlines()[-1]
    assert stats.startswith(f"prompt: {len(prompt)} tokens") and "decode" in stats and "tok/s" in stats


def test_raw_prompt_and_system_message(qwen25):
    model = minqwen.load(qwen25)
    raw = run_cli("generate", "--model", str(qwen25), "--prompt", "abc", "--no-chat", "--temperature", "0",
                  "--max-new-tokens", "3")
    assert (raw.returncode == 0
            and raw.stderr.startswith(f"prompt: {len(model.tokenizer.encode('abc'))} tokens"))
    system = run_cli("generate", "--model", str(qwen25), "--prompt", "abc", "--system", "Be brief.",
                     "--temperature", "0", "--max-new-tokens", "3")
    with_system = model.tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."},
                                                       {"role": "user", "content": "abc"}])
    assert system.returncode == 0 and system.stderr.startswith(f"prompt: {len(with_system)} tokens")


def test_generation_config_defaults_and_seed(qwen25):
    """No sampling options: generation_config.json's (temperature 0.7, top-k 20, ...) apply; a seed makes
    the output repeatable, and different seeds differ."""
    args = ("generate", "--model", str(qwen25), "--prompt", "Tell me a story", "--max-new-tokens", "24")
    first, again = run_cli(*args, "--seed", "7"), run_cli(*args, "--seed", "7")
    other = run_cli(*args, "--seed", "8")
    assert first.returncode == 0, first.stderr
    assert first.stdout == again.stdout
    assert first.stdout != other.stdout


def test_same_seed_same_tokens_api(qwen25):
    model = minqwen.load(qwen25)
    options = dict(temperature=1.0, top_k=50, top_p=0.9, min_p=0.01, repetition_penalty=1.2,
                   presence_penalty=0.5, seed=3)
    a = model.generate([1, 2, 3], max_new_tokens=20, **options)
    b = model.generate([1, 2, 3], max_new_tokens=20, **options)
    c = model.generate([1, 2, 3], max_new_tokens=20, **dict(options, seed=4))
    assert a == b and a != c


def test_stops_at_end_of_turn_tokens(qwen25):
    """Every id of generation_config's eos_token_id ends generation; the end token is the last returned."""
    model = minqwen.load(qwen25)
    greedy = model.generate([5, 6, 7], max_new_tokens=8)
    model.generation_config["eos_token_id"] = [greedy[3], 151645]
    assert model.generate([5, 6, 7], max_new_tokens=8) == greedy[:greedy.index(greedy[3]) + 1]


def test_stop_strings_span_token_boundaries(qwen25):
    model = minqwen.load(qwen25)
    tokens = model.generate([9, 10, 11], max_new_tokens=16)
    text = model.tokenizer.decode(tokens)
    # a stop string made of the end of one token's text and the start of the next one's
    first = model.tokenizer.decode(tokens[:4])
    assert len(first) >= 2 and len(text) > len(first) + 1
    stop = first[-2:] + text[len(first):len(first) + 2]
    stopped = model.generate([9, 10, 11], max_new_tokens=16, stop=[stop])
    assert stop in model.tokenizer.decode(stopped)
    assert stop not in model.tokenizer.decode(stopped[:-1])
    assert stopped == tokens[:len(stopped)]


def test_cli_sampling_errors_are_one_line(qwen25):
    for option in (["--temperature", "-1"], ["--top-p", "0"], ["--top-p", "1.5"], ["--max-new-tokens", "-2"]):
        result = run_cli("generate", "--model", str(qwen25), "--prompt", "hi", *option)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert (len(result.stderr.strip().splitlines()) == 1
                and result.stderr.startswith("error: ")), result.stderr


def test_speculative_generate_and_chat_give_the_plain_answer(qwen25):
    """--speculative on the command line: the same text, the drafts' line in the stats (a model drafting for
    itself accepts every draft), through chat's turns too; what it cannot draft with is one line."""
    model = minqwen.load(qwen25)
    prompt = model.tokenizer.apply_chat_template([{"role": "user", "content": "Hello there"}])
    expected = model.tokenizer.decode(model.generate(prompt, max_new_tokens=12), skip_special_tokens=True)
    common = ["--model", str(qwen25), "--temperature", "0", "--repetition-penalty", "1",
              "--max-new-tokens", "12"]
    result = run_cli("generate", *common, "--prompt", "Hello there", "--speculative", f"model:{qwen25}",
                     "--speculative-tokens", "3")
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip("\n") == expected
    assert re.search(r"drafts: (\d+) of \1 accepted \(100%\)$", result.stderr.strip()), result.stderr
    result = run_cli("chat", *common, "--speculative", "ngram", stdin="Hello there\nAgain\n/exit\n")
    assert result.returncode == 0 and expected in result.stdout, result.stderr
    for option, message in ((["--speculative", "mtp"], "has no MTP head"),
                            (["--speculative", "guess"], "ngram, mtp or model:PATH"),
                            (["--speculative", "ngram", "--speculative-tokens", "0"], "draft")):
        result = run_cli("generate", *common, "--prompt", "hi", *option)
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and message in result.stderr


def test_prompt_longer_than_context_cli(qwen25):
    result = run_cli("generate", "--model", str(qwen25), "--prompt", "word " * 600, "--no-chat")
    assert result.returncode == 2 and "context window" in result.stderr and "Traceback" not in result.stderr


def test_info(qwen3):
    result = run_cli("info", "--model", str(qwen3), "--context", "256")
    assert result.returncode == 0, result.stderr
    assert "qwen3" in result.stdout and "bf16" in result.stdout and "KV cache" in result.stdout
    assert "head_dim 16" in result.stdout and "256 tokens" in result.stdout


def test_thinking_switch_changes_the_prompt(qwen3):
    model = minqwen.load(qwen3)
    messages = [{"role": "user", "content": "2+2?"}]
    think = model.tokenizer.apply_chat_template(messages, enable_thinking=True)
    no_think = model.tokenizer.apply_chat_template(messages, enable_thinking=False)
    assert no_think[:len(think)] == think and len(no_think) > len(think)  # an empty <think></think> block
    result = run_cli("generate", "--model", str(qwen3), "--prompt", "2+2?", "--no-think",
                     "--max-new-tokens", "2", "--temperature", "0")
    assert result.returncode == 0 and result.stderr.startswith(f"prompt: {len(no_think)} tokens")


def test_chat_keeps_the_cache_across_turns(qwen25):
    result = run_cli("chat", "--model", str(qwen25), "--temperature", "0", "--max-new-tokens", "5",
                     stdin="Hi\nHow are you?\n/reset\nHi\n/exit\n")
    assert result.returncode == 0, result.stderr
    stats = [line for line in result.stderr.splitlines() if line.startswith("prompt:")]
    assert len(stats) == 3
    assert "cached" not in stats[0] and "cached" in stats[1] and "cached" not in stats[2]
    assert "(conversation cleared)" in result.stderr


def test_sequence_reuses_its_prefix(qwen25):
    model = minqwen.load(qwen25)
    fresh = model.logits([1, 2, 3, 4, 5, 6])
    sequence = model.sequence()
    sequence.reset_to([1, 2, 3, 9])
    last = sequence.reset_to([1, 2, 3, 4, 5, 6])  # keeps 1, 2, 3, recomputes from 4
    assert sequence.cache.length == 6
    np.testing.assert_allclose(last, fresh[-1], rtol=1e-4, atol=1e-4 * np.abs(fresh).max())


def test_logits_a_sequence_returned_stay_as_they_were(qwen25):
    """Each step's logits are the caller's to keep: the next step must not write over them."""
    model = minqwen.load(qwen25)
    fresh = model.logits([1, 2, 3, 4])
    sequence = model.sequence()
    sequence.extend([1, 2])
    kept = [sequence.extend([3]), sequence.extend([4])]
    np.testing.assert_allclose(np.stack(kept), fresh[2:], rtol=1e-4, atol=1e-4 * np.abs(fresh).max())


def test_cli_text_ends_before_the_stop_string(qwen25):
    """The printed reply stops where the stop string begins (the OpenAI API's rule); --frequency-penalty
    is accepted with the other sampling options."""
    model = minqwen.load(qwen25)
    prompt = model.tokenizer.apply_chat_template([{"role": "user", "content": "Hello there"}])
    text = model.tokenizer.decode(model.generate(prompt, max_new_tokens=12), skip_special_tokens=True)
    stop = text[len(text) // 2:len(text) // 2 + 3]
    result = run_cli("generate", "--model", str(qwen25), "--prompt", "Hello there", "--temperature", "0",
                     "--repetition-penalty", "1", "--frequency-penalty", "0", "--max-new-tokens", "12",
                     "--stop", stop)
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip("\n") == text[:text.index(stop)]


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("terminal", [False, True])
def test_reasoning_is_shown_by_the_markers_token_ids(terminal):
    """The CLI prints what Reply splits by token id: reasoning between <think> lines, dimmed on a terminal,
    then the content. Qwen3.5's prompt opens <think>, so its reasoning has no "<think>" text to find; one
    cut short (here by a stop string) is closed."""
    tok = Tokenizer.from_dir(DATA / "tokenizers" / "qwen3.5")
    prompt = tok.apply_chat_template([{"role": "user", "content": "2+2?"}])
    dim, reset = (DIM, RESET) if terminal else ("", "")

    def printed(script, stop=()):
        reply, out = Reply(tok, prompt, list(stop)), Terminal() if terminal else io.StringIO()
        printer = Printer(out)
        for token in tok.encode(script):
            printer.show(reply.push(token))
        printer.show(reply.finish())
        printer.end()
        return out.getvalue(), printer.reply

    out, reply = printed("Easy.\n</think>\n\nIt is 4.")
    assert out == f"{dim}<think>\nEasy.\n</think>{reset}\n\nIt is 4.\n"
    assert (reply.reasoning, reply.content) == ("Easy.", "It is 4.")
    out, reply = printed("Easy: 2+2 is 4.", stop=["2+2"])
    assert out == f"{dim}<think>\nEasy: \n</think>{reset}\n"
    assert (reply.reasoning, reply.content) == ("Easy: ", "")


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_the_generic_path_computes_what_the_fastest_does(qwen25, tmp_path, quantize):
    """MINQWEN_ISA=generic (plain Numba loops, no hand-placed instructions) runs the same model to the same
    logits, within the bf16 checkpoints' parity tolerance: an 80-token prefill (the bf16 GEMM micro-kernel
    against BLAS; GGML blocks: dequantised tiles on both) and one decode step (int8: integer dot products
    against float math)."""
    prompt = list(range(1000, 1080))
    script = ("import sys, numpy as np, minqwen\n"
              f"m = minqwen.load({str(qwen25)!r}, quantize={quantize!r})\n"
              "s = m.sequence()\n"
              f"np.save(sys.argv[1], np.stack([s.extend({prompt!r}), s.extend([7])]))\n")
    out = tmp_path / "generic.npy"
    result = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True,
                            timeout=600, env={**os.environ, "MINQWEN_ISA": "generic"})
    assert result.returncode == 0, result.stderr
    sequence = minqwen.load(qwen25, quantize=quantize).sequence()
    fastest = np.stack([sequence.extend(prompt), sequence.extend([7])])
    error = relative_error(np.load(out), fastest)
    print(f"generic vs fastest path, quantize={quantize}: {error:.1e}")
    assert error <= 5e-3
