"""The safetensors format: read a Hugging Face checkpoint folder memory-mapped, and write tensors.

Why parse safetensors ourselves: NumPy has no bfloat16, so the `safetensors` library cannot hand
NumPy a bf16 tensor. The format is simple enough to read in a page of Python:

    [ N: u64 little-endian ][ N bytes: UTF-8 JSON header ][ data section ]

    header = {"__metadata__": {str: str},                       (optional)
              "<tensor name>": {"dtype": "BF16", "shape": [896, 4864], "data_offsets": [begin, end]},
              ...}

`begin`/`end` are byte offsets into the data section. Tensors are stored C-order, little-endian.

Each file is mapped once, read-only, and every tensor is a NumPy view into that mapping: loading a
model costs no RAM until the kernels touch the weights, and then only the page cache. Half-width
tensors come back as their raw bits (see kernels/dtypes.py): BF16 -> uint16, F16 -> int16.

The header is untrusted input, so it is validated as strictly as the safetensors library does
(safetensors/src/tensor.rs, `read_metadata` + `Metadata::validate`), and a little more strictly
where that costs nothing (duplicate JSON keys, unknown fields). Every failure is a CheckpointError
whose one-line message names the file.
"""
import json
import mmap
import os
import shutil
import struct
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, ConfigError, quoted
from ..kernels.dtypes import BF16, FP16, FP32
from ..network.config import Config
from ..network.quantize import BLOCK, bits_for, quantizable, quantize_matrix
from ..network.weights import language_model_prefix

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's limit (MAX_HEADER_SIZE, 100 MB)
# Parsed, a tensor's header entry takes ~1 KB of Python objects: a header may not list more tensors than
# this (~200 MB), checked before parsing. The largest published checkpoints have ~100k tensors in all,
# spread over dozens of files.
MAX_TENSORS = 200_000
MAX_USIZE = 2**64 - 1           # header integers are Rust `usize` (64-bit)
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

# Stored dtype -> how we hand it out. All little-endian, as the format stores them.
# I16 shares int16 with F16 bits: only small integer buffers are ever I16, never weights. F8_E4M3 shares
# uint8 with U8: an FP8 weight is told apart by its scale (`X.weight_scale_inv`, see weights.py).
DTYPES = {
    "BF16": BF16,                 # raw bits, np.uint16
    "F16": FP16,                  # raw bits, np.int16
    "F32": FP32,
    "F64": np.dtype("<f8"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "F8_E4M3": np.dtype("u1"),    # raw bits
    "BOOL": np.dtype("?"),
}

# For writing: int16 arrays are F16 bits, uint8 arrays U8.
STORED_NAMES = {dtype: name for name, dtype in DTYPES.items() if name not in ("I16", "F8_E4M3")}

TensorEntry = tuple[str, tuple[int, ...], tuple[int, int]]  # (dtype, shape, (begin, end))


# ---------------------------------------------------------------------------------------------
# One file: header
# ---------------------------------------------------------------------------------------------

def read_safetensors_header(path) -> tuple[dict[str, TensorEntry], int]:
    """Parse and fully validate a .safetensors file's header.

    Returns ({name: (dtype, shape, (begin, end))} in data order, data_offset), where a tensor's
    bytes are file[data_offset + begin : data_offset + end]. Raises CheckpointError.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _error(path, f"file is {file_size} bytes, too short for the 8-byte header length")
            n = int.from_bytes(prefix, "little")
            if n > MAX_HEADER_BYTES:
                raise _error(path, f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
            if 8 + n > file_size:
                raise _error(path, f"header length {n} runs past the end of the {file_size}-byte file")
            raw = f.read(n)
    except (OSError, ValueError) as e:  # ValueError: a path with a NUL byte
        raise CheckpointError(f"{path}: cannot read: {getattr(e, 'strerror', None) or e}") from None
    if len(raw) != n:  # the file shrank while we read it
        raise _error(path, "file changed while being read")
    # Data order (as the library sorts them): the layout check needs it, and readers then walk the
    # file front to back.
    entries = dict(sorted(_parse_header(path, raw).items(), key=lambda item: item[1][2]))
    data_end = _check_layout(path, entries)
    if 8 + n + data_end != file_size:
        raise _error(path, f"data section is {file_size - 8 - n} bytes but the tensors cover "
                           f"{data_end} (file truncated or has trailing bytes)")
    return entries, 8 + n


def _error(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: {what}")


def _parse_header(path: Path, raw: bytes) -> dict[str, TensorEntry]:
    """JSON header bytes -> {name: (dtype, shape, offsets)}, checking every type (not yet the layout)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _error(path, "header is not valid UTF-8") from None
    if raw.count(b"{") > MAX_TENSORS + 2:  # each entry is an object: a bound on the count, before parsing
        raise _error(path, f"header lists more than {MAX_TENSORS} tensors")
    try:
        # Python's json is laxer than the library's Rust serde_json; the hooks close the gaps that
        # matter here (NaN/Infinity, also accepted by Python, parse to floats and fail the checks).
        header = json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_int=_parse_int)
    except RecursionError:
        raise _error(path, "header JSON is nested too deeply") from None
    except ValueError as e:  # json.JSONDecodeError is a ValueError; so are the hooks' errors
        raise _error(path, f"header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise _error(path, f"header is a JSON {type(header).__name__}, not an object")

    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
            isinstance(v, str) and _is_unicode(v) for v in metadata.values()):
        raise _error(path, "__metadata__ must map strings to strings")

    entries = {}
    for name, info in header.items():
        where = f"tensor {quoted(name)}"
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise _error(path, f"{where} must have exactly the keys dtype, shape, data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise _error(path, f"{where} has dtype {quoted(dtype)}, which minqwen does not read "
                               f"(supported: {', '.join(DTYPES)})")
        if not isinstance(shape, list) or not all(_is_usize(d) for d in shape):
            raise _error(path, f"{where} has shape {quoted(shape)}, not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_usize, offsets))):
            raise _error(path, f"{where} has data_offsets {quoted(offsets)}, "
                               "not two non-negative integers")
        entries[name] = (dtype, tuple(shape), (offsets[0], offsets[1]))
    return entries


def _check_layout(path: Path, entries: dict[str, TensorEntry]) -> int:
    """Check that the tensors (in offset order) tile the data section: each begins where the last
    ended and is exactly shape x itemsize long. Returns the data section's length."""
    end_so_far = 0
    for name, (dtype, shape, (begin, end)) in entries.items():
        what = ("ends before it begins" if end < begin else
                "overlaps the previous tensor" if begin < end_so_far else
                "leaves a gap before it" if begin > end_so_far else None)
        if what:
            raise _error(path, f"tensor {quoted(name)} data_offsets [{begin}, {end}] {what}")
        nbytes = DTYPES[dtype].itemsize
        for d in shape:
            nbytes *= d
        if end - begin != nbytes:
            raise _error(path, f"tensor {quoted(name)} is {end - begin} bytes but shape "
                               f"{quoted(list(shape))} of {dtype} needs {nbytes}")
        end_so_far = end
    return end_so_far


def _no_duplicate_keys(pairs):
    """object_pairs_hook: a JSON object -> dict, refusing repeated keys (Python would keep the last)."""
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"duplicate key {quoted(key)}")
        if not _is_unicode(key):
            raise ValueError(f"key {quoted(key)} holds an unpaired surrogate escape")
        obj[key] = value
    return obj


