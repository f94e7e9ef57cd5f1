"""Prefill and decode tok/s of minqwen (bf16, int8, int4) against transformers and llama.cpp, in one run,
on the same random-weight checkpoints with real Qwen shapes and the same thread count.

    python bench/generate.py [--shapes qwen2.5-0.5b,qwen3-0.6b] [--prompts 128,512] [--new 64] [--threads 2]

Checkpoints are built once (transformers' save_pretrained, random bf16 weights, the real tokenizer) under
--work. Peers that are not installed are skipped with a message: transformers comes with the test extra;
llama.cpp with `pip install llama-cpp-python` plus the `gguf` package (see bench/README.md), which we use
to convert the checkpoint with llama.cpp's own convert_hf_to_gguf.py found in --llama-cpp-src.
Decode limit = measured read bandwidth / bytes of weights read per token (all matrices incl. lm_head).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from common import read_bandwidth, report  # noqa: E402

DATA = Path(__file__).parent.parent / "tests" / "data"
SHAPES = {"qwen2.5-0.5b": ("qwen2.5-0.5b-instruct", "qwen2.5"), "qwen3-0.6b": ("qwen3-0.6b", "qwen3")}


def checkpoint(work: Path, shape: str) -> Path:
    from checkpoints import build_checkpoint

    folder = work / shape
    if not (folder / "model.safetensors").exists():
        config_name, tokenizer = SHAPES[shape]
        config = json.loads((DATA / "configs" / f"{config_name}.config.json").read_text())
        build_checkpoint(folder, config, "bf16", tokenizer=tokenizer)
    return folder


def time_minqwen(folder: Path, prompt: list[int], new: int, quantize: str | None) -> tuple[float, float]:
    import minqwen

    model = minqwen.load(folder, quantize=quantize)
    model.sequence().reset_to(prompt[:16])  # compile and fault the weights in
    sequence = model.sequence()
    start = time.perf_counter()
    logits = sequence.reset_to(prompt)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(new):
        logits = sequence.extend([int(np.argmax(logits))])
    decode = time.perf_counter() - start
    return len(prompt) / prefill, new / decode


def time_transformers(folder: Path, prompt: list[int], new: int, threads: int) -> tuple[float, float]:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        model(ids[:, :16])
        start = time.perf_counter()
        model(ids)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        total = time.perf_counter() - start
    return len(prompt) / prefill, new / max(total - prefill, 1e-9)


def gguf_files(folder: Path, source: Path | None) -> dict[str, Path]:
    """bf16, Q8_0 and Q4_0 GGUF files of the checkpoint (converted once)."""
    import llama_cpp

    files = {kind: folder / f"model-{kind}.gguf" for kind in ("bf16", "q8_0", "q4_0")}
    if not files["bf16"].exists():
        script = source / "convert_hf_to_gguf.py" if source else None
        if script is None or not script.exists():
            raise RuntimeError("llama.cpp's convert_hf_to_gguf.py not found (pass --llama-cpp-src)")
        subprocess.run([sys.executable, str(script), str(folder), "--outtype", "bf16", "--outfile",
                        str(files["bf16"])], check=True, capture_output=True)
    for kind, ftype in (("q8_0", 7), ("q4_0", 2)):  # LLAMA_FTYPE_MOSTLY_Q8_0, _Q4_0
        if not files[kind].exists():
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = ftype
            llama_cpp.llama_model_quantize(str(files["bf16"]).encode(), str(files[kind]).encode(), params)
    return files


def time_llama_cpp(gguf: Path, prompt: list[int], new: int, threads: int) -> tuple[float, float]:
    import llama_cpp

    llm = llama_cpp.Llama(str(gguf), n_ctx=len(prompt) + new + 16, n_batch=512, n_threads=threads,
                          n_threads_batch=threads, verbose=False, logits_all=False)
    llm.eval(prompt[:16])
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(new):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    decode = time.perf_counter() - start
    return len(prompt) / prefill, new / decode


def weight_bytes(folder: Path, bits_per_weight: float) -> float:
    import minqwen

    model = minqwen.load(folder)
    tensors = [model.weights.lm_head]
    for layer in model.weights.layers:
        tensors += [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
                    layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj]
    return sum(t.size for t in tensors) * bits_per_weight / 8


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="qwen2.5-0.5b,qwen3-0.6b")
    parser.add_argument("--prompts", default="128,512")
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "minqwen-bench")
    parser.add_argument("--llama-cpp-src", type=Path, default=None,
                        help="llama.cpp source folder (holds convert_hf_to_gguf.py)")
    args = parser.parse_args()

    import numba

    numba.set_num_threads(args.threads)
    bandwidth = read_bandwidth()
    engines = ("minqwen bf16", "minqwen int8", "minqwen int4", "transformers bf16", "llama.cpp bf16",
               "llama.cpp Q8_0", "llama.cpp Q4_0")
    try:
        import llama_cpp  # noqa: F401
        have_llama = True
    except ImportError:
        have_llama = False
        print("llama.cpp: skipped (llama-cpp-python is not installed; see bench/README.md)")
    rows = []
    for shape in args.shapes.split(","):
        folder = checkpoint(args.work, shape)
        limits = {name: bandwidth * 1e9 / weight_bytes(folder, bits)
                  for name, bits in (("bf16", 16), ("int8", 8 + 16 / 32), ("int4", 4 + 32 / 32))}
        ggufs = {}
        if have_llama:
            try:
                ggufs = gguf_files(folder, args.llama_cpp_src)
            except Exception as e:  # a conversion problem skips llama.cpp, with the reason
                print(f"llama.cpp: skipped for {shape} ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
        for length in map(int, args.prompts.split(",")):
            prompt = np.random.default_rng(length).integers(0, 150000, size=length).tolist()
            for engine in engines:
                try:
                    if engine.startswith("minqwen"):
                        kind = engine.split()[1]
                        prefill, decode = time_minqwen(folder, prompt, args.new, None if kind == "bf16" else kind)
                    elif engine.startswith("transformers"):
                        prefill, decode = time_transformers(folder, prompt, args.new, args.threads)
                    else:
                        kind = engine.split()[1].lower()
                        if kind not in ggufs:
                            continue
                        prefill, decode = time_llama_cpp(ggufs[kind], prompt, args.new, args.threads)
                except ImportError as e:
                    print(f"{engine}: skipped ({e})")
                    continue
                limit = limits.get(engine.split()[1].lower().replace("q8_0", "int8").replace("q4_0", "int4"))
                rows.append({"engine": engine, "shape": shape, "prompt": length, "prefill_tok_per_s": prefill,
                             "decode_tok_per_s": decode, "decode_limit_tok_per_s": limit})
                print(f"{engine:18} {shape:13} prompt {length:4}: prefill {prefill:7.1f} tok/s, decode {decode:6.2f} "
                      f"tok/s ({decode / limit:.2f} of the {limit:.1f} tok/s bandwidth limit)", flush=True)

    print("\nratios (same shape and prompt):")
    by_key = {(r["engine"], r["shape"], r["prompt"]): r for r in rows}
    for r in rows:
        if not r["engine"].startswith("minqwen"):
            continue
        for peer in ("transformers bf16", "llama.cpp bf16", "llama.cpp Q8_0", "llama.cpp Q4_0"):
            other = by_key.get((peer, r["shape"], r["prompt"]))
            if other:
                r[f"decode_vs_{peer}"] = r["decode_tok_per_s"] / other["decode_tok_per_s"]
                r[f"prefill_vs_{peer}"] = r["prefill_tok_per_s"] / other["prefill_tok_per_s"]
        ratios = ", ".join(f"{k[len('decode_vs_'):]} decode x{v:.2f}" for k, v in r.items() if k.startswith("decode_vs_"))
        print(f"  {r['engine']:14} {r['shape']:13} {r['prompt']:4}: {ratios}")
    report("generate", {"read_bandwidth_GBps": bandwidth, "threads": args.threads, "new_tokens": args.new,
                        "rows": rows})


if __name__ == "__main__":
    main()
