"""Tests of the safetensors reader: round trips through the real `safetensors` library, folder
layouts, memory mapping, and fuzzing with the library itself as the oracle.

The fuzz property, for any bytes: read_tensors either raises CheckpointError, or returns exactly
what `safetensors.deserialize` returns for the same bytes (names, dtypes, shapes, raw data). Never
another exception, and never accepting a file the library rejects.
"""
import json
import mmap
import random
import re
import struct

import numpy as np
import pytest
import safetensors
import safetensors.numpy
import safetensors.torch
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from minqwen.errors import CheckpointError
from minqwen.formats.safetensors import read_safetensors_header, read_tensors

# What each stored dtype must come back as (written out here, not imported, so the test is an
# independent statement of the contract).
EXPECTED_NUMPY = {
    "BF16": np.uint16, "F16": np.int16, "F32": np.float32, "F64": np.float64, "I64": np.int64,
    "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
    "F8_E4M3": np.uint8,  # raw bits: FP8 weights of the official FP8 checkpoints
}
TORCH_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
}
# Every dtype the library knows, with its size in bytes where it is whole (F4/F6 pack bits).
LIBRARY_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
    "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "C64": 8, "F64": 8, "I64": 8, "U64": 8,
}
FUZZ = settings(deadline=None, max_examples=150,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def random_torch_tensor(dtype: str, shape, rng: np.random.Generator) -> torch.Tensor:
    if dtype in ("BF16", "F16", "F32", "F64"):
        values = rng.standard_normal(shape) * 10.0 ** rng.integers(-3, 4)
        return torch.from_numpy(np.asarray(values)).to(TORCH_DTYPES[dtype])
    if dtype == "BOOL":
        return torch.from_numpy(np.asarray(rng.integers(0, 2, shape).astype(bool)))
    if dtype == "F8_E4M3":  # any byte pattern, NaNs included: the reader hands bits over untouched
        return (torch.from_numpy(np.asarray(rng.integers(0, 256, shape, dtype=np.uint8)))
                .view(torch.float8_e4m3fn))
    info = np.iinfo(EXPECTED_NUMPY[dtype])
    values = rng.integers(info.min, info.max, shape, dtype=EXPECTED_NUMPY[dtype], endpoint=True)
    return torch.from_numpy(np.asarray(values))


def torch_bits(t: torch.Tensor) -> np.ndarray:
    """What read_tensors must return for a torch tensor: half floats as their raw bits."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    if t.dtype == torch.float16:
        return t.view(torch.int16).numpy()
    if t.dtype == torch.float8_e4m3fn:
        return t.view(torch.uint8).numpy()
    return t.numpy()


def assert_same(got: np.ndarray, want: np.ndarray, name: str):
    assert got.dtype == want.dtype, f"{name}: dtype {got.dtype}, want {want.dtype}"
    assert got.shape == want.shape, f"{name}: shape {got.shape}, want {want.shape}"
    assert got.tobytes() == want.tobytes(), f"{name}: data differs"


def library_view(blob: bytes):
    """The oracle: {name: (dtype, shape, data bytes)} as the safetensors library reads blob, or None."""
    try:
        return {name: (info["dtype"], tuple(info["shape"]), bytes(info["data"]))
                for name, info in safetensors.deserialize(blob)}
    except Exception:  # any rejection by the library counts as a rejection
        return None


def our_view(blob: bytes, folder):
    """{name: (dtype, shape, data bytes)} as read_tensors reads blob, or None on CheckpointError.
    Any other exception escapes and fails the test."""
    path = folder / "model.safetensors"
    # Unlink rather than overwrite: arrays from an earlier example may still map the old file,
    # and shrinking a mapped file under them would turn a read into SIGBUS.
    path.unlink(missing_ok=True)
    path.write_bytes(blob)
    try:
        tensors = read_tensors(folder)
        header, _ = read_safetensors_header(path)
    except CheckpointError as e:
        message = str(e)
        assert "\n" not in message and str(path) in message, f"bad message: {message!r}"
        return None
    assert tensors.keys() == header.keys()
    view = {}
    for name, array in tensors.items():
        dtype, shape, _ = header[name]
        assert array.dtype == EXPECTED_NUMPY[dtype] and array.shape == shape
        assert not array.flags.writeable
        view[name] = (dtype, shape, array.tobytes())
    return view


def check_against_library(blob: bytes, folder):
    """The fuzz property (see the module docstring). Returns (library's view, ours)."""
    theirs, ours = library_view(blob), our_view(blob, folder)
    if theirs is None:
        assert ours is None, "read_tensors accepted a file the safetensors library rejects"
    if ours is not None:
        assert ours == theirs, "read_tensors disagrees with the safetensors library"
    return theirs, ours


def count_outcome(theirs, ours):
    """Shown by pytest --hypothesis-show-statistics: the fuzzers should reach every outcome."""
    event("both accept" if ours is not None else
          "both reject" if theirs is None else "only the library accepts")


def pack(header, data: bytes = b"", pad: int = 0) -> bytes:
    """A safetensors file from a header (dict, str or bytes) and a data section."""
    if isinstance(header, dict):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode()
    header += b" " * pad
    return struct.pack("<Q", len(header)) + header + data


@pytest.fixture
def base_file() -> bytes:
    """A valid file written by the library: every dtype we read, incl. 0-d and empty tensors."""
    rng = np.random.default_rng(0)
    shapes = {"BF16": (3, 5), "F16": (7,), "F32": (2, 3), "F64": (), "I64": (2,), "I32": (0, 4),
              "I16": (3,), "I8": (5,), "U8": (1, 1, 3), "BOOL": (4,), "F8_E4M3": (2, 3)}
    return safetensors.torch.save({f"t.{dtype.lower()}": random_torch_tensor(dtype, shape, rng)
                                   for dtype, shape in shapes.items()})


# ---------------------------------------------------------------------------------------------
# round trips through the library's writers
# ---------------------------------------------------------------------------------------------

tensor_specs = st.dictionaries(
    keys=st.text("abcdefghij.0123456789_", min_size=1, max_size=12),
    values=st.tuples(st.sampled_from(sorted(TORCH_DTYPES)),
                     st.lists(st.integers(0, 6), max_size=3).map(tuple)),
    max_size=6)


@settings(deadline=None, max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(specs=tensor_specs, seed=st.integers(0, 2**32 - 1))
def test_round_trip_torch_writer(tmp_path_factory, specs, seed):
    rng = np.random.default_rng(seed)
    folder = tmp_path_factory.mktemp("rt")
    written = {name: random_torch_tensor(dtype, shape, rng) for name, (dtype, shape) in specs.items()}
    safetensors.torch.save_file(written, folder / "model.safetensors")
    got = read_tensors(folder)
    assert got.keys() == written.keys()
    for name, t in written.items():
        assert_same(got[name], torch_bits(t), name)


def test_bf16_bits_match_torch(tmp_path):
    # Values that round differently under truncation vs round-to-nearest-even.
    t = torch.tensor([1.0, -2.5, 3.14159, 1e-40, float("inf"), -0.0, 65504.0, 1 + 2**-8])
    safetensors.torch.save_file({"w": t.to(torch.bfloat16), "h": t.to(torch.float16)},
                                tmp_path / "model.safetensors")
    got = read_tensors(tmp_path)
    assert np.array_equal(got["w"], t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16))
    assert np.array_equal(got["h"], t.to(torch.float16).view(torch.int16).numpy())


def test_round_trip_numpy_writer(tmp_path):
    rng = np.random.default_rng(1)
    written = {
        "f32": rng.standard_normal((4, 3)).astype(np.float32),
        "f64": rng.standard_normal(5),
        "f16": rng.standard_normal((2, 2)).astype(np.float16),
        "i64": rng.integers(-2**62, 2**62, (3,)),
        "i32": rng.integers(-100, 100, (2, 1, 2)).astype(np.int32),
        "i16": rng.integers(-100, 100, (3,)).astype(np.int16),
        "i8": rng.integers(-100, 100, (3,)).astype(np.int8),
        "u8": rng.integers(0, 255, (6,)).astype(np.uint8),
        "bool": rng.integers(0, 2, (3,)).astype(bool),
        "scalar": np.array(2.5, dtype=np.float32),
        "empty": np.zeros((0, 7), dtype=np.float32),
    }
    safetensors.numpy.save_file(written, tmp_path / "model.safetensors", metadata={"format": "np"})
    got = read_tensors(tmp_path)
    assert got.keys() == written.keys()
    for name, array in written.items():
        want = array.view(np.int16) if array.dtype == np.float16 else array
        assert_same(got[name], want, name)


def test_header_reader_reports_layout(tmp_path):
    safetensors.numpy.save_file({"a": np.zeros((2, 3), np.float32), "b": np.zeros((), np.int8)},
                                tmp_path / "x.safetensors")
    entries, data_offset = read_safetensors_header(tmp_path / "x.safetensors")
    assert entries == {"a": ("F32", (2, 3), (0, 24)), "b": ("I8", (), (24, 25))}
    assert data_offset % 8 == 0 and data_offset + 25 == (tmp_path / "x.safetensors").stat().st_size


# ---------------------------------------------------------------------------------------------
# folder layouts
# ---------------------------------------------------------------------------------------------

def write_shards(folder, shards: dict[str, dict[str, np.ndarray]], index: dict | None = None):
    for file, tensors in shards.items():
        safetensors.numpy.save_file(tensors, folder / file)
    if index is not None:
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def two_shards():
    return {"model-00001-of-00002.safetensors": {"a": np.arange(3, dtype=np.float32),
                                                 "b": np.ones((2, 2), np.int32)},
            "model-00002-of-00002.safetensors": {"c": np.full(4, 7, np.int8)}}


def weight_map_of(shards):
    return {name: file for file, tensors in shards.items() for name in tensors}


def test_sharded_with_index(tmp_path):
    shards = two_shards()
    write_shards(tmp_path, shards, {"metadata": {"total_size": 32}, "weight_map": weight_map_of(shards)})
    # A stray file the index does not list is not read (here it is not even valid).
    (tmp_path / "consolidated.safetensors").write_bytes(b"garbage")
    got = read_tensors(tmp_path)
    assert got.keys() == {"a", "b", "c"}
    for tensors in shards.values():
        for name, array in tensors.items():
            assert_same(got[name], array, name)


def test_sharded_without_index(tmp_path):
    shards = two_shards()
    write_shards(tmp_path, shards)
    got = read_tensors(str(tmp_path))  # str paths work too
    assert got.keys() == {"a", "b", "c"}
    assert_same(got["c"], shards["model-00002-of-00002.safetensors"]["c"], "c")


def test_duplicate_tensor_across_shards(tmp_path):
    write_shards(tmp_path, {"one.safetensors": {"a": np.zeros(2, np.float32)},
                            "two.safetensors": {"a": np.zeros(2, np.float32)}})
    with pytest.raises(CheckpointError, match=r"'a'.*one\.safetensors.*two\.safetensors"):
        read_tensors(tmp_path)


@pytest.mark.parametrize("break_index, message", [
    (lambda m: m | {"c": "model-00003-of-00002.safetensors"}, r"does not exist"),
    (lambda m: m | {"c": "model-00001-of-00002.safetensors"}, r"'c' is in this shard, but it is not"),
    (lambda m: {k: v for k, v in m.items() if k != "b"}, r"holds tensor 'b'.*nowhere"),
    (lambda m: m | {"d": "model-00002-of-00002.safetensors"}, r"'d' is in this shard"),
    (lambda m: m | {"c": "../model-00002-of-00002.safetensors"}, r"not a file name"),
    (lambda m: m | {"c": 3}, r"weight_map"),
    (lambda m: {}, r"weight_map"),
    (lambda m: [m], r"weight_map"),
])
def test_index_disagreeing_with_shards(tmp_path, break_index, message):
    shards = two_shards()
    write_shards(tmp_path, shards)
    index = break_index(weight_map_of(shards))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps(index if isinstance(index, list) else {"weight_map": index}))
    with pytest.raises(CheckpointError, match=message):
        read_tensors(tmp_path)


@pytest.mark.parametrize("text", ['{"weight_map": ', '{"weight_map": {"a": "x", "a": "y"}}', "\xff"])
def test_index_not_json(tmp_path, text):
    write_shards(tmp_path, two_shards())
    (tmp_path / "model.safetensors.index.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(CheckpointError, match="index.json"):
        read_tensors(tmp_path)


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / "nope"))):
        read_tensors(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no .safetensors files"):
        read_tensors(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="not a folder"):
        read_tensors(tmp_path / "config.json")


def test_unreadable_file(tmp_path):
    (tmp_path / "model.safetensors").mkdir()  # exists, cannot be read as a file
    with pytest.raises(CheckpointError, match="model.safetensors: cannot read"):
        read_tensors(tmp_path)
    (tmp_path / "model.safetensors").rmdir()
    (tmp_path / "model.safetensors").symlink_to(tmp_path / "gone")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        read_tensors(tmp_path)


# ---------------------------------------------------------------------------------------------
# memory mapping
# ---------------------------------------------------------------------------------------------

def test_tensors_are_read_only_views_of_one_mapping(tmp_path, base_file):
    (tmp_path / "model.safetensors").write_bytes(base_file)
    tensors = read_tensors(tmp_path)
    mappings = {id(array.base) for array in tensors.values()}
    assert len(mappings) == 1, "each file must be mapped once"
    mapping = next(iter(tensors.values())).base
    whole = np.frombuffer(mapping, dtype=np.uint8)
    assert len(whole) == len(base_file)
    for name, array in tensors.items():
        assert not array.flags.writeable
        assert array.flags.aligned and array.flags.c_contiguous
        if array.size:
            assert np.shares_memory(array, whole), f"{name} is a copy, not a view"
        with pytest.raises(ValueError):
            array.flags.writeable = True


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_loading_does_not_read_the_weights_into_ram(tmp_path):
    # A 200 MB file, written sparse (truncate) so that writing it costs neither time nor disk.
    # A reader that copied or read the data would grow resident memory by 200 MB.
    n = 50_000_000
    header = {"__metadata__": {"format": "pt"},
              "big": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]},
              "small": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [4 * n, 4 * n + 8]}}
    blob = pack(header, pad=(-len(json.dumps(header))) % 8)
    path = tmp_path / "model.safetensors"
    with open(path, "wb") as f:
        f.write(blob)
        f.truncate(len(blob) + 4 * n + 8)
    with safetensors.safe_open(path, framework="numpy") as f:  # the library agrees it is valid
        assert set(f.keys()) == {"big", "small"}

    before = resident_bytes()
    tensors = read_tensors(tmp_path)
    grown = resident_bytes() - before
    assert tensors["big"].shape == (n,) and tensors["big"].dtype == np.float32
    assert grown < 20_000_000, f"resident memory grew by {grown / 1e6:.0f} MB loading 200 MB"
    assert tensors["big"][-1] == 0.0 and tensors["small"].sum() == 0


