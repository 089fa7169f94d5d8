"""Hugging Face interop: today's open decoders in and out, straight into the sharded layout.

    from llm_jax.interop import hf
    model, params = hf.load_pretrained("path/to/hf_dir")           # config.json + *.safetensors
    logits = model.apply({"params": params}, tokens)               # [batch, length, vocab] float32
    hf.save_pretrained("path/to/out", model.cfg, params)           # transformers' from_pretrained reads it

What each architecture is lives in the tables (`hf_table.py` for their vocabulary; `hf_gpt2.py`,
`hf_llama.py`, `hf_gemma.py`; `hf_specs.py` the registry): one spec per architecture with its
config.json mapping and the one tensor table that both import and export below read. Supported:
`GPT2LMHeadModel`, `LlamaForCausalLM` (incl. Llama 3.x RoPE scaling), `MistralForCausalLM`
(sliding window), `Qwen2ForCausalLM` (q/k/v biases), `Qwen3ForCausalLM` (QK-norm),
`Gemma2ForCausalLM` and `Gemma3ForCausalLM` (text: local and global layers, soft-capping,
(1 + w) norms, post-norms, GeGLU). A field whose value this model cannot reproduce exactly is an
error that names it, never a silent guess.

Weights are read from safetensors only (`safetensors_io.py`): pickled `.bin` / `.pt` files can run
code when loaded and are refused. Files are memory-mapped and each device's shard is sliced out of
the map (`jax.make_array_from_callback` on the shardings that `jax.eval_shape(model.init)` and the
logical axis rules give), so neither a device nor the host ever holds the unsharded model; a
scanned model (`scan_layers=True`) gets its per-layer tensors stacked shard by shard.

Run directories: `import_run` makes a workdir that `python -m llm_jax.main` fine-tunes (config.json,
tokenizer/, checkpoints/0 with the TrainState of training/state.py, written by checkpoint.py), `export_run`
writes a run's checkpoint (read by `run.load_run`) back as a Hugging Face directory;
`python -m llm_jax.convert` is their command line.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import ml_dtypes
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh

from llm_jax.data import tokenizer as tok_lib
from llm_jax.interop import hf_export, hf_specs, safetensors_io
from llm_jax.interop.hf_specs import HFError, Spec
from llm_jax.interop.safetensors_io import INDEX_FILE, SafetensorsDir  # noqa: F401 - part of this module's API
from llm_jax.models import family as family_lib
from llm_jax.models.model import RUNTIME_FIELDS, ModelConfig, TransformerLM
from llm_jax.runtime import files, sharding
from llm_jax.runtime.errors import AlreadyExists, BadValue, NotFound
from llm_jax.training import checkpoint as ckpt_lib
from llm_jax.training import config as config_lib
from llm_jax.training import optim
from llm_jax.training import saved_run as run_lib
from llm_jax.training import state as state_lib
from llm_jax.training import workdir as workdir_lib

PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
# Small files of an imported checkpoint kept in the run (workdir/hf/) and written back on export. The
# tokenizer's own files (tokenizer_config.json, special_tokens_map.json, chat_template.jinja) travel
# with the tokenizer instead (workdir/tokenizer/, HFTokenizer.SIDE_FILES): the run reads them there.
CARRIED_FILES = ("config.json", "generation_config.json")
# Runs imported before the tokenizer carried its files kept them in workdir/hf/; export still copies them.
_OLD_CARRIED = ("tokenizer_config.json", "special_tokens_map.json")
# Export dtypes, and the names config.json gives them.
_CASTS = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
_DTYPE_NAMES = {np.dtype(t): name for name, t in _CASTS.items()}
# ModelConfig fields a run chooses on import: config.json says nothing about them.
_RUN_CHOICES = (*RUNTIME_FIELDS, "scan_layers", "param_dtype", "init_std")

abstract_params = family_lib.abstract_params


# ----------------------------------------------------------------------------------------------
# Reading a directory


def read_config(hf_dir: str) -> dict:
    """config.json of a Hugging Face directory, as a dict."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise NotFound(f"{hf_dir} is not a Hugging Face model directory: no config.json")
    with open(path) as f:
        try:
            found = json.load(f)
        except ValueError as e:  # not JSON, not UTF-8
            raise HFError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(found, dict):
        raise HFError(f"{path} holds a JSON {type(found).__name__}, not an object of config fields")
    return found


