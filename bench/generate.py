"""Prefill and decode speed of minqwen (bf16, int8, int4, and llama.cpp's own GGUF files) against
transformers and llama.cpp, in one run, on the same checkpoints, prompts and thread count.

    python bench/generate.py [--shapes qwen2.5-0.5b,qwen3-0.6b] [--prompts 128,512] [--new 64]
                             [--threads 2] [--repeats 3] [--rounds 1]
                             [--engines minqwen,transformers,llama.cpp]
                             [--work ~/.cache/minqwen-bench] [--out results.json]

Checkpoints: random bf16 weights with the real shapes of Qwen2.5-0.5B-Instruct and Qwen3-0.6B, and
on request (--shapes qwen3.5-35b-a3b-8layers-64experts, 5.8 GB) Qwen3.5-35B-A3B's shape with 8 of its 40
layers and 64 of its 256 experts, built once under --work (bench/checkpoints.py). --shapes smollm2-135m is
the one trained model reachable offline, as published: the Q4_1 GGUF the tests fetch, which only the -q4_1
engines run (the small model of issue 19's item 4, whose fixed costs per layer and call weigh most).
Prompts: random token ids, no chat template.

Every engine gets --threads threads (numba.set_num_threads, torch.set_num_threads, llama.cpp's
n_threads, and OPENBLAS/OMP/MKL_NUM_THREADS for BLAS) and runs in a fresh process, so no engine's
thread pool, memory or crash can touch another's. What is timed, the same way for every engine:
- prefill tok/s = prompt tokens / time from a fresh sequence to the logits of the last prompt token;
- decode tok/s = (new - 1) / time of the (new - 1) one-token steps that follow, each feeding back the
  greedy (argmax) token: `new` generated tokens in all, end-of-sequence ignored.
A warm-up is not timed (each prompt once, then 8 steps: JIT compiles, page faults, buffers; for
transformers, which compiles nothing, 32 tokens); the figures are medians over --repeats x --rounds.
- minqwen: `model.sequence().reset_to(prompt)`, then `sequence.extend([token])` per step; minqwen-q8_0,
  -q4_0, -q4_1, -q4_k_m, -q5_k_m and -q6_k load the very GGUF files llama.cpp runs (the "same file" ratio
  column).
- transformers (bf16, torch CPU): `model.generate(do_sample=False, min_new_tokens=max_new_tokens=new)`,
  timed by a logits processor that stamps the clock as each token's logits arrive: prefill = the first
  stamp (a forward over the prompt, logits of its last position only), decode = first to last stamp.
- llama.cpp (llama-cpp-python; GGUF bf16, Q8_0, Q4_0, Q4_1, Q4_K_M, Q5_K_M, Q6_K converted by llama.cpp's own
  convert_hf_to_gguf.py and llama_model_quantize, cached under --work): `llm.eval(prompt)`, then
  `llm.eval([token])` per step with the argmax of the last logits; n_batch = n_ubatch = 512,
  n_threads = n_threads_batch = --threads.

The decode limit of a row is the read bandwidth (a Numba prange sum over 1 GiB, sampled before, between
and after the engines; the median sample) divided by the bytes of weights one decode step must read,
counted from what the engine loaded: every matrix and vector once, lm_head included (a tied lm_head is
the embedding table), an untied embedding table not (one row per token), nor the KV cache (a few MB);
MoE experts at num_experts_per_tok / num_experts of their bytes (what one token reads of them).

Prefill's arithmetic: GFLOP/s = 2 x the multiply-adds of one prompt's matrix products (prefill_flops: every
layer's projections and MLP for each token, attention's QK^T and PV over the causal triangle, the LM head
for the last token only) / prefill time, and that as a fraction of this machine's float32 FMA peak on the
same threads (common.fp32_fma_peak, sampled with the bandwidth; the best sample): the ceiling of a prefill
that multiplies in float32, as minqwen's does by default, but not of one on integer dot products (the int16
and int8 dot peaks are printed beside it), and as a fraction of the bf16 dot peak where the CPU has one (the
ceiling of a bf16 prefill on vdpbf16ps: llama.cpp's on bf16 files, minqwen's with MINQWEN_PREFILL=bf16).
MINQWEN_PREFILL / MINQWEN_DECODE in the bench's environment run minqwen's opt-in modes (kernels/isa.py);
the header and the JSON say which ran.

The last stdout line is one JSON document with everything (also written to --out).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import fields, is_dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from speculative import tests_module

import minqwen
from checkpoints import SHAPES, bench_checkpoint, converter_options
from common import (
    Bandwidth,
    bf16_dot_peak,
    fp32_fma_peak,
    int8_dot_peak,
    int16_dot_peak,
    machine,
    warn_if_slow_blas,
    warn_if_workqueue,
)
from minqwen.formats.safetensors import load_config
from minqwen.kernels import isa
from minqwen.loader import open_checkpoint
from minqwen.network.config import Config

ENGINES = ("minqwen-bf16", "minqwen-int8", "minqwen-int4", "minqwen-q8_0", "minqwen-q4_0", "minqwen-q4_1",
           "minqwen-q4_k_m", "minqwen-q5_k_m", "minqwen-q6_k", "transformers-bf16", "llama.cpp-bf16",
           "llama.cpp-q8_0", "llama.cpp-q4_0", "llama.cpp-q4_1", "llama.cpp-q4_k_m", "llama.cpp-q5_k_m",
           "llama.cpp-q6_k")
SAME_FILE = "llama.cpp, same file"  # minqwen on a GGUF file against llama.cpp on that file
BASELINES = ("transformers-bf16", "llama.cpp-bf16", "llama.cpp-q8_0", SAME_FILE)  # the ratio columns
# llama.h's LLAMA_FTYPE_MOSTLY_Q8_0, _Q4_0, _Q4_1, _Q4_K_M, _Q5_K_M, _Q6_K
GGUF_FTYPES = {"q8_0": 7, "q4_0": 2, "q4_1": 3, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}
TRAINED = "smollm2-135m"  # --shapes: SmolLM2-135M-Instruct as published, a Q4_1 GGUF (tests/gguf_files.py)
PREFILL_GOAL = 1.2  # issue 19: minqwen's prefill >= 1.2x llama.cpp's on the same file
WARMUP_STEPS = 8
WARMUP_PROMPT = 32  # tokens of transformers' warm-up prompt (see time_transformers)
PROMPT_VOCAB = 151643  # random prompts use ordinary tokens only (the special tokens start here)


class Skip(Exception):
    """An engine that cannot run here: reported in one line, never a crash."""


# ---- timing: the same loop for every engine that can be driven one step at a time ----

def time_steps(runner, prompts: list[list[int]], new: int, repeats: int) -> dict:
    """{prompt length: ([prefill seconds], [decode seconds])} of `runner` (start(prompt) -> first greedy
    token of a fresh sequence; step(token) -> next greedy token), after an untimed warm-up on every
    prompt (kernels/linear.py picks a product's kernel by its number of tokens: each may compile its own)."""
    for prompt in prompts:
        token = runner.start(prompt)
    for _ in range(min(WARMUP_STEPS, new - 1)):
        token = runner.step(token)
    times = {}
    for prompt in prompts:
        prefill, decode = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            token = runner.start(prompt)
            t1 = time.perf_counter()
            for _ in range(new - 1):
                token = runner.step(token)
            t2 = time.perf_counter()
            prefill.append(t1 - t0)
            decode.append(t2 - t1)
        times[len(prompt)] = (prefill, decode)
    return times


class MinqwenRunner:
    def __init__(self, folder: Path, quantize: str | None):
        import minqwen

        self.model = minqwen.load(folder, quantize=quantize)
        self.sequence = None

    def start(self, prompt: list[int]) -> int:
        self.sequence = self.model.sequence()
        return int(np.argmax(self.sequence.reset_to(prompt)))

    def step(self, token: int) -> int:
        return int(np.argmax(self.sequence.extend([token])))


class LlamaCppRunner:
    def __init__(self, gguf: Path, threads: int, n_ctx: int):
        import llama_cpp

        self.llama_cpp = llama_cpp
        self.llm = llama_cpp.Llama(str(gguf), n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=threads,
                                   n_threads_batch=threads, verbose=False)
        self.n_vocab = self.llm.n_vocab()

    def start(self, prompt: list[int]) -> int:
        self.llm.reset()  # n_tokens = 0: eval() then drops the cached KV entries past it
        self.llm.eval(prompt)
        return self.greedy()

    def step(self, token: int) -> int:
        self.llm.eval([token])
        return self.greedy()

    def greedy(self) -> int:
        # without logits_all the binding keeps no copy of the logits: read the last row from the context
        row = self.llama_cpp.llama_get_logits_ith(self.llm._ctx.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(row, shape=(self.n_vocab,))))


