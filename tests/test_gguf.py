"""The GGUF reader against the `gguf` package's reader (the reference) on the real SmolLM2 file and on
files its writer makes; and every way a file can be wrong, each a CheckpointError."""
from __future__ import annotations

import mmap
import struct
import time
import tracemalloc
from datetime import timedelta
from typing import NamedTuple

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as T
from gguf_files import write_gguf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minqwen.errors import CheckpointError
from minqwen.formats.gguf import GGML_TYPES, read_gguf

# One value of every metadata type, arrays of each element type, and an array of arrays.
METADATA = {
    "test.uint8": (T.UINT8, 200), "test.int8": (T.INT8, -100), "test.uint16": (T.UINT16, 60000),
    "test.int16": (T.INT16, -30000), "test.uint32": (T.UINT32, 4_000_000_000),
    "test.int32": (T.INT32, -2_000_000_000), "test.float32": (T.FLOAT32, 1e-5),
    "test.uint64": (T.UINT64, 2**64 - 1), "test.int64": (T.INT64, -(2**63)),
    "test.float64": (T.FLOAT64, -2.5e300), "test.bool": (T.BOOL, True),
    "test.string": (T.STRING, "héllo 世界"),
    "test.u8s": (T.ARRAY, [0, 1, 255], T.UINT8), "test.i32s": (T.ARRAY, [-1, 7, 2**31 - 1], T.INT32),
    "test.f32s": (T.ARRAY, [0.5, -1.25], T.FLOAT32), "test.f64s": (T.ARRAY, [1e-300], T.FLOAT64),
    "test.u64s": (T.ARRAY, [2**64 - 1, 0], T.UINT64), "test.bools": (T.ARRAY, [True, False, True], T.BOOL),
    "test.strings": (T.ARRAY, ["a", "", "Ġthe", "🌍"], T.STRING),
    "test.nested": (T.ARRAY, [[1, 2], [3]], T.ARRAY),
}


def block_tensor(rng, ggml_type: Q, rows: int, blocks_per_row: int):
    """Random bytes of a block type, as (uint8 [rows, bytes per row], type) for write_gguf."""
    type_size = gguf.GGML_QUANT_SIZES[ggml_type][1]
    return rng.integers(0, 256, (rows, blocks_per_row * type_size), dtype=np.uint8), ggml_type


def varied_tensors(seed=0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "f32": rng.standard_normal((3, 5)).astype(np.float32),
        "f16": rng.standard_normal((4, 8)).astype(np.float16),
        "bf16": (rng.integers(0, 2**16, (2, 6), dtype=np.uint16).view(np.uint8), Q.BF16),
        "f64": rng.standard_normal(7),
        "i8": rng.integers(-128, 128, 9, dtype=np.int8),
        "i32": rng.integers(-2**31, 2**31, (2, 2), dtype=np.int32),
        "q8_0": block_tensor(rng, Q.Q8_0, 3, 2),
        "q4_1": block_tensor(rng, Q.Q4_1, 2, 1),
        "q4_k": block_tensor(rng, Q.Q4_K, 2, 1),
        "q6_k": block_tensor(rng, Q.Q6_K, 1, 2),
        "experts": (rng.integers(0, 256, (4, 3, 2 * 34), dtype=np.uint8), Q.Q8_0),  # stacked 3-D
    }


def assert_matches_reference(path, ours=None):
    """Every metadata value and tensor byte equals what the `gguf` package reads."""
    ours = ours or read_gguf(path)
    reference = gguf.GGUFReader(path)
    fields = {k: f for k, f in reference.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.metadata) == list(fields)
    for key, field in fields.items():
        value = ours.metadata[key]
        if field.types[:2] == [T.ARRAY, T.ARRAY]:
            continue  # the package flattens arrays of arrays; checked by hand below
        expected = field.contents()
        if isinstance(value, np.ndarray):
            value = value.tolist()
        else:
            assert type(value) is type(expected), key
        np.testing.assert_equal(value, expected, err_msg=key)  # NaN equals NaN here
    assert list(ours.tensors) == [t.name for t in reference.tensors]
    for t in reference.tensors:
        mine = ours.tensors[t.name]
        assert mine.type.id == t.tensor_type and mine.type.name == t.tensor_type.name, t.name
        assert mine.shape == tuple(reversed(t.shape.tolist())), t.name
        assert not mine.data.flags.writeable and not mine.data.flags.owndata, t.name
        assert mine.data.dtype == mine.type.dtype and mine.data.flags.c_contiguous, t.name
        assert mine.data.tobytes() == t.data.tobytes(), t.name
    return ours


