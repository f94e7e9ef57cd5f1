"""The kernels of the instruction layer: integer dot-product decode (kernels/intdot.py) and the layer
itself (kernels/simd.py); the prefill (kernels/gemm.py) has tests/test_kernels_gemm.py.

Every path the test machine's CPU has runs here against float64 references; the AVX-512 path, which this
machine may lack, is compiled (never run) for a Zen 4 target in a child process, as is a forced avx2 path,
and the machine code must hold the instructions each path is for and no call (a misspelt intrinsic
compiles to a call to nowhere).
"""
import re
import subprocess
import sys

import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType as GGML
from gguf.quants import dequantize, quantize
from hypothesis import given, settings
from hypothesis import strategies as st
from numba.core import errors

from minqwen.kernels import isa
from minqwen.kernels.dtypes import bf16_bits, to_float32
from minqwen.kernels.ggml import GGML_BLOCKS
from minqwen.kernels.jit import jit
from minqwen.kernels.simd import (
    bit_words,
    bytes_of,
    bytes_to_float,
    dot_bf16,
    dot_s16,
    dot_u8s8,
    field,
    fp16_splat,
    hsum,
    izeros,
    join,
    lane,
    load,
    quads,
    store,
    to_float,
    u32_at,
    widen16,
    words,
)

pytestmark = pytest.mark.skipif(isa.ISA == "generic",
                                reason="the CPU has no AVX2: these kernels are never used")
if isa.ISA != "generic":  # imported only where the CPU has the instructions, as the engine does
    from minqwen.kernels.intdot import (
        INTEGER_TYPES,
        LEVEL_BITS_AT,
        matmul_integer,
        matmul_integer_reference,
    )

seeds = st.integers(0, 2**32 - 1)
# matmul_integer's activations: int16, and int8 where the path has 256-bit VNNI (MINQWEN_DECODE=int8)
ACTIVATIONS = [np.dtype(mode) for mode in isa.DECODES]
SCALE_AT = {GGML.Q4_K: (0, 2), GGML.Q5_K: (0, 2), GGML.Q6_K: (208,), GGML.IQ4_NL: (0,),
            GGML.IQ4_XS: (0,)}  # fp16 scales in the blocks that are random bytes otherwise


