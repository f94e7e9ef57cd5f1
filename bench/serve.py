"""Serving throughput: aggregate completion tokens/s of `minqwen serve` with 1, 2, 4, 8 concurrent
streams, and time to first token under load.

    python bench/serve.py [--shape qwen2.5-0.5b] [--streams 1,2,4,8] [--prompt 128] [--new 128]
                          [--quantize bf16,int8] [--threads 2] [--rounds 3] [--work ~/.cache/minqwen-bench]
                          [--peer-url http://127.0.0.1:8081/v1] [--out results.json]

Each engine is a `python -m minqwen serve` process (--parallel = the most streams + 1) on the bench's
random-weight checkpoint (bench/checkpoints.py). For each number of streams K, K clients send at once a
streaming /v1/completions request each: a different random prompt of --prompt token ids (no prompt cache
to lean on), --new tokens at temperature 0 with `ignore_eos`, so every stream produces exactly --new.
Once all K are decoding, one more request (the probe: same prompt length, one token) measures the time
to first token of a request arriving under load: its prompt is prefilled in chunks beside the K decoding
streams (engine.PREFILL_PER_STEP). Figures are medians over --rounds, after one untimed warm-up round at
the largest K (JIT compiles, page faults).

    aggregate tok/s  all completion tokens / wall time from the first request sent to the last token
                     (prefill included: K prompts arriving together are prefilled before any decodes)
    decode tok/s     tokens after each stream's first / time from the last first token to the last token
                     (the steady state, all K decoding together)
    TTFT             the streams' median time to first token, and the probe's

A decode step reads every weight once whatever the number of streams, so decode tok/s should grow almost
K-fold until the step turns compute-bound. The peer: llama.cpp's server, if you start one (e.g.
`llama-server -m q8_0.gguf -np 9 -c 4096 -t 2 --port 8081`) and pass --peer-url; llama-cpp-python's
`llama_cpp.server` runs one request at a time (no parallel slots), so it is no peer for this bench.
The last stdout line is one JSON document.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from checkpoints import SHAPES, bench_checkpoint
from common import Bandwidth, report, warn_if_slow_blas

PROMPT_VOCAB = 151643  # ordinary tokens only (the special tokens start here)
WAIT = 600  # seconds before a request is given up on


class Server:
    """A `python -m minqwen serve` process on a free port, its threads as the bench says."""

    def __init__(self, folder: Path, quantize: str, parallel: int, threads: int, context: int):
        env = dict(os.environ, NUMBA_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
                   OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        command = [sys.executable, "-m", "minqwen", "serve", "--model", str(folder), "--port", "0",
                   "--parallel", str(parallel), "--context", str(context)]
        if quantize != "bf16":
            command += ["--quantize", quantize]
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
        line = self.process.stderr.readline()
        if not line.startswith("serving "):
            self.process.kill()
            why = (line + self.process.stderr.read()).strip()[-300:]
            raise RuntimeError(f"the server did not start: {why}")
        self.url = line.split(" at ")[1].split()[0]
        threading.Thread(target=self.process.stderr.read, daemon=True).start()  # drain the request log

    def close(self):
        self.process.terminate()
        self.process.wait(timeout=60)


def stream_completion(url: str, prompt: list[int], new: int, first_token: threading.Event | None = None
                      ) -> dict:
    """One streaming /completions request: when it was sent, its first token came (first_token is set
    then) and its last did, and how many tokens it got (from the usage chunk)."""
    address = urlparse(url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=WAIT)
    body = json.dumps({"model": "bench", "prompt": prompt, "max_tokens": new, "temperature": 0,
                       "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}})
    sent = time.perf_counter()
    connection.request("POST", address.path + "/completions", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    if response.status != 200:
        raise RuntimeError(f"{response.status}: {response.read()[:300]!r}")
    first, tokens = None, 0
    for line in response:
        if not line.startswith(b"data: {"):
            continue
        chunk = json.loads(line[len(b"data: "):])
        if chunk["choices"] and first is None:
            first = time.perf_counter()  # text shows with the first token (or the next, mid-character)
            if first_token is not None:
                first_token.set()
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    connection.close()
    return {"sent": sent, "first": first, "end": time.perf_counter(), "tokens": tokens}


def one_round(url: str, streams: int, prompt: int, new: int, seed: int) -> dict:
    """K streams at once, and a probe sent once all of them are decoding."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, PROMPT_VOCAB, size=prompt).tolist() for _ in range(streams + 1)]
    decoding = [threading.Event() for _ in range(streams)]
    with ThreadPoolExecutor(streams + 1) as pool:
        runs = [pool.submit(stream_completion, url, p, new, d) for p, d in zip(prompts, decoding)]
        for d in decoding:  # the probe goes once every stream has its first token
            d.wait(WAIT)
        probe = pool.submit(stream_completion, url, prompts[-1], 1)
        results = [r.result() for r in runs]
        probe = probe.result()
    start, end = min(r["sent"] for r in results), max(r["end"] for r in results)
    last_first = max(r["first"] for r in results)
    return {"aggregate_tok_s": sum(r["tokens"] for r in results) / (end - start),
            "decode_tok_s": sum(r["tokens"] - 1 for r in results) / (end - last_first),
            "ttft_s": statistics.median(r["first"] - r["sent"] for r in results),
            "probe_ttft_s": probe["first"] - probe["sent"],
            "tokens": [r["tokens"] for r in results]}