def test_every_type_the_gguf_package_knows_has_its_sizes():
    for ggml_type, (block_size, type_size) in gguf.GGML_QUANT_SIZES.items():
        ours = GGML_TYPES[int(ggml_type)]
        if ggml_type == Q.Q8_1:  # ggml's sizeof(block_q8_1) is 2 + 2 + 32; PyPI gguf 0.19.0 says 4 + 4 + 32
            type_size = 36       # (llama.cpp's own gguf-py has it right)
        assert (ours.name, ours.block_size, ours.type_size) == (ggml_type.name, block_size, type_size)


def test_written_file_matches_the_reference(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", METADATA, varied_tensors(), alignment=64)
    ours = assert_matches_reference(path)
    assert ours.version == 3 and ours.alignment == 64
    assert [a.tolist() for a in ours.metadata["test.nested"]] == [[1, 2], [3]]
    assert ours.metadata["test.bools"].dtype == bool and ours.metadata["test.float32"] == np.float32(1e-5)
    # Stored types: float32 as is, F16 / BF16 as raw bits (int16 / uint16), blocks as uint8 rows.
    tensors = varied_tensors()
    assert ours.tensors["f32"].data.dtype == np.float32 and np.array_equal(ours.tensors["f32"].data,
                                                                        tensors["f32"])
    assert np.array_equal(ours.tensors["f16"].data, tensors["f16"].view(np.int16))
    assert ours.tensors["bf16"].data.dtype == np.uint16 and ours.tensors["bf16"].shape == (2, 6)
    assert ours.tensors["q4_k"].shape == (2, 256) and ours.tensors["q4_k"].data.shape == (2, 144)
    assert ours.tensors["experts"].shape == (4, 3, 64) and ours.tensors["experts"].data.shape == (4, 3, 68)
    # Every tensor is a view of one memory map of the file: nothing is copied into RAM.
    bases = {id(t.data.base) for t in ours.tensors.values()}
    assert len(bases) == 1 and isinstance(ours.tensors["f32"].data.base, mmap.mmap)


def test_version_2_reads_as_version_3(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", METADATA, varied_tensors())
    data = bytearray(path.read_bytes())
    data[4:8] = struct.pack("<I", 2)
    path.write_bytes(data)
    assert read_gguf(path).version == 2
    assert_matches_reference(path)


def test_big_endian_file_is_refused(tmp_path):
    path = write_gguf(tmp_path / "be.gguf", METADATA, varied_tensors(), endianess=gguf.GGUFEndian.BIG)
    with pytest.raises(CheckpointError, match="a big-endian GGUF file"):
        read_gguf(path)


def test_smollm2_matches_the_reference(smollm2_gguf):
    ours = assert_matches_reference(smollm2_gguf)
    assert ours.metadata["general.architecture"] == "llama" and len(ours.tensors) == 272
    embedding = ours.tensors["token_embd.weight"]
    assert embedding.type.name == "Q8_0" and embedding.shape == (49152, 576)
    assert embedding.data.shape == (49152, 576 // 32 * 34)
    assert ours.tensors["blk.0.attn_q.weight"].type.name == "Q4_1"


def parse_seconds(path, repeats=3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        read_gguf(path)
        best = min(best, time.perf_counter() - start)
    return best


def test_vocabulary_metadata_parses_fast(smollm2_gguf, qwen_tokenizer_ggufs):
    """The vocabularies are the bulk of a GGUF's metadata: 49k tokens + 49k merges for SmolLM2, 152k +
    294k for Qwen2.5, 248k + 500k for Qwen3.5 (~0.04 / 0.15 / 0.3 s on the 2-core test VM)."""
    for path in (smollm2_gguf, qwen_tokenizer_ggufs["qwen2.5"], qwen_tokenizer_ggufs["qwen3.5"]):
        seconds = parse_seconds(path)
        print(f"{path.name}: {seconds:.3f} s")
        assert seconds < 1.5, (path.name, seconds)


# ---- malformed files: each a CheckpointError that says what is wrong


def raw_gguf(*kvs: bytes, tensor_infos: tuple[bytes, ...] = ()) -> bytes:
    """A GGUF header written by hand, for what the `gguf` package cannot write."""
    return header(3, len(tensor_infos), len(kvs)) + b"".join(kvs) + b"".join(tensor_infos)


def header(version, n_tensors, n_kv) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)


def string(text: bytes) -> bytes:
    return struct.pack("<Q", len(text)) + text


def kv(key: bytes, value_type: int, payload: bytes) -> bytes:
    return string(key) + struct.pack("<I", value_type) + payload


def array(element_type: int, count: int, payload: bytes = b"") -> bytes:
    return struct.pack("<IQ", element_type, count) + payload


def tensor_info(name: bytes, ne, ggml_type: int, offset: int) -> bytes:
    return string(name) + struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, ggml_type, offset)


def refusal(tmp_path, data: bytes) -> str:
    """The CheckpointError message reading `data` as a file gives (it must name the file)."""
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    with pytest.raises(CheckpointError) as error:
        read_gguf(path)
    assert str(error.value).startswith(f"{path}: "), error.value
    return str(error.value)


F32_4 = tensor_info(b"w", [4], 0, 0)  # 4 float32 at the start of the data section


@pytest.mark.parametrize("data, message", [
    (b"", "too short"),
    (b"GGUF" + bytes(19), "too short"),
    (b"PK\x03\x04" + bytes(40), "not a GGUF file"),
    (header(1, 0, 0), "version 1"),
    (header(4, 0, 0), "version 4"),
    (b"GGUF" + struct.pack(">IQQ", 3, 0, 0), "big-endian"),
    (header(3, 0, 2**64 - 1), "metadata count is 18446744073709551615"),
    (header(3, 2**60, 0), "tensor count"),
    (raw_gguf(kv(b"", 4, bytes(4))), "empty"),
    (raw_gguf(kv(b"a", 4, bytes(4)), kv(b"a", 4, bytes(4))), "'a' appears twice"),
    (raw_gguf(kv(b"a" * 10**5, 4, bytes(4)), kv(b"a" * 10**5, 4, bytes(4))),  # names quoted in 80 characters
     "metadata key '" + "a" * 76 + "... appears twice"),
    (raw_gguf(kv(b"\xff\xfe", 4, bytes(4))), "not valid UTF-8"),
    (raw_gguf(kv(b"a", 13, bytes(8))), "unknown value type 13"),
    (raw_gguf(kv(b"a", 8, string(b"caf\xc3"))), "not valid UTF-8"),
    (raw_gguf(kv(b"a", 8, struct.pack("<Q", 2**63) + b"x")), "needs 9223372036854775808 bytes"),
    (raw_gguf(kv(b"a", 9, array(8, 2, string(b"ok") + string(b"\xc3\x28"))))[:-1] + b"\x28",
     "'a'[1] is not valid UTF-8"),
    (raw_gguf(kv(b"a", 9, array(8, 3, string(b"ok") + string(b"no")))), "length is 3, but"),
    (raw_gguf(kv(b"a", 9, array(8, 1, struct.pack("<Q", 2**64 - 1))), kv(b"b", 4, bytes(4))),
     "'a'[0] runs past the end"),
    (raw_gguf(kv(b"a", 9, array(8, 2, string(b"ok") + struct.pack("<Q", 50) + b"short"))),
     "'a'[1] runs past the end"),
    (raw_gguf(kv(b"a", 9, array(4, 2**61, bytes(8)))), "length is 2305843009213693952"),
    (raw_gguf(kv(b"a", 9, array(14, 0))), "unknown element type 14"),
    (raw_gguf(kv(b"a", 9, array(9, 1) * 9 + array(0, 0))), "nested more than 8 deep"),
    (raw_gguf(kv(b"general.alignment", 4, struct.pack("<I", 0))), "not a power of two"),
    (raw_gguf(kv(b"general.alignment", 4, struct.pack("<I", 48))), "not a power of two"),
    (raw_gguf(kv(b"general.alignment", 4, struct.pack("<I", 1 << 17))), "not a power of two"),
    (raw_gguf(kv(b"general.alignment", 10, struct.pack("<Q", 32))), "not UINT32"),
    (raw_gguf(tensor_infos=(tensor_info(b"", [4], 0, 0),)) + bytes(64), "empty name"),
    (raw_gguf(tensor_infos=(tensor_info(b"\xc0w", [4], 0, 0),)) + bytes(64), "not valid UTF-8"),
    (raw_gguf(tensor_infos=(tensor_info(b"w", [1] * 5, 0, 0),)) + bytes(64), "5 dimensions"),
    (raw_gguf(tensor_infos=(tensor_info(b"w", [], 0, 0),)) + bytes(64), "0 dimensions"),
    (raw_gguf(tensor_infos=(tensor_info(b"w", [4, 0], 0, 0),)) + bytes(64), "empty dimension"),
    (raw_gguf(tensor_infos=(tensor_info(b"w", [4], 4, 0),)) + bytes(64), "unknown GGML type 4"),
    (raw_gguf(tensor_infos=(tensor_info(b"w", [4], 2**32 - 1, 0),)) + bytes(64), "unknown GGML type"),
    (raw_gguf(tensor_infos=(tensor_info(b"w", [48], 8, 0),)) + bytes(64), "rows of 48 elements"),
    (raw_gguf(tensor_infos=(tensor_info(b"w", [2**32, 2**32, 2**32], 0, 0),)) + bytes(64),
     "more than the whole"),
    (raw_gguf(tensor_infos=(tensor_info(b"w", [2**63, 2**63, 2**63, 2**63], 0, 0),)), "more than the whole"),
    (raw_gguf(tensor_infos=(F32_4,)) + bytes(10), "runs past the end"),
    (raw_gguf(tensor_infos=(tensor_info(b"w", [4], 0, 2**64 - 32),)) + bytes(64), "runs past the end"),
    (raw_gguf(tensor_infos=(tensor_info(b"w", [4], 0, 16),)) + bytes(64), "not a multiple of the alignment"),
    (raw_gguf(tensor_infos=(F32_4, F32_4)) + bytes(96), "'w' appears twice"),
    (raw_gguf(tensor_infos=(F32_4, tensor_info(b"v", [2], 0, 0))) + bytes(96), "overlap"),
    (raw_gguf(tensor_infos=(tensor_info(b"v", [16], 0, 0), tensor_info(b"w", [4], 0, 32))) + bytes(128),
     "'v' and 'w' overlap"),
    (raw_gguf(kv(b"general.alignment", 4, struct.pack("<I", 1)), tensor_infos=(F32_4,)) + bytes(64),
     "not aligned to its 4-byte elements"),
])
def test_malformed_file_is_refused(tmp_path, data, message):
    assert message in refusal(tmp_path, data)


def test_unreadable_paths_are_refused(tmp_path):
    for path, message in ((tmp_path / "missing.gguf", "No such file"), (tmp_path, "Is a directory")):
        with pytest.raises(CheckpointError, match=f"{path}: cannot read: {message}"):
            read_gguf(path)


def test_lying_counts_cost_neither_memory_nor_time(tmp_path):
    """Counts and lengths are checked against the bytes left before anything is allocated for them."""
    liars = [header(3, 0, 2**64 - 1), header(3, 2**64 - 1, 0),
             raw_gguf(kv(b"a", 8, struct.pack("<Q", 2**64 - 1))),
             raw_gguf(kv(b"a", 9, array(8, 2**63))), raw_gguf(kv(b"a", 9, array(12, 2**61))),
             raw_gguf(kv(b"a", 9, array(9, 2**62))),
             raw_gguf(tensor_infos=(tensor_info(b"w", [2**62, 2**62], 0, 0),))]
    for data in liars:
        tracemalloc.start()
        start = time.perf_counter()
        refusal(tmp_path, data + bytes(1000))
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 1_000_000 and seconds < 0.5, (data[:40], peak, seconds)


def test_edge_values_that_are_legal(tmp_path):
    """Empty arrays, empty strings, strings holding NUL, arrays of arrays, tensors in any order with gaps,
    and bytes after the last tensor all read as written."""
    path = tmp_path / "edge.gguf"
    path.write_bytes(raw_gguf(
        kv(b"empty", 9, array(8, 0)), kv(b"empty_numbers", 9, array(5, 0)),
        kv(b"strings", 9, array(8, 4, string(b"") + string(b"a\0b") + string(b"\0") + string(b"z"))),
        kv(b"nested", 9, array(9, 2, array(8, 1, string(b"x")) + array(7, 2, b"\x00\x02"))),
        kv(b"bool", 7, b"\x05"),
        tensor_infos=(tensor_info(b"late", [2], 0, 64), tensor_info(b"early", [4], 0, 0)))
        + bytes(160) + b"trailing bytes")
    f = read_gguf(path)
    assert f.metadata["empty"] == [] and f.metadata["empty_numbers"].shape == (0,)
    assert f.metadata["strings"] == ["", "a\0b", "\0", "z"]
    assert f.metadata["nested"][0] == ["x"] and f.metadata["nested"][1].tolist() == [False, True]
    assert f.metadata["bool"] is True  # any non-zero byte, as llama.cpp reads it
    assert list(f.tensors) == ["late", "early"] and f.tensors["late"].shape == (2,)


# ---- mutations of a valid file, field by field: it loads as the reference reads it, or is refused

# Tensor types whose bytes the `gguf` package reads as ggml does (it sizes Q8_1 blocks wrongly).
REFERENCE_TYPES = {int(t) for t in Q} - {int(Q.Q8_1)}


class Field(NamedTuple):
    name: str
    offset: int
    width: int  # bytes: 4 (u32) or 8 (u64)


class ValidFile(NamedTuple):
    data: bytes
    fields: list[Field]

    def __repr__(self):  # hypothesis prints its arguments: not the whole file
        return f"ValidFile({len(self.data)} bytes, {len(self.fields)} fields)"


@pytest.fixture(scope="module")
def valid_file(tmp_path_factory):
    """(bytes, fields) of a small file with every kind of value and tensor; `fields` are all its u32 and
    u64 fields (counts, lengths, types, dims, offsets, the alignment), where the reference reader
    found them: each field's parts lie back to back from its offset."""
    path = write_gguf(tmp_path_factory.mktemp("valid") / "valid.gguf",
                      {**METADATA, "test.key_a": (T.UINT32, 1), "test.key_b": (T.UINT32, 2)},
                      varied_tensors(), alignment=32)
    reader = gguf.GGUFReader(path)
    fields = []
    for field in [*reader.fields.values(), *(t.field for t in reader.tensors)]:
        offset = field.offset
        for i, part in enumerate(field.parts):
            if part.dtype in (np.uint32, np.uint64):
                fields += [Field(f"{field.name} part {i}[{j}]", offset + j * part.itemsize, part.itemsize)
                           for j in range(part.size)]
            offset += part.nbytes
    return ValidFile(path.read_bytes(), fields)


def loads_as_the_reference_reads_it_or_is_refused(path):
    """The reader's contract on any input: CheckpointError, or every value and byte right. Files with
    tensor types the reference cannot size are checked for consistency instead."""
    try:
        ours = read_gguf(path)
    except CheckpointError:
        return
    if all(t.type.id in REFERENCE_TYPES for t in ours.tensors.values()):
        assert_matches_reference(path, ours)
    for t in ours.tensors.values():
        row_bytes = t.shape[-1] // t.type.block_size * t.type.type_size
        assert t.data.nbytes == row_bytes * int(np.prod(t.shape[:-1])) and not t.data.flags.writeable


def interesting(value: int, width: int, file_size: int):
    bits = 8 * width
    edges = [0, 1, 2, 3, 4, 5, 7, 8, 9, 12, 13, 16, 31, 32, 33, 64, 255, 256, 2**16, 2**31 - 1, 2**31,
             2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1, value - 1, value + 1, value * 2, value + 32,
             file_size, file_size - value]
    return st.one_of(st.sampled_from([e % 2**bits for e in edges]), st.integers(0, 2**bits - 1))


MUTATION_SETTINGS = settings(max_examples=400, deadline=timedelta(seconds=5),
                             suppress_health_check=[HealthCheck.function_scoped_fixture])


@MUTATION_SETTINGS
@given(data=st.data())
def test_mutated_fields(valid_file, tmp_path, data):
    original, fields = valid_file
    mutated = bytearray(original)
    for field in data.draw(st.lists(st.sampled_from(fields), min_size=1, max_size=3), label="fields"):
        value = int.from_bytes(original[field.offset:field.offset + field.width], "little")
        new = data.draw(interesting(value, field.width, len(original)), label=field.name)
        mutated[field.offset:field.offset + field.width] = new.to_bytes(field.width, "little")
    path = tmp_path / f"mutated-{data.draw(st.integers(0, 2**32), label='file')}.gguf"
    path.write_bytes(mutated)
    loads_as_the_reference_reads_it_or_is_refused(path)


@MUTATION_SETTINGS
@given(data=st.data())
def test_mutated_bytes(valid_file, tmp_path, data):
    """Random bytes anywhere in the header, a truncation, bytes appended, names made equal, tensors
    moved onto each other."""
    original, fields = valid_file
    mutated = bytearray(original)
    header_end = max(f.offset + f.width for f in fields)
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        kind = data.draw(st.sampled_from(["byte", "truncate", "append", "copy"]), label="kind")
        if kind == "byte" and mutated:
            mutated[data.draw(st.integers(0, min(header_end, len(mutated)) - 1))] = \
                data.draw(st.integers(0, 255))
        elif kind == "truncate":
            del mutated[data.draw(st.integers(0, len(mutated))):]
        elif kind == "append":
            mutated += data.draw(st.binary(min_size=1, max_size=64))
        else:  # copy one field over another of the same width: duplicate names, shared offsets
            source, target = data.draw(st.lists(st.sampled_from(fields), min_size=2, max_size=2))
            if source.width == target.width and target.offset + target.width <= len(mutated):
                mutated[target.offset:target.offset + target.width] = \
                    original[source.offset:source.offset + source.width]
    path = tmp_path / f"mutated-{data.draw(st.integers(0, 2**32), label='file')}.gguf"
    path.write_bytes(mutated)
    loads_as_the_reference_reads_it_or_is_refused(path)


def test_equal_names_and_shared_offsets(tmp_path, valid_file):
    original, fields = valid_file
    data = original.replace(b"test.key_b", b"test.key_a")
    assert "'test.key_a' appears twice" in refusal(tmp_path, data)
    data = original.replace(b"\x03\x00\x00\x00\x00\x00\x00\x00f16", b"\x03\x00\x00\x00\x00\x00\x00\x00f32")
    assert "'f32' appears twice" in refusal(tmp_path, data)
    offsets = {f.name: f.offset for f in fields}  # part 5 of a tensor's entry: its data offset
    f32, f16 = offsets["f32 part 5[0]"], offsets["f16 part 5[0]"]
    data = bytearray(original)
    data[f16:f16 + 8] = original[f32:f32 + 8]
    assert "overlap" in refusal(tmp_path, bytes(data))


def test_every_truncation_is_refused_or_loses_only_padding(tmp_path, valid_file):
    original, _ = valid_file
    last_tensor_end = len(original.rstrip(b"\0"))
    for size in range(0, len(original), 7):
        path = tmp_path / f"cut-{size}.gguf"
        path.write_bytes(original[:size])
        if size < last_tensor_end:
            refusal(tmp_path, original[:size])
        else:
            assert_matches_reference(path)