def random_blocks(rng, N, K, kind):
    """Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q5_1 as gguf quantises Gaussian weights; K-quants and IQ4_NL / IQ4_XS
    as random bytes with valid fp16 (super-)block scales (every bit pattern of the rest is a valid block)."""
    if kind in SCALE_AT:
        E, B = GGML_BLOCKS[kind]
        data = rng.integers(0, 256, (N, K // E * B), dtype=np.uint8)
        blocks = data.reshape(N, K // E, B)
        for at in SCALE_AT[kind]:
            blocks[:, :, at:at + 2] = (rng.uniform(1e-4, 2e-2, (N, K // E)).astype(np.float16)
                                       .view(np.uint8).reshape(N, K // E, 2))
        return data
    return quantize((rng.standard_normal((N, K)) * 0.05).astype(np.float32), kind).reshape(N, -1)


def minimum_term(kind, data, K):
    """The part of each weight that does not scale with its level (Q4_1 / Q5_1's m, Q4_K / Q5_K's
    -dmin m_j), per weight, by gguf-py: the weights of the same blocks with every level bit zero."""
    if kind not in LEVEL_BITS_AT:
        return np.zeros((data.shape[0], K))
    zero = data.copy().reshape(data.shape[0], -1, GGML_BLOCKS[kind][1])
    zero[:, :, LEVEL_BITS_AT[kind]:] = 0
    return dequantize(zero.reshape(data.shape[0], -1), kind).reshape(data.shape[0], K).astype(np.float64)


@settings(deadline=None, max_examples=25)
@given(seed=seeds, N=st.sampled_from([1, 5, 33]), blocks=st.sampled_from([1, 3]), T=st.integers(2, 6),
       kind=st.sampled_from([GGML(t) for t in INTEGER_TYPES]), activations=st.sampled_from(ACTIVATIONS))
def test_a_few_tokens_at_once_are_each_token_alone(seed, N, blocks, T, kind, activations):
    """matmul_integer (a batch decoding together) gives each token what it gives that token alone, bit for
    bit (speculative decoding's verify pass must see the logits single steps see): the same operations in
    the same order, though each group size (4, 2, 1) compiles its own code (simd.ORDERED); with int16 and
    with int8 activations."""
    rng = np.random.default_rng(seed)
    K = blocks * GGML_BLOCKS[kind][0]
    data = random_blocks(rng, N, K, kind)
    x = rng.standard_normal((T, K)).astype(np.float32)
    together = np.full((T, N + 3), np.nan, np.float32)
    matmul_integer(together[:, 1:N + 1], data, int(kind), x, activations)
    alone = np.empty(N, np.float32)
    for i in range(T):
        matmul_integer(alone.reshape(1, N), data, int(kind), x[i:i + 1], activations)
        np.testing.assert_array_equal(together[i, 1:N + 1], alone)
    assert np.isnan(together[:, 0]).all() and np.isnan(together[:, N + 1:]).all()


@settings(deadline=None, max_examples=60)
@given(seed=seeds, T=st.integers(1, 16), N=st.sampled_from([1, 3, 17, 64]),
       blocks=st.sampled_from([1, 2, 3, 5, 7]), kind=st.sampled_from([GGML(t) for t in INTEGER_TYPES]),
       activations=st.sampled_from(ACTIVATIONS))
def test_matmul_integer_is_the_product_with_rounded_activations(seed, T, N, blocks, kind, activations):
    """To float rounding against matmul_integer_reference (x rounded to int16 / int8 the same way, in
    float64); and against the exact x W^T (W by gguf-py's dequantisation) to within what that rounding
    moves it."""
    rng = np.random.default_rng(seed)
    K = blocks * GGML_BLOCKS[kind][0]
    data = random_blocks(rng, N, K, kind)
    x = (rng.standard_normal((T, K)) * rng.choice([0.01, 1.0, 30.0])).astype(np.float32)
    out = np.full((T, N), np.nan, np.float32)
    matmul_integer(out, data, int(kind), x, activations)
    w = dequantize(data, kind).reshape(N, K).astype(np.float64)
    terms = np.abs(x.astype(np.float64)) @ np.abs(w).T
    diff = np.abs(out - matmul_integer_reference(data, int(kind), x, activations))
    assert diff.max() <= 1e-5 * terms.max(), (f"{kind.name} {activations}: max|diff| {diff.max():.3g}, "
                                              f"mean {diff.mean():.3g}")
    # x rounded to steps xd = max|x in its block| / L (32767 for int16, 127 for int8) moves by at most
    # xd / 2, and the level terms w - minimum feel it (the minimum terms take the exact block sums of x)
    L = np.iinfo(activations).max
    step = np.repeat(np.abs(x.astype(np.float64)).reshape(T, -1, 32).max(axis=2) / L, 32, axis=1)
    bound = (step / 2) @ np.abs(w - minimum_term(kind, data, K)).T
    assert np.all(np.abs(out - x.astype(np.float64) @ w.T) <= bound + 1e-5 * terms.max())


@jit
def lane_ops(a, b, packed):  # every vector intrinsic once, reduced to scalars
    low, high = widen16(a, 0, True), widen16(a, 16, True)
    signed = hsum(to_float(dot_s16(dot_s16(izeros(8), low, load(b, 0, 16)), high, load(b, 16, 16))))
    w = words(packed, 0, 16, 16)
    low, high = field(w, 0, 15), field(w, 12, 15)
    four_bit = hsum(to_float(dot_s16(dot_s16(izeros(8), low, load(b, 0, 16)), high, load(b, 16, 16))))
    six_bit = hsum(to_float(dot_s16(izeros(8), join(field(w, 4, 15), field(w, 8, 3), 4), load(b, 0, 16))))
    return signed, four_bit, six_bit


def test_vector_intrinsics():
    rng = np.random.default_rng(0)
    a = rng.integers(-128, 128, 32).astype(np.int8)
    b = rng.integers(-32767, 32768, 32).astype(np.int16)  # the widest int16 activations
    packed = rng.integers(0, 256, 32, dtype=np.uint8)
    signed, four_bit, six_bit = lane_ops(a, b, packed)
    wide = b.astype(np.int64)
    assert signed == a.astype(np.int64) @ wide
    pairs = packed.view(np.uint16).astype(np.int64)  # the 16-bit words of the packed bytes
    assert four_bit == (pairs & 15) @ wide[:16] + (pairs >> 12) @ wide[16:]
    assert six_bit == ((pairs >> 4) & 15 | ((pairs >> 8) & 3) << 4) @ wide[:16]


@jit
def byte_dot_256(out, unsigned, signed):
    store(out, 0, dot_u8s8(izeros(8), load(unsigned, 0, 32), load(signed, 0, 32)))


@jit
def byte_dot_512(out, unsigned, signed):
    store(out, 0, dot_u8s8(load(out, 0, 16), load(unsigned, 0, 64), load(signed, 0, 64)))


@given(seed=seeds)
def test_byte_dot_products(seed):
    """dot_u8s8 sums four products of an unsigned and a signed byte per int32 lane, at the extremes too,
    on each width the path has VNNI for; on the others it refuses to compile"""
    rng = np.random.default_rng(seed)
    unsigned = rng.choice(np.array([0, 1, 127, 128, 255]), 64).astype(np.uint8)
    signed = rng.choice(np.array([-128, -127, -1, 0, 1, 127]), 64).astype(np.int8)
    quads = (unsigned.astype(np.int64) * signed).reshape(16, 4).sum(axis=1)
    start = rng.integers(-2**20, 2**20, 16).astype(np.int32)
    for bits, kernel in ((256, byte_dot_256), (512, byte_dot_512)):
        out = start.copy() if bits == 512 else np.zeros(16, np.int32)
        if bits not in isa.VNNI_BITS:
            with pytest.raises(errors.TypingError, match="needs VNNI"):
                kernel(out, unsigned, signed)
            continue
        kernel(out, unsigned, signed)
        expected = start + quads if bits == 512 else np.r_[quads[:8], np.zeros(8, np.int64)]
        assert np.array_equal(out, expected)


@jit
def bf16_dot(out, a, b):  # out: [16] float32, the accumulators in and the sums out; a, b: [32] bf16 bits
    store(out, 0, dot_bf16(load(out, 0, 16), load(a, 0, 32), load(b, 0, 32)))


@given(seed=seeds)
def test_bf16_dot_products(seed):
    """dot_bf16 adds two products of bf16 pairs to each float32 lane: exact products, then float32 sums
    (within two roundings of float64's), subnormal inputs taken as zero and subnormal sums flushed to zero;
    where the compile target lacks AVX512-BF16 it refuses to compile"""
    rng = np.random.default_rng(seed)
    values = (rng.standard_normal(64) * rng.choice([1e-20, 1.0, 1e15], 64)).astype(np.float32)
    values[rng.random(64) < 0.1] = np.float32(1e-39)  # subnormal in float32 and in bf16
    a, b = bf16_bits(values[:32]), bf16_bits(values[32:])
    start = (rng.standard_normal(16) * rng.choice([1e-40, 1.0], 16)).astype(np.float32)
    out = start.copy()
    if "avx512bf16" not in isa.FEATURES:
        with pytest.raises(errors.TypingError, match="lacks"):
            bf16_dot(out, a, b)
        return
    bf16_dot(out, a, b)
    def normal(v):  # subnormals as zero
        return np.where(np.abs(v) < np.finfo(np.float32).tiny, 0, v).astype(np.float64)
    products = (normal(to_float32(a)) * normal(to_float32(b))).reshape(16, 2)
    expected = normal(start) + products[:, 1] + products[:, 0]
    terms = np.abs(normal(start)) + np.abs(products).sum(axis=1)
    assert np.all(np.abs(out - expected) <= 2.0**-23 * terms + np.finfo(np.float32).tiny), (out, expected)
    assert not np.any((out != 0) & (np.abs(out) < np.finfo(np.float32).tiny))


@jit
def byte_ops(packed, floats, signed_bytes, pairs, j):  # the unpacking intrinsics, stored for the test
    unsigned = bytes_to_float(bytes_of(u32_at(packed, 0), u32_at(packed, 4)), False)
    store(floats, 0, unsigned)
    store(floats, 8, bytes_to_float(load(packed, 0, 8), True) * fp16_splat(packed, 3, 8))
    store(floats, 16, lane(unsigned, j))
    store(floats, 24, quads(unsigned, j // 2))
    store(pairs, 0, words(packed, 0, 64, 16))
    store(signed_bytes, 0, field(load(packed, 0, 32), 4, 15) - 8)
    store(pairs, 16, bit_words(packed, 5, 16))
    return u32_at(packed, 5)


@given(seed=seeds, j=st.integers(0, 7))
def test_unpacking_intrinsics(seed, j):
    packed = np.random.default_rng(seed).integers(0, 256, 32, dtype=np.uint8)
    packed[3:5] = np.array([0.75], np.float16).view(np.uint8)  # a finite fp16 for fp16_splat
    floats, signed_bytes = np.full(32, np.nan, np.float32), np.zeros(32, np.int8)
    pairs = np.zeros(32, np.int16)
    word = byte_ops(packed, floats, signed_bytes, pairs, j)
    assert word == packed[5:9].view(np.uint32)[0]
    assert np.array_equal(floats[:8], packed[:8])
    assert np.array_equal(floats[8:16], packed[:8].view(np.int8) * np.float32(0.75))
    assert np.all(floats[16:24] == packed[j])
    assert np.array_equal(floats[24:32], packed[j // 2 + np.arange(8) // 4])
    assert np.array_equal(pairs[:16], packed.view(np.int16))
    assert np.array_equal(signed_bytes, (packed >> 4) - 8.0)
    bits = np.unpackbits(packed[5:7], bitorder="little")  # bit i of the little-endian uint16
    assert np.array_equal(pairs[16:], 16 * bits)


PROBE = """
import numpy as np
from minqwen.kernels import isa
from minqwen.kernels.intdot import matmul_integer
from minqwen.kernels.gemm import matmul_bf16, matmul_panels
from numba import njit
from minqwen.kernels.simd import dot_s16, dot_u8s8, izeros, load, to_float, hsum

@njit  # not kernels.jit's: a function defined in -c code cannot be cached
def probe(a, b):
    return hsum(to_float(dot_s16(dot_s16(izeros(8), load(a, 0, 16), load(b, 0, 16)), load(a, 16, 16),
                                 load(b, 16, 16))))

@njit
def probe_bytes(a, b):
    return hsum(to_float(dot_u8s8(izeros(8), load(a, 0, 32), load(b, 0, 32))))

a, b = np.zeros(32, np.int16), np.zeros(32, np.int16)
matvec_args = (np.empty((1, 2), np.float32), np.zeros((2, 34 * 8), np.uint8), 8,
               np.zeros((1, 256), np.float32), np.dtype(np.int16))
prefill_args = (np.empty((7, 2), np.float32), np.zeros((7, 256), np.float32), np.zeros((2, 256), np.uint16),
                np.int16)
kernels = [(probe, (a, b)), (matmul_integer, matvec_args), (matmul_panels, prefill_args)]
if "int8" in isa.DECODES:  # the int8 options (MINQWEN_DECODE / MINQWEN_PREFILL=int8) where the path has them
    kernels += [(probe_bytes, (np.zeros(32, np.uint8), np.zeros(32, np.int8))),
                (matmul_integer, matvec_args[:4] + (np.dtype(np.int8),))]
if "int8" in isa.PREFILLS:
    kernels += [(matmul_panels, prefill_args[:3] + (np.uint8,))]
if "bf16" in isa.PREFILLS:  # MINQWEN_PREFILL=bf16, where the avx512 path has AVX512-BF16
    kernels += [(matmul_bf16, prefill_args[:3])]
print("prefills:", *isa.PREFILLS)
for kernel, args in kernels:
    kernel.compile(tuple(kernel.typeof_pyval(v) for v in args))
print("".join(probe.inspect_asm().values()))
print("-- probe_bytes --")
print("".join(probe_bytes.inspect_asm().values()) if probe_bytes.signatures else "")
"""


ZEN4 = ("+sse4.2,+popcnt,+avx,+avx2,+fma,+f16c,+bmi2,+avx512f,+avx512bw,+avx512vl,+avx512dq,+avx512vnni,"
        "+avx512bf16")
# an Alder Lake: AVX2 with AVX-VNNI (256 bits, VEX-encoded), no AVX-512
ALDER_LAKE = "+sse4.2,+popcnt,+avx,+avx2,+fma,+f16c,+bmi2,+avxvnni," + ",".join(
    "-" + f for f in ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512vnni"))


def compiled_in_child(script, env, tmp_path) -> str:
    """What `script` prints, run in a child process with `env` (Numba's target, a fresh cache)"""
    env = {"NUMBA_CACHE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin", **env}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def compiled_probe(env, tmp_path) -> tuple[str, str]:
    """The machine code of the probe and of probe_bytes ("" where the path has no 256-bit VNNI), compiled
    (never run) in a child process with `env`, the int8 kernels too where the path has them."""
    stdout = compiled_in_child(PROBE, env, tmp_path)
    # each function itself (Numba's Python wrapper follows it)
    native, native_bytes = (part.split(".Lfunc_end0")[0] for part in stdout.split("-- probe_bytes --"))
    assert "call" not in native + native_bytes  # a misspelt intrinsic would be a call to nowhere
    return native, native_bytes


def test_avx512_path_compiles_to_vnni(tmp_path):
    """On a Zen 4 target (AVX-512 with VNNI and BF16) the same kernels compile each dot product to one
    vpdpwssd (and the prefill, on 512-bit vectors there, compiles), the int8 options' byte dots to vpdpbusd,
    and the bf16 prefill compiles."""
    native, native_bytes = compiled_probe({"NUMBA_CPU_NAME": "znver4", "NUMBA_CPU_FEATURES": ZEN4}, tmp_path)
    assert native.count("vpdpwssd") == 2 and "vpmaddwd" not in native
    assert "prefills: float int16 bf16 int8\n" in native
    assert native_bytes.count("vpdpbusd") == 1


def test_an_avx2_path_with_avx_vnni_compiles_the_int8_options(tmp_path):
    """An Alder Lake target (no AVX-512; AVX-VNNI's 256-bit dot products, VEX-encoded): the avx2 path,
    whose dots are vpdpwssd and whose int8 decode and prefill compile, byte dots on vpdpbusd."""
    native, native_bytes = compiled_probe({"NUMBA_CPU_NAME": "alderlake", "NUMBA_CPU_FEATURES": ALDER_LAKE},
                                          tmp_path)
    assert native.count("vpdpwssd") == 2 and "zmm" not in native
    assert "prefills: float int16 int8\n" in native  # no bf16: it is the avx512 path's
    assert native_bytes.count("vpdpbusd") == 1 and "zmm" not in native_bytes


SAPPHIRE_RAPIDS = ZEN4 + ",+amx-tile,+amx-bf16,+amx-int8"
AMX_PROBE = """
import numpy as np
from minqwen.kernels.gemm import matmul_amx
args = (np.empty((40, 40), np.float32), np.zeros((40, 96), np.float32), np.zeros((40, 96), np.uint16))
matmul_amx.compile(tuple(matmul_amx.typeof_pyval(v) for v in args))
print("".join(matmul_amx.inspect_asm().values()))
"""


def test_an_amx_target_compiles_the_amx_kernel_to_tile_instructions(tmp_path):
    """On a Sapphire Rapids target (compiled, never run: this CPU need not have AMX) matmul_amx is AMX code:
    the tiles configured and released, zeroed, loaded, multiplied on tdpbf16ps (four a step of k) and
    stored. What the code computes is tests/test_kernels_gemm.py's, on emulated tiles."""
    native = compiled_in_child(AMX_PROBE, {"NUMBA_CPU_NAME": "sapphirerapids",
                                           "NUMBA_CPU_FEATURES": SAPPHIRE_RAPIDS}, tmp_path)
    count = {name: len(re.findall(rf"\b{name}\b", native))
             for name in ("ldtilecfg", "tilerelease", "tilezero", "tileloadd", "tdpbf16ps", "tilestored")}
    assert count["ldtilecfg"] >= 1 and count["tilerelease"] >= 1, count
    assert min(count["tilezero"], count["tileloadd"], count["tdpbf16ps"], count["tilestored"]) >= 4, count


def test_a_forced_avx2_path_compiles_as_on_an_avx2_machine(tmp_path):
    """MINQWEN_ISA=avx2 on this CPU: its dot products are vpmaddwd + vpaddd, even where the CPU has VNNI,
    which LLVM would otherwise fuse them into (minqwen/environment.py narrows Numba's target); it has no
    int8 or bf16 options."""
    native, native_bytes = compiled_probe({"MINQWEN_ISA": "avx2"}, tmp_path)
    assert native.count("vpmaddwd") == 2 and "vpdpwssd" not in native
    assert native_bytes.strip() == "" and "prefills: float int16\n" in native
