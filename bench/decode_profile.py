"""Where one decode step's (or one prefill's) time goes: each kernel the forward pass calls, and everything
outside them.

    python bench/decode_profile.py [--shape qwen2.5-0.5b] [--quantize int8|int4] [--context 128] [--steps 64]
    python bench/decode_profile.py --model ~/.cache/minqwen-bench/<shape>/gguf-<version>/q4_k_m.gguf
    python bench/decode_profile.py --model ~/.cache/minqwen-test/SmolLM2-135M-Instruct.Q4_1.gguf \
        --prompt-tokens 42 --steps 32      # 32 prefills of a 42-token prompt, each into a fresh sequence

Every kernel name the forward pass looks up in minqwen.network.decoder (linear, rmsnorm, apply_rope,
attention_decode, swiglu, ...) is wrapped with a clock for the run; matrix products are told apart by
their weight's shape. "outside kernels" is the step's wall time minus the time inside them: the Python of the
forward pass, NumPy one-liners (residual adds, the KV-cache store) and the calls themselves. The
step is the bench's `sequence.extend([token])`, lm_head and argmax included; with --prompt-tokens, a step
is the bench's prefill instead, `reset_to(prompt)` of a fresh sequence (its cache allocated untimed).
Each kernel's GB/s is the bytes of weights it read over its time (matrix products, and moe_one_token:
the chosen experts' matrices), next to the machine's read bandwidth measured in the same run. Prints a
table, then one JSON document.
"""
# ruff: noqa: I001 (minqwen is imported before NumPy, out of isort's order)
import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import minqwen  # noqa: F401 (before NumPy: it sets OpenBLAS's and libgomp's spinning, read as they load)
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import minqwen.network.decoder as model_module  # noqa: E402
from checkpoints import SHAPES, bench_checkpoint  # noqa: E402
from common import Bandwidth, context_switches, report, warn_if_contended  # noqa: E402
from minqwen import load  # noqa: E402

KERNELS = ["embed", "rmsnorm", "linear", "apply_rope", "attention_decode", "attention_prefill", "swiglu",
           "moe_one_token", "moe_by_expert", "route", "causal_conv1d", "l2norm", "delta_rule_gates",
           "gated_delta_rule_recurrent", "gated_rmsnorm", "sigmoid_gate"]


def weight_bytes(w) -> int:  # an array, or a quantised matrix: a NamedTuple of arrays (and sizes)
    return sum(a.nbytes for a in w if isinstance(a, np.ndarray)) if isinstance(w, tuple) else w.nbytes