def check_weights(hf_dir: str) -> list[str]:
    """The directory's safetensors files; an HFError if it has only pickled weights (never unpickled)."""
    files = safetensors_io.weight_files(hf_dir)
    if files:
        return files
    pickled = sorted(os.path.basename(p) for pat in PICKLE_PATTERNS for p in glob.glob(os.path.join(hf_dir, pat)))
    if pickled:
        raise HFError(
            f"{hf_dir} has only pickled PyTorch weights ({', '.join(pickled)}). llm_jax reads safetensors "
            "only and never unpickles .bin/.pt files (unpickling runs arbitrary code). In an environment you "
            "trust, convert once with transformers: AutoModelForCausalLM.from_pretrained(D)"
            ".save_pretrained(D) writes model.safetensors."
        )
    raise NotFound(f"{hf_dir} has no *.safetensors weights (and no {INDEX_FILE})")


def _eos_ids(hf_dir: str, name: str, cfg: dict | None = None) -> list[int]:
    """eos_token_id of `name` in `hf_dir` (config.json, generation_config.json): one id or a list."""
    if cfg is None:
        path = os.path.join(hf_dir, name)
        if not os.path.isfile(path):
            return []
        try:
            with open(path) as f:
                cfg = json.load(f)
        except json.JSONDecodeError as e:
            raise HFError(f"{path} is not valid JSON ({e})") from None
    eos = cfg.get("eos_token_id") if isinstance(cfg, dict) else None
    return [int(i) for i in (eos if isinstance(eos, list) else [eos]) if i is not None]


def load_tokenizer(hf_dir: str, hf_cfg: dict | None = None) -> tok_lib.HFTokenizer | None:
    """The directory's tokenizer (tokenizer.json and the files beside it: special tokens, chat
    template) as an HFTokenizer, or None if there is no tokenizer.json. Its EOS is config.json's
    (the first, if a list); every eos_token_id of config.json and generation_config.json stops a
    generation (Llama 3's <|eot_id|>, Gemma's <end_of_turn>)."""
    if not os.path.isfile(os.path.join(hf_dir, tok_lib.HFTokenizer.FILE)):
        return None
    model_eos = _eos_ids(hf_dir, "config.json", hf_cfg if hf_cfg is not None else read_config(hf_dir))
    stop = model_eos + _eos_ids(hf_dir, "generation_config.json")
    return tok_lib.HFTokenizer.from_dir(hf_dir, model_eos[0] if model_eos else None, stop)


# ----------------------------------------------------------------------------------------------
# config.json <-> ModelConfig (the per-architecture halves are the specs' from_hf / to_hf)


def model_config_from_hf(hf_cfg: dict, **overrides) -> ModelConfig:
    """The ModelConfig that computes what transformers computes for this config.json.

    `overrides` are ModelConfig fields that do not change the function (scan_layers, remat,
    attention, dtype, param_dtype, dropout_rate); dropout defaults to 0.
    """
    spec = hf_specs.for_config(hf_cfg)
    if hf_cfg.get("quantization_config"):
        raise HFError("config.json quantization_config is set: quantized checkpoints are not supported")
    kw = spec.from_hf(hf_cfg)
    overrides.setdefault("dropout_rate", 0.0)
    kw["vocab_multiple"] = 1  # the checkpoint's vocabulary exactly: padding would change the logits
    forbidden = set(overrides) & set(kw)
    if forbidden:
        raise HFError(f"{sorted(forbidden)} come from config.json and cannot be overridden on import")
    return ModelConfig(**kw, **overrides)


def hf_config_from_model(cfg: ModelConfig, base: dict | None = None, eos_id: int | None = None) -> dict:
    """config.json for `cfg`: the architecture of `base` (an imported checkpoint's original
    config.json) if it computes the same function, else the first in `hf_specs.SPECS` that does.
    `base` of that architecture keeps its other fields (token ids, ...)."""
    prefer = (base.get("architectures") or [None])[0] if base else None
    spec = hf_specs.for_model(cfg, prefer)
    out = dict(base) if base and base.get("architectures") == [spec.architecture] else {}
    for key in ("torch_dtype", "transformers_version"):  # describe the old file, not this one
        out.pop(key, None)
    out.update(spec.to_hf(cfg), dtype=cfg.param_dtype)
    if eos_id is not None and "eos_token_id" not in out:
        out["eos_token_id"] = int(eos_id)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        out.setdefault(key, None)  # not GPT2Config's 50256 defaults, which may lie outside this vocabulary
    return out


