"""The GGUF format: the one-file models of llama.cpp, Ollama and LM Studio, read memory-mapped.

A GGUF file is a header, typed metadata, a table of tensors, and the tensors' bytes:

    offset 0    "GGUF"               magic, 4 bytes
                version              u32: 2 or 3 (1 had 32-bit counts; llama.cpp dropped it)
                n_tensors, n_kv      u64, u64
                n_kv x              [ key: string ][ value type: u32 ][ value ]
                n_tensors x         [ name: string ][ n_dims: u32 ][ ne: u64 x n_dims ][ ggml type: u32 ]
                                    [ offset: u64 ]
                zero padding up to a multiple of `general.alignment` (default 32)
    data_start  tensor bytes: tensor i at data_start + offset_i, each offset a multiple of the alignment

    string = [ length: u64 ][ UTF-8 bytes, no terminator ]
    value  = one of the VALUE_TYPES below: a number, a bool (1 byte), a string, or
    array  = [ element type: u32 ][ count: u64 ][ count values ]    (arrays of arrays are legal)

Everything is little-endian (version 3 also allows big-endian files, which minqwen refuses: no such
model is in use). `ne[0]` varies fastest, so a NumPy shape is `ne` reversed: a torch Linear weight
(out, in) is stored with ne = [in, out]. Block-quantized types (Q4_0, Q4_K, ...) cut each row of
ne[0] elements into blocks of `block_size` elements stored in `type_size` bytes.

What `read_gguf` returns: the metadata as Python values (numbers, bools, strings; arrays of numbers as
NumPy arrays, arrays of strings as lists), and every tensor as a read-only NumPy view of one memory
map of the file, in its stored type, never copied into RAM:

    F32 -> float32, F16 -> int16 bits, BF16 -> uint16 bits (minqwen's conventions: kernels/dtypes.py),
    F64 / I8 / I16 / I32 / I64 -> their NumPy types,
    block types -> uint8, shape[:-1] + (bytes per row,), with GGUFTensor.shape the logical shape.

Why our own reader: the file is untrusted input, and llama.cpp's parser has had CVEs of exactly the
kinds checked here (lying counts and lengths, overflowing dims, out-of-file offsets); the `gguf` PyPI
package accepts overlapping and misaligned tensors, and is slow on 150k-token vocabularies. Every
count and length is checked against the bytes left before anything is allocated for it, so memory
stays within a small constant factor of the metadata's bytes and time within one pass over them;
each failure is a CheckpointError naming the file and the problem.
"""
from __future__ import annotations

import bisect
import mmap
import struct
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..errors import CheckpointError, quoted
from ..kernels.dtypes import BF16, FP16, FP32
from ..kernels.ggml import GGML_BLOCKS

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_ALIGNMENT = 1 << 16  # a sane bound: 64 KiB, the largest page size in use
MAX_DIMS = 4             # GGML_MAX_DIMS
MAX_ARRAY_DEPTH = 8      # arrays of arrays: llama.cpp reads none; deeper nesting is an attack, not a model

U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")


class GGMLType(NamedTuple):
    """A tensor element type: `block_size` elements stored in `type_size` bytes."""

    id: int
    name: str
    block_size: int  # elements per block; 1 for plain number types
    type_size: int   # bytes per block
    dtype: np.dtype  # what the data array holds: the numbers themselves, or uint8 block bytes


BLOCKS = np.dtype(np.uint8)


def _read_by_the_kernels(type_id: int, name: str) -> GGMLType:  # sizes from the kernels' table, not twice
    return GGMLType(type_id, name, *GGML_BLOCKS[type_id], BLOCKS)