class Clocks:
    """Wraps the kernels in minqwen.network.decoder's namespace; seconds, calls and bytes per label."""

    def __init__(self):
        self.seconds, self.calls, self.bytes = defaultdict(float), defaultdict(int), defaultdict(int)
        self.originals = {name: getattr(model_module, name) for name in KERNELS}
        for name, kernel in self.originals.items():
            setattr(model_module, name, self.clocked(name, kernel))

    def clocked(self, name, kernel):
        def run(*args):
            label, nbytes = name, 0
            if name == "linear":  # linear(out, x, w): label by the weight's shape
                rows, cols = args[2].shape
                label, nbytes = f"linear {rows}x{cols}", weight_bytes(args[2])
            elif name == "moe_one_token":  # (out, hidden, x, gate_w, up_w, down_w, experts, weights)
                nbytes = sum(weight_bytes(matrices[e]) for matrices in args[3:6] for e in args[6])
            start = time.perf_counter()
            kernel(*args)
            self.seconds[label] += time.perf_counter() - start
            self.calls[label] += 1
            self.bytes[label] += nbytes
        return run

    def reset(self):
        self.seconds.clear(), self.calls.clear(), self.bytes.clear()

    def restore(self):
        for name, kernel in self.originals.items():
            setattr(model_module, name, kernel)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="qwen2.5-0.5b", choices=list(SHAPES))
    parser.add_argument("--quantize", choices=("int8", "int4"), default=None)
    parser.add_argument("--context", type=int, default=128, help="prompt tokens before the timed steps")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=None,
                        help="profile prefills of a prompt this long instead of decode steps")
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "minqwen-bench")
    parser.add_argument("--model", type=Path, default=None,
                        help="a checkpoint folder or GGUF file instead of --shape (e.g. generate.py's)")
    args = parser.parse_args()
    if args.model is not None:
        args.shape = args.model.name

    model = load(args.model.expanduser() if args.model else bench_checkpoint(args.work, args.shape),
                 quantize=args.quantize)
    prompt = list(np.random.default_rng(0).integers(1000, 20000, args.prompt_tokens or args.context))
    bandwidth = Bandwidth()
    sequence = model.sequence()

    def decode(steps, clocks=None):
        token = int(np.argmax(sequence.reset_to(prompt)))
        if clocks is not None:  # count the timed steps only
            clocks.reset()
        total = 0.0
        for _ in range(steps):
            start = time.perf_counter()
            token = int(np.argmax(sequence.extend([token])))
            total += time.perf_counter() - start
        return total

    def prefill(steps, clocks=None):
        if clocks is not None:
            clocks.reset()
        total = 0.0
        for _ in range(steps):
            fresh = model.sequence()
            start = time.perf_counter()
            int(np.argmax(fresh.reset_to(prompt)))
            total += time.perf_counter() - start
        return total

    run = prefill if args.prompt_tokens else decode
    run(4)  # compile, page the weights in
    unclocked = run(args.steps)
    bandwidth.sample()
    clocks = Clocks()
    switches = context_switches()
    clocked = run(args.steps, clocks)
    switches = context_switches() - switches
    clocks.restore()
    bandwidth.sample()
    bw = bandwidth.median

    inside = sum(clocks.seconds.values())
    step_ms = clocked / args.steps * 1e3
    weights = args.quantize or ("as stored" if args.model else "bf16")
    what = f"prefill of {args.prompt_tokens} tokens" if args.prompt_tokens else f"context {args.context}"
    print(f"{args.shape} {weights}, {what}, {args.steps} steps: "
          f"{step_ms:.2f} ms a step clocked ({(args.prompt_tokens or 1) * args.steps / clocked:.1f} tok/s), "
          f"{unclocked / args.steps * 1e3:.2f} ms unclocked; read bandwidth {bw:.1f} GB/s\n")
    print(f"{'kernel':28s} {'calls/step':>10s} {'ms/step':>8s} {'share':>6s} {'GB/s':>6s} {'of bw':>6s}")
    rows = []
    for label in sorted(clocks.seconds, key=clocks.seconds.get, reverse=True):
        seconds = clocks.seconds[label]
        gbps = clocks.bytes[label] / seconds / 1e9 if clocks.bytes[label] else None
        rows.append({"kernel": label, "calls_per_step": clocks.calls[label] / args.steps,
                     "ms_per_step": seconds / args.steps * 1e3, "share": seconds / clocked,
                     "GBps": gbps, "of_bandwidth": gbps / bw if gbps else None})
        r = rows[-1]
        print(f"{label:28s} {r['calls_per_step']:10.0f} {r['ms_per_step']:8.3f} {r['share']:6.1%} "
              + (f"{gbps:6.1f} {gbps / bw:6.2f}" if gbps else ""))
    outside = clocked - inside
    print(f"{'outside kernels':28s} {'':10s} {outside / args.steps * 1e3:8.3f} {outside / clocked:6.1%}")
    warn_if_contended(switches, args.steps)
    report("profile", {"shape": args.shape, "quantize": args.quantize, "context": args.context,
                       "prompt_tokens": args.prompt_tokens,
                       "steps": args.steps, "step_ms_clocked": step_ms,
                       "step_ms_unclocked": unclocked / args.steps * 1e3, "read_bandwidth_GBps": bw,
                       "outside_kernels_ms": outside / args.steps * 1e3, "outside_share": outside / clocked,
                       "context_switches": switches, "kernels": rows})


if __name__ == "__main__":
    main()