def time_transformers(model, prompts: list[list[int]], new: int, repeats: int) -> dict:
    """As time_steps, through model.generate: a logits processor stamps the clock at each new token."""
    import torch
    from transformers import LogitsProcessor

    class Clock(LogitsProcessor):
        def __init__(self):
            self.stamps = []

        def __call__(self, input_ids, scores):
            self.stamps.append(time.perf_counter())
            return scores

    def generate(prompt: list[int], n: int) -> tuple[float, float]:
        clock = Clock()
        ids = torch.tensor([prompt])
        start = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                       min_new_tokens=n, logits_processor=[clock], pad_token_id=0)
        assert len(clock.stamps) == n, "generate stopped early"
        return clock.stamps[0] - start, clock.stamps[-1] - clock.stamps[0]

    times = {}
    with torch.inference_mode():
        # Eager torch compiles nothing per shape: a short warm-up (thread pool, allocator, first-call
        # dispatch) spares minutes of bf16 prefill, which is slow on CPUs without bf16 instructions.
        generate(prompts[0][:WARMUP_PROMPT], min(WARMUP_STEPS, new - 1) + 1)
        for prompt in prompts:
            runs = [generate(prompt, new) for _ in range(repeats)]
            times[len(prompt)] = ([p for p, _ in runs], [d for _, d in runs])
    return times


