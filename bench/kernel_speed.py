"""Kernel bench: how close each weight-streaming kernel gets to this machine's memory bandwidth.

    python bench/kernel_speed.py [--gib 1] [--repeats 7] [--quick] [--threads N]
                            [--kinds fp32,bf16,fp16,fp8,int8,int4,q8_0,q4_0,q4_1,q5_0,q5_1,q4_k,q5_k,
                                     q6_k,iq4_nl,iq4_xs]

Decoding one token streams every weight from DRAM once, so the decode kernels (matvec) are judged
in GB/s of weights read, next to the read bandwidth of the machine measured the same way (a Numba
prange sum over a >= 1 GiB float32 array). Each case rotates through copies of its matrix totalling
>= 1 GiB so no cache can serve them. On a shared VM the bandwidth moves by 10-30% from second to
second, so every case measures the bandwidth again between its own repeats and reports the ratio
of the two medians ("ratio") and of the two best runs ("best": other processes only ever add time,
so it is the closer guess at a quiet machine).

"Gw/s" is weights per second, the kernel's compute rate: when it, not bandwidth, is the limit,
fewer bytes per weight stop paying. "waits/ms" counts the times a thread blocked per ms of
kernel time: on a shared machine another process can hold a core, a parallel region then waits
for it (~0.6 ms here), and the row measures the scheduler more than the kernel; --threads 1
gives a per-core figure that other processes cannot spoil as easily.

The GGML kinds (q8_0 ... iq4_xs, GGUF's block types) are random blocks with fp16 scales of the size a
quantised N(0, 0.02) matrix has (their speed does not depend on the values; every nibble and 6-bit
scale is a valid IQ4 block); the types whose rows are whole blocks of 256 (K-quants, IQ4_XS) use
Qwen3-0.6B's shapes instead of those multiples of 128.

Prefill (matmul, T = 128 / 512) is bound by flops: reported in GFLOP/s. Compile time is excluded
(one warm-up call each); times are medians. Prints a table, then one JSON object per result, and
last one JSON document with everything.
"""
# minqwen.environment before NumPy: OpenBLAS's threads must not spin after each call, as in the engine, or
# they take the cores from the Numba kernel measured next
import minqwen.environment  # noqa: F401, I001
import argparse
import json
import os
import platform
import resource
import sys
import time

import llvmlite.binding
import numba
import numpy as np
from numba import prange

from common import bf16_dot_peak, cpu_flags, cpu_model, fp32_fma_peak, int8_dot_peak, int16_dot_peak
from minqwen.kernels import isa, linear
from minqwen.kernels.dtypes import bf16_bits
from minqwen.kernels.fp8 import Fp8Matrix, matmul_fp8, matvec_fp8
from minqwen.kernels.ggml import (
    GGML_BLOCKS,
    GgmlMatrix,
    matmul_ggml,
    matvec_ggml,
    quantize_q4_1,
    quantize_q8_0,
)
from minqwen.kernels.jit import pjit
from minqwen.kernels.linear import ACTIVATIONS, INTEGER_TYPES
from minqwen.kernels.matmul import matmul, matmul_few, matvec

if isa.ISA != "generic":
    from minqwen.kernels.gemm import LANES, PAIRS, QUADS, XTYPES, matmul_panels
    from minqwen.kernels.intdot import matmul_integer

SHAPES = [(896, 896), (4864, 896), (896, 4864), (151936, 896)]  # Qwen2.5-0.5B: q/o, gate/up, down, lm_head
FEW_SHAPES = [(768, 2048), (2048, 768), (3072, 1024)]  # Qwen3-30B-A3B expert gate/up, down; Qwen3-0.6B gate
FEW_TOKENS = [2, 4, 8, 16, 24, 32, 48, 64]
K_QUANT_SHAPES = [(1024, 1024), (3072, 1024), (1024, 3072), (151936, 1024)]  # Qwen3-0.6B: rows of 256s
GGML = {"q8_0": 8, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q4_k": 12, "q5_k": 13,  # kind: type id
        "q6_k": 14, "iq4_nl": 20, "iq4_xs": 23}
