"""Structured outputs' cost (issue 21), in one run:

    python bench/constraints.py [--quick] [--work DIR] [--parts mask,compile]

mask     what the constraint adds to each generated token -- ConstrainedSequence.mask (llguidance fills the
         allowed-token bitmask; the disallowed logits are set to MASKED) and consume -- against one decode
         step, on the real SmolLM2-135M-Instruct (the Q4_1 GGUF the tests fetch; 49k vocabulary) and on the
         Qwen3-0.6B shape (llama.cpp's Q4_K_M of bench/generate.py's random checkpoint; 152k vocabulary).
         The walk is the tokens of a document the model wrote under TYPICAL, replayed; the mask is split
         into llguidance's fill and the NumPy that applies it.
compile  a typical schema (TYPICAL: nested objects, enums, arrays, $ref, patterns, integer ranges) and, where
         text/constraints.py has it, a tool-call grammar, compiled against each tokenizer (the tokenizer
         itself is built once per Tokenizer and timed apart).

Goals (issue 21): the constraint <= 3% of a decode step, a schema compiled in <= 10 ms. The last stdout
line is the JSON report.
"""
from __future__ import annotations

import argparse
import inspect
import time
from pathlib import Path

import llguidance.numpy
import numpy as np
from speculative import pass_seconds, prompted, tests_module

import minqwen
from checkpoints import bench_checkpoint
from common import report_between_bandwidths
from minqwen.text.constraints import Constraint, llg_tokenizer

ADDRESS = {"type": "object", "properties": {
    "street": {"type": "string", "maxLength": 40}, "city": {"type": "string", "maxLength": 30},
    "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
    "required": ["street", "city", "zip"], "additionalProperties": False}
TYPICAL = {
    "$defs": {"address": ADDRESS},
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "email": {"type": "string", "pattern": "^[a-z0-9.]+@[a-z0-9]+\\.[a-z]{2,4}$"},
        "home": {"$ref": "#/$defs/address"},
        "offices": {"type": "array", "items": {"$ref": "#/$defs/address"}, "maxItems": 3},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 1,
                 "maxItems": 5}},
    "required": ["name", "age", "role", "email", "home", "tags"], "additionalProperties": False}
QUESTION = ("Describe a fictional employee of a small company in JSON: name, age, role, email, home "
            "address, office addresses and a few tags.")
