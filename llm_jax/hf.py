"""Hugging Face interop: GPT-2 and Llama checkpoints in and out, straight into the sharded layout.

    from llm_jax import hf
    model, params = hf.load_pretrained("path/to/hf_dir")           # config.json + *.safetensors
    logits = model.apply({"params": params}, tokens)               # [batch, length, vocab] float32
    hf.save_pretrained("path/to/out", model.cfg, params)           # transformers' from_pretrained reads it

Supported: `GPT2LMHeadModel` (learned positions, LayerNorm, tanh-GELU, biases) and
`LlamaForCausalLM` (RoPE with theta and 'linear' / 'llama3' scaling, RMSNorm eps, SwiGLU,
grouped-query attention, `attention_bias` / `mlp_bias`, tied or untied embeddings). A field whose
value this model cannot reproduce exactly is an error that names it, never a silent guess.

Weights are read from safetensors only: pickled `.bin` / `.pt` files can run code when loaded and
are refused. Files are memory-mapped and each device's shard is sliced out of the map
(`jax.make_array_from_callback` on the shardings that `jax.eval_shape(model.init)` and the logical
axis rules give), so neither a device nor the host ever holds the unsharded model; a scanned model
(`scan_layers=True`) gets its per-layer tensors stacked shard by shard. The safetensors header is
parsed here rather than through `safetensors.safe_open`, whose numpy backend copies whole tensors.

Run directories: `import_run` makes a workdir that `python -m llm_jax.main` fine-tunes (config.json,
tokenizer/, checkpoints/0 with the TrainState of train.py), `export_run` writes a run's latest
checkpoint back as a Hugging Face directory; `python -m llm_jax.convert` is their command line.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import struct
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import ml_dtypes
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh

from llm_jax import config as config_lib
from llm_jax import family as family_lib
from llm_jax import sharding
from llm_jax import tokenizer as tok_lib
from llm_jax import workdir as workdir_lib
from llm_jax.errors import AlreadyExists, BadValue, NotFound
from llm_jax.model import ModelConfig, TransformerLM

ARCHITECTURES = {"GPT2LMHeadModel": "gpt2", "LlamaForCausalLM": "llama"}
INDEX_FILE = "model.safetensors.index.json"
SAFE_FILE = "model.safetensors"
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
# Small files of an imported checkpoint kept in the run (workdir/hf/) and written back on export.
CARRIED_FILES = ("config.json", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json")

# safetensors dtype codes -> numpy (bfloat16 and float8 via ml_dtypes, which JAX depends on).
_ST_DTYPES = {
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
_DTYPE_NAMES = {
    np.dtype(np.float32): "float32",
    np.dtype(ml_dtypes.bfloat16): "bfloat16",
    np.dtype(np.float16): "float16",
}


class HFError(BadValue):
    """A Hugging Face directory or config this codebase cannot convert exactly."""


# ----------------------------------------------------------------------------------------------
# Reading a directory


def read_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise NotFound(f"{hf_dir} is not a Hugging Face model directory: no config.json")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise HFError(f"{path} is not valid JSON ({e})") from None


def architecture(hf_cfg: dict) -> str:
    """'gpt2' or 'llama' from config.json's `architectures`; anything else is an error naming it."""
    archs = hf_cfg.get("architectures") or []
    if len(archs) != 1 or archs[0] not in ARCHITECTURES:
        raise HFError(
            f"config.json architectures={archs!r} is not supported; llm_jax converts exactly one of "
            f"{sorted(ARCHITECTURES)}"
        )
    return ARCHITECTURES[archs[0]]


class SafetensorsDir:
    """Every tensor of a directory's safetensors file(s) (single or sharded with an index), memory-mapped.

    `tensors[name]` is a read-only numpy view into the file; slicing it reads only those bytes.
    """

    def __init__(self, hf_dir: str):
        index = os.path.join(hf_dir, INDEX_FILE)
        if os.path.isfile(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        elif os.path.isfile(os.path.join(hf_dir, SAFE_FILE)):
            files = [SAFE_FILE]
        else:
            files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(hf_dir, "*.safetensors")))
        if not files:
            pickled = sorted(
                os.path.basename(p) for pat in PICKLE_PATTERNS for p in glob.glob(os.path.join(hf_dir, pat))
            )
            if pickled:
                raise HFError(
                    f"{hf_dir} has only pickled PyTorch weights ({', '.join(pickled)}). llm_jax reads safetensors "
                    "only and never unpickles .bin/.pt files (unpickling runs arbitrary code). In an environment you "
                    "trust, convert once with transformers: AutoModelForCausalLM.from_pretrained(D)"
                    ".save_pretrained(D) writes model.safetensors."
                )
            raise NotFound(f"{hf_dir} has no *.safetensors weights (and no {INDEX_FILE})")
        self.tensors: dict[str, np.ndarray] = {}
        for name in files:
            for key, arr in _map_safetensors(os.path.join(hf_dir, name)).items():
                if key in self.tensors:
                    raise HFError(f"tensor {key!r} appears in more than one safetensors file of {hf_dir}")
                self.tensors[key] = arr