# ----------------------------------------------------------------------------------------------
# Import: the spec's table read left to right, HF tensor -> view in our parameter's shape


def default_mesh() -> Mesh:
    """One device, like `from_pretrained` without a device map; pass a mesh to shard instead."""
    return Mesh(np.asarray(jax.local_devices()[:1]).reshape((1,) * len(sharding.MESH_AXES)), sharding.MESH_AXES)


def _param_key(path: tuple[str, ...], layer: int | None, scan: bool) -> tuple[str, ...]:
    """Our flat parameter key of a table path: top level, 'layers_{i}/...' or stacked 'layers/...'."""
    if layer is None:
        return path
    return ("layers",) + path if scan else (f"layers_{layer}",) + path


def _table_rows(spec: Spec, cfg: ModelConfig) -> list[tuple[hf_specs.Tensor, int | None, int | None, str]]:
    """(entry, layer or None, expert or None, HF name) of every tensor `cfg` has under `spec`."""
    rows = []
    for entry in spec.table:
        if not entry.when(cfg):
            continue
        layers = [i for i in range(cfg.num_layers) if entry.layers(cfg, i)] if entry.per_layer else [None]
        for i in layers:
            for j in range(cfg.num_experts) if entry.per_expert else (None,):
                rows.append((entry, i, j, entry.hf.format(i=i, j=j)))
    return rows


def _import_views(spec: Spec, cfg: ModelConfig, tensors: dict[str, np.ndarray], hf_dir: str, where=None) -> dict:
    """{our flat parameter key: view of the checkpoint in that parameter's shape}; nothing is read yet.

    E.g. ('layers_0', 'attn', 'query', 'kernel'): [e, h, d], a view of q_proj.weight [h*d, e]. Per-expert
    views are stacked lazily into [experts, ...], a scanned model's per-layer views into [layers, ...]
    (`_Stacked`). `where`: {tensor name: its file}, for messages.
    """
    bare = bool(tensors) and not any(n.startswith(spec.backbone) for n in tensors)  # old uploads: 'h.0.ln_1.weight'
    rows = [(e, i, j, name.removeprefix(spec.backbone) if bare else name) for e, i, j, name in _table_rows(spec, cfg)]
    missing = [name for *_, name in rows if name not in tensors]
    if missing:
        raise HFError(
            f"{hf_dir} lacks tensors a {spec.model_type} model with this config.json needs: {missing[:8]}"
            + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        )
    used = {name for *_, name in rows}
    unused = sorted(n for n in tensors if n not in used and not spec.ignorable(n, cfg))
    if unused:
        raise HFError(
            f"{hf_dir} has tensors the {spec.model_type} layout does not use (an unsupported variant?): {unused[:8]}"
        )
    dims, views, stacks, experts = hf_specs.sizes(cfg), {}, {}, {}
    for entry, i, j, name in rows:
        x, want = tensors[name], entry.hf_shape(dims)
        if x.dtype not in safetensors_io.FLOAT_DTYPES:  # cast only float to float: an int or bool weight is a lie
            path = (where or {}).get(name, hf_dir)
            raise HFError(f"{path}: tensor {name} is {x.dtype}, not a floating-point weight; the file is corrupt")
        if want is not None and tuple(x.shape) != want:
            raise HFError(
                f"{hf_dir}: tensor {name} is {tuple(x.shape)} but config.json implies {want} "
                f"(layout {entry.layout!r} with {dims}); the tensors do not fit config.json"
            )
        for path, view in zip(entry.paths(), entry.to_ours(x, dims)):
            key = _param_key(path, i, cfg.scan_layers)
            if j is not None:
                experts.setdefault((key, i), []).append(view)
            elif i is not None and cfg.scan_layers:
                stacks.setdefault(key, []).append(view)
            else:
                views[key] = view
    for (key, i), per_expert in experts.items():  # layer by layer, in order
        if i is not None and cfg.scan_layers:
            stacks.setdefault(key, []).append(_Stacked(per_expert))
        else:
            views[key] = _Stacked(per_expert)
    return {**views, **{key: _Stacked(per_layer) for key, per_layer in stacks.items()}}