# ---- bytes one decode step reads ----

def minqwen_decode_bytes(model) -> int:
    """Bytes of every array reachable from the layers, the final norm and lm_head, each counted once
    (a quantised matrix is a NamedTuple holding its arrays: GGML blocks, or FP8 values and scales);
    an MoE layer's experts at num_experts_per_tok / num_experts of their bytes, the share of them one
    token reads."""
    from minqwen.network.weights import MoEWeights

    config = model.config
    seen: dict[tuple[int, int], float] = {}  # (address, bytes): a view boxed twice is one array

    def visit(x, share: float = 1.0):
        if isinstance(x, np.ndarray):
            seen[(x.ctypes.data, x.nbytes)] = x.nbytes * share
        elif isinstance(x, MoEWeights):
            for f in fields(x):  # the experts are numba typed Lists, read k of n per token
                experts = f.name in ("gate_projs", "up_projs", "down_projs")
                visit(list(getattr(x, f.name)) if experts else getattr(x, f.name),
                      share * config.num_experts_per_tok / config.num_experts if experts else share)
        elif is_dataclass(x):
            for f in fields(x):
                visit(getattr(x, f.name), share)
        elif isinstance(x, (list, tuple)):
            for item in x:
                visit(item, share)

    w = model.weights
    visit([w.layers, w.norm, w.lm_head])
    return round(sum(seen.values()))


def transformers_decode_bytes(model) -> int:
    """As minqwen_decode_bytes: experts (`mlp.experts.*`) count k / n of their bytes."""
    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    config = model.config
    experts = config.num_experts_per_tok / config.num_experts if getattr(config, "num_experts", 0) else 1
    rest = sum(p.nbytes * (experts if ".experts." in name else 1) for name, p in model.named_parameters()
               if p is not embedding and p is not head)
    return round(rest + head.nbytes)


def gguf_decode_bytes(gguf: Path, source: Path) -> int:
    """All tensors of the file but the embedding table, which counts only when it is also the output;
    the experts' (`*_exps`) at expert_used_count / expert_count of their bytes. Cached beside the file:
    GGUFReader parses the 150k-token vocabulary in Python (~20 s)."""
    cached = gguf.with_suffix(".decode-bytes")
    if not cached.exists():
        sys.path.insert(0, str(source / "gguf-py"))
        from gguf import GGUFReader

        reader = GGUFReader(gguf)
        arch = reader.get_field("general.architecture").contents()
        count, used = (reader.get_field(f"{arch}.{key}") for key in ("expert_count", "expert_used_count"))
        experts = used.contents() / count.contents() if count is not None else 1
        sizes = {t.name: int(t.n_bytes) * (experts if "_exps." in t.name else 1) for t in reader.tensors}
        if "output.weight" in sizes:
            sizes.pop("token_embd.weight", None)
        cached.write_text(str(round(sum(sizes.values()))))
    return int(cached.read_text())


# ---- prefill's arithmetic ----