def _parse_int(digits: str):
    # serde_json reads "-0" as the float -0.0 and anything beyond u64 as a float, both invalid
    # where an integer is expected: mark them invalid (-1) without converting huge digit strings.
    if digits.startswith("-") or len(digits) > 20:
        return -1
    return int(digits)


def _is_usize(x) -> bool:
    return type(x) is int and 0 <= x <= MAX_USIZE  # type() excludes bool


def _is_unicode(s: str) -> bool:
    """False for strings holding lone surrogates ("\\ud800" escapes), which Rust strings cannot."""
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


# ---------------------------------------------------------------------------------------------
# One file: tensors
# ---------------------------------------------------------------------------------------------

def _map_file(path) -> dict[str, np.ndarray]:
    """All tensors of one .safetensors file, as read-only views into one memory map of it."""
    path = Path(path)
    entries, data_offset = read_safetensors_header(path)
    try:
        with open(path, "rb") as f:
            # The map outlives the file object: it holds its own descriptor. A file of only a
            # header still has >= 8 bytes, so the map is never empty (mmap refuses empty files).
            mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot memory-map: {e}") from None
    data_end = max((end for _, _, (_, end) in entries.values()), default=0)
    if len(mapping) != data_offset + data_end:
        raise _error(path, "file changed while being read")

    tensors = {}
    for name, (dtype, shape, (begin, end)) in entries.items():
        try:
            array = np.ndarray(shape, DTYPES[dtype], buffer=mapping, offset=data_offset + begin)
        except ValueError as e:  # e.g. more than 64 dimensions, or a dimension beyond int64
            raise _error(path, f"tensor {quoted(name)} of shape {quoted(list(shape))} "
                               f"cannot be a NumPy array: {e}")
        if not array.flags.aligned:
            # The format does not promise alignment (the library's writer pads the header to 8 bytes,
            # other writers may not). Kernels get aligned arrays only, so Numba compiles one
            # specialisation per dtype: copy this one tensor into RAM instead of viewing it.
            array = array.copy()
            array.flags.writeable = False
        tensors[name] = array
    return tensors


# ---------------------------------------------------------------------------------------------
# A checkpoint folder
# ---------------------------------------------------------------------------------------------