class _Stacked:
    """A lazy [n, ...] stack of views (layers of nn.scan params, experts), sliced shard by shard."""

    def __init__(self, views: list):
        self.views = views
        self.shape = (len(views),) + tuple(views[0].shape)

    def __getitem__(self, index):
        index = (index if isinstance(index, tuple) else (index,)) or (slice(None),)
        rows = range(len(self.views))[index[0]]
        return np.stack([np.asarray(self.views[i][index[1:]]) for i in rows])


def _place(view: Any, target: jax.ShapeDtypeStruct, sh: jax.sharding.NamedSharding, name: str, hf_dir: str):
    """`view` as a jax.Array of `target`'s shape and dtype, each device's shard sliced out of it
    (`view[index]` reads only that shard's bytes of the memory-mapped file)."""
    if tuple(view.shape) != tuple(target.shape):
        raise HFError(
            f"{hf_dir}: parameter {name} should be {tuple(target.shape)} for this config.json but the "
            f"checkpoint gives {tuple(view.shape)}"
        )
    for dim, (size, axes) in enumerate(zip(target.shape, sh.spec)):
        parts = int(np.prod([sh.mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ())]))
        if size % parts:
            raise HFError(
                f"parameter {name} dim {dim} (size {size}) does not split over mesh axes {axes} "
                f"({parts} devices); choose mesh sizes that divide it"
            )
    return jax.make_array_from_callback(target.shape, sh, lambda index: np.asarray(view[index], dtype=target.dtype))


def load_params(
    hf_dir: str, cfg: ModelConfig, mesh: Mesh | None = None, rules=None, hf_cfg: dict | None = None
) -> dict:
    """The checkpoint's weights as `cfg`'s param tree, each array placed straight into its shards.

    Each device's shard is sliced from the memory-mapped files (`make_array_from_callback`) on the
    shardings that the model's logical axis names get under `rules` on `mesh`.
    """
    hf_cfg = read_config(hf_dir) if hf_cfg is None else hf_cfg
    spec = hf_specs.for_config(hf_cfg)
    mesh = default_mesh() if mesh is None else mesh
    rules = sharding.logical_rules() if rules is None else rules
    check_weights(hf_dir)
    weights = SafetensorsDir(hf_dir)
    views = _import_views(spec, cfg, weights.tensors, hf_dir, weights.files)
    boxed = abstract_params(family_lib.build(cfg))
    shardings = traverse_util.flatten_dict(sharding.boxed_shardings(boxed, mesh, rules))
    targets = traverse_util.flatten_dict(nn.meta.unbox(boxed))
    if set(targets) != set(views):
        raise HFError(
            f"internal layout mismatch: model params {sorted(set(targets) ^ set(views))} have no tensor mapping "
            f"in the {spec.architecture} table of llm_jax/interop/hf_specs.py"
        )
    out = {p: _place(views[p], targets[p], shardings[p], "/".join(p), hf_dir) for p in targets}
    return traverse_util.unflatten_dict(out)


def load_pretrained(hf_dir: str, mesh: Mesh | None = None, rules=None, **overrides) -> tuple[TransformerLM, dict]:
    """(model, params) from a local Hugging Face directory; `model.apply({'params': params}, tokens)`.

    `mesh`: where the params go (default: the first device); with the default logical `rules`
    params are sharded over `fsdp` (embed) and `tensor` (heads, mlp, vocab). `overrides`: ModelConfig
    fields that do not change the function, e.g. scan_layers=True, dtype='bfloat16'.
    """
    hf_cfg = read_config(hf_dir)
    cfg = model_config_from_hf(hf_cfg, **overrides)
    return TransformerLM(cfg), load_params(hf_dir, cfg, mesh, rules, hf_cfg)


# ----------------------------------------------------------------------------------------------
# Export: the same table read right to left