def prefill_flops(config: Config, length: int) -> int:
    """2 x the multiply-adds of the matrix products in one prefill of `length` tokens:
    - per token and layer, the projections (attention q [with its output gate], k, v, o; DeltaNet
      in_proj_qkv, z, b, a and out_proj) and the MLP (SwiGLU gate, up, down; an MoE layer's router, its
      num_experts_per_tok experts, the shared expert and its gate);
    - per attention layer and head, QK^T and PV: head_dim multiply-adds for each query-key pair of the
      causal triangle, sum_t min(t + 1, window) pairs (length (length + 1) / 2 without a window);
    - the LM head for the last token only.
    Not counted (not matrix products; a few % of these shapes): DeltaNet's recurrence and convolution,
    norms, RoPE, softmax, the activation."""
    c, d = config, config.hidden_size
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    attention = d * (q * (2 if c.family.output_gate else 1) + 2 * kv) + q * d
    deltanet = (d * (c.deltanet_conv_channels + c.deltanet_value_dim + 2 * c.linear_num_value_heads)
                + c.deltanet_value_dim * d)
    shared = c.shared_expert_intermediate_size
    sparse = d * c.num_experts + 3 * d * (c.num_experts_per_tok * c.moe_intermediate_size + shared) \
        + (d if shared else 0)
    per_token = sum((deltanet if kind == "linear_attention" else attention)
                    + (sparse if c.is_sparse(i) else 3 * d * c.intermediate_size)
                    for i, kind in enumerate(c.layer_types))
    pairs = sum(sum(min(t + 1, c.windows[i] or length) for t in range(length)) for i in c.attention_layers)
    return 2 * (per_token * length + 2 * c.num_attention_heads * c.head_dim * pairs + d * c.vocab_size)


# ---- one engine on one checkpoint, in its own process ----

def measure(engine: str, folder: Path, prompts: list[list[int]], new: int, threads: int, repeats: int,
            gguf: Path | None = None, source: Path | None = None) -> dict:
    """{"decode_bytes": ..., "times": {length: ([prefill s], [decode s])}, "info": {...}} of one engine."""
    family, kind = engine.split("-")
    if family == "minqwen":
        import inspect

        import numba

        if kind in ("int8", "int4") and "quantize" not in inspect.signature(minqwen.load).parameters:
            raise Skip("this minqwen.load has no quantize= argument")
        numba.set_num_threads(threads)
        runner = (MinqwenRunner(gguf, None) if kind in GGUF_FTYPES
                  else MinqwenRunner(folder, None if kind == "bf16" else kind))
        times = time_steps(runner, prompts, new, repeats)
        return {"decode_bytes": minqwen_decode_bytes(runner.model), "times": times,
                "info": {"numba_threading_layer": numba.threading_layer()}}
    if family == "transformers":
        try:
            import torch
            import transformers
            from transformers import AutoModelForCausalLM
        except ImportError as e:
            raise Skip(f"not installed ({e}); pip install -e '.[test]'")
        torch.set_num_threads(threads)
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
        return {"decode_bytes": transformers_decode_bytes(model),
                "times": time_transformers(model, prompts, new, repeats),
                "info": {"torch_threads": torch.get_num_threads()}}
    runner = LlamaCppRunner(gguf, threads, n_ctx=max(map(len, prompts)) + new + 8)
    return {"decode_bytes": gguf_decode_bytes(gguf, source),
            "times": time_steps(runner, prompts, new, repeats),
            "info": {"flash_attn": False, "n_batch": 512}}


# libgomp's and OpenBLAS's own defaults for the thread settings minqwen changes when it is imported
# (minqwen/environment.py): torch runs on libgomp too, and the peers are measured as they ship.
PEER_DEFAULTS = {name: {"GOMP_SPINCOUNT": "300000", "OPENBLAS_THREAD_TIMEOUT": "28"}[name]
                 for name in minqwen.environment.SET_BY_MINQWEN}


def isolated(function, *args, env=None):
    """function(*args) in a fresh Python process, with `env` added to its environment:
    (result, None) or (None, why it failed or skipped)."""
    saved = {name: os.environ.get(name) for name in env or {}}
    os.environ.update(env or {})
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        try:
            return pool.submit(function, *args).result(), None
        except Skip as e:
            return None, str(e)
        except BrokenProcessPool:
            return None, "the process died (a crash in native code?)"
        except Exception as e:  # an engine's failure is reported, never the end of the bench
            return None, (f"{type(e).__name__}: "
                          f"{str(e).strip().splitlines()[-1] if str(e).strip() else ''}")[:300]
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name)
                else:
                    os.environ[name] = value


# ---- llama.cpp's files: its converter (from the matching sdist) and the GGUF checkpoints ----