def test_unaligned_tensor_is_copied_and_correct(tmp_path):
    # The library's writer sorts tensors by falling alignment and pads the header to 8 bytes, but
    # its reader accepts a byte before a float32, which puts the float32 at an odd address.
    rng = np.random.default_rng(2)
    values = rng.standard_normal(5).astype(np.float32)
    bits = torch.tensor([1.5, -2.0, 3.0]).to(torch.bfloat16)
    header = {"b": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
              "w": {"dtype": "F32", "shape": [5], "data_offsets": [1, 21]},
              "h": {"dtype": "BF16", "shape": [3], "data_offsets": [21, 27]},
              "aligned": {"dtype": "U8", "shape": [1], "data_offsets": [27, 28]}}
    text = json.dumps(header)
    blob = pack(text, b"\x07" + values.tobytes() + torch_bits(bits).tobytes() + b"\x09",
                pad=-len(text) % 8)
    theirs, ours = check_against_library(blob, tmp_path)
    assert theirs is not None and ours is not None
    got = read_tensors(tmp_path)
    for name in "wh":
        assert got[name].flags.aligned and not got[name].flags.writeable, name
    assert np.array_equal(got["w"], values) and got["b"][0] == 7 and got["aligned"][0] == 9
    assert np.array_equal(got["h"], torch_bits(bits))
    # Only the unaligned tensors are copies.
    assert isinstance(got["b"].base, mmap.mmap) and isinstance(got["aligned"].base, mmap.mmap)
    assert not isinstance(got["w"].base, mmap.mmap) and not isinstance(got["h"].base, mmap.mmap)