def hf_tensors(cfg: ModelConfig, params: Any) -> dict[str, np.ndarray]:
    """Our params (jax or numpy, boxed or not) -> {HF tensor name: host numpy array in HF's shape},
    e.g. 'model.layers.0.self_attn.q_proj.weight': [h*d, e] from our query kernel [e, h, d]."""
    spec = hf_specs.for_model(cfg)
    flat = {p: np.asarray(v) for p, v in traverse_util.flatten_dict(jax.device_get(nn.meta.unbox(params))).items()}
    dims, out, used = hf_specs.sizes(cfg), {}, set()
    for entry, i, j, name in _table_rows(spec, cfg):
        arrays = []
        for path in entry.paths():
            key = _param_key(path, i, cfg.scan_layers)
            if key not in flat:
                raise HFError(f"params lack {'/'.join(key)}, which {spec.architecture} needs for this ModelConfig")
            used.add(key)
            array = flat[key][i] if i is not None and cfg.scan_layers else flat[key]
            arrays.append(array if j is None else array[j])
        out[name] = entry.to_hf(arrays, dims)
    if used != set(flat):
        left = sorted("/".join(k) for k in set(flat) - used)
        raise HFError(
            f"params {left[:8]} have no tensor in the {spec.architecture} table of llm_jax/interop/hf_specs.py"
        )
    return out


def save_pretrained(
    hf_dir: str,
    cfg: ModelConfig,
    params: Any,
    tokenizer: tok_lib.Tokenizer | None = None,
    base_config: dict | None = None,
    dtype: str | None = None,
    max_shard_bytes: int = 5 * 2**30,
    extra_files: dict | None = None,
) -> None:
    """Writes config.json + model.safetensors (sharded with an index past `max_shard_bytes`).

    `tokenizer`: an HFTokenizer is written as tokenizer.json (others have no HF form). `dtype`:
    'float32' / 'bfloat16' / 'float16' to cast the weights (default: as stored). `extra_files`:
    {file name: path} copied alongside (an imported checkpoint's generation/tokenizer configs).
    """
    if dtype is not None and dtype not in _CASTS:
        raise BadValue(f"dtype={dtype!r}: use one of {sorted(_CASTS)}")
    tensors = hf_tensors(cfg, params)
    if dtype is not None:
        tensors = {n: v.astype(_CASTS[dtype]) for n, v in tensors.items()}
    safetensors_io.write(hf_dir, tensors, max_shard_bytes)
    for name, src in (extra_files or {}).items():
        shutil.copyfile(src, os.path.join(hf_dir, name))
    eos = getattr(tokenizer, "eos_id", None)
    hf_cfg = hf_config_from_model(cfg, base_config, eos)
    stored = {_DTYPE_NAMES.get(v.dtype, str(v.dtype)) for v in tensors.values()}
    if len(stored) == 1:  # what the weights are, which a cast may have changed
        hf_cfg["dtype"] = stored.pop()
    files.write_json(os.path.join(hf_dir, "config.json"), hf_cfg)
    if isinstance(tokenizer, tok_lib.HFTokenizer):
        _write_tokenizer(hf_dir, tokenizer, cfg.max_len)


def _write_tokenizer(hf_dir: str, tokenizer: tok_lib.HFTokenizer, max_len: int) -> None:
    """tokenizer.json and the checkpoint's tokenizer files as imported (special tokens, chat
    template), or a minimal tokenizer_config.json if there was none (AutoTokenizer needs one to pick
    the fast tokenizer class)."""
    files.write_text(os.path.join(hf_dir, "tokenizer.json"), tokenizer.json_str)
    for name, text in tokenizer.side_files.items():
        files.write_text(os.path.join(hf_dir, name), text)
    if not os.path.exists(os.path.join(hf_dir, "tokenizer_config.json")):
        tc = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len}
        if tokenizer.eos_id is not None:
            tc["eos_token"] = tokenizer.tok.id_to_token(int(tokenizer.eos_id))
        files.write_json(os.path.join(hf_dir, "tokenizer_config.json"), tc)


# ----------------------------------------------------------------------------------------------
# Run directories


def model_keys(hf_cfg: dict, preset: str) -> dict:
    """`config.model` keys (every ModelConfig field) of the model this config.json describes: what
    `run_config` reads from a checkpoint and what the presets of published models (configs/llama3.py,
    qwen.py, gemma.py) are written as, so a preset and an imported checkpoint cannot disagree."""
    keys = dataclasses.asdict(model_config_from_hf(hf_cfg, preset=preset))
    return {k: v for k, v in keys.items() if k in config_lib.model_section()}  # LoRA's live in `config.lora`


