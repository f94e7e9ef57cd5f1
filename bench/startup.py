"""Start-up bench: time to first token of a fresh process, with Numba's disk cache cold and warm.

    python bench/startup.py [--shapes qwen2.5-0.5b,qwen3-0.6b] [--repeats 3] [--quantize int8]

What a user waits for after typing `python -m minqwen generate ...`: the interpreter starts, minqwen
and its kernels are imported, the checkpoint is opened (memory-mapped), the chat-templated prompt
is encoded and prefilled, and the first token is sampled. Each run is a new process, timed from the
moment the parent starts it; the child reports when each phase ended:

    import   python + numpy + numba + minqwen imported
    load     config, tokenizer and weights ready (mmap: pages are read later, on first touch)
    first    the first generated token is known (prefill, including any JIT compilation)

Cold: Numba's cache points at an empty folder, so every kernel compiles (what the first run after
installing costs). Warm: the same folder again, as every later run finds it. The checkpoint's pages
are in the OS page cache in both (it was just built or read), so "cold" is about compilation, not
the disk. Prints a table, then one JSON document.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

PROMPT = "Explain in two sentences why the sky is blue."


def child(folder: str, quantize: str | None):
    """Runs in the timed process: report the end of each phase, in seconds since the parent started it."""
    started = float(os.environ["STARTUP_BENCH_T0"])
    phases = {}
    from minqwen import load
    phases["import"] = time.time() - started
    model = load(folder, quantize=quantize)
    phases["load"] = time.time() - started
    prompt = model.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}],
                                                 add_generation_prompt=True)
    next(iter(model.stream(prompt, 1)))
    phases["first"] = time.time() - started
    print(json.dumps({"prompt_tokens": len(prompt), **phases}))


def run_child(folder: Path, cache_dir: str, threads: int, quantize: str | None) -> dict:
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir, NUMBA_NUM_THREADS=str(threads),
               OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
               STARTUP_BENCH_T0=repr(time.time()))
    command = ([sys.executable, __file__, "--child", str(folder)]
               + (["--quantize", quantize] if quantize else []))
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"the timed process failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    from checkpoints import SHAPES, bench_checkpoint

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="qwen2.5-0.5b", help=f"any of {', '.join(SHAPES)}")
    parser.add_argument("--repeats", type=int, default=3, help="cold and warm runs each (medians reported)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quantize", choices=("int8", "int4"), default=None)
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "minqwen-bench")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.quantize)

    rows = []
    print(f"{'shape':14s} {'cache':6s} {'import s':>9s} {'load s':>7s} {'first token s':>14s}")
    for shape in args.shapes.split(","):
        folder = bench_checkpoint(args.work, shape)
        run_child(folder, tempfile.mkdtemp(), args.threads, args.quantize)  # page the checkpoint in
        for cache in ("cold", "warm"):
            runs = []
            for _ in range(args.repeats):
                if cache == "cold":  # a new empty cache each time; the warm runs reuse the last one
                    cache_dir = tempfile.mkdtemp(prefix="numba-cold-")
                runs.append(run_child(folder, cache_dir, args.threads, args.quantize))
            median = {k: sorted(r[k] for r in runs)[len(runs) // 2] for k in ("import", "load", "first")}
            rows.append({"shape": shape, "cache": cache, "quantize": args.quantize,
                         "prompt_tokens": runs[0]["prompt_tokens"], "runs": runs, **median})
            print(f"{shape:14s} {cache:6s} {median['import']:9.2f} {median['load']:7.2f} "
                  f"{median['first']:14.2f}")
    from common import report
    report("startup", {"threads": args.threads, "rows": rows})


if __name__ == "__main__":
    main()