# --quantize int8 / int4: GGML's Q8_0 / Q4_1, written by minqwen's quantisers
MINQWEN_FORMATS = {"int8": 8, "int4": 3}
GGML_FP16_AT = {8: [0], 2: [0], 3: [0, 2], 6: [0], 7: [0, 2], 12: [0, 2], 13: [0, 2],  # scale offsets
                14: [208], 20: [0], 23: [0]}
GIB = 1 << 30


@pjit
def read_sum(a):  # a: [M] float32
    """sum_i a[i]: one streaming read of a, the fastest a kernel can consume weights"""
    s = np.float32(0.0)
    for i in prange(a.shape[0]):
        s += a[i]
    return s


def read_bandwidth(a):  # GB/s of one timed read_sum
    t = time.perf_counter()
    read_sum(a)
    return a.nbytes / (time.perf_counter() - t) / 1e9


def stored_weights(kind, N, K, rng):  # -> tuple of the arrays the kernel reads, random N(0, 0.02)
    w = (rng.standard_normal((N, K), dtype=np.float32) * 0.02).astype(np.float32)
    if kind == "fp32":
        return (w,)
    if kind == "bf16":
        return (bf16_bits(w),)
    if kind == "fp16":
        return (w.astype(np.float16).view(np.int16),)
    if kind in MINQWEN_FORMATS:
        return ((quantize_q8_0 if kind == "int8" else quantize_q4_1)(w).data,)
    if kind in GGML:  # random blocks, every fp16 number ~0.002
        E, B = GGML_BLOCKS[GGML[kind]]
        data = rng.integers(0, 256, (N, K // E, B), dtype=np.uint8)
        for o in GGML_FP16_AT[GGML[kind]]:
            data[..., o:o + 2] = np.full((N, K // E, 1), 0.002, np.float16).view(np.uint8)
        return (data.reshape(N, -1),)
    if kind == "fp8":  # e4m3 bytes of a scaled Gaussian (NaN bytes avoided), one float32 scale per 128 x 128
        q = rng.integers(0, 0x7E, (N, K), dtype=np.uint8) | (rng.integers(0, 2, (N, K), dtype=np.uint8) << 7)
        return q, np.full((-(-N // 128), -(-K // 128)), 0.02 / 64, np.float32)
    raise ValueError(f"unknown kind {kind!r}")


def ggml_type(kind):
    return GGML.get(kind) or MINQWEN_FORMATS.get(kind)


def matvec_calls(kind) -> dict:
    """{path: call(out, arrays, x)}: the generic kernel, and the instruction layer's where it has one."""
    if ggml_type(kind):
        t = ggml_type(kind)
        calls = {"generic": lambda out, arrays, x: matvec_ggml(out, arrays[0], t, x)}
        if t in INTEGER_TYPES:
            calls[isa.ISA] = lambda out, arrays, x: matmul_integer(out[None], arrays[0], t, x[None],
                                                                   ACTIVATIONS)
        return calls
    if kind == "fp8":
        return {"generic": lambda out, arrays, x: matvec_fp8(out, *arrays, x, 128)}
    return {"generic": lambda out, arrays, x: matvec(out, arrays[0], x)}


def weight_matrix(kind, arrays, K):  # the arrays of stored_weights as linear() takes them
    if ggml_type(kind):
        return GgmlMatrix(arrays[0], ggml_type(kind), K)
    return Fp8Matrix(*arrays, 128) if kind == "fp8" else arrays[0]


def prefill_kernel(prefill):  # -> call(out, x, w): what linear.py runs for MINQWEN_PREFILL=prefill
    if prefill == "bf16":
        return linear.BF16_PRODUCT
    return lambda out, x, w, xtype=XTYPES[prefill]: matmul_panels(out, x, w, xtype)


def matmul_calls(kind) -> dict:
    """{path: call(out, x, arrays)}: the generic kernel (tiles for BLAS) and the micro-kernels of gemm.py,
    float32, int16, int8 (matmul_panels) and bf16 (matmul_bf16; matmul_amx where isa.AMX), for
    MINQWEN_PREFILL=int16 / int8 / bf16 where the CPU runs them (isa.PREFILLS)"""
    generic = matmul_ggml if ggml_type(kind) else matmul_fp8 if kind == "fp8" else matmul
    calls = {"generic": lambda out, x, arrays: generic(out, x, weight_matrix(kind, arrays, x.shape[1]))}
    if isa.ISA != "generic" and kind != "fp32":
        for prefill in isa.PREFILLS:
            calls[isa.ISA + ("" if prefill == "float" else "-" + prefill)] = \
                lambda out, x, arrays, kernel=prefill_kernel(prefill): \
                kernel(out, x, weight_matrix(kind, arrays, x.shape[1]))
    return calls


def shapes_for(kind):
    return K_QUANT_SHAPES if kind in GGML and GGML_BLOCKS[GGML[kind]][0] == 256 else SHAPES


def bench_matvec(kind, path, call, N, K, total_bytes, repeats, bw_array, rng):
    one = stored_weights(kind, N, K, rng)
    nbytes = sum(a.nbytes for a in one)
    copies = [one] + [tuple(a.copy() for a in one) for _ in range(max(2, -(-total_bytes // nbytes)) - 1)]
    x = rng.standard_normal(K).astype(np.float32)
    out = np.empty(N, np.float32)
    call(out, one, x)  # compile
    sweeps, bws, waits = [], [], 0
    for _ in range(repeats):
        bws.append(read_bandwidth(bw_array))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw
        t = time.perf_counter()
        for arrays in copies:
            call(out, arrays, x)
        sweeps.append(time.perf_counter() - t)
        # A thread that blocks inside a parallel region means a core was taken by another process.
        waits += resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw - before
    dt = float(np.median(sweeps)) / len(copies)
    gbs, best = nbytes / dt / 1e9, nbytes * len(copies) / min(sweeps) / 1e9
    bw, bw_best = float(np.median(bws)), float(max(bws))
    return {"kernel": f"matvec_{kind}", "path": path, "shape": [N, K], "bytes_per_weight": nbytes / (N * K),
            "us_per_call": dt * 1e6, "GB_s": gbs, "bandwidth_GB_s": bw, "ratio": gbs / bw,
            "GB_s_best": best, "bandwidth_GB_s_best": bw_best, "ratio_best": best / bw_best,
            "G_weights_s": N * K / dt / 1e9, "copies": len(copies),
            "waits_per_ms": waits / (sum(sweeps) * 1e3)}


def bench_matmul(kind, path, call, N, K, T, repeats, rng):
    arrays = stored_weights(kind, N, K, rng)
    x = rng.standard_normal((T, K)).astype(np.float32)
    out = np.empty((T, N), np.float32)
    call(out, x, arrays)  # compile (and let BLAS start its threads)
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        call(out, x, arrays)
        ts.append(time.perf_counter() - t)
    dt = float(np.median(ts))
    return {"kernel": f"matmul_{kind}", "path": path, "shape": [N, K], "T": T, "ms": dt * 1e3,
            "GFLOP_s": 2 * T * N * K / dt / 1e9, "GFLOP_s_best": 2 * T * N * K / min(ts) / 1e9}


def few_calls(kind) -> dict:
    """{name: call(out, x, w)}: the few-token kernel of kind (bf16: matmul_few, which streams W once; a
    GGML type: matmul_integer) against the prefill ones (matmul_panels: float, int16, int8; matmul_bf16: bf16;
    where the CPU has them, else BLAS tiles). Where they cross is linear.py's FEW_TOKENS / INTEGER_TOKENS."""
    few = {"matmul_few": matmul_few} if kind == "bf16" else {
        "matmul_integer": lambda out, x, w: matmul_integer(out, w.data, w.ggml_type, x, ACTIVATIONS)}
    if isa.ISA == "generic":
        return {**few, "blas_tiles": matmul if kind == "bf16" else matmul_ggml}
    return {**few, **{"panels" + ("" if p == "float" else "_" + p) if p != "bf16" else "matmul_bf16":
                      prefill_kernel(p) for p in isa.PREFILLS}}


def bench_few(kind, N, K, T, total_bytes, repeats, rng):
    """A few tokens through weights read from DRAM (rotated copies), each kernel of few_calls(kind)"""
    one = stored_weights(kind, N, K, rng)
    count = max(2, -(-total_bytes // one[0].nbytes))
    copies = [one] + [tuple(a.copy() for a in one) for _ in range(count - 1)]
    matrices = [weight_matrix(kind, arrays, K) for arrays in copies]
    x = rng.standard_normal((T, K)).astype(np.float32)
    out = np.empty((T, N), np.float32)
    row = {"kernel": f"few_{kind}", "shape": [N, K], "T": T}
    for name, kernel in few_calls(kind).items():
        kernel(out, x, matrices[0])  # compile
        sweeps = []
        for _ in range(repeats):
            t = time.perf_counter()
            for w in matrices:
                kernel(out, x, w)
            sweeps.append((time.perf_counter() - t) / len(matrices))
        row[f"{name}_us"] = float(np.median(sweeps)) * 1e6
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gib", type=float, default=1.0,
                   help="weights streamed per case, GiB (>= 1 defeats caches)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--quick", action="store_true", help="skip the lm_head shape in prefill and T = 512")
    p.add_argument("--kinds", default="fp32,bf16,fp16,fp8,int8,int4," + ",".join(GGML))
    p.add_argument("--threads", type=int, default=None, help="Numba threads (default: all)")
    args = p.parse_args(argv)
    if args.threads:
        numba.set_num_threads(args.threads)
    kinds = args.kinds.split(",")
    rng = np.random.default_rng(0)
    total = int(args.gib * GIB)

    bw_array = np.ones(max(total, GIB) // 4, np.float32)
    read_sum(bw_array[:1024])  # compile and start the thread pool
    machine = {
        "cpu": cpu_model(), "threads": numba.get_num_threads(), "threading_layer": numba.threading_layer(),
        "numba": numba.__version__, "numpy": np.__version__, "python": platform.python_version(),
        "NUMBA_CPU_FEATURES": os.environ.get("NUMBA_CPU_FEATURES"),
        "avx512": "avx512f" in cpu_flags(), "avx2": "avx2" in cpu_flags(),
        "llvm_cpu": llvmlite.binding.get_host_cpu_name(), "isa_path": isa.ISA,
    }
    print(f"CPU {machine['cpu']}, {machine['threads']} Numba threads, "
          f"threading layer {machine['threading_layer']}")
    if machine["threading_layer"] == "workqueue":
        print("!" * 78 + "\n"
              "!! WARNING: Numba's 'workqueue' threading layer costs ~0.1 ms per parallel region:\n"
              "!! a decode step has ~170 of them. Install a wheel with OpenMP or TBB (layer 'omp' / 'tbb').\n"
              + "!" * 78)
    print(f"LLVM target {machine['llvm_cpu']}: AVX-512 {'yes' if machine['avx512'] else 'no'}, "
          f"AVX2 {'yes' if machine['avx2'] else 'no'} (Zen 4/5 get 512-bit code by default; some Intel "
          "targets only with NUMBA_CPU_FEATURES=<host features>,-prefer-256-bit); instruction path "
          f"{isa.ISA} (MINQWEN_ISA; every kernel also runs on the generic path below)")

    bws = [read_bandwidth(bw_array) for _ in range(args.repeats)]
    numba.set_num_threads(1)
    bws1 = [read_bandwidth(bw_array) for _ in range(args.repeats)]
    numba.set_num_threads(machine["threads"])
    bandwidth = {"read_GB_s": float(np.median(bws)), "read_GB_s_best": float(max(bws)),
                 "read_GB_s_1_thread": float(np.median(bws1)), "array_GiB": bw_array.nbytes / GIB,
                 "runs": args.repeats}
    print(f"read bandwidth ({bw_array.nbytes / GIB:.1f} GiB float32 prange sum, median of {args.repeats}): "
          f"{bandwidth['read_GB_s']:.1f} GB/s with {machine['threads']} thread(s) "
          f"(best {bandwidth['read_GB_s_best']:.1f}), {bandwidth['read_GB_s_1_thread']:.1f} GB/s with 1")

    peak = fp32_fma_peak(args.repeats)
    bandwidth["fp32_peak_GFLOP_s"] = peak
    if peak:
        int16_peak, int8_peak = int16_dot_peak(args.repeats), int8_dot_peak(args.repeats)
        bandwidth["int16_dot_peak_GOP_s"], bandwidth["int8_dot_peak_GOP_s"] = int16_peak, int8_peak
        print(f"float32 FMA peak ({machine['threads']} threads, {LANES} lanes, 12 chains): {peak:.0f} GFLOP/s"
              f" (the ceiling of BLAS tiles, path generic, and of the float panels, path {isa.ISA})\n"
              f"int16 dot peak ({PAIRS} int16 lanes, 12 chains): {int16_peak:.0f} GOP/s (the ceiling of "
              f"the int16 panels, path {isa.ISA}-int16)")
        if int8_peak:
            print(f"int8 dot peak ({QUADS} byte lanes, 12 chains): {int8_peak:.0f} GOP/s (the ceiling of the "
                  f"int8 panels, path {isa.ISA}-int8)")
        bandwidth["bf16_dot_peak_GFLOP_s"] = bf16_peak = bf16_dot_peak(args.repeats)
        if bf16_peak:
            print(f"bf16 dot peak ({PAIRS} bf16 lanes, 12 chains): {bf16_peak:.0f} GFLOP/s (the ceiling of "
                  f"matmul_bf16, path {isa.ISA}-bf16)")
    results = []
    print(f"\n{'matvec (decode)':16s} {'path':>8s} {'shape':>12s} {'B/weight':>8s} {'us/call':>9s} "
          f"{'GB/s':>7s} {'bw GB/s':>8s} {'ratio':>6s} {'best':>6s} {'Gw/s':>6s} {'waits/ms':>8s}")
    for kind in kinds:
        for path, call in matvec_calls(kind).items():
            for N, K in shapes_for(kind):
                r = bench_matvec(kind, path, call, N, K, total, args.repeats, bw_array, rng)
                results.append(r)
                print(f"{r['kernel']:16s} {path:>8s} {N:>6d}x{K:<5d} {r['bytes_per_weight']:8.3f} "
                      f"{r['us_per_call']:9.1f} {r['GB_s']:7.1f} {r['bandwidth_GB_s']:8.1f} "
                      f"{r['ratio']:6.2f} {r['ratio_best']:6.2f} {r['G_weights_s']:6.1f} "
                      f"{r['waits_per_ms']:8.3f}", flush=True)

    print(f"\n{'matmul (prefill)':16s} {'path':>8s} {'shape':>12s} {'T':>4s} {'ms':>9s} {'GFLOP/s':>8s} "
          f"{'best':>7s}")
    for T in ([128] if args.quick else [128, 512]):
        for kind in kinds:
            for path, call in matmul_calls(kind).items():
                for N, K in (shapes_for(kind)[:3] if args.quick else shapes_for(kind)):
                    r = bench_matmul(kind, path, call, N, K, T, max(3, args.repeats // 2), rng)
                    results.append(r)
                    print(f"{r['kernel']:16s} {path:>8s} {N:>6d}x{K:<5d} {T:4d} {r['ms']:9.2f} "
                          f"{r['GFLOP_s']:8.1f} {r['GFLOP_s_best']:7.1f}", flush=True)

    for kind in [k for k in ("bf16", "q4_k") if k in kinds and (k == "bf16" or isa.ISA != "generic")]:
        names = list(few_calls(kind))
        print(f"\n{'few tokens, ' + kind:18s} {'shape':>12s} {'T':>4s} " + " ".join(f"{n + ' us':>16s}"
                                                                                for n in names))
        for N, K in FEW_SHAPES[:2] if args.quick else FEW_SHAPES:
            for T in FEW_TOKENS:
                r = bench_few(kind, N, K, T, total // 4, max(3, args.repeats // 2), rng)
                results.append(r)
                print(f"{r['kernel']:18s} {N:>6d}x{K:<5d} {T:4d} " + " ".join(f"{r[n + '_us']:16.1f}"
                                                                              for n in names), flush=True)

    if any(r.get("waits_per_ms", 0) > 0.05 for r in results):
        print("\nWARNING: threads blocked inside parallel regions (waits/ms > 0.05, "
              "each wait ~0.6 ms): other\n"
              "processes were using the cores, so those rows measure the scheduler more than the kernel.\n"
              "Rerun on a quiet machine, or with --threads 1 for a per-core figure.")
    for r in results:
        print(json.dumps(r))
    print(json.dumps({"machine": machine, "bandwidth": bandwidth, "results": results}))


if __name__ == "__main__":
    sys.exit(main())
