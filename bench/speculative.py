"""Speculative decoding's speed (issue 20), in one run, with the machine's read bandwidth:

    python bench/speculative.py [--quick] [--work DIR] [--parts lookup,verify,mtp]

lookup   prompt lookup (`--speculative ngram`) on the real SmolLM2-135M-Instruct (the Q4_1 GGUF the tests
         fetch), greedy: a code edit (rename a parameter of a 20-line function, return the whole code) and a
         plain question; decode tok/s plain and speculative, interleaved, and the drafts accepted. Twice:
         with the weights as stored (Q4_1, the head Q8_0), and the same model with every matrix dequantised
         and rounded to bf16 in memory, where a verify pass costs less against a step; for each, the cost
         of a pass over 1, 5 and 9 positions (a step, and verifying 4 or 8 drafts).
verify   what checking drafts costs: a pass over k + 1 = 4 positions (the last token and 3 drafts, every
         row's logits, DeltaNet states kept) against one decode step, after a 128-token prompt, on the
         Qwen3-0.6B shape in bf16, int8 (`quantize="int8"`) and llama.cpp's Q4_K_M of it.
mtp      the Qwen3.5-35B-A3B shape cut to 8 layers and 64 experts (bench/checkpoints.py) with a random MTP
         head: a decode step, a verify pass over k + 1 positions, one pass of the head; random weights
         accept nothing, so the tokens/s that acceptance a would give are computed from those costs: a round
         drafts k tokens (k passes of the head) and verifies them in one pass, and yields
         (1 - a^(k+1)) / (1 - a) tokens on average.

The speeds are ratios within this run; the last stdout line is the JSON report.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import shutil
import sys
import time
from pathlib import Path

import numpy as np

import minqwen
from checkpoints import bench_checkpoint
from common import report_between_bandwidths
from minqwen.kernels.dtypes import BF16, from_float32
from minqwen.kernels.ggml import GgmlMatrix, dequantize_ggml
from minqwen.text.generation import GenerationOptions, Stats, stream_tokens

TESTS = Path(__file__).resolve().parent.parent / "tests"
FUNCTION = '''def summarize_orders(orders, currency, tax_rate):
    """Total the orders of each customer, in one currency, with tax."""
    totals = {}
    for order in orders:
        if order["currency"] != currency:
            raise ValueError(f"order {order['id']} is not in {currency}")
        customer = order["customer"]
        amount = order["amount"] * (1 + tax_rate)
        if customer not in totals:
            totals[customer] = 0.0
        totals[customer] += amount
    report = []
    for customer, total in sorted(totals.items()):
        line = f"{customer}: {total:.2f} {currency}"
        report.append(line)
    if not report:
        return "no orders in " + currency
    summary = "\\n".join(report)
    print(f"{len(report)} customers, currency {currency}, tax {tax_rate}")
    return summary
'''
CODE_EDIT = ("Rename the parameter `currency` to `unit` in this function and return the whole function, "
             "nothing else.\n\n```python\n" + FUNCTION + "```")
QUESTION = "Why is the sky blue? Answer in a few sentences."


def tests_module(name: str):
    """A helper module of tests/ (bench/ has its own checkpoints.py, so not by sys.path)."""
    spec = importlib.util.spec_from_file_location(f"tests_{name}", TESTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(TESTS))  # its own imports
    spec.loader.exec_module(module)
    sys.path.remove(str(TESTS))
    return module


def decode_speed(model, prompt, n, drafter) -> tuple[float, Stats]:
    stats = Stats()
    for _ in stream_tokens(model.sequence(), prompt, n, GenerationOptions(), model.eos_token_ids, None, stats,
                           drafter=drafter, most_drafts=8):
        pass
    return (stats.generated_tokens - 1) / stats.decode_seconds, stats


def widened_to_bf16(model):
    """The model with each GGML matrix replaced by its dequantised values rounded to bf16 (the tied
    embedding and LM head stay one array)."""
    widened = {}

    def widen(weights):
        for field in dataclasses.fields(weights):
            value = getattr(weights, field.name)
            if isinstance(value, GgmlMatrix):
                if id(value) not in widened:
                    widened[id(value)] = from_float32(dequantize_ggml(value), BF16)
                setattr(weights, field.name, widened[id(value)])
            elif dataclasses.is_dataclass(value):
                widen(value)
            elif isinstance(value, list):
                for item in value:
                    widen(item)

    widen(model.weights)
    return model


def lookup(rounds: int, new_tokens: int, repeats: int) -> dict:
    path = tests_module("gguf_files").smollm2_path()
    results = {}
    for kind in ("q4_1", "bf16"):
        model = minqwen.load(path) if kind == "q4_1" else widened_to_bf16(minqwen.load(path))
        sequence = prompted(model)
        pass_seconds(model, sequence, 9, 2)  # compiled, warm
        passes = {rows: 1e3 * pass_seconds(model, sequence, rows, repeats) for rows in (1, 5, 9)}
        print(f"lookup {kind}: a pass over 1 / 5 / 9 positions "
              + " / ".join(f"{ms:.1f}" for ms in passes.values()) + " ms = 1 / "
              + " / ".join(f"{ms / passes[1]:.2f}" for ms in list(passes.values())[1:]) + "x", flush=True)
        measured = {"pass_ms": passes}  # Q4_1's at the top level (the keys it had), bf16's under "bf16"
        for name, text in (("code_edit", CODE_EDIT), ("question", QUESTION)):
            prompt = model.tokenizer.apply_chat_template([{"role": "user", "content": text}])
            decode_speed(model, prompt, 8, None)  # compiled, warm
            plain, ours = [], []
            for _ in range(rounds):  # interleaved: the machine's drift hits both alike
                plain.append(decode_speed(model, prompt, new_tokens, None)[0])
                speed, stats = decode_speed(model, prompt, new_tokens, model.drafter("ngram"))
                ours.append(speed)
            plain, ours = float(np.median(plain)), float(np.median(ours))
            measured[name] = {"prompt_tokens": len(prompt), "generated": stats.generated_tokens,
                              "plain_tok_s": plain, "ngram_tok_s": ours, "ratio": ours / plain,
                              "drafted": stats.drafted, "accepted": stats.accepted}
            print(f"lookup {kind} {name}: plain {plain:.1f} tok/s, ngram {ours:.1f} tok/s = "
                  f"{ours / plain:.2f}x ({stats.accepted} of {stats.drafted} drafts accepted)", flush=True)
        if kind == "q4_1":
            results.update(measured)
        else:
            results[kind] = measured
    return results


def pass_seconds(model, sequence, rows: int, repeats: int) -> float:
    """Median seconds of one pass over `rows` new positions after the sequence (logits of each row and
    DeltaNet states kept when more than one, as a verify pass does), each forgotten again."""
    start, tokens = len(sequence.tokens), list(range(100, 100 + rows))
    sequence.cache.snapshot()  # a decode step keeps no states: a hybrid returns to the snapshot
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        if rows > 1:
            sequence.cache.keep_states()
        sequence.extend(tokens, every_token=rows > 1)
        times.append(time.perf_counter() - began)
        sequence.truncate(start)
    return float(np.median(times))


def prompted(model, length: int = 128):
    sequence = model.sequence()
    sequence.extend(np.random.default_rng(0).integers(0, 1000, length).tolist())
    return sequence


def verify(work: Path, repeats: int) -> dict:
    folder = bench_checkpoint(work, "qwen3-0.6b")
    gguf = folder / "gguf-0.3.36" / "q4_k_m.gguf"
    models = {"bf16": lambda: minqwen.load(folder), "int8": lambda: minqwen.load(folder, quantize="int8")}
    if gguf.exists():  # bench/generate.py converts it with llama.cpp's tools
        models["q4_k_m"] = lambda: minqwen.load(gguf)
    else:
        print(f"verify: no {gguf} (run bench/generate.py once to convert it); Q4_K_M left out", flush=True)
    results = {}
    for name, load in models.items():
        model = load()
        sequence = prompted(model)
        pass_seconds(model, sequence, 4, 2)  # compiled, warm
        steps, verifies = [], []
        for _ in range(3):
            steps.append(pass_seconds(model, sequence, 1, repeats))
            verifies.append(pass_seconds(model, sequence, 4, repeats))
        step, four = float(np.median(steps)), float(np.median(verifies))
        results[name] = {"decode_step_ms": 1e3 * step, "verify_4_ms": 1e3 * four, "ratio": four / step}
        print(f"verify {name}: decode step {1e3 * step:.1f} ms, 4 positions {1e3 * four:.1f} ms = "
              f"{four / step:.2f}x", flush=True)
    return results


def mtp_checkpoint(work: Path) -> Path:
    """The 8-layer Qwen3.5-35B-A3B shape with a random MTP head beside its weights (built once)."""
    base = bench_checkpoint(work, "qwen3.5-35b-a3b-8layers-64experts")
    folder = Path(work).expanduser() / "qwen3.5-35b-a3b-8layers-64experts-mtp"
    if not (folder / "model-mtp.safetensors").exists():
        print(f"adding a random MTP head in {folder} (once)", flush=True)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for f in base.iterdir():
            if f.is_file():
                (folder / f.name).symlink_to(f)
        tests_module("checkpoints").add_mtp_head(folder)
    return folder


def mtp(work: Path, repeats: int) -> dict:
    model = minqwen.load(mtp_checkpoint(work))
    sequence = prompted(model)
    drafter = model.drafter("mtp")
    head, cache = drafter.head, drafter.cache
    hidden = model.decoder.hidden[-1:].copy()

    def head_pass():
        began = time.perf_counter()
        head.extend(cache, hidden, np.array([7]))
        seconds = time.perf_counter() - began
        cache.rewind(cache.length - 1)
        return seconds

    head_pass()
    step = float(np.median([pass_seconds(model, sequence, 1, repeats) for _ in range(3)]))
    verifies = {k: pass_seconds(model, sequence, k + 1, repeats) for k in (1, 2, 3)}
    draft = float(np.median([head_pass() for _ in range(repeats)]))
    predicted = {}
    for a in (0.6, 0.8):
        for k, seconds in verifies.items():
            tokens = (1 - a ** (k + 1)) / (1 - a)
            predicted[f"a={a},k={k}"] = {"tok_s": tokens / (seconds + k * draft), "plain_tok_s": 1 / step,
                                         "speedup": tokens * step / (seconds + k * draft)}
    best = {a: max((v for key, v in predicted.items() if key.startswith(f"a={a},")),
                   key=lambda v: v["speedup"]) for a in (0.6, 0.8)}
    print(f"mtp: decode step {1e3 * step:.1f} ms, head pass {1e3 * draft:.1f} ms, verify "
          + ", ".join(f"k+1={k + 1} {1e3 * s:.1f} ms" for k, s in verifies.items())
          + "; predicted " + ", ".join(f"acceptance {a}: {v['tok_s']:.1f} tok/s ({v['speedup']:.2f}x)"
                                       for a, v in best.items()), flush=True)
    return {"decode_step_ms": 1e3 * step, "head_pass_ms": 1e3 * draft,
            "verify_ms": {k + 1: 1e3 * s for k, s in verifies.items()}, "predicted": predicted}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and tokens")
    parser.add_argument("--work", default="~/.cache/minqwen-bench", help="where checkpoints are built")
    parser.add_argument("--parts", default="lookup,verify,mtp")
    args = parser.parse_args()
    parts, work, repeats = args.parts.split(","), Path(args.work).expanduser(), 3 if args.quick else 7
    measures = {"lookup": lambda: lookup(1 if args.quick else 3, 120 if args.quick else 300, repeats),
                "verify": lambda: verify(work, repeats), "mtp": lambda: mtp(work, repeats)}
    report_between_bandwidths("speculative", lambda: {name: measure() for name, measure in measures.items()
                                                      if name in parts})


if __name__ == "__main__":
    main()
