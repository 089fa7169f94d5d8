"""safetensors files in and out: memory-mapped reading of a directory (one file or sharded with an
index) and writing, sharded with an index past a size limit, as transformers' `from_pretrained` reads.

The format: an 8-byte little-endian header size, a JSON header {name: {dtype, shape, data_offsets}},
then the raw bytes. The header is parsed here rather than through `safetensors.safe_open`, whose
numpy backend copies whole tensors: a view into `np.memmap` reads only the bytes that are sliced,
so a device's shard of a large tensor never needs the whole tensor in memory.

Files come from elsewhere, so every claim is checked before a byte is mapped: the header length
against the file, the header's JSON shape, each tensor's dtype, shape and byte range (inside the
data, exactly shape x dtype bytes, overlapping no other), and an index's file names (only files
beside it: no absolute path, no '..', no symlink out). A lie is one line naming the file and tensor.
"""

from __future__ import annotations

import glob
import json
import math
import os
import struct

import ml_dtypes
import numpy as np

from llm_jax.runtime import files
from llm_jax.runtime.errors import BadValue, NotFound

INDEX_FILE = "model.safetensors.index.json"
SAFE_FILE = "model.safetensors"
# Metadata transformers needs: it refuses safetensors files without format=pt.
_METADATA = {"format": "pt"}
# Longest header or index read (the safetensors library's own limit): a lying length allocates nothing.
_MAX_HEADER = 100 * 2**20

# safetensors dtype codes -> numpy (bfloat16 and float8 via ml_dtypes, which JAX depends on).
DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
# The floating-point codes: the only ones a weight is cast from (to the parameter's float dtype).
FLOAT_DTYPES = frozenset(np.dtype(DTYPES[c]) for c in ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"))


class SafetensorsError(BadValue):
    """A safetensors file or index that cannot be read as it claims to be."""


def weight_files(directory: str) -> list[str]:
    """Names of the safetensors files holding a directory's weights: the index's, else
    model.safetensors, else every *.safetensors; [] when there are none."""
    index = os.path.join(directory, INDEX_FILE)
    if os.path.isfile(index):
        return sorted({_confined(directory, index, tensor, name) for tensor, name in _weight_map(index).items()})
    if os.path.isfile(os.path.join(directory, SAFE_FILE)):
        return [SAFE_FILE]
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(directory, "*.safetensors")))


def _weight_map(index: str) -> dict[str, str]:
    """The index's {tensor name: file name}, checked to be that shape (the file is untrusted)."""
    try:
        with open(index, "rb") as f:
            weight_map = json.loads(f.read(_MAX_HEADER)).get("weight_map")
    except (ValueError, AttributeError) as e:  # not JSON / UTF-8, or not an object
        raise SafetensorsError(f"{index} is not a JSON object ({type(e).__name__}); rewrite the checkpoint") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise SafetensorsError(f"{index} has no 'weight_map' {{tensor name: file}}; rewrite the checkpoint")
    for tensor, name in weight_map.items():
        if not isinstance(name, str):
            raise SafetensorsError(f"{index}: tensor {tensor!r} maps to {name!r}, not a file name; rewrite the index")
    return weight_map


def _confined(directory: str, index: str, tensor: str, name: str) -> str:
    """`name` if it is a file inside `directory` (no absolute path, no '..', no symlink out of it)."""
    root = os.path.realpath(directory)
    target = os.path.realpath(os.path.join(root, name))
    if os.path.isabs(name) or ".." in name.replace("\\", "/").split("/") or os.path.dirname(target) != root:
        raise SafetensorsError(
            f"{index}: tensor {tensor!r} names file {name!r}, which is not a file in {directory}; "
            "an index may only name files beside it"
        )
    return name


class SafetensorsDir:
    """Every tensor of a directory's safetensors file(s) (single or sharded with an index), memory-mapped.

    `tensors[name]` is a read-only numpy view into the file, in the file's shape and dtype; slicing
    it reads only those bytes. `files[name]` is the path of the file that holds it.
    """

    def __init__(self, directory: str):
        files = weight_files(directory)
        if not files:
            raise NotFound(f"{directory} has no *.safetensors weights (and no {INDEX_FILE})")
        self.tensors: dict[str, np.ndarray] = {}
        self.files: dict[str, str] = {}  # {tensor name: the path of its file}, for messages
        for name in files:
            path = os.path.join(directory, name)
            for key, arr in map_file(path).items():
                if key in self.tensors:
                    raise SafetensorsError(f"tensor {key!r} appears in more than one safetensors file of {directory}")
                self.tensors[key], self.files[key] = arr, path