def pretraining_config(hf_cfg: dict, preset: str, seq_len: int, tiny: bool = False) -> ml_collections.ConfigDict:
    """The run config that pre-trains the model of a published config.json (the presets in configs/):
    its model keys, its own tokenizer (`data.tokenizer_path`), `config_lib.pretraining`'s recipe; `tiny`:
    the same architecture on bytes, `config_lib.cpu_smoke`'s seconds-long CPU run."""
    c = config_lib.base_config()
    c.model.update(model_keys(hf_cfg, preset=preset))
    c.data.update(tokenizer="hf")
    config_lib.pretraining(c, seq_len=seq_len, batch_size=64, lr=3e-4)
    if tiny:
        c.model.vocab_size = None  # the byte tokenizer's
        config_lib.cpu_smoke(c)
    return c


def run_config(path: str) -> ml_collections.ConfigDict:
    """`base_config()` with the model keys of a Hugging Face directory or of a run made by `import_run`.

    The tokenizer is the directory's tokenizer.json (kind 'hf'); data.seq_len is capped at max_len.
    The rest (data source, optimizer, steps) keeps the defaults for configs to set.
    """
    found = read_config(path)
    c = config_lib.base_config()
    if "architectures" in found:  # a Hugging Face directory
        keys = model_keys(found, preset=f"hf:{hf_specs.for_config(found).model_type}")
        tokenizer_path = os.path.join(path, "tokenizer.json")
    elif "model" in found:  # a run directory: read as every run is read
        keys = config_lib.load_run_config(path).model.to_dict()
        tokenizer_path = os.path.join(workdir_lib.tokenizer_dir(path), tok_lib.HFTokenizer.FILE)
    else:
        raise HFError(
            f"{path}/config.json is neither a Hugging Face config (no 'architectures') nor a run config (no 'model')"
        )
    unknown = sorted(set(keys) - set(c.model.keys()))
    if unknown:
        raise HFError(f"model keys {unknown} of {path}/config.json are not in config.base_config(); update llm_jax")
    c.model.update(keys)
    c.data.tokenizer = "hf"
    c.data.tokenizer_path = tokenizer_path if os.path.isfile(tokenizer_path) else ""
    c.data.seq_len = min(c.data.seq_len, c.model.max_len)
    return c


def _fine_tuning_tokenizer(hf_dir: str, hf_cfg: dict) -> tok_lib.HFTokenizer:
    """The directory's tokenizer, which a run needs (load_pretrained does not)."""
    tokenizer = load_tokenizer(hf_dir, hf_cfg)
    if tokenizer is None:
        raise HFError(
            f"{hf_dir} has no tokenizer.json, which fine-tuning needs. Write one with transformers "
            "(AutoTokenizer.from_pretrained(D).save_pretrained(D)) or use hf.load_pretrained for the weights alone"
        )
    if tokenizer.vocab_size > hf_cfg["vocab_size"]:
        raise HFError(
            f"tokenizer.json has {tokenizer.vocab_size} tokens but config.json vocab_size={hf_cfg['vocab_size']}"
        )
    return tokenizer


def _imported_model_config(hf_dir: str, hf_cfg: dict, config: ml_collections.ConfigDict, vocab: int) -> ModelConfig:
    """The checkpoint's ModelConfig with the run's runtime choices; an error if `config.model` disagrees."""
    cfg = model_config_from_hf(hf_cfg, **{k: config.model[k] for k in _RUN_CHOICES})
    run_cfg = config_lib.model_config(config, vocab)
    if run_cfg != cfg:
        diff = {
            f.name: (getattr(run_cfg, f.name), getattr(cfg, f.name))
            for f in dataclasses.fields(cfg)
            if getattr(run_cfg, f.name) != getattr(cfg, f.name)
        }
        raise HFError(f"config.model disagrees with {hf_dir}/config.json on (config, checkpoint): {diff}")
    return cfg


def _initial_state(cfg: ModelConfig, config: ml_collections.ConfigDict, params: dict, mesh: Mesh, rules):
    """TrainState(step=0, params, fresh optimizer state), sharded as the trainer shards it."""
    tx = optim.make_optimizer(config.optim)
    _, state_sh = state_lib.abstract_state(family_lib.build(cfg), tx, mesh, rules, 1)
    opt_state = jax.jit(tx.init, out_shardings=state_sh.opt_state)(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), state_sh.step)
    return state_lib.TrainState(step=step, params=params, opt_state=opt_state)