TOOLS = [  # an agent's typical pair
    {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                      "parameters": {"type": "object", "properties": {
                                          "city": {"type": "string"},
                                          "unit": {"enum": ["celsius", "fahrenheit"]},
                                          "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                                          "required": ["city"]}}},
    {"type": "function", "function": {"name": "search", "description": "Search the web.",
                                      "parameters": {"type": "object", "properties": {
                                          "query": {"type": "string"},
                                          "sites": {"type": "array", "items": {"type": "string"}}},
                                          "required": ["query"]}}}]


def models(work: Path) -> dict:
    """name -> a function loading it."""
    gguf = bench_checkpoint(work, "qwen3-0.6b") / "gguf-0.3.36" / "q4_k_m.gguf"
    found = {"smollm2-135m-q4_1": lambda: minqwen.load(tests_module("gguf_files").smollm2_path())}
    if gguf.exists():  # bench/generate.py converts it with llama.cpp's tools
        found["qwen3-0.6b-q4_k_m"] = lambda: minqwen.load(gguf)
    else:
        print(f"no {gguf} (run bench/generate.py once to convert it): the Qwen3-0.6B shape left out",
              flush=True)
    return found


def walk_microseconds(constraint: Constraint, prompt, tokens, vocab: int) -> dict[str, list[float]]:
    """Each token's mask and consume, in µs, replaying `tokens` from a fresh ConstrainedSequence as decoding
    does; then, in a second replay, llguidance's fill of the bitmask alone at the same states (the mask
    less the fill is the NumPy that turns the bitmask into MASKED logits)."""
    state, logits = constraint.start(prompt), np.zeros(vocab, np.float32)
    times = {"mask": [], "consume": [], "fill": []}
    for token in tokens:
        began = time.perf_counter()
        state.mask(logits)
        masked = time.perf_counter()
        state.consume(token)
        times["mask"].append(1e6 * (masked - began))
        times["consume"].append(1e6 * (time.perf_counter() - masked))
    state = constraint.start(prompt)
    for token in tokens:
        began = time.perf_counter()
        llguidance.numpy.fill_next_token_bitmask(state.matcher, state.bitmask)
        times["fill"].append(1e6 * (time.perf_counter() - began))
        state.consume(token)
    return times


def mask(work: Path, repeats: int) -> dict:
    results = {}
    for name, load in models(work).items():
        model = load()
        vocab = model.config.vocab_size
        constraint = Constraint(model.tokenizer, vocab, model.eos_token_ids, json_schema=TYPICAL)
        prompt = model.tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}],
                                                     enable_thinking=False)  # all of it under the schema
        tokens = model.generate(prompt, 200, json_schema=TYPICAL)  # the real walk (cut at 200 tokens)
        walk_microseconds(constraint, prompt, tokens, vocab)  # warm
        walks = [walk_microseconds(constraint, prompt, tokens, vocab) for _ in range(repeats)]
        per_token = {part: float(np.median([np.mean(w[part]) for w in walks])) for part in walks[0]}
        worst = {part: float(np.median([np.percentile(w[part], 90) for w in walks])) for part in walks[0]}
        sequence = prompted(model)
        pass_seconds(model, sequence, 1, 2)  # compiled, warm
        step = float(np.median([pass_seconds(model, sequence, 1, repeats) for _ in range(3)]))
        cost = per_token["mask"] + per_token["consume"]
        results[name] = {"vocab": vocab, "tokens": len(tokens), "decode_step_ms": 1e3 * step,
                         "mean_us": per_token, "p90_us": worst, "constraint_us": cost,
                         "fraction_of_step": cost / (1e6 * step)}
        print(f"mask {name}: {len(tokens)} tokens, vocab {vocab}; per token mask {per_token['mask']:.0f} µs "
              f"(llguidance fill {per_token['fill']:.0f}, p90 mask {worst['mask']:.0f}) + consume "
              f"{per_token['consume']:.0f} µs = {cost:.0f} µs; decode step {1e3 * step:.2f} ms: "
              f"{100 * cost / (1e6 * step):.1f}% of a step", flush=True)
    return results


def compile_ms(make, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        make()
        times.append(time.perf_counter() - began)
    return 1e3 * float(np.median(times))


def compiling(work: Path, repeats: int) -> dict:
    results = {}
    # constrained tool calls (tool_choice "required"), where Constraint takes tools (issue 21's item 3)
    tools = "tools" in inspect.signature(Constraint).parameters
    for name, load in models(work).items():
        model = load()
        tok, vocab, ends = model.tokenizer, model.config.vocab_size, model.eos_token_ids
        began = time.perf_counter()
        llg_tokenizer(tok, vocab, ends)
        built = 1e3 * (time.perf_counter() - began)
        schema = compile_ms(lambda: Constraint(tok, vocab, ends, json_schema=TYPICAL), repeats)
        logits = np.zeros(vocab, np.float32)  # llguidance builds parts of its lexer lazily, at first use
        first = compile_ms(lambda: Constraint(tok, vocab, ends, json_schema=TYPICAL).start([]).mask(logits),
                           repeats)
        results[name] = {"tokenizer_ms": built, "schema_ms": schema, "schema_and_first_mask_ms": first}
        calls = tools and tok.token_to_id("<tool_call>") is not None  # SmolLM2 has no call tokens
        if calls:
            results[name]["tool_calls_ms"] = compile_ms(
                lambda: Constraint(tok, vocab, ends, tools=TOOLS, call=""), repeats)
        print(f"compile {name}: llguidance's tokenizer {built:.0f} ms (once per Tokenizer); TYPICAL "
              f"{schema:.1f} ms ({first:.1f} ms with the first token's mask)"
              + (f"; calls of two tools {results[name]['tool_calls_ms']:.1f} ms" if calls else ""),
              flush=True)
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--work", default="~/.cache/minqwen-bench", help="where checkpoints are built")
    parser.add_argument("--parts", default="mask,compile")
    args = parser.parse_args()
    parts, work, repeats = args.parts.split(","), Path(args.work).expanduser(), 3 if args.quick else 9
    measures = {"mask": lambda: mask(work, repeats), "compile": lambda: compiling(work, repeats)}
    report_between_bandwidths("constraints", lambda: {name: measure() for name, measure in measures.items()
                                                      if name in parts})


if __name__ == "__main__":
    main()