# ggml.h `enum ggml_type` and the sizes of ggml.c's type_traits. Ids 4, 5, 31-33 and 36-38 were
# removed from the format. Every type is described here, so any file's tensors can be mapped and
# listed; which types the kernels compute with is the model's business, not the reader's. The block
# types the kernels read take their sizes from kernels/ggml.py's GGML_BLOCKS; the others' are only here.
GGML_TYPES = {t.id: t for t in (
    GGMLType(0, "F32", 1, 4, FP32),
    GGMLType(1, "F16", 1, 2, FP16),
    _read_by_the_kernels(2, "Q4_0"),
    _read_by_the_kernels(3, "Q4_1"),
    _read_by_the_kernels(6, "Q5_0"),
    _read_by_the_kernels(7, "Q5_1"),
    _read_by_the_kernels(8, "Q8_0"),
    GGMLType(9, "Q8_1", 32, 36, BLOCKS),
    _read_by_the_kernels(10, "Q2_K"),
    _read_by_the_kernels(11, "Q3_K"),
    _read_by_the_kernels(12, "Q4_K"),
    _read_by_the_kernels(13, "Q5_K"),
    _read_by_the_kernels(14, "Q6_K"),
    GGMLType(15, "Q8_K", 256, 292, BLOCKS),
    _read_by_the_kernels(16, "IQ2_XXS"),
    _read_by_the_kernels(17, "IQ2_XS"),
    _read_by_the_kernels(18, "IQ3_XXS"),
    GGMLType(19, "IQ1_S", 256, 50, BLOCKS),
    _read_by_the_kernels(20, "IQ4_NL"),
    _read_by_the_kernels(21, "IQ3_S"),
    _read_by_the_kernels(22, "IQ2_S"),
    _read_by_the_kernels(23, "IQ4_XS"),
    GGMLType(24, "I8", 1, 1, np.dtype(np.int8)),
    GGMLType(25, "I16", 1, 2, np.dtype(np.int16)),
    GGMLType(26, "I32", 1, 4, np.dtype(np.int32)),
    GGMLType(27, "I64", 1, 8, np.dtype(np.int64)),
    GGMLType(28, "F64", 1, 8, np.dtype(np.float64)),
    GGMLType(29, "IQ1_M", 256, 56, BLOCKS),
    GGMLType(30, "BF16", 1, 2, BF16),
    GGMLType(34, "TQ1_0", 256, 54, BLOCKS),
    GGMLType(35, "TQ2_0", 256, 66, BLOCKS),
    _read_by_the_kernels(39, "MXFP4"),
    GGMLType(40, "NVFP4", 64, 36, BLOCKS),
    GGMLType(41, "Q1_0", 128, 18, BLOCKS),
    GGMLType(42, "Q2_0", 64, 18, BLOCKS),
)}

# Metadata value types (gguf.h `enum gguf_type`): id -> NumPy type, for the fixed-size ones.
VALUE_TYPES = {
    0: np.dtype("<u1"), 1: np.dtype("<i1"), 2: np.dtype("<u2"), 3: np.dtype("<i2"),
    4: np.dtype("<u4"), 5: np.dtype("<i4"), 6: np.dtype("<f4"), 7: np.dtype("<u1"),  # 7: bool
    10: np.dtype("<u8"), 11: np.dtype("<i8"), 12: np.dtype("<f8"),
}
BOOL, STRING, ARRAY, UINT32 = 7, 8, 9, 4
SMALLEST_VALUE = {**{t: d.itemsize for t, d in VALUE_TYPES.items()}, STRING: 8, ARRAY: 12}


class GGUFTensor(NamedTuple):
    type: GGMLType
    shape: tuple[int, ...]  # logical NumPy shape: the file's ne reversed
    data: np.ndarray        # read-only view of the file (see the module docstring for its shape)


class GGUFFile(NamedTuple):
    path: Path
    version: int
    alignment: int
    metadata: dict[str, object]
    tensors: dict[str, GGUFTensor]  # in the file's table order