def llama_cpp_source(work: Path, version: str, given: Path | None) -> Path:
    """A llama.cpp folder holding convert_hf_to_gguf.py, conversion/ and gguf-py/: --llama-cpp-src, or
    the same-version llama-cpp-python sdist's vendor/llama.cpp, fetched with pip once."""
    if given is not None:
        if not (given / "convert_hf_to_gguf.py").exists():
            raise Skip(f"no convert_hf_to_gguf.py in {given}")
        return given
    source = work / f"llama-cpp-python-{version}" / "vendor" / "llama.cpp"
    if (source / "convert_hf_to_gguf.py").exists():
        return source
    print(f"llama.cpp: fetching the llama-cpp-python {version} sdist for its GGUF converter (pip download)")
    sdists = work / "sdist"
    # --no-binary for this package only: ":all:" would also build its build dependencies (cmake) from source
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", "llama-cpp-python",
                           "--no-deps", "-q", "-d", str(sdists), f"llama-cpp-python=={version}"],
                          capture_output=True, text=True)
    archive = next(sdists.glob(f"llama_cpp_python-{version}.tar.gz"), None)
    if done.returncode != 0 or archive is None:
        raise Skip(f"could not fetch its sdist: {(done.stderr.strip().splitlines() or ['?'])[-1]}; "
                   "pass --llama-cpp-src (see bench/README.md)")
    wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
    with tarfile.open(archive) as tar:
        inside = [m for m in tar.getmembers()
                  if "/vendor/llama.cpp/" in m.name
                  and m.name.split("/vendor/llama.cpp/", 1)[1].startswith(wanted)]
        for m in inside:
            m.name = m.name.split("/vendor/llama.cpp/", 1)[1]
        tar.extractall(source, members=inside, filter="data")
    shutil.rmtree(sdists)  # 75 MB, of which we keep the converter's 2
    return source


def gguf_checkpoints(folder: Path, source: Path, version: str, kinds: set[str]) -> dict[str, Path]:
    """{"bf16" and each of `kinds` ("q8_0", "q4_k_m", ...): GGUF file} of a checkpoint, converted once
    per llama-cpp-python version; only the kinds asked for are quantised (minutes each on a large shape)."""
    out = folder / f"gguf-{version}"
    out.mkdir(exist_ok=True)
    files = {kind: out / f"{kind}.gguf" for kind in ("bf16", *GGUF_FTYPES) if kind == "bf16" or kind in kinds}
    if not files["bf16"].exists():
        print(f"llama.cpp: converting {folder.name} to GGUF bf16 (once)", flush=True)
        partial = files["bf16"].with_suffix(".partial")
        done = subprocess.run([sys.executable, str(source / "convert_hf_to_gguf.py"), str(folder),
                               "--outtype", "bf16", "--outfile", str(partial), *converter_options(folder)],
                              capture_output=True, text=True)
        (out / "convert.log").write_text(done.stdout + done.stderr)
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines() or ["?"]
            raise Skip(f"convert_hf_to_gguf.py failed: {lines[-1][:200]} (log: {out / 'convert.log'})")
        partial.rename(files["bf16"])
    for kind, ftype in GGUF_FTYPES.items():
        if kind in files and not files[kind].exists():
            print(f"llama.cpp: quantising {folder.name} to {kind.upper()} (once)", flush=True)
            _, why = isolated(quantize_gguf, files["bf16"], files[kind], ftype)
            if why:
                raise Skip(f"llama_model_quantize to {kind.upper()} failed: {why}")
    return files