def _map_safetensors(path: str) -> dict[str, np.ndarray]:
    """The safetensors layout: u64 little-endian header size, a JSON header, then the raw data."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for key, info in header.items():
        if info["dtype"] not in _ST_DTYPES:
            raise HFError(f"{path}: tensor {key!r} has dtype {info['dtype']}, which llm_jax cannot read")
        begin, end = info["data_offsets"]
        raw = mm[8 + n + begin : 8 + n + end]
        out[key] = raw.view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])
    return out


def load_tokenizer(hf_dir: str, hf_cfg: dict | None = None) -> tok_lib.HFTokenizer | None:
    """The directory's tokenizer.json as an HFTokenizer (EOS from config.json), or None if absent."""
    path = os.path.join(hf_dir, "tokenizer.json")
    if not os.path.isfile(path):
        return None
    eos = (hf_cfg if hf_cfg is not None else read_config(hf_dir)).get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    return tok_lib.HFTokenizer.from_file(path, eos)


# ----------------------------------------------------------------------------------------------
# config.json <-> ModelConfig


def _get(hf_cfg: dict, key: str, default=None):
    value = hf_cfg.get(key, default)
    return default if value is None else value


def _require(hf_cfg: dict, key: str, ok: Callable[[Any], bool], default, why: str):
    value = _get(hf_cfg, key, default)
    if not ok(value):
        raise HFError(f"config.json {key}={value!r} is not supported: {why}")
    return value