def import_run(
    hf_dir: str, workdir: str, config: ml_collections.ConfigDict | None = None, log=print
) -> ml_collections.ConfigDict:
    """Makes `workdir` a run that `llm_jax.main` resumes from the imported weights.

    Writes workdir/config.json (`config`, default `run_config(hf_dir)`), workdir/tokenizer/ (the HF
    tokenizer.json with its tokenizer_config.json, special_tokens_map.json, chat_template.jinja:
    what the run encodes, chats and stops with), workdir/hf/ (the original config.json and
    generation_config.json, reused on export)
    and workdir/checkpoints/0 (TrainState(step=0, params, fresh opt_state), sharded on `config.mesh`).
    Problems are reported most fundamental first: no config.json, an unsupported architecture, no
    safetensors weights, then what a run needs on top (an empty workdir, a tokenizer).
    """
    hf_cfg = read_config(hf_dir)
    spec = hf_specs.for_config(hf_cfg)
    check_weights(hf_dir)
    config = run_config(hf_dir) if config is None else config
    ckpt_dir = ckpt_lib.checkpoint_dir(workdir)
    if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
        raise AlreadyExists(f"{ckpt_dir} already has checkpoints; import into a new workdir")
    tokenizer = _fine_tuning_tokenizer(hf_dir, hf_cfg)
    cfg = _imported_model_config(hf_dir, hf_cfg, config, tokenizer.vocab_size)

    tok_dir = workdir_lib.tokenizer_dir(workdir)
    config = ml_collections.ConfigDict(config.to_dict())
    config.data.tokenizer_path = os.path.join(tok_dir, tok_lib.HFTokenizer.FILE)
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.logical_rules(config)
    layers = f"{cfg.num_layers} layers, vocab {cfg.vocab_size}"
    log(f"importing {hf_dir} ({spec.model_type}, {layers}) onto mesh {dict(mesh.shape)}")
    state = _initial_state(cfg, config, load_params(hf_dir, cfg, mesh, rules, hf_cfg), mesh, rules)

    workdir_lib.prepare(workdir, config)
    if jax.process_index() == 0:
        tokenizer.save(tok_dir)
        os.makedirs(os.path.join(workdir, "hf"), exist_ok=True)
        for name in CARRIED_FILES:
            if os.path.isfile(os.path.join(hf_dir, name)):
                shutil.copyfile(os.path.join(hf_dir, name), os.path.join(workdir, "hf", name))
        hf_export.record_import(workdir, hf_dir)
    mngr = ckpt_lib.manager(workdir, config.train.keep_checkpoints, async_save=False)
    # The context it was pre-trained at: what decoding may use (llm_jax.training.saved_run.trained_context).
    ckpt_lib.save(mngr, 0, state, {"step": 0, "trained_context": cfg.max_len})
    mngr.wait_until_finished()
    mngr.close()
    log(f"wrote {workdir}: config.json, tokenizer/, hf/, checkpoints/0")
    return config


def export_run(
    workdir: str, hf_dir: str, step: int | None = None, dtype: str | None = None, log=print, overwrite: bool = False
) -> None:
    """Writes a run's checkpoint (default: the latest) as a Hugging Face directory, whole or not at
    all, never over the run, its import source or another directory's files (`hf_export.py`)."""
    if dtype is not None and dtype not in _CASTS:
        raise BadValue(f"dtype={dtype!r}: use one of {sorted(_CASTS)}")
    hf_export.check_target(workdir, hf_dir, overwrite)  # before the checkpoint is read
    run = run_lib.load_run(workdir, step, on_host=True)
    carried = os.path.join(workdir, "hf")
    base = read_config(carried) if os.path.isfile(os.path.join(carried, "config.json")) else None
    names = (*CARRIED_FILES[1:], *_OLD_CARRIED)
    extra = {n: os.path.join(carried, n) for n in names if os.path.isfile(os.path.join(carried, n))}
    cfg = run.model.cfg
    with hf_export.writing(workdir, hf_dir, overwrite, run.step, log) as tmp:
        save_pretrained(tmp, cfg, run.params, tokenizer=run.tokenizer, base_config=base, dtype=dtype, extra_files=extra)
    log(f"wrote {hf_dir} from {workdir}/checkpoints/{run.step} ({hf_specs.for_model(cfg).architecture})")
