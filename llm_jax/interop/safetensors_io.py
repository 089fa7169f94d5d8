"""safetensors files in and out: memory-mapped reading of a directory (one file or sharded with an
index) and writing, sharded with an index past a size limit, as transformers' `from_pretrained` reads.

The format: an 8-byte little-endian header size, a JSON header {name: {dtype, shape, data_offsets}},
then the raw bytes. The header is parsed here rather than through `safetensors.safe_open`, whose
numpy backend copies whole tensors: a view into `np.memmap` reads only the bytes that are sliced,
so a device's shard of a large tensor never needs the whole tensor in memory.
"""

from __future__ import annotations

import glob
import json
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


class SafetensorsError(BadValue):
    """A safetensors file or index that cannot be read as it claims to be."""


def weight_files(directory: str) -> list[str]:
    """Names of the safetensors files holding a directory's weights: the index's, else
    model.safetensors, else every *.safetensors; [] when there are none."""
    index = os.path.join(directory, INDEX_FILE)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise SafetensorsError(f"{index} has no 'weight_map' {{tensor name: file}}; rewrite the checkpoint")
        return sorted(set(weight_map.values()))
    if os.path.isfile(os.path.join(directory, SAFE_FILE)):
        return [SAFE_FILE]
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(directory, "*.safetensors")))


class SafetensorsDir:
    """Every tensor of a directory's safetensors file(s) (single or sharded with an index), memory-mapped.

    `tensors[name]` is a read-only numpy view into the file, in the file's shape and dtype; slicing
    it reads only those bytes.
    """

    def __init__(self, directory: str):
        files = weight_files(directory)
        if not files:
            raise NotFound(f"{directory} has no *.safetensors weights (and no {INDEX_FILE})")
        self.tensors: dict[str, np.ndarray] = {}
        for name in files:
            for key, arr in map_file(os.path.join(directory, name)).items():
                if key in self.tensors:
                    raise SafetensorsError(f"tensor {key!r} appears in more than one safetensors file of {directory}")
                self.tensors[key] = arr


def map_file(path: str) -> dict[str, np.ndarray]:
    """{name: read-only view} of one safetensors file, through one np.memmap of the whole file."""
    if not os.path.isfile(path):
        raise NotFound(f"{path} is missing (named by {INDEX_FILE}?)")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for key, info in header.items():
        if info["dtype"] not in DTYPES:
            raise SafetensorsError(
                f"{path}: tensor {key!r} has dtype {info['dtype']}, which llm_jax cannot read (known: {sorted(DTYPES)})"
            )
        begin, end = info["data_offsets"]
        raw = mm[8 + n + begin : 8 + n + end]
        out[key] = raw.view(DTYPES[info["dtype"]]).reshape(info["shape"])
    return out


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


def _save(st_numpy, tensors: dict[str, np.ndarray], path: str) -> None:
    """One safetensors file, atomically: a killed export never leaves a truncated shard."""
    with files.atomic_path(path) as tmp:
        st_numpy.save_file(tensors, tmp, metadata=_METADATA)