def quantize_gguf(source: Path, target: Path, ftype: int):
    """llama.cpp's own quantiser with its default choices (run in a process of its own: it logs every
    tensor from C, so its stdout and stderr go to a log file beside the target)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    partial = target.with_suffix(".partial")
    with open(target.with_suffix(".log"), "w") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        if llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), params) != 0:
            raise RuntimeError(f"llama_model_quantize returned an error (log: {log.name})")
    partial.rename(target)


# ---- the run ----

def run(args) -> dict:
    import numba

    # The engines' BLAS pools (minqwen's prefill calls NumPy's OpenBLAS) get the same thread count as
    # everything else: read when a process starts, so set here for the engine processes to inherit.
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(args.threads)
    numba.set_num_threads(args.threads)
    # Sampled now, between engines and at the end. The median is what the engines ran with: on a shared
    # VM single samples swing both ways (37-73 GB/s seen within one run here), so the best one is not
    # the machine but a moment when its neighbours were idle (it is reported too).
    # The float32 FMA and int16 dot peaks are sampled with it; their best samples are the machine's (a
    # peak that other processes can only lower): the ceilings of a float32 and an int16 prefill.
    bandwidth, peaks, int16_peaks, int8_peaks, bf16_peaks = Bandwidth(1.0), [], [], [], []

    def sample():
        bandwidth.sample()
        peaks.append(fp32_fma_peak(3))
        int16_peaks.append(int16_dot_peak(3))
        int8_peaks.append(int8_dot_peak(3))
        bf16_peaks.append(bf16_dot_peak(3))

    for _ in range(3):
        sample()
    print(f"read bandwidth: {bandwidth.median:.1f} GB/s (Numba prange sum over 1 GiB, "
          f"{args.threads} threads, threading layer {numba.threading_layer()})", flush=True)
    if peaks[0] is not None:
        int8 = f"{max(int8_peaks):.0f}" if int8_peaks[0] else "-"
        bf16 = f"{max(bf16_peaks):.0f}" if bf16_peaks[0] else "-"
        print(f"float32 FMA peak: {max(peaks):.0f} GFLOP/s, int16 dot peak {max(int16_peaks):.0f} GOP/s, "
              f"int8 {int8} GOP/s, bf16 dot peak {bf16} GFLOP/s ({args.threads} threads; bench/common.py); "
              f"minqwen runs MINQWEN_PREFILL={isa.PREFILL}{' (AMX tiles)' * isa.AMX}, "
              f"MINQWEN_DECODE={isa.DECODE}", flush=True)
    warn_if_workqueue()
    warn_if_slow_blas()
    lengths = [int(n) for n in args.prompts.split(",")]
    engines = [e for e in ENGINES
               if any(e == want or e.split("-")[0] == want for want in args.engines.split(","))]
    skipped, rows = [], []

    def skip(engine: str, shape: str, why: str):
        print(f"{engine}: skipped on {shape}: {why}", flush=True)
        skipped.append({"engine": engine, "shape": shape, "reason": why})

    llama_version = _version("llama_cpp_python")
    if llama_version is None or importlib.util.find_spec("llama_cpp") is None:
        for engine in [e for e in engines if e.startswith("llama.cpp")]:
            skip(engine, "all", "llama-cpp-python is not installed (see bench/README.md)")
        engines = [e for e in engines if not e.startswith("llama.cpp")]
    for shape in args.shapes.split(","):
        ggufs, source, shape_engines = {}, None, engines
        if shape == TRAINED:
            folder, ggufs = None, {"q4_1": tests_module("gguf_files").smollm2_path()}
            config = open_checkpoint(ggufs["q4_1"]).config
            shape_engines = [e for e in engines if e.endswith("-q4_1")]
            others = sorted(set(engines) - set(shape_engines))
            if others:
                skip(", ".join(others), shape, "the trained SmolLM2 is published as Q4_1 only")
            if llama_version is not None:  # its gguf-py reads the file's tensor sizes
                source = llama_cpp_source(args.work, llama_version, args.llama_cpp_src)
        else:
            folder = bench_checkpoint(args.work, shape)
            config = load_config(folder)
        if shape != TRAINED and any(map(needs_gguf, engines)):
            try:
                if llama_version is None:
                    raise Skip("llama-cpp-python (its converter and quantiser) is not installed")
                source = llama_cpp_source(args.work, llama_version, args.llama_cpp_src)
                ggufs = gguf_checkpoints(folder, source, llama_version,
                                         {e.split("-")[1] for e in engines if needs_gguf(e)})
            except Skip as why:
                for engine in [e for e in engines if needs_gguf(e)]:
                    skip(engine, shape, str(why))
        vocabulary = min(PROMPT_VOCAB, config.vocab_size)
        prompts = [np.random.default_rng(n).integers(0, vocabulary, size=n).tolist() for n in lengths]
        # Rounds: every engine in turn, then again. A shared VM's speed drifts over minutes (its
        # neighbours come and go), so interleaving puts the same drift into every engine's median.
        collected, failed = {}, set()
        for round_ in range(args.rounds):
            for engine in shape_engines:
                if (needs_gguf(engine) and not ggufs) or engine in failed:
                    continue
                print(f"{engine} on {shape}, round {round_ + 1} of {args.rounds} ...", flush=True)
                start = time.perf_counter()
                # minqwen's process inherits the thread settings importing minqwen made here, as `python -m
                # minqwen` has them; a peer's process gets its libraries' defaults back for those names.
                result, why = isolated(measure, engine, folder, prompts, args.new, args.threads, args.repeats,
                                       ggufs.get(engine.split("-")[1]), source,
                                       env=None if engine.startswith("minqwen") else PEER_DEFAULTS)
                if why:
                    skip(engine, shape, why)
                    failed.add(engine)
                    continue
                for length, (prefill, decode) in result["times"].items():
                    times = collected.setdefault((engine, length),
                                                 {"prefill_s": [], "decode_s": [], **result})
                    times["prefill_s"] += prefill
                    times["decode_s"] += decode
                    print(f"  prompt {length}: prefill {length / statistics.median(prefill):.1f} tok/s, "
                          f"decode {(args.new - 1) / statistics.median(decode):.2f} tok/s", flush=True)
                print(f"  ({time.perf_counter() - start:.0f} s with loading)", flush=True)
                sample()
        for (engine, length), times in collected.items():
            if engine in failed:
                continue
            rows.append({"engine": engine, "shape": shape, "prompt": length,
                         "prefill_tok_s": length / statistics.median(times["prefill_s"]),
                         "decode_tok_s": (args.new - 1) / statistics.median(times["decode_s"]),
                         "decode_bytes_per_token": times["decode_bytes"], "prefill_s": times["prefill_s"],
                         "decode_s": times["decode_s"], **times["info"],
                         "prefill_GFLOP": prefill_flops(config, length) / 1e9})
    for _ in range(3):
        sample()
    peak = max(peaks) if peaks[0] is not None else None
    bf16_peak = max(bf16_peaks) if bf16_peaks[0] else None
    for row in rows:
        row["decode_limit_tok_s"] = bandwidth.median * 1e9 / row["decode_bytes_per_token"]
        row["of_limit"] = row["decode_tok_s"] / row["decode_limit_tok_s"]
        row["prefill_GFLOP_s"] = row["prefill_GFLOP"] * row["prefill_tok_s"] / row["prompt"]
        row["prefill_of_fp32_peak"] = row["prefill_GFLOP_s"] / peak if peak else None
        row["prefill_of_bf16_peak"] = row["prefill_GFLOP_s"] / bf16_peak if bf16_peak else None
    add_ratios(rows)
    return {"read_bandwidth_GBps": bandwidth.median, "read_bandwidth_best_GBps": bandwidth.best,
            "read_bandwidth_samples": len(bandwidth.samples), "fp32_fma_peak_GFLOP_s": peak,
            "fp32_fma_peak_samples": peaks, "int16_dot_peak_GOP_s": max(int16_peaks) if peak else None,
            "int8_dot_peak_GOP_s": max(int8_peaks) if int8_peaks[0] else None,
            "bf16_dot_peak_GFLOP_s": bf16_peak,
            "minqwen_prefill": isa.PREFILL, "minqwen_decode": isa.DECODE, "amx": isa.AMX,
            "threads": args.threads, "new_tokens": args.new,
            "repeats": args.repeats, "rounds": args.rounds, "prompts": lengths, "versions": versions(),
            "skipped": skipped, "rows": rows}


def needs_gguf(engine: str) -> bool:
    return engine.startswith("llama.cpp") or engine.split("-")[1] in GGUF_FTYPES


def add_ratios(rows: list[dict]):
    """row["vs"][baseline] = (prefill ratio, decode ratio) against the baseline's row of the same shape
    and prompt (> 1: faster than the baseline); SAME_FILE: a minqwen GGUF row against llama.cpp's.
    A minqwen row with a llama.cpp row of its kind (the same GGUF file, or bf16) also gets
    row["fp32_peak_for_goal"]: the fraction of the float32 FMA peak a prefill GOAL x llama.cpp's needs."""
    by_key = {(r["engine"], r["shape"], r["prompt"]): r for r in rows}
    for r in rows:
        r["vs"] = {}
        family, kind = r["engine"].split("-")
        peer = by_key.get((f"llama.cpp-{kind}", r["shape"], r["prompt"]))
        if family == "minqwen" and peer is not None and peer["prefill_of_fp32_peak"] is not None:
            r["fp32_peak_for_goal"] = PREFILL_GOAL * peer["prefill_of_fp32_peak"]
        for baseline in BASELINES:
            against = baseline
            if baseline == SAME_FILE:
                against = f"llama.cpp-{kind}" if family == "minqwen" and kind in GGUF_FTYPES else None
            b = by_key.get((against, r["shape"], r["prompt"]))
            if b is not None:
                r["vs"][baseline] = (r["prefill_tok_s"] / b["prefill_tok_s"],
                                     r["decode_tok_s"] / b["decode_tok_s"])