def map_file(path: str) -> dict[str, np.ndarray]:
    """{name: read-only view} of one safetensors file, through one np.memmap of the whole file.

    The file is untrusted: its header is checked (`_read_header`) before any byte is mapped."""
    if not os.path.isfile(path):
        raise NotFound(f"{path} is missing (named by {INDEX_FILE}?)")
    n, entries = _read_header(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r") if entries else None  # an empty file cannot be mapped
    return {
        key: mm[8 + n + begin : 8 + n + end].view(DTYPES[dtype]).reshape(shape)
        for key, (dtype, shape, begin, end) in entries.items()
    }


def _read_header(path: str) -> tuple[int, dict[str, tuple[str, tuple[int, ...], int, int]]]:
    """(header length, {tensor: (dtype, shape, begin, end)}) with every claim checked against the file:
    the length fits, the header is a JSON object of entries, each dtype known, each shape a list of
    non-negative ints, each byte range inside the data, of exactly shape x dtype bytes, overlapping
    no other. A lie is a SafetensorsError naming the file and the tensor."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SafetensorsError(f"{path} is {size} bytes, too short for a safetensors header; rewrite the file")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, _MAX_HEADER):
            raise SafetensorsError(
                f"{path} claims a {n}-byte header but the file holds {size - 8} bytes after the length "
                f"(limit {_MAX_HEADER}); the file is truncated or not safetensors"
            )
        try:
            header = json.loads(f.read(n))
        except ValueError as e:  # not UTF-8, not JSON
            raise SafetensorsError(f"{path}: its header is not JSON ({type(e).__name__}); rewrite the file") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: its header is a JSON {type(header).__name__}, not an object of tensors")
    header.pop("__metadata__", None)
    data = size - 8 - n
    entries = {key: _entry(path, key, info, data) for key, info in header.items()}
    ranges = sorted((begin, end, key) for key, (_, _, begin, end) in entries.items() if end > begin)
    for (_, end_a, a), (begin_b, _, b) in zip(ranges, ranges[1:]):
        if begin_b < end_a:
            raise SafetensorsError(f"{path}: tensor {b!r} overlaps tensor {a!r} (from byte {begin_b}); rewrite it")
    return n, entries


def _entry(path: str, key: str, info, data: int) -> tuple[str, tuple[int, ...], int, int]:
    """One header entry, checked (see `_read_header`); `data`: bytes after the header."""
    where = f"{path}: tensor {key!r}"
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise SafetensorsError(f"{where} is not {{dtype, shape, data_offsets}}: {str(info)[:80]}; rewrite the file")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise SafetensorsError(f"{where} has dtype {dtype!r}, which llm_jax cannot read (known: {sorted(DTYPES)})")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise SafetensorsError(f"{where} has shape {shape!r}: give a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise SafetensorsError(f"{where} has data_offsets {offsets!r}: give [begin, end] byte offsets")
    begin, end = offsets
    if not 0 <= begin <= end <= data:
        raise SafetensorsError(
            f"{where} has data_offsets [{begin}, {end}] outside the file's {data} data bytes; "
            "the file is truncated or corrupt"
        )
    want = math.prod(shape) * np.dtype(DTYPES[dtype]).itemsize
    if end - begin != want:
        raise SafetensorsError(
            f"{where} is {dtype} {shape} ({want} bytes) but its data_offsets [{begin}, {end}] hold {end - begin}; "
            "the file is corrupt"
        )
    return dtype, tuple(shape), begin, end


def shard_names(tensors: dict[str, np.ndarray], max_shard_bytes: int) -> list[list[str]]:
    """Tensor names grouped into files of at most `max_shard_bytes` each (a larger tensor alone)."""
    shards, size = [[]], 0
    for name in sorted(tensors):
        nbytes = tensors[name].nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def write(directory: str, tensors: dict[str, np.ndarray], max_shard_bytes: int = 5 * 2**30) -> list[str]:
    """Writes `tensors` as model.safetensors, or as model-0000i-of-0000n.safetensors plus the index
    when they exceed `max_shard_bytes`. Weight files already there are removed first (a stale shard
    of a larger model would otherwise be read back). Returns the file names written."""
    import safetensors.numpy  # the `hf` extra; only writing needs it

    tensors = {n: np.ascontiguousarray(v) for n, v in tensors.items()}
    os.makedirs(directory, exist_ok=True)
    for stale in glob.glob(os.path.join(directory, "*.safetensors")) + glob.glob(os.path.join(directory, INDEX_FILE)):
        os.remove(stale)
    shards = shard_names(tensors, max_shard_bytes)
    if len(shards) == 1:
        _save(safetensors.numpy, tensors, os.path.join(directory, SAFE_FILE))
        return [SAFE_FILE]
    weight_map = {}
    for i, names in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        part = {n: tensors[n] for n in names}
        _save(safetensors.numpy, part, os.path.join(directory, fname))
        weight_map.update(dict.fromkeys(names, fname))
    total = sum(v.nbytes for v in tensors.values())
    files.write_json(os.path.join(directory, INDEX_FILE), {"metadata": {"total_size": total}, "weight_map": weight_map})
    return sorted(set(weight_map.values()))


def write_file(path: str, tensors: dict[str, np.ndarray]) -> None:
    """One safetensors file of any name (a PEFT adapter's adapter_model.safetensors), atomically."""
    import safetensors.numpy  # the `hf` extra; only writing needs it

    _save(safetensors.numpy, {n: np.ascontiguousarray(v) for n, v in tensors.items()}, path)


def _save(st_numpy, tensors: dict[str, np.ndarray], path: str) -> None:
    """One safetensors file, atomically: a killed export never leaves a truncated shard."""
    with files.atomic_path(path) as tmp:
        st_numpy.save_file(tensors, tmp, metadata=_METADATA)