def read_tensors(folder) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint folder, memory-mapped read-only in its stored dtype.

    Layouts, in order of precedence:
      model.safetensors.index.json   sharded; its weight_map names each tensor's shard
      model.safetensors              one file
      *.safetensors                  sharded without an index (a name in two files is an error)
    """
    folder = Path(folder)
    if not folder.exists():
        raise CheckpointError(f"{folder}: checkpoint folder not found")
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder")
    if (folder / INDEX_NAME).exists():
        return _read_indexed(folder / INDEX_NAME)
    if (folder / SINGLE_NAME).exists():
        return _map_file(folder / SINGLE_NAME)

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no .safetensors files in the checkpoint folder")
    tensors, source = {}, {}
    for path in files:
        for name, array in _map_file(path).items():
            if name in tensors:
                raise CheckpointError(f"{folder}: tensor {quoted(name)} appears in both "
                                      f"{source[name].name} and {path.name}")
            tensors[name], source[name] = array, path
    return tensors


def _read_indexed(index_path: Path) -> dict[str, np.ndarray]:
    """Read the shards an index names, checking that index and shards agree tensor for tensor."""
    folder = index_path.parent
    try:
        index = json.loads(index_path.read_bytes().decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except OSError as e:
        raise CheckpointError(f"{index_path}: cannot read: {e.strerror or e}") from None
    except (ValueError, RecursionError) as e:  # includes UnicodeDecodeError and JSONDecodeError
        raise CheckpointError(f"{index_path}: not valid JSON: {e}") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index_path}: needs a non-empty \"weight_map\" "
                              "of tensor name -> shard file")

    by_shard: dict[str, set[str]] = {}
    for name, shard in weight_map.items():
        by_shard.setdefault(shard, set()).add(name)
    tensors = {}
    for shard, expected in by_shard.items():
        if Path(shard).name != shard or shard in ("", ".", ".."):
            raise CheckpointError(f"{index_path}: shard {quoted(shard)} is not a file name "
                                  "in the folder")
        path = folder / shard
        if not path.exists():
            raise CheckpointError(f"{index_path}: shard {shard} is listed but {path} does not exist")
        found = _map_file(path)
        missing, extra = expected - found.keys(), found.keys() - expected
        if missing:
            raise CheckpointError(f"{path}: index says tensor {quoted(min(missing))} is in this shard, "
                                  f"but it is not")
        if extra:
            name = min(extra)
            placed = f"in {weight_map[name]}" if name in weight_map else "nowhere"
            raise CheckpointError(f"{path}: holds tensor {quoted(name)}, "
                                  f"which the index places {placed}")
        tensors.update(found)
    return tensors


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

def write_safetensors(path: Path, tensors: dict[str, np.ndarray]):
    """The format above, written by hand because the library's NumPy writer cannot say BF16 for our
    uint16 bits (and we keep fp16 as int16 bits: see kernels/dtypes.py)."""
    header, offset = {}, 0
    for name, w in tensors.items():
        header[name] = {"dtype": STORED_NAMES[w.dtype], "shape": list(w.shape),
                        "data_offsets": [offset, offset + w.nbytes]}
        offset += w.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # pad so the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for w in tensors.values():
            f.write(np.ascontiguousarray(w).tobytes())


def write_quantized_checkpoint(folder: Path, out: Path, bits: int):
    """Read a checkpoint, write its quantised copy (config, tokenizer and generation files copied)."""
    folder, out = Path(folder), Path(out)
    if folder.is_file():
        raise ConfigError(f"{folder} is a GGUF file, quantised already; `quantize` reads checkpoint "
                          "folders. Run the file as it is, or re-quantise it as it loads: "
                          "--quantize int8|int4")
    config = load_config(folder)
    tensors = read_tensors(folder)
    raw_config = read_json(folder / "config.json")
    if config.quantization_config:
        method = config.quantization_config.get("quant_method")
        raise ConfigError(f"{folder} is already quantised ({method}); to run an FP8 checkpoint at "
                          "int8 / int4, re-quantise it as it loads: --quantize int8|int4" if method == "fp8"
                          else f"{folder} is already quantised ({method})")
    out.mkdir(parents=True, exist_ok=True)
    if "lm_head.weight" not in tensors:  # tied: lm_head becomes its own (quantised) tensor
        embed = tensors[language_model_prefix(tensors) + "embed_tokens.weight"]
        tensors = dict(tensors, **{"lm_head.weight": embed})
    written = {}
    for name, w in tensors.items():
        if name.endswith(".weight") and quantizable(name, w):
            written[name[:-len(".weight")] + ".qweight"] = quantize_matrix(w, bits_for(name, bits)).data
        else:
            written[name] = w
    write_safetensors(out / "model.safetensors", written)
    target = raw_config.get("text_config", raw_config) if config.has_vision_tower else raw_config
    target["tie_word_embeddings"] = False
    raw_config["tie_word_embeddings"] = False
    raw_config["quantization_config"] = {"quant_method": "minqwen", "bits": bits, "block_size": BLOCK}
    (out / "config.json").write_text(json.dumps(raw_config, indent=2))
    for extra in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"):
        if (folder / extra).exists():
            shutil.copy(folder / extra, out / extra)


def read_json(path: Path, error=ConfigError) -> dict:
    """A JSON object from `path`, or `error` naming the file and what is wrong with it."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"{path}: cannot read ({e})") from None
    if not isinstance(value, dict):
        raise error(f"{path}: must hold a JSON object")
    return value


def load_config(folder: Path) -> Config:
    """A Hugging Face folder's config.json as a Config."""
    return Config.from_dict(read_json(Path(folder) / "config.json"))