def print_table(results: dict):
    print(f"\nprefill and decode tok/s, {results['threads']} threads, {results['new_tokens']} new tokens, "
          f"median of {results['repeats']} x {results['rounds']} rounds; "
          f"decode limit = {results['read_bandwidth_GBps']:.1f} GB/s (median read bandwidth; "
          f"best {results['read_bandwidth_best_GBps']:.1f}) / MB of weights per token; ratios are "
          "prefill / decode against the baseline (> 1: faster)")
    width = max([13] + [len(r["shape"]) for r in results["rows"]])
    header = (f"{'engine':18} {'shape':{width}} {'prompt':>6} {'prefill':>8} {'decode':>7} {'MB/tok':>7} "
              f"{'limit':>6} {'of lim':>6}" + "".join(f"  {'vs ' + b:>23}" for b in BASELINES))
    print(header)
    print("-" * len(header))
    for r in results["rows"]:
        ratios = "".join(f"  {'%.2f / %.2f' % r['vs'][b] if b in r['vs'] else '-':>23}" for b in BASELINES)
        print(f"{r['engine']:18} {r['shape']:{width}} {r['prompt']:6d} {r['prefill_tok_s']:8.1f} "
              f"{r['decode_tok_s']:7.2f} {r['decode_bytes_per_token'] / 1e6:7.0f} "
              f"{r['decode_limit_tok_s']:6.1f} {r['of_limit']:6.0%}{ratios}")
    print_prefill_arithmetic(results, width)
    for s in results["skipped"]:
        print(f"skipped: {s['engine']} on {s['shape']}: {s['reason']}")