def read_gguf(path) -> GGUFFile:
    """Parse and validate a GGUF file; its tensors become views of one read-only memory map of it."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            # The map outlives the file object: it holds its own descriptor.
            size = f.seek(0, 2)
            if size < 24:
                raise CheckpointError(f"{path}: {size} bytes, too short for a GGUF header (24 bytes)")
            mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as e:  # ValueError: a path with a NUL byte
        raise CheckpointError(f"{path}: cannot read: {getattr(e, 'strerror', None) or e}") from None
    return _Parser(path, mapping).parse()


class _Parser:
    """One pass over the file's bytes; every read first checks that the bytes are there."""

    def __init__(self, path: Path, buf: mmap.mmap):
        self.path, self.buf, self.pos, self.size = path, buf, 0, len(buf)

    def error(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {what}")

    def take(self, n: int, what: str) -> int:
        """Claim the next n bytes; return where they start."""
        if n > self.size - self.pos:
            raise self.error(f"{what}: needs {n} bytes at offset {self.pos}, but the file ends "
                             f"{self.size - self.pos} bytes later (truncated?)")
        start = self.pos
        self.pos += n
        return start

    def u32(self, what: str) -> int:
        return U32.unpack_from(self.buf, self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return U64.unpack_from(self.buf, self.take(8, what))[0]

    def string(self, what: str) -> str:
        n = self.u64(what)
        start = self.take(n, f"{what} ({n}-byte string)")
        try:
            return str(self.buf[start:start + n], "utf-8")
        except UnicodeDecodeError as e:
            raise self.error(f"{what} is not valid UTF-8 ({e.reason} at byte {e.start})") from None

    def count(self, what: str, smallest: int) -> int:
        """A u64 count of items of at least `smallest` bytes each, checked against the bytes left, so
        a lying count fails here instead of allocating or looping for it."""
        n = self.u64(what)
        if n * smallest > self.size - self.pos:
            raise self.error(f"{what} is {n}, but the {self.size - self.pos} bytes left in the file "
                             f"hold at most {(self.size - self.pos) // smallest}")
        return n

    # ---- the file, section by section

    def parse(self) -> GGUFFile:
        magic = self.buf[:4]
        if magic != MAGIC:
            raise self.error(f"not a GGUF file (starts with {magic!r}, not {MAGIC!r})")
        self.pos = 4
        version = self.u32("version")
        if version not in VERSIONS:
            if int.from_bytes(version.to_bytes(4, "little"), "big") in VERSIONS:
                raise self.error("a big-endian GGUF file; minqwen reads little-endian ones")
            raise self.error(f"GGUF version {version}; minqwen reads versions 2 and 3")
        # Smallest entries: a tensor is a name of >= 1 byte, 1 dim, type and offset; a key/value pair
        # a key of >= 1 byte, a type and a 1-byte value.
        n_tensors = self.count("tensor count", 8 + 1 + 4 + 8 + 4 + 8)
        n_kv = self.count("metadata count", 8 + 1 + 4 + 1)

        metadata, alignment = self.metadata(n_kv)
        infos = [self.tensor_info(i) for i in range(n_tensors)]
        data_start = -(-self.pos // alignment) * alignment
        tensors = self.tensors(infos, data_start, alignment)
        return GGUFFile(self.path, version, alignment, metadata, tensors)

    def metadata(self, n_kv: int) -> tuple[dict[str, object], int]:
        metadata = {}
        alignment = DEFAULT_ALIGNMENT
        for i in range(n_kv):
            key = self.string(f"metadata key {i}")
            if not key:
                raise self.error(f"metadata key {i} is empty")
            if key in metadata:
                raise self.error(f"metadata key {quoted(key)} appears twice")
            value_type = self.u32(f"metadata {quoted(key)} type")
            metadata[key] = self.value(value_type, f"metadata {quoted(key)}", depth=0)
            if key == "general.alignment":
                alignment = metadata[key]
                if value_type != UINT32:
                    raise self.error(f"general.alignment has value type {value_type}, not UINT32")
                if not 0 < alignment <= MAX_ALIGNMENT or alignment & (alignment - 1):
                    raise self.error(f"general.alignment is {alignment}, not a power of two "
                                     f"up to {MAX_ALIGNMENT}")
        return metadata, alignment

    def value(self, value_type: int, what: str, depth: int):
        """One metadata value of the given type: a Python number, bool or str, or an array."""
        if value_type == STRING:
            return self.string(what)
        if value_type == ARRAY:
            return self.array(what, depth + 1)
        dtype = VALUE_TYPES.get(value_type)
        if dtype is None:
            raise self.error(f"{what} has unknown value type {value_type}")
        value = np.frombuffer(self.buf, dtype, 1, self.take(dtype.itemsize, what))[0]
        return bool(value) if value_type == BOOL else value.item()

    def array(self, what: str, depth: int):
        """An array: numbers and bools as a NumPy array, strings and arrays as a list."""
        if depth > MAX_ARRAY_DEPTH:
            raise self.error(f"{what}: arrays nested more than {MAX_ARRAY_DEPTH} deep")
        element_type = self.u32(f"{what} element type")
        if element_type not in SMALLEST_VALUE:
            raise self.error(f"{what} has unknown element type {element_type}")
        n = self.count(f"{what} length", SMALLEST_VALUE[element_type])
        if element_type == STRING:
            return self.strings(n, what)
        if element_type == ARRAY:
            return [self.array(f"{what}[{i}]", depth + 1) for i in range(n)]
        dtype = VALUE_TYPES[element_type]
        values = np.frombuffer(self.buf, dtype, n, self.take(n * dtype.itemsize, what)).copy()
        return values != 0 if element_type == BOOL else values

    def strings(self, n: int, what: str) -> list[str]:
        """n length-prefixed strings. A vocabulary holds 150k-500k of them (tokens, merges), so Python
        touches each only to step over it; then NumPy turns every 8-byte length into one NUL byte, and
        a single decode (which checks the UTF-8 of all of them) and a single split make the strings.
        NUL bytes are character boundaries, so the whole is valid UTF-8 exactly when every string is."""
        start, buf, unpack = self.pos, self.buf, U64.unpack_from
        ends, pos, read = [0] * n, start, n
        try:
            for i in range(n):
                pos += 8 + unpack(buf, pos)[0]
                ends[i] = pos
        except (struct.error, OverflowError):  # string i's length lies past the end of the file
            read, pos = i, self.size + 1
        if pos > self.size:  # name the first string that ends past the end of the file
            i = bisect.bisect_right(ends, self.size, 0, read)
            raise self.error(f"{what}[{i}] runs past the end of the file (truncated?)")
        self.pos = pos
        if n == 0:
            return []
        lengths_at = np.array([start] + ends[:-1]) - start  # where each 8-byte length begins
        region = np.frombuffer(buf, np.uint8, pos - start, start)
        keep = np.ones(len(region), bool)
        for byte in range(7):                                    # keep each length's last byte...
            keep[lengths_at + byte] = False
        joined = region[keep]
        separators = lengths_at - 7 * np.arange(n)               # ...where it lands in `joined`,
        joined[separators] = 0                                   # ...as the NUL before its string
        raw = joined.tobytes()
        try:
            strings = raw.decode("utf-8").split("\0")[1:]
        except UnicodeDecodeError as e:
            i = np.searchsorted(separators, e.start, "right") - 1
            raise self.error(f"{what}[{i}] is not valid UTF-8 ({e.reason})") from None
        if len(strings) != n:  # some string holds a NUL byte itself: cut at the known places instead
            cuts = separators.tolist() + [len(raw)]
            strings = [raw[a + 1:b].decode("utf-8") for a, b in zip(cuts, cuts[1:])]
        return strings

    def tensor_info(self, i: int) -> tuple[str, GGMLType, tuple[int, ...], int, int]:
        """(name, type, NumPy shape, offset in the data section, bytes) of the i-th tensor."""
        name = self.string(f"tensor {i} name")
        what = f"tensor {quoted(name)}"
        if not name:
            raise self.error(f"tensor {i} has an empty name")
        n_dims = self.u32(f"{what} dimension count")
        if not 1 <= n_dims <= MAX_DIMS:
            raise self.error(f"{what} has {n_dims} dimensions; GGUF allows 1 to {MAX_DIMS}")
        ne = struct.unpack_from(f"<{n_dims}Q", self.buf, self.take(8 * n_dims, f"{what} dimensions"))
        type_id = self.u32(f"{what} type")
        offset = self.u64(f"{what} offset")
        ggml_type = GGML_TYPES.get(type_id)
        if ggml_type is None:
            raise self.error(f"{what} has unknown GGML type {type_id}")
        if min(ne) == 0:
            raise self.error(f"{what} has an empty dimension: ne = {list(ne)}")
        if ne[0] % ggml_type.block_size:
            raise self.error(f"{what} of type {ggml_type.name} has rows of {ne[0]} elements, not a "
                             f"multiple of its {ggml_type.block_size}-element blocks")
        # Python integers do not overflow; one that does not fit in the file does not fit in int64.
        nbytes = ne[0] // ggml_type.block_size * ggml_type.type_size
        for n in ne[1:]:
            nbytes *= n
        if nbytes > self.size:
            raise self.error(f"{what} with ne = {list(ne)} of {ggml_type.name} needs {nbytes} bytes, "
                             f"more than the whole {self.size}-byte file")
        return name, ggml_type, tuple(reversed(ne)), offset, nbytes

    def tensors(self, infos, data_start: int, alignment: int) -> dict[str, GGUFTensor]:
        tensors = {}
        for name, ggml_type, shape, offset, nbytes in infos:
            what = f"tensor {quoted(name)}"
            if name in tensors:
                raise self.error(f"{what} appears twice in the tensor table")
            if offset % alignment:
                raise self.error(f"{what} offset {offset} is not a multiple of the alignment {alignment}")
            start = data_start + offset
            if nbytes > self.size - start:
                raise self.error(f"{what} (bytes {start} to {start + nbytes}) runs past the end of the "
                                 f"{self.size}-byte file (truncated?)")
            if start % ggml_type.dtype.itemsize:
                raise self.error(f"{what} at byte {start} is not aligned to its "
                                 f"{ggml_type.dtype.itemsize}-byte elements")
            data_shape = shape if ggml_type.block_size == 1 else \
                shape[:-1] + (shape[-1] // ggml_type.block_size * ggml_type.type_size,)
            data = np.ndarray(data_shape, ggml_type.dtype, buffer=self.buf, offset=start)
            tensors[name] = GGUFTensor(ggml_type, shape, data)

        # Overlap: in offset order, each tensor must start at or after the end of the one before.
        placed = sorted((data_start + offset, nbytes, name) for name, _, _, offset, nbytes in infos)
        for (start, nbytes, name), (next_start, _, next_name) in zip(placed, placed[1:]):
            if next_start < start + nbytes:
                raise self.error(f"tensors {quoted(name)} and {quoted(next_name)} overlap")
        return tensors