def _rope_fields(hf_cfg: dict) -> dict:
    """ModelConfig rope fields from either `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling`."""
    field = "rope_parameters" if hf_cfg.get("rope_parameters") else "rope_scaling"
    params = dict(hf_cfg.get(field) or {})
    theta = float(params.get("rope_theta", _get(hf_cfg, "rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    partial = params.get("partial_rotary_factor", _get(hf_cfg, "partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise HFError(f"config.json partial_rotary_factor={partial} is not supported: llm_jax rotates the whole head")
    out = {"rope_theta": theta}
    if kind == "default":
        return out
    if kind == "linear":
        return {**out, "rope_scaling": "linear", "rope_scaling_factor": float(params["factor"])}
    if kind == "llama3":
        return {
            **out,
            "rope_scaling": "llama3",
            "rope_scaling_factor": float(params["factor"]),
            "rope_low_freq_factor": float(params["low_freq_factor"]),
            "rope_high_freq_factor": float(params["high_freq_factor"]),
            "rope_original_max_len": int(
                params.get("original_max_position_embeddings") or hf_cfg["max_position_embeddings"]
            ),
        }
    raise HFError(
        f"config.json {field}.rope_type={kind!r} is not supported: llm_jax reproduces 'default', 'linear' and "
        "'llama3' rope exactly"
    )


def model_config_from_hf(hf_cfg: dict, **overrides) -> ModelConfig:
    """The ModelConfig that computes what transformers computes for this config.json.

    `overrides` are ModelConfig fields that do not change the function (scan_layers, remat,
    attention, dtype, param_dtype, dropout_rate); dropout defaults to 0.
    """
    arch = architecture(hf_cfg)
    if hf_cfg.get("quantization_config"):
        raise HFError("config.json quantization_config is set: quantized checkpoints are not supported")
    if arch == "gpt2":
        _require(
            hf_cfg,
            "activation_function",
            lambda v: v in ("gelu_new", "gelu_pytorch_tanh"),
            "gelu_new",
            "llm_jax's GPT-2 MLP is the tanh-approximate GELU ('gelu_new' / 'gelu_pytorch_tanh')",
        )
        _require(
            hf_cfg, "scale_attn_weights", lambda v: v is True, True, "attention is always scaled by 1/sqrt(head_dim)"
        )
        _require(
            hf_cfg,
            "scale_attn_by_inverse_layer_idx",
            lambda v: v is False,
            False,
            "per-layer attention scaling is not implemented",
        )
        _require(
            hf_cfg, "add_cross_attention", lambda v: v is False, False, "decoder-only models have no cross-attention"
        )
        embed = int(hf_cfg["n_embd"])
        kw = dict(
            vocab_size=int(hf_cfg["vocab_size"]),
            num_layers=int(hf_cfg["n_layer"]),
            num_heads=int(hf_cfg["n_head"]),
            embed_dim=embed,
            mlp_dim=int(_get(hf_cfg, "n_inner", 4 * embed)),
            max_len=int(hf_cfg["n_positions"]),
            positions="learned",
            norm="layernorm",
            norm_eps=float(_get(hf_cfg, "layer_norm_epsilon", 1e-5)),
            mlp_activation="gelu",
            use_bias=True,
            tie_embeddings=bool(_get(hf_cfg, "tie_word_embeddings", True)),
        )
    else:
        _require(hf_cfg, "hidden_act", lambda v: v == "silu", "silu", "llm_jax's Llama MLP is SwiGLU (silu)")
        heads = int(hf_cfg["num_attention_heads"])
        kw = dict(
            vocab_size=int(hf_cfg["vocab_size"]),
            num_layers=int(hf_cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(_get(hf_cfg, "num_key_value_heads", heads)),
            embed_dim=int(hf_cfg["hidden_size"]),
            mlp_dim=int(hf_cfg["intermediate_size"]),
            head_dim=int(_get(hf_cfg, "head_dim", int(hf_cfg["hidden_size"]) // heads)),
            max_len=int(_get(hf_cfg, "max_position_embeddings", 2048)),
            positions="rope",
            norm="rmsnorm",
            norm_eps=float(_get(hf_cfg, "rms_norm_eps", 1e-6)),
            mlp_activation="swiglu",
            use_bias=False,
            attention_bias=bool(_get(hf_cfg, "attention_bias", False)),
            mlp_bias=bool(_get(hf_cfg, "mlp_bias", False)),
            tie_embeddings=bool(_get(hf_cfg, "tie_word_embeddings", False)),
            **_rope_fields(hf_cfg),
        )
    overrides.setdefault("dropout_rate", 0.0)
    kw["vocab_multiple"] = 1  # the checkpoint's vocabulary exactly: padding would change the logits
    forbidden = set(overrides) & set(kw)
    if forbidden:
        raise HFError(f"{sorted(forbidden)} come from config.json and cannot be overridden on import")
    return ModelConfig(**kw, **overrides)


def hf_config_from_model(cfg: ModelConfig, base: dict | None = None, eos_id: int | None = None) -> dict:
    """config.json for `cfg`: GPT2LMHeadModel or LlamaForCausalLM, whichever computes the same function.

    `base` (an imported checkpoint's original config.json) keeps its other fields (token ids, ...).
    """
    arch = _export_architecture(cfg)
    out = dict(base or {}) if base and architecture(base) == arch else {}
    for key in ("rope_scaling", "rope_parameters", "rope_theta", "torch_dtype", "transformers_version"):
        out.pop(key, None)
    dtype = cfg.param_dtype
    if arch == "gpt2":
        out.update(
            architectures=["GPT2LMHeadModel"],
            model_type="gpt2",
            vocab_size=cfg.vocab_size,
            n_positions=cfg.max_len,
            n_embd=cfg.embed_dim,
            n_layer=cfg.num_layers,
            n_head=cfg.num_heads,
            n_inner=cfg.mlp_dim,
            activation_function="gelu_new",
            layer_norm_epsilon=cfg.norm_eps,
            tie_word_embeddings=cfg.tie_embeddings,
            scale_attn_weights=True,
            scale_attn_by_inverse_layer_idx=False,
            reorder_and_upcast_attn=False,
            add_cross_attention=False,
            resid_pdrop=cfg.dropout_rate,
            embd_pdrop=cfg.dropout_rate,
            attn_pdrop=0.0,
            dtype=dtype,
        )
    else:
        rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
        if cfg.rope_scaling == "linear":
            rope.update(rope_type="linear", factor=cfg.rope_scaling_factor)
        elif cfg.rope_scaling == "llama3":
            rope.update(
                rope_type="llama3",
                factor=cfg.rope_scaling_factor,
                low_freq_factor=cfg.rope_low_freq_factor,
                high_freq_factor=cfg.rope_high_freq_factor,
                original_max_position_embeddings=cfg.rope_original_max_len,
            )
        out.update(
            architectures=["LlamaForCausalLM"],
            model_type="llama",
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.embed_dim,
            intermediate_size=cfg.mlp_dim,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.kv_heads,
            head_dim=cfg.dim_per_head,
            hidden_act="silu",
            max_position_embeddings=cfg.max_len,
            rms_norm_eps=cfg.norm_eps,
            tie_word_embeddings=cfg.tie_embeddings,
            attention_bias=cfg.attention_use_bias,
            mlp_bias=cfg.mlp_use_bias,
            attention_dropout=0.0,
            pretraining_tp=1,
            dtype=dtype,
            # Both spellings: transformers >= 5 reads rope_parameters, 4.x reads rope_theta + rope_scaling.
            rope_parameters=rope,
            rope_theta=cfg.rope_theta,
            rope_scaling=None if rope["rope_type"] == "default" else dict(rope),
        )
    if eos_id is not None and "eos_token_id" not in out:
        out["eos_token_id"] = int(eos_id)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        out.setdefault(key, None)  # not GPT2Config's 50256 defaults, which may lie outside this vocabulary
    return out


def _export_architecture(cfg: ModelConfig) -> str:
    gpt2 = {
        "positions": (cfg.positions, "learned"),
        "norm": (cfg.norm, "layernorm"),
        "mlp_activation": (cfg.mlp_activation, "gelu"),
        "use_bias": (cfg.use_bias, True),
        "attention_bias": (cfg.attention_use_bias, True),
        "mlp_bias": (cfg.mlp_use_bias, True),
        "num_kv_heads": (cfg.kv_heads, cfg.num_heads),
        "head_dim": (cfg.dim_per_head * cfg.num_heads, cfg.embed_dim),
        "rope_scaling": (cfg.rope_scaling, "none"),
    }
    llama = {
        "positions": (cfg.positions, "rope"),
        "norm": (cfg.norm, "rmsnorm"),
        "mlp_activation": (cfg.mlp_activation, "swiglu"),
    }
    misfit = {
        name: [k for k, (v, want) in spec.items() if v != want] for name, spec in (("gpt2", gpt2), ("llama", llama))
    }
    for name in ("gpt2", "llama"):
        if not misfit[name]:
            return name
    raise HFError(
        "this model matches no Hugging Face architecture llm_jax exports: as GPT2LMHeadModel its fields "
        f"{misfit['gpt2']} differ (needs learned positions, layernorm, gelu, all biases, multi-head, no rope "
        f"scaling); as LlamaForCausalLM its fields {misfit['llama']} differ (needs rope, rmsnorm, swiglu)"
    )


# ----------------------------------------------------------------------------------------------
# Tensor layouts. One table per architecture: our parameter path -> a numpy view of HF tensors
# (import) and HF name -> array built from our parameters (export). The tests prove they invert.


def _import_views(arch: str, cfg: ModelConfig, t: Callable[[str], np.ndarray], prefix: str) -> tuple[dict, list]:
    """({our path (layer-relative under 'layer', i): view}, HF names used). `t(name)` returns the tensor."""
    e, h, k, d = cfg.embed_dim, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
    top, layers = {}, []
    if arch == "gpt2":
        top[("embed", "embedding")] = t(prefix + "wte.weight")
        top[("pos_embed",)] = t(prefix + "wpe.weight")
        top[("ln_f", "scale")], top[("ln_f", "bias")] = t(prefix + "ln_f.weight"), t(prefix + "ln_f.bias")
        for i in range(cfg.num_layers):
            p = f"{prefix}h.{i}."
            qkv_w, qkv_b = t(p + "attn.c_attn.weight"), t(p + "attn.c_attn.bias")  # Conv1D: [in, out]
            layer = {
                ("ln_1", "scale"): t(p + "ln_1.weight"),
                ("ln_1", "bias"): t(p + "ln_1.bias"),
                ("ln_2", "scale"): t(p + "ln_2.weight"),
                ("ln_2", "bias"): t(p + "ln_2.bias"),
                ("attn", "out", "kernel"): t(p + "attn.c_proj.weight").reshape(h, d, e),
                ("attn", "out", "bias"): t(p + "attn.c_proj.bias"),
                ("mlp", "wi", "kernel"): t(p + "mlp.c_fc.weight"),
                ("mlp", "wi", "bias"): t(p + "mlp.c_fc.bias"),
                ("mlp", "wo", "kernel"): t(p + "mlp.c_proj.weight"),
                ("mlp", "wo", "bias"): t(p + "mlp.c_proj.bias"),
            }
            for j, name in enumerate(("query", "key", "value")):
                layer[("attn", name, "kernel")] = qkv_w[:, j * e : (j + 1) * e].reshape(e, h, d)
                layer[("attn", name, "bias")] = qkv_b[j * e : (j + 1) * e].reshape(h, d)
            layers.append(layer)
    else:
        top[("embed", "embedding")] = t(prefix + "embed_tokens.weight")
        top[("ln_f", "scale")] = t(prefix + "norm.weight")
        for i in range(cfg.num_layers):
            p = f"{prefix}layers.{i}."
            a, m = p + "self_attn.", p + "mlp."  # nn.Linear: [out, in]
            layer = {
                ("ln_1", "scale"): t(p + "input_layernorm.weight"),
                ("ln_2", "scale"): t(p + "post_attention_layernorm.weight"),
                ("attn", "query", "kernel"): t(a + "q_proj.weight").T.reshape(e, h, d),
                ("attn", "key", "kernel"): t(a + "k_proj.weight").T.reshape(e, k, d),
                ("attn", "value", "kernel"): t(a + "v_proj.weight").T.reshape(e, k, d),
                ("attn", "out", "kernel"): t(a + "o_proj.weight").T.reshape(h, d, e),
                ("mlp", "wi_0", "kernel"): t(m + "gate_proj.weight").T,
                ("mlp", "wi_1", "kernel"): t(m + "up_proj.weight").T,
                ("mlp", "wo", "kernel"): t(m + "down_proj.weight").T,
            }
            if cfg.attention_use_bias:
                layer[("attn", "query", "bias")] = t(a + "q_proj.bias").reshape(h, d)
                layer[("attn", "key", "bias")] = t(a + "k_proj.bias").reshape(k, d)
                layer[("attn", "value", "bias")] = t(a + "v_proj.bias").reshape(k, d)
                layer[("attn", "out", "bias")] = t(a + "o_proj.bias")
            if cfg.mlp_use_bias:
                for ours, theirs in (("wi_0", "gate_proj"), ("wi_1", "up_proj"), ("wo", "down_proj")):
                    layer[("mlp", ours, "bias")] = t(m + theirs + ".bias")
            layers.append(layer)
    if not cfg.tie_embeddings:
        top[("lm_head", "kernel")] = t("lm_head.weight").T
    return top, layers


def _export_tensors(arch: str, cfg: ModelConfig, top: dict, layers: list[dict]) -> dict[str, np.ndarray]:
    """HF name -> array, from our parameters split into top-level and per-layer flat dicts."""
    e, h, k, d = cfg.embed_dim, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
    out = {}
    if arch == "gpt2":
        out["transformer.wte.weight"] = top[("embed", "embedding")]
        out["transformer.wpe.weight"] = top[("pos_embed",)]
        out["transformer.ln_f.weight"], out["transformer.ln_f.bias"] = top[("ln_f", "scale")], top[("ln_f", "bias")]
        for i, L in enumerate(layers):
            p = f"transformer.h.{i}."
            out[p + "ln_1.weight"], out[p + "ln_1.bias"] = L[("ln_1", "scale")], L[("ln_1", "bias")]
            out[p + "ln_2.weight"], out[p + "ln_2.bias"] = L[("ln_2", "scale")], L[("ln_2", "bias")]
            names = ("query", "key", "value")
            out[p + "attn.c_attn.weight"] = np.concatenate(
                [L[("attn", n, "kernel")].reshape(e, h * d) for n in names], axis=1
            )
            out[p + "attn.c_attn.bias"] = np.concatenate([L[("attn", n, "bias")].reshape(h * d) for n in names])
            out[p + "attn.c_proj.weight"] = L[("attn", "out", "kernel")].reshape(h * d, e)
            out[p + "attn.c_proj.bias"] = L[("attn", "out", "bias")]
            out[p + "mlp.c_fc.weight"], out[p + "mlp.c_fc.bias"] = L[("mlp", "wi", "kernel")], L[("mlp", "wi", "bias")]
            out[p + "mlp.c_proj.weight"], out[p + "mlp.c_proj.bias"] = (
                L[("mlp", "wo", "kernel")],
                L[("mlp", "wo", "bias")],
            )
    else:
        out["model.embed_tokens.weight"] = top[("embed", "embedding")]
        out["model.norm.weight"] = top[("ln_f", "scale")]
        for i, L in enumerate(layers):
            p = f"model.layers.{i}."
            a, m = p + "self_attn.", p + "mlp."
            out[p + "input_layernorm.weight"] = L[("ln_1", "scale")]
            out[p + "post_attention_layernorm.weight"] = L[("ln_2", "scale")]
            out[a + "q_proj.weight"] = L[("attn", "query", "kernel")].reshape(e, h * d).T
            out[a + "k_proj.weight"] = L[("attn", "key", "kernel")].reshape(e, k * d).T
            out[a + "v_proj.weight"] = L[("attn", "value", "kernel")].reshape(e, k * d).T
            out[a + "o_proj.weight"] = L[("attn", "out", "kernel")].reshape(h * d, e).T
            out[m + "gate_proj.weight"] = L[("mlp", "wi_0", "kernel")].T
            out[m + "up_proj.weight"] = L[("mlp", "wi_1", "kernel")].T
            out[m + "down_proj.weight"] = L[("mlp", "wo", "kernel")].T
            if cfg.attention_use_bias:
                for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"), ("out", "o_proj")):
                    out[a + theirs + ".bias"] = L[("attn", ours, "bias")].reshape(-1)
            if cfg.mlp_use_bias:
                for ours, theirs in (("wi_0", "gate_proj"), ("wi_1", "up_proj"), ("wo", "down_proj")):
                    out[m + theirs + ".bias"] = L[("mlp", ours, "bias")]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = top[("lm_head", "kernel")].T
    return out


def _ignorable(arch: str, name: str, cfg: ModelConfig) -> bool:
    """Buffers some checkpoints carry that are not parameters (causal masks, rotary tables)."""
    if arch == "gpt2" and (name.endswith(".attn.bias") or name.endswith(".attn.masked_bias")):
        return True
    if name.endswith("rotary_emb.inv_freq"):
        return True
    return cfg.tie_embeddings and name == "lm_head.weight"  # a tied head is the embedding


class _Stacked:
    """A lazy [layers, ...] stack of per-layer views, sliced shard by shard (for nn.scan params)."""

    def __init__(self, views: list):
        self.views = views
        self.shape = (len(views),) + tuple(views[0].shape)

    def __getitem__(self, index):
        index = index if isinstance(index, tuple) else (index,)
        rows = range(len(self.views))[index[0]]
        return np.stack([np.asarray(self.views[i][index[1:]]) for i in rows])


# ----------------------------------------------------------------------------------------------
# Import


abstract_params = family_lib.abstract_params


def default_mesh() -> Mesh:
    """One device, like `from_pretrained` without a device map; pass a mesh to shard instead."""
    return Mesh(np.asarray(jax.local_devices()[:1]).reshape(1, 1, 1), sharding.MESH_AXES)


def load_params(
    hf_dir: str, cfg: ModelConfig, mesh: Mesh | None = None, rules=None, hf_cfg: dict | None = None
) -> dict:
    """The checkpoint's weights as `cfg`'s param tree, each array placed straight into its shards.

    Each device's shard is sliced from the memory-mapped files (`make_array_from_callback`) on the
    shardings that the model's logical axis names get under `rules` on `mesh`.
    """
    hf_cfg = read_config(hf_dir) if hf_cfg is None else hf_cfg
    arch = architecture(hf_cfg)
    mesh = default_mesh() if mesh is None else mesh
    rules = sharding.logical_rules() if rules is None else rules
    files = SafetensorsDir(hf_dir)
    prefix = _name_prefix(arch, files.tensors)
    used, missing = set(), []

    def t(name):
        if name not in files.tensors:
            missing.append(name)
            return np.zeros((0,), np.float32)
        used.add(name)
        return files.tensors[name]

    # Shapes are checked below, against the model; the views only need to be well-formed first.
    try:
        top, layers = _import_views(arch, cfg, t, prefix)
    except ValueError as err:  # a reshape that does not fit: the config disagrees with the tensors
        if not missing:
            raise HFError(f"{hf_dir}: the tensors do not fit config.json ({err})") from None
    if missing:
        raise HFError(
            f"{hf_dir} lacks tensors a {arch} model with this config.json needs: {missing[:8]}"
            + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        )
    unused = sorted(n for n in files.tensors if n not in used and not _ignorable(arch, n, cfg))
    if unused:
        raise HFError(f"{hf_dir} has tensors the {arch} layout does not use (an unsupported variant?): {unused[:8]}")

    views = dict(top)
    for i, layer in enumerate(layers):
        for path, view in layer.items():
            if cfg.scan_layers:
                views.setdefault(("layers",) + path, []).append(view)
            else:
                views[(f"layers_{i}",) + path] = view
    if cfg.scan_layers:
        views = {p: _Stacked(v) if p[0] == "layers" else v for p, v in views.items()}

    model = TransformerLM(cfg)
    boxed = abstract_params(model)
    shardings = traverse_util.flatten_dict(sharding.boxed_shardings(boxed, mesh, rules))
    targets = traverse_util.flatten_dict(nn.meta.unbox(boxed))
    if set(targets) != set(views):
        raise HFError(
            f"internal layout mismatch: model params {sorted(set(targets) ^ set(views))} have no tensor mapping"
        )
    out = {}
    for path, target in targets.items():
        view, sh = views[path], shardings[path]
        name = "/".join(path)
        if tuple(view.shape) != tuple(target.shape):
            raise HFError(
                f"{hf_dir}: parameter {name} should be {tuple(target.shape)} for this config.json but the "
                f"checkpoint gives {tuple(view.shape)}"
            )
        for dim, (size, axes) in enumerate(zip(target.shape, sh.spec)):
            parts = int(np.prod([mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ())]))
            if size % parts:
                raise HFError(
                    f"parameter {name} dim {dim} (size {size}) does not split over mesh axes {axes} "
                    f"({parts} devices); choose mesh sizes that divide it"
                )
        dtype = target.dtype
        out[path] = jax.make_array_from_callback(
            target.shape, sh, lambda index, view=view, dtype=dtype: np.asarray(view[index], dtype=dtype)
        )
    return traverse_util.unflatten_dict(out)


def _name_prefix(arch: str, tensors: dict) -> str:
    """'transformer.' / 'model.' as transformers saves, '' for the bare-backbone names of old uploads."""
    want = "transformer." if arch == "gpt2" else "model."
    probe = "wte.weight" if arch == "gpt2" else "embed_tokens.weight"
    return want if want + probe in tensors or probe not in tensors else ""


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
# Export


def hf_tensors(cfg: ModelConfig, params: Any) -> dict[str, np.ndarray]:
    """Our params (jax or numpy, boxed or not) -> {HF tensor name: host numpy array}."""
    flat = traverse_util.flatten_dict(jax.device_get(nn.meta.unbox(params)))
    flat = {p: np.asarray(v) for p, v in flat.items()}
    if cfg.scan_layers:
        stacked = {p[1:]: v for p, v in flat.items() if p[0] == "layers"}
        layers = [{p: v[i] for p, v in stacked.items()} for i in range(cfg.num_layers)]
    else:
        layers = [{p[1:]: v for p, v in flat.items() if p[0] == f"layers_{i}"} for i in range(cfg.num_layers)]
    top = {p: v for p, v in flat.items() if not p[0].startswith("layers")}
    return _export_tensors(_export_architecture(cfg), cfg, top, layers)


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
    import safetensors.numpy

    tensors = hf_tensors(cfg, params)
    if dtype is not None:
        tensors = {n: v.astype(_np_dtype(dtype)) for n, v in tensors.items()}
    tensors = {n: np.ascontiguousarray(v) for n, v in tensors.items()}
    stored = {_DTYPE_NAMES.get(v.dtype, str(v.dtype)) for v in tensors.values()}
    os.makedirs(hf_dir, exist_ok=True)
    for stale in glob.glob(os.path.join(hf_dir, "*.safetensors")) + glob.glob(os.path.join(hf_dir, INDEX_FILE)):
        os.remove(stale)
    for name, src in (extra_files or {}).items():
        shutil.copyfile(src, os.path.join(hf_dir, name))

    shards, size = [[]], 0
    for name in sorted(tensors):
        nbytes = tensors[name].nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    meta = {"format": "pt"}  # transformers refuses safetensors files without it
    if len(shards) == 1:
        safetensors.numpy.save_file(tensors, os.path.join(hf_dir, SAFE_FILE), metadata=meta)
    else:
        weight_map = {}
        for i, names in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            safetensors.numpy.save_file({n: tensors[n] for n in names}, os.path.join(hf_dir, fname), metadata=meta)
            weight_map.update({n: fname for n in names})
        total = sum(v.nbytes for v in tensors.values())
        _write_json(os.path.join(hf_dir, INDEX_FILE), {"metadata": {"total_size": total}, "weight_map": weight_map})

    eos = getattr(tokenizer, "eos_id", None)
    hf_cfg = hf_config_from_model(cfg, base_config, eos)
    hf_cfg["dtype"] = stored.pop() if len(stored) == 1 else cfg.param_dtype
    _write_json(os.path.join(hf_dir, "config.json"), hf_cfg)
    if isinstance(tokenizer, tok_lib.HFTokenizer):
        with open(os.path.join(hf_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
            f.write(tokenizer.json_str)
        if not os.path.exists(os.path.join(hf_dir, "tokenizer_config.json")):
            tc = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.max_len}
            if eos is not None:
                tc["eos_token"] = tokenizer.tok.id_to_token(int(eos))
            _write_json(os.path.join(hf_dir, "tokenizer_config.json"), tc)


def _np_dtype(name: str):
    table = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
    if name not in table:
        raise BadValue(f"dtype={name!r}: use one of {sorted(table)}")
    return table[name]


def _write_json(path: str, obj: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Run directories


def run_config(path: str) -> ml_collections.ConfigDict:
    """`base_config()` with the model keys of a Hugging Face directory or of a run made by `import_run`.

    The tokenizer is the directory's tokenizer.json (kind 'hf'); data.seq_len is capped at max_len.
    The rest (data source, optimizer, steps) keeps the defaults for configs to set.
    """
    found = read_config(path)
    c = config_lib.base_config()
    if "architectures" in found:  # a Hugging Face directory
        keys = dataclasses.asdict(model_config_from_hf(found, preset=f"hf:{architecture(found)}"))
        tokenizer_path = os.path.join(path, "tokenizer.json")
    elif "model" in found:  # a run directory
        keys = dict(config_lib.upgrade(found)["model"])
        tokenizer_path = os.path.join(path, "tokenizer", tok_lib.HFTokenizer.FILE)
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


def import_run(
    hf_dir: str, workdir: str, config: ml_collections.ConfigDict | None = None, log=print
) -> ml_collections.ConfigDict:
    """Makes `workdir` a run that `llm_jax.main` resumes from the imported weights.

    Writes workdir/config.json (`config`, default `run_config(hf_dir)`), workdir/tokenizer/ (the HF
    tokenizer.json), workdir/hf/ (the original config.json and other small files, reused on export)
    and workdir/checkpoints/0 (TrainState(step=0, params, fresh opt_state), sharded on `config.mesh`).
    """
    from llm_jax import checkpoint as ckpt_lib
    from llm_jax import optim, train

    hf_cfg = read_config(hf_dir)
    config = run_config(hf_dir) if config is None else config
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
        raise AlreadyExists(f"{ckpt_dir} already has checkpoints; import into a new workdir")
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
    cfg = model_config_from_hf(
        hf_cfg,
        scan_layers=config.model.scan_layers,
        remat=config.model.remat,
        attention=config.model.attention,
        dtype=config.model.dtype,
        param_dtype=config.model.param_dtype,
        init_std=config.model.init_std,
        dropout_rate=config.model.dropout_rate,
        preset=config.model.preset,
    )
    run_cfg = config_lib.model_config(config, tokenizer.vocab_size)
    if run_cfg != cfg:
        diff = {
            f.name: (getattr(run_cfg, f.name), getattr(cfg, f.name))
            for f in dataclasses.fields(cfg)
            if getattr(run_cfg, f.name) != getattr(cfg, f.name)
        }
        raise HFError(f"config.model disagrees with {hf_dir}/config.json on (config, checkpoint): {diff}")

    tok_dir = os.path.join(workdir, "tokenizer")
    config = ml_collections.ConfigDict(config.to_dict())
    config.data.tokenizer_path = os.path.join(tok_dir, tok_lib.HFTokenizer.FILE)
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.logical_rules(config)
    log(
        f"importing {hf_dir} ({architecture(hf_cfg)}, {cfg.num_layers} layers, vocab {cfg.vocab_size}) "
        f"onto mesh {dict(mesh.shape)}"
    )
    params = load_params(hf_dir, cfg, mesh, rules, hf_cfg)

    tx = optim.make_optimizer(config.optim)
    _, state_sh = train.abstract_state(family_lib.build(cfg), tx, mesh, rules, 1)
    opt_state = jax.jit(tx.init, out_shardings=state_sh.opt_state)(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), state_sh.step)
    state = train.TrainState(step=step, params=params, opt_state=opt_state)

    workdir_lib.prepare(workdir, config)
    if jax.process_index() == 0:
        tokenizer.save(tok_dir)
        os.makedirs(os.path.join(workdir, "hf"), exist_ok=True)
        for name in CARRIED_FILES:
            if os.path.isfile(os.path.join(hf_dir, name)):
                shutil.copyfile(os.path.join(hf_dir, name), os.path.join(workdir, "hf", name))
    mngr = ckpt_lib.manager(workdir, config.train.keep_checkpoints, async_save=False)
    # The context it was pre-trained at: what decoding may use (llm_jax.run.trained_context).
    ckpt_lib.save(mngr, 0, state, {"step": 0, "trained_context": cfg.max_len})
    mngr.wait_until_finished()
    mngr.close()
    log(f"wrote {workdir}: config.json, tokenizer/, hf/, checkpoints/0")
    return config


def export_run(workdir: str, hf_dir: str, step: int | None = None, dtype: str | None = None, log=print) -> None:
    """Writes a run's checkpoint (default: the latest) as a Hugging Face directory."""
    from llm_jax.run import load_run

    run = load_run(workdir, step, on_host=True)
    cfg, params, tokenizer, step = run.model.cfg, run.params, run.tokenizer, run.step
    carried = os.path.join(workdir, "hf")
    base = None
    if os.path.isfile(os.path.join(carried, "config.json")):
        with open(os.path.join(carried, "config.json")) as f:
            base = json.load(f)
    extra = {n: os.path.join(carried, n) for n in CARRIED_FILES[1:] if os.path.isfile(os.path.join(carried, n))}
    save_pretrained(hf_dir, cfg, params, tokenizer=tokenizer, base_config=base, dtype=dtype, extra_files=extra)
    log(f"wrote {hf_dir} from {workdir}/checkpoints/{step} ({_export_architecture(cfg)})")