def print_prefill_arithmetic(results: dict, width: int):
    """Each prefill's GFLOP/s against the float32 FMA peak measured in the same run, and for a minqwen row
    with a llama.cpp peer, the fraction of that peak PREFILL_GOAL x the peer's speed would take."""
    peak = results["fp32_fma_peak_GFLOP_s"]
    if peak is None:
        return
    print("\nprefill arithmetic: GFLOP = 2 x the multiply-adds of a prompt's matrix products (prefill_flops);"
          f" float32 FMA peak {peak:.0f} GFLOP/s on {results['threads']} threads (best of "
          f"{len(results['fp32_fma_peak_samples'])} samples in this run), int16 dot peak "
          f"{results['int16_dot_peak_GOP_s']:.0f} GOP/s, int8 {results['int8_dot_peak_GOP_s'] or 0:.0f} "
          f"GOP/s, bf16 dot peak {results.get('bf16_dot_peak_GFLOP_s') or 0:.0f} GFLOP/s; "
          f"minqwen's prefill: {results['minqwen_prefill']}")
    header = (f"{'engine':18} {'shape':{width}} {'prompt':>6} {'GFLOP':>6} {'GFLOP/s':>8} "
              f"{'of fp32 peak':>12} {'of bf16 peak':>12}  {PREFILL_GOAL}x llama.cpp (same kind) needs")
    print(header)
    print("-" * len(header))
    for r in results["rows"]:
        goal = (f"{r['fp32_peak_for_goal']:.2f} of the peak (llama.cpp at "
                f"{r['fp32_peak_for_goal'] / PREFILL_GOAL:.2f})" if "fp32_peak_for_goal" in r else "-")
        print(f"{r['engine']:18} {r['shape']:{width}} {r['prompt']:6d} {r['prefill_GFLOP']:6.1f} "
              f"{r['prefill_GFLOP_s']:8.1f} {r['prefill_of_fp32_peak']:12.2f} "
              f"{r.get('prefill_of_bf16_peak') or 0:12.2f}  {goal}")


def versions() -> dict:
    return {name: _version(name) for name in ("minqwen", "numba", "numpy", "torch", "transformers",
                                              "llama_cpp_python")}


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="qwen2.5-0.5b,qwen3-0.6b",  # the scaled 35B-A3B on request
                        help=f"any of {', '.join(SHAPES)}, {TRAINED}")
    parser.add_argument("--prompts", default="128,512", help="prompt lengths in tokens")
    parser.add_argument("--new", type=int, default=64, help="tokens generated per prompt (>= 2)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per prompt in each engine process")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the list of engines this many times in turn (medians over all rounds)")
    parser.add_argument("--engines", default="minqwen,transformers,llama.cpp",
                        help=f"families or names among {', '.join(ENGINES)}")
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "minqwen-bench",
                        help="where checkpoints, GGUF files and llama.cpp's converter are kept")
    parser.add_argument("--llama-cpp-src", type=Path, default=None,
                        help="a llama.cpp checkout to convert with (default: the installed version's sdist)")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON document here")
    args = parser.parse_args()
    args.work = args.work.expanduser()
    if args.new < 2 or args.repeats < 1 or args.rounds < 1 or args.threads < 1:
        parser.error("--new must be >= 2, --repeats, --rounds and --threads >= 1")
    unknown = [s for s in args.shapes.split(",") if s not in SHAPES and s != TRAINED]
    if unknown:
        parser.error(f"unknown shape {unknown[0]!r}: choose from {', '.join(SHAPES)}, {TRAINED}")
    families = {e.split("-")[0] for e in ENGINES}
    unknown = [e for e in args.engines.split(",") if e not in ENGINES and e not in families]
    if unknown:
        parser.error(f"unknown engine {unknown[0]!r}: "
                     f"choose from {', '.join(sorted(families))}, {', '.join(ENGINES)}")

    start = time.perf_counter()
    results = run(args)
    print_table(results)
    document = {"bench": "generate", "machine": machine(), **results,
                "seconds": round(time.perf_counter() - start)}
    if args.out:
        args.out.write_text(json.dumps(document, indent=1))
    print(json.dumps(document))  # the last stdout line


if __name__ == "__main__":
    main()