# ---------------------------------------------------------------------------------------------
# strict validation: specific errors
# ---------------------------------------------------------------------------------------------

def test_unknown_tensor_field_is_refused(tmp_path):
    # The library ignores unknown fields; a field we do not understand may change the meaning.
    blob = pack({"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1], "x": 0}}, b"1")
    (tmp_path / "model.safetensors").write_bytes(blob)
    with pytest.raises(CheckpointError, match="tensor 'a' must have exactly the keys"):
        read_tensors(tmp_path)


def test_unsupported_dtype_names_tensor_and_dtype(tmp_path):
    blob = pack({"lm_head.weight": {"dtype": "F8_E5M2", "shape": [2], "data_offsets": [0, 2]}},
                b"\0\0")
    assert library_view(blob) is not None  # the library reads it; we refuse by name
    (tmp_path / "model.safetensors").write_bytes(blob)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'lm_head\.weight' "
                                              r"has dtype 'F8_E5M2'"):
        read_tensors(tmp_path)


def test_absurd_number_of_tensors_is_refused_before_parsing(tmp_path):
    entry = '"t{}":{{"dtype":"U8","shape":[0],"data_offsets":[0,0]}}'
    header = "{" + ",".join(entry.format(i) for i in range(200_005)) + "}"
    (tmp_path / "model.safetensors").write_bytes(pack(header))
    with pytest.raises(CheckpointError, match="more than 200000 tensors"):
        read_tensors(tmp_path)
    header = "{" + ",".join(entry.format(i) for i in range(1000)) + "}"  # many, but not absurd
    (tmp_path / "model.safetensors").write_bytes(pack(header))
    assert len(read_tensors(tmp_path)) == 1000


@pytest.mark.parametrize("blob, message", [
    (b"", "too short"),
    (b"\x02\0\0\0", "too short"),
    (struct.pack("<Q", 100_000_001) + b"{}", "exceeds the 100000000-byte limit"),
    (struct.pack("<Q", 2**64 - 1) + b"{}", "exceeds"),
    (struct.pack("<Q", 50) + b"{}", "runs past the end"),
    (pack("{}", b"x"), "trailing bytes"),
    (pack({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"1234"), "truncated"),
    (pack({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"1234"), "needs 8"),
    (pack({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 8]}}, b"12345678"), "needs 4"),
    (pack({"a": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}, b"12"), "gap"),
    (pack({"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
           "b": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}, b"12"), "overlaps"),
    (pack({"a": {"dtype": "U8", "shape": [1], "data_offsets": [1, 0]}}, b"1"), "ends before"),
    (pack({"a": {"dtype": "U8", "shape": [-1], "data_offsets": [0, 0]}}), "shape"),
    (pack({"__metadata__": {"a": 1}}), "__metadata__"),
    (pack(b"{\xff}"), "UTF-8"),
    (pack("[]"), "not an object"),
], ids=lambda x: x if isinstance(x, str) else "")
def test_specific_errors(tmp_path, blob, message):
    (tmp_path / "model.safetensors").write_bytes(blob)
    with pytest.raises(CheckpointError, match=message) as caught:
        read_tensors(tmp_path)
    assert str(tmp_path / "model.safetensors") in str(caught.value)
    assert "\n" not in str(caught.value)
    assert library_view(blob) is None  # each of these the library rejects too


# Headers where Python's json and Rust's serde_json differ, or that probe a single rule.
# The data section is 4 bytes, right for a 4-byte tensor at [0, 4].
TRICKY_HEADERS = [
    '{"a":{"dtype":"U8","shape":[-0],"data_offsets":[0,0]},"b":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}',
    '{"a":{"dtype":"U8","shape":[0],"data_offsets":[-0,0]},"b":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}',
    '{"a":{"dtype":"U8","shape":[4.0],"data_offsets":[0,4]}}',
    '{"a":{"dtype":"U8","shape":[4e0],"data_offsets":[0,4]}}',
    '{"a":{"dtype":"U8","shape":[true,4],"data_offsets":[0,4]}}',
    '{"a":{"dtype":"U8","shape":[NaN],"data_offsets":[0,4]}}',
    '{"a":{"dtype":"U8","shape":[Infinity],"data_offsets":[0,4]}}',
    '{"a":{"dtype":"U8","shape":[18446744073709551616],"data_offsets":[0,4]}}',
    '{"a":{"dtype":"U8","shape":[0,18446744073709551615],"data_offsets":[0,0]},'
    '"b":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}',
    '{"a":{"dtype":"U8","shape":[4294967296,4294967296],"data_offsets":[0,4]}}',
    '{"a":{"dtype":"U8","shape":[' + "9" * 5000 + '],"data_offsets":[0,4]}}',
    '{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4],"data_offsets":[0,4]}}',
    '{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}',
    '{"\\ud800":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}',
    '{"\\ud83d\\ude00":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}',
    '{"__metadata__":{"k":"\\udc00"},"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}',
    '{"__metadata__":null,"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}',
    '{"__metadata__":{"k":"v"},"__metadata__":{},"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}',
    '\ufeff{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}',
    ' \t\r\n{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}} \n',
    '{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}x',
    '{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}\x00',
    '{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4,4]}}',
    '{"a":{"dtype":"U8","shape":[4],"data_offsets":{"0":0,"1":4}}}',
    '{"a":{"dtype":"U8","shape":"4","data_offsets":[0,4]}}',
    '{"a":{"dtype":["U8"],"shape":[4],"data_offsets":[0,4]}}',
    '{"a":{"dtype":"u8","shape":[4],"data_offsets":[0,4]}}',
    '{"a":{"dtype":"U32","shape":[1],"data_offsets":[0,4]}}',
    '{"a":{"shape":[4],"data_offsets":[0,4]}}',
    '{"a":[]}',
    '{"a":{"dtype":"U8","shape":[' + "[" * 3000 + "]" * 3000 + '],"data_offsets":[0,4]}}',
    '{"a":{"dtype":"U8","shape":[1,1,1,1],"data_offsets":[0,1]},'
    '"b":{"dtype":"U8","shape":' + json.dumps([1] * 70 + [3]) + ',"data_offsets":[1,4]}}',
    '{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"e":{"dtype":"F32","shape":[0],"data_offsets":[4,4]}}',
    '{"e":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}',
    '{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"e":{"dtype":"F32","shape":[0],"data_offsets":[2,2]}}',
    '{"a":{"dtype":"I16","shape":[2],"data_offsets":[0,4]}}',
    '{"a":{"dtype":"BOOL","shape":[2,2],"data_offsets":[0,4]}}',
    '{}',
    '',
]
# Of those, the ones we must accept (the library does, and they are inside our rules).
MUST_ACCEPT = {
    '{"\\ud83d\\ude00":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}',
    ' \t\r\n{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}} \n',
    '{"a":{"dtype":"I16","shape":[2],"data_offsets":[0,4]}}',
    '{"a":{"dtype":"BOOL","shape":[2,2],"data_offsets":[0,4]}}',
    '{"e":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}',
    '{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"e":{"dtype":"F32","shape":[0],"data_offsets":[4,4]}}',
}


@pytest.mark.parametrize("header", TRICKY_HEADERS, ids=range(len(TRICKY_HEADERS)))
def test_tricky_headers_against_library(tmp_path, header):
    data = b"" if header in ("{}", "") else b"\x01\x00\x02\x01"
    theirs, ours = check_against_library(pack(header.encode("utf-8", "surrogatepass"), data), tmp_path)
    if header in MUST_ACCEPT:
        assert theirs is not None and ours is not None


def test_empty_file_of_no_tensors(tmp_path):
    theirs, ours = check_against_library(safetensors.numpy.save({}), tmp_path)
    assert theirs == ours == {}


# ---------------------------------------------------------------------------------------------
# fuzzing with the library as oracle
# ---------------------------------------------------------------------------------------------

JSON_BYTES = b'{}[]",:0123456789-.eE \\tfnu'


@FUZZ
@given(data=st.data())
def test_fuzz_mutated_header_bytes(tmp_path, base_file, data):
    n = int.from_bytes(base_file[:8], "little")
    blob = bytearray(base_file)
    for _ in range(data.draw(st.integers(1, 4))):
        # Mostly the JSON text, sometimes the length prefix; mostly JSON-ish replacement bytes.
        position = data.draw(st.one_of(st.integers(8, 7 + n), st.integers(0, 7)))
        blob[position] = data.draw(st.one_of(st.sampled_from(JSON_BYTES), st.integers(0, 255)))
    count_outcome(*check_against_library(bytes(blob), tmp_path))


@FUZZ
@given(data=st.data())
def test_fuzz_truncated_or_extended(tmp_path, base_file, data):
    cut = data.draw(st.integers(0, len(base_file)))
    tail = data.draw(st.binary(max_size=9))
    blob = base_file[:cut] + tail
    theirs, ours = check_against_library(blob, tmp_path)
    count_outcome(theirs, ours)
    if blob != base_file:  # any other length is wrong; the same length may be the same file
        assert ours is None or len(blob) == len(base_file)
    else:
        assert theirs is not None and ours is not None


PERTURBATIONS = ["none", "none", "offset", "shape", "dtype", "extra_key", "missing_key",
                 "metadata", "data_len", "swap", "header_len", "value_type", "pad"]


@st.composite
def generated_files(draw):
    """(blob, perturbation): a header built as a dict with a consistent layout, then maybe broken."""
    entries = {}
    offset = 0
    for i in range(draw(st.integers(0, 4))):
        dtype = draw(st.sampled_from(sorted(EXPECTED_NUMPY) * 3 + sorted(LIBRARY_ITEMSIZE)))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        size = LIBRARY_ITEMSIZE[dtype] * int(np.prod(shape))
        entries[f"layer.{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    header = dict(draw(st.permutations(list(entries.items()))))  # key order is not data order
    only_our_dtypes = all(e["dtype"] in EXPECTED_NUMPY for e in entries.values())
    data_len = offset
    n_delta = 0
    pad = draw(st.integers(0, 7))
    kind = draw(st.sampled_from(PERTURBATIONS))
    names = list(entries)
    pick = draw(st.sampled_from(names)) if names else None
    huge = st.sampled_from([-1, 2**63, 2**64 - 1, 2**64, 10**30])

    if kind == "offset" and pick:
        which = draw(st.integers(0, 1))
        offsets = entries[pick]["data_offsets"]
        offsets[which] = draw(st.one_of(st.integers(-3, 3).map(lambda d: offsets[which] + d), huge))
    elif kind == "shape" and pick:
        shape = entries[pick]["shape"]
        change = draw(st.sampled_from(["grow", "shrink", "append", "negative", "huge", "float"]))
        if change == "grow":
            shape.append(2)
        elif change == "shrink" and shape and shape[-1]:
            shape[-1] -= 1
        elif change == "append":
            shape.append(draw(st.integers(0, 3)))
        elif change in ("negative", "huge"):
            shape.append(draw(huge))
        else:
            shape.append(1.0)
    elif kind == "dtype" and pick:
        entries[pick]["dtype"] = draw(st.sampled_from(["f32", "", "F128", 4, None, ["F32"]]
                                                      + sorted(LIBRARY_ITEMSIZE)))
    elif kind == "extra_key" and pick:
        entries[pick]["extra"] = 1
    elif kind == "missing_key" and pick:
        del entries[pick][draw(st.sampled_from(["dtype", "shape", "data_offsets"]))]
    elif kind == "metadata":
        header["__metadata__"] = draw(st.sampled_from(
            [{"format": "pt"}, {}, {"a": 1}, {"a": None}, [], "pt", None, {"a": {"b": "c"}}]))
    elif kind == "data_len":
        data_len += draw(st.sampled_from([-2, -1, 1, 3]))
    elif kind == "swap" and len(names) >= 2:
        a, b = draw(st.permutations(names))[:2]
        entries[a]["data_offsets"], entries[b]["data_offsets"] = (
            entries[b]["data_offsets"], entries[a]["data_offsets"])
    elif kind == "header_len":
        n_delta = draw(st.sampled_from([-1, 1, 2**20, 100_000_001, 2**64 - 1]))
    elif kind == "value_type" and pick:
        key = draw(st.sampled_from(["shape", "data_offsets"]))
        entries[pick][key] = draw(st.sampled_from(
            ["[0, 1]", {"0": 0}, None, [0, 1, 2], [[0], [1]], 3, [True, False]]))
    elif kind == "pad":
        pad = draw(st.sampled_from([0, 1, 3]))  # unaligned data sections are still valid

    text = json.dumps(header).encode() + b" " * pad
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    data = rng.randbytes(max(data_len, 0))
    n = len(text) + n_delta
    blob = struct.pack("<Q", n % 2**64) + text + data
    return blob, kind, only_our_dtypes


@FUZZ
@given(case=generated_files())
def test_fuzz_generated_headers(tmp_path, case):
    blob, kind, only_our_dtypes = case
    theirs, ours = check_against_library(blob, tmp_path)
    count_outcome(theirs, ours)
    if kind in ("none", "pad"):
        assert theirs is not None, "generator bug: an unbroken file must be valid"
        assert (ours is not None) == only_our_dtypes, "a valid file of supported dtypes was refused"