def measure(name: str, url: str, counts: list[int], args, bandwidth: Bandwidth) -> list[dict]:
    """One engine's rows: after a warm-up, rounds of every K in turn (the VM's speed drifts over minutes,
    and interleaving puts the same drift into every K's median: the ratios between them are the point)."""
    print(f"{name}: warm-up ({max(counts)} streams)", flush=True)
    one_round(url, max(counts), args.prompt, 8, seed=99)
    runs = {k: [] for k in counts}
    for r in range(args.rounds):
        for k in counts:
            got = one_round(url, k, args.prompt, args.new, seed=1000 * r + k)  # prompts nobody sent before
            runs[k].append(got)
            print(f"  round {r + 1}, {k} streams: {got['aggregate_tok_s']:.1f} tok/s aggregate, "
                  f"{got['decode_tok_s']:.1f} decoding, TTFT {got['ttft_s']:.2f} s, "
                  f"probe {got['probe_ttft_s']:.2f} s", flush=True)
        bandwidth.sample()
    rows = []
    for k, rounds in runs.items():
        medians = {key: statistics.median(r[key] for r in rounds) for key in rounds[0] if key != "tokens"}
        rows.append({"engine": name, "streams": k, **medians, "tokens_per_stream": rounds[0]["tokens"][0],
                     "rounds": rounds})
    for row in rows:
        row["vs_one_stream"] = row["aggregate_tok_s"] / rows[0]["aggregate_tok_s"]
        row["decode_vs_one_stream"] = row["decode_tok_s"] / rows[0]["decode_tok_s"]
    return rows


def run(args) -> dict:
    folder = bench_checkpoint(args.work, args.shape)
    counts = sorted(int(k) for k in args.streams.split(","))
    bandwidth = Bandwidth(1.0)
    bandwidth.sample()
    rows, skipped = [], []
    engines = [(f"minqwen-{q}", q) for q in args.quantize.split(",")]
    engines += [("peer", args.peer_url)] if args.peer_url else []
    if not args.peer_url:
        skipped.append({"engine": "llama.cpp", "reason": "no --peer-url: start llama.cpp's llama-server with "
                        "-np and pass its /v1 URL (llama-cpp-python's server has no parallel slots)"})
    for name, what in engines:
        server = (None if name == "peer"
                  else Server(folder, what, max(counts) + 1, args.threads, args.prompt + args.new + 64))
        try:
            rows += measure(name, what if server is None else server.url, counts, args, bandwidth)
        except Exception as e:  # a failing engine is reported, never the end of the bench
            skipped.append({"engine": name, "reason": f"{type(e).__name__}: {e}"[:300]})
            print(f"{name}: failed: {skipped[-1]['reason']}", flush=True)
        finally:
            if server is not None:
                server.close()
    return {"shape": args.shape, "prompt": args.prompt, "new_tokens": args.new, "threads": args.threads,
            "rounds": args.rounds, "read_bandwidth_GBps": bandwidth.median, "skipped": skipped, "rows": rows}


def print_table(results: dict):
    print(f"\n{results['shape']}, prompts of {results['prompt']} tokens, {results['new_tokens']} new tokens "
          f"per stream, {results['threads']} threads, median of {results['rounds']} rounds "
          f"(read bandwidth {results['read_bandwidth_GBps']:.1f} GB/s)")
    header = (f"{'engine':14} {'streams':>7} {'aggregate tok/s':>15} {'x 1 stream':>10} {'decode tok/s':>12} "
              f"{'x 1 stream':>10} {'TTFT s':>7} {'probe TTFT s':>12}")
    print(header)
    print("-" * len(header))
    for r in results["rows"]:
        print(f"{r['engine']:14} {r['streams']:7d} {r['aggregate_tok_s']:15.1f} {r['vs_one_stream']:10.2f} "
              f"{r['decode_tok_s']:12.1f} {r['decode_vs_one_stream']:10.2f} {r['ttft_s']:7.2f} "
              f"{r['probe_ttft_s']:12.2f}")
    for s in results["skipped"]:
        print(f"skipped: {s['engine']}: {s['reason']}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="qwen2.5-0.5b", choices=sorted(SHAPES))
    parser.add_argument("--streams", default="1,2,4,8", help="numbers of concurrent streams")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens per stream")
    parser.add_argument("--new", type=int, default=128, help="tokens generated per stream")
    parser.add_argument("--quantize", default="bf16,int8", help="minqwen engines: bf16, int8, int4")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "minqwen-bench")
    parser.add_argument("--peer-url", default=None, help="an OpenAI-compatible server to measure alike")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON document here")
    args = parser.parse_args()
    warn_if_slow_blas()
    started = time.perf_counter()
    results = run(args)
    print_table(results)
    results["seconds"] = round(time.perf_counter() - started)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    report("serve", results)


if __name__ == "__main__":
    main()
