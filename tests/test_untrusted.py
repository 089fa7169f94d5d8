"""Files from elsewhere read as untrusted input: a safetensors file or a Hugging Face index that lies
about itself is one line naming the file and the tensor, never a crash, a huge allocation or a read
outside the model directory (llm_jax/interop/safetensors_io.py, llm_jax/interop/hf.py)."""

import json
import os
import struct

import jax
import numpy as np
import pytest

from llm_jax.interop import hf, safetensors_io
from llm_jax.interop.safetensors_io import SafetensorsError

GPT2 = {"architectures": ["GPT2LMHeadModel"], "vocab_size": 16, "n_embd": 8, "n_layer": 1, "n_head": 2,
        "n_positions": 8}  # fmt: skip


def write_raw(path, header, data: bytes = b"", length: int | None = None) -> str:
    """A safetensors file written by hand: `length` (default: the header's true length), header, data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return str(path)


def entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def test_a_well_formed_hand_written_file_reads(tmp_path):
    a, b = np.arange(2, dtype=np.float32), np.arange(6, dtype=np.int16).reshape(2, 3)
    header = {"__metadata__": {"format": "pt"}, "a": entry(), "b": entry("I16", (2, 3), (8, 20))}
    out = safetensors_io.map_file(write_raw(tmp_path / "ok.safetensors", header, a.tobytes() + b.tobytes()))
    assert np.array_equal(out["a"], a) and np.array_equal(out["b"], b) and out["b"].dtype == np.int16


LIES = [  # (header, data, claimed header length, the one line's pattern)
    ({"w": entry()}, b"\0" * 8, 10**12, r"claims a 1000000000000-byte header but the file holds \d+ bytes"),
    (b"{not json", b"", None, r"its header is not JSON"),
    (b"\xff\xfe{}", b"", None, r"its header is not JSON"),
    ([1, 2], b"", None, r"its header is a JSON list, not an object"),
    ({"w": [1, 2]}, b"", None, r"tensor 'w' is not \{dtype, shape, data_offsets\}"),
    ({"w": entry(dtype="C64")}, b"\0" * 8, None, r"tensor 'w' has dtype 'C64', which llm_jax cannot read"),
    ({"w": entry(shape=(-2,))}, b"\0" * 8, None, r"tensor 'w' has shape \[-2\]"),
    ({"w": entry(shape=("2",))}, b"\0" * 8, None, r"tensor 'w' has shape \['2'\]"),
    ({"w": entry(offsets=(0, 800))}, b"\0" * 8, None, r"tensor 'w' has data_offsets \[0, 800\] outside the file's 8"),
    ({"w": entry(offsets=(-8, 0))}, b"\0" * 8, None, r"tensor 'w' has data_offsets \[-8, 0\] outside"),
    ({"w": entry(offsets=(8, 0))}, b"\0" * 8, None, r"tensor 'w' has data_offsets \[8, 0\] outside"),
    ({"w": entry(offsets=(0, 2**64 + 8))}, b"\0" * 8, None, r"data_offsets \[0, 18446744073709551624\] outside"),
    ({"w": entry(offsets=(0, 1.5))}, b"\0" * 8, None, r"tensor 'w' has data_offsets \[0, 1.5\]"),
    ({"w": entry(shape=(3,))}, b"\0" * 8, None, r"tensor 'w' is F32 \[3\] \(12 bytes\) but its data_offsets \[0, 8\]"),
    ({"w": entry(shape=(2**62, 4))}, b"\0" * 8, None, r"tensor 'w' is F32 .* but its data_offsets"),
    ({"a": entry(), "b": entry(offsets=(4, 12))}, b"\0" * 12, None, r"tensor 'b' overlaps tensor 'a'"),
]


@pytest.mark.parametrize("header,data,length,match", LIES)
def test_a_lying_safetensors_file_is_one_line_naming_file_and_tensor(tmp_path, header, data, length, match):
    path = write_raw(tmp_path / "bad.safetensors", header, data, length)
    with pytest.raises(SafetensorsError, match=rf"^{path}: .*{match}|^{path} {match}") as e:
        safetensors_io.map_file(path)
    assert "\n" not in str(e.value)


def test_a_file_too_short_for_its_length_is_one_line(tmp_path):
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x01\x02")
    with pytest.raises(SafetensorsError, match=rf"^{path} is 2 bytes, too short for a safetensors header"):
        safetensors_io.map_file(str(path))


def _index(directory, weight_map):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, safetensors_io.INDEX_FILE), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return os.path.join(directory, safetensors_io.INDEX_FILE)


def test_index_names_only_files_inside_the_model_directory(tmp_path):
    outside = write_raw(tmp_path / "secret.safetensors", {"w": entry()}, b"\0" * 8)
    model = tmp_path / "model"
    write_raw(_index(model, {"w": "part.safetensors"}).replace(safetensors_io.INDEX_FILE, "part.safetensors"),
              {"w": entry()}, b"\0" * 8)  # fmt: skip
    assert safetensors_io.weight_files(str(model)) == ["part.safetensors"]
    os.symlink(outside, model / "link.safetensors")
    for name in ["../secret.safetensors", outside, "link.safetensors", "sub/../../secret.safetensors"]:
        index = _index(model, {"w": name})
        with pytest.raises(
            SafetensorsError, match=rf"^{index}: tensor 'w' names file {name!r}, which is not a file in"
        ):
            safetensors_io.SafetensorsDir(str(model))
    for weight_map, match in [([1], "has no 'weight_map'"), ({"w": 3}, "tensor 'w' maps to 3, not a file name")]:
        index = _index(model, weight_map)
        with pytest.raises(SafetensorsError, match=rf"^{index}:? .*{match}"):
            safetensors_io.weight_files(str(model))
    with open(index, "w") as f:
        f.write("[1, 2]")
    with pytest.raises(SafetensorsError, match=rf"^{index} is not a JSON object"):
        safetensors_io.weight_files(str(model))


def _gpt2_dir(tmp_path, dtype_of=lambda name: np.float32):
    """A tiny GPT-2 directory: config.json and the tensors of a fresh model, each in `dtype_of(name)`."""
    import safetensors.numpy

    from llm_jax.models.model import TransformerLM

    d = tmp_path / "gpt2"
    os.makedirs(d)
    (d / "config.json").write_text(json.dumps(GPT2))
    cfg = hf.model_config_from_hf(GPT2)
    params = TransformerLM(cfg).init(jax.random.key(0), np.zeros((1, 4), np.int32))["params"]
    tensors = {n: v.astype(dtype_of(n)) for n, v in hf.hf_tensors(cfg, params).items()}
    safetensors.numpy.save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    return str(d)


def test_weights_are_cast_only_from_floats(tmp_path):
    """A float16 weight becomes the parameter's float32 (an explicit float-to-float cast); an integer
    or boolean weight is refused, naming the tensor, never silently turned into numbers."""
    pytest.importorskip(
        "safetensors", reason="needs the hf extra (safetensors writes the checkpoint): pip install safetensors"
    )
    _, params = hf.load_pretrained(_gpt2_dir(tmp_path, lambda n: np.float16))
    assert {v.dtype for v in jax.tree.leaves(params)} == {np.dtype(np.float32)}
    bad = _gpt2_dir(tmp_path / "int", lambda n: np.int32 if n.endswith("wte.weight") else np.float32)
    with pytest.raises(
        hf.HFError,
        match=rf"^{bad}/model\.safetensors: tensor transformer\.wte\.weight is int32, not a floating-point weight",
    ):
        hf.load_pretrained(bad)


def test_config_json_must_be_an_object(tmp_path):
    (tmp_path / "config.json").write_text("[1]")
    with pytest.raises(hf.HFError, match=r"config\.json holds a JSON list, not an object"):
        hf.read_config(str(tmp_path))
