"""Hugging Face architectures as data: one `Spec` per architecture, read by both import and export.

A spec holds
- the config.json <-> ModelConfig mapping: `from_hf(config.json) -> ModelConfig keyword arguments`
  (an HFError names any field whose value llm_jax cannot reproduce exactly, never a silent guess),
  `to_hf(cfg) -> config.json fields`, and `requires(cfg)`: the ModelConfig fields the architecture
  fixes, as {field: (value, wanted)}; export writes the first spec that `cfg` fits;
- one tensor table of `Tensor(HF name, our parameter path(s), layout)` entries. The layout is an
  einops-style rearrangement, 'HF axes -> our axes', e.g. '(h d) e -> e h d' for a q_proj weight
  [h*d, e] that is our query kernel [e, h, d]. Import reads it left to right (reshape, transpose:
  views into the memory-mapped file, nothing copied), export right to left. A fused HF tensor maps
  to several of ours along the letter `n` (GPT-2's c_attn: 'e (n h d) -> n e h d' is q, k, v).

Letters: e = embed_dim, h = num_heads, k = kv heads, d = head dim, m = mlp_dim, v = vocab_size,
n = how many of our parameters a fused tensor holds. Names with '{i}' repeat for every layer, and
their paths are relative to the layer ('layers_{i}/...', or stacked on 'layers/...' when scanned).

A new architecture is one more `Spec` (its three config functions and its table) added to `SPECS`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from llm_jax.models.model import ModelConfig
from llm_jax.runtime.errors import BadValue


class HFError(BadValue):
    """A Hugging Face directory or config this codebase cannot convert exactly."""


def _always(cfg: ModelConfig) -> bool:
    return True


def _untied(cfg: ModelConfig) -> bool:
    return not cfg.tie_embeddings


def _attention_bias(cfg: ModelConfig) -> bool:
    return cfg.attention_use_bias


def _mlp_bias(cfg: ModelConfig) -> bool:
    return cfg.mlp_use_bias


def sizes(cfg: ModelConfig) -> dict[str, int]:
    """The size of each layout letter under `cfg`."""
    return {
        "e": cfg.embed_dim,
        "h": cfg.num_heads,
        "k": cfg.kv_heads,
        "d": cfg.dim_per_head,
        "m": cfg.mlp_dim,
        "v": cfg.vocab_size,
    }


def _axes(side: str) -> tuple[str, ...]:
    """'e (n h d)' -> ('e', 'nhd'): the letters that make up each axis."""
    out, group = [], None
    for token in side.replace("(", " ( ").replace(")", " ) ").split():
        if token == "(":
            group = ""
        elif token == ")":
            out.append(group)
            group = None
        elif group is not None:
            group += token
        else:
            out.append(token)
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One row of a tensor table: an HF tensor and the parameter(s) of ours it holds."""

    hf: str  # the name transformers saves it under; '{i}' is the layer index
    ours: str | tuple[str, ...]  # our parameter path 'attn/query/kernel', or several for a fused tensor
    layout: str | None = None  # 'HF axes -> our axes' (module docstring); None: the very same array
    when: Callable[[ModelConfig], bool] = _always  # whether `cfg` has this tensor (biases, untied head)
    _src: tuple[str, ...] = dataclasses.field(init=False, repr=False)  # HF axes' letters: ('e', 'nhd')
    _dst: str = dataclasses.field(init=False, repr=False)  # our axes, a letter each: 'nehd'

    def __post_init__(self):
        ours = (self.ours,) if isinstance(self.ours, str) else tuple(self.ours)
        src, dst = (_axes(side) for side in self.layout.split("->")) if self.layout else ((), ())
        # A typo in a table is a bug of llm_jax, not a user error: it fails when this module is imported.
        if self.layout and (sorted("".join(src)) != sorted(dst) or any(len(a) != 1 for a in dst)):
            raise ValueError(f"{self.hf}: layout {self.layout!r} must rearrange the same letters, one per our axis")
        if (len(ours) > 1) != ("n" in dst) or (len(ours) > 1 and dst[0] != "n"):
            raise ValueError(f"{self.hf}: {len(ours)} parameters need a layout whose leading axis of ours is n")
        object.__setattr__(self, "ours", ours)
        object.__setattr__(self, "_src", src)
        object.__setattr__(self, "_dst", "".join(dst))

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf

    def paths(self) -> list[tuple[str, ...]]:
        """Our parameter path(s) as tuples of keys."""
        return [tuple(p.split("/")) for p in self.ours]

    def hf_shape(self, dims: dict[str, int]) -> tuple[int, ...] | None:
        """The HF tensor's shape under `dims` (None without a layout: then it is our parameter's)."""
        dims = {**dims, "n": len(self.ours)}
        return tuple(math.prod(dims[c] for c in axis) for axis in self._src) if self.layout else None

    def to_ours(self, x: np.ndarray, dims: dict[str, int]) -> list[np.ndarray]:
        """The HF tensor -> our parameter(s), as views of `x` (a memory map stays a memory map).

        E.g. '(h d) e -> e h d': x [h*d, e] -> [[e, h, d]]; 'e (n h d) -> n e h d': x [e, 3*h*d] ->
        three [e, h, d].
        """
        if not self.layout:
            return [x]
        letters = "".join(self._src)
        dims = {**dims, "n": len(self.ours)}
        y = x.reshape([dims[c] for c in letters]).transpose([letters.index(c) for c in self._dst])
        return list(y) if len(self.ours) > 1 else [y]

    def to_hf(self, arrays: list[np.ndarray], dims: dict[str, int]) -> np.ndarray:
        """Our parameter(s) -> the HF tensor: the inverse of `to_ours` (three [e, h, d] -> [e, 3*h*d])."""
        if not self.layout:
            return arrays[0]
        letters = "".join(self._src)
        x = np.stack(arrays) if len(self.ours) > 1 else arrays[0]
        return x.transpose([self._dst.index(c) for c in letters]).reshape(self.hf_shape(dims))


@dataclasses.dataclass(frozen=True)
class Spec:
    """Everything llm_jax knows about one Hugging Face architecture (module docstring)."""

    architecture: str  # config.json 'architectures' entry, e.g. 'GPT2LMHeadModel'
    model_type: str  # config.json 'model_type'; also our preset name 'hf:<model_type>'
    from_hf: Callable[[dict], dict]  # config.json -> ModelConfig kwargs (function-defining fields)
    to_hf: Callable[[ModelConfig], dict]  # ModelConfig -> config.json fields
    requires: Callable[[ModelConfig], dict]  # {ModelConfig field: (value, wanted)} this architecture fixes
    needs: str  # `requires` in words, for the export error
    backbone: str  # prefix of the backbone's tensor names; some old uploads save them without it
    table: tuple[Tensor, ...]
    buffers: tuple[str, ...] = ()  # suffixes of non-parameter tensors some checkpoints carry (masks, tables)
    tied_head: str = "lm_head.weight"  # a copy of the embedding some tied checkpoints save anyway

    def misfits(self, cfg: ModelConfig) -> list[str]:
        """ModelConfig fields of `cfg` this architecture cannot express ([] = exportable as this)."""
        return [k for k, (value, wanted) in self.requires(cfg).items() if value != wanted]

    def ignorable(self, name: str, cfg: ModelConfig) -> bool:
        """Whether a checkpoint tensor that the table does not read may be left out."""
        return name.endswith(self.buffers) or (cfg.tie_embeddings and name == self.tied_head)


# ----------------------------------------------------------------------------------------------
# config.json helpers


def _get(hf_cfg: dict, key: str, default=None):
    """hf_cfg[key], with `default` also for an explicit null (transformers writes nulls)."""
    value = hf_cfg.get(key, default)
    return default if value is None else value


def _require(hf_cfg: dict, key: str, ok: Callable[[Any], bool], default, why: str):
    value = _get(hf_cfg, key, default)
    if not ok(value):
        raise HFError(f"config.json {key}={value!r} is not supported: {why}")
    return value


# ----------------------------------------------------------------------------------------------
# GPT2LMHeadModel: learned positions, LayerNorm, tanh-GELU, biases everywhere; Conv1D stores [in, out].


def _gpt2_from_hf(hf_cfg: dict) -> dict:
    _require(
        hf_cfg,
        "activation_function",
        lambda v: v in ("gelu_new", "gelu_pytorch_tanh"),
        "gelu_new",
        "llm_jax's GPT-2 MLP is the tanh-approximate GELU ('gelu_new' / 'gelu_pytorch_tanh')",
    )
    _require(hf_cfg, "scale_attn_weights", lambda v: v is True, True, "attention is always scaled by 1/sqrt(head_dim)")
    _require(
        hf_cfg,
        "scale_attn_by_inverse_layer_idx",
        lambda v: v is False,
        False,
        "per-layer attention scaling is not implemented",
    )
    _require(hf_cfg, "add_cross_attention", lambda v: v is False, False, "decoder-only models have no cross-attention")
    embed = int(hf_cfg["n_embd"])
    return dict(
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


def _gpt2_to_hf(cfg: ModelConfig) -> dict:
    return dict(
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
    )


def _gpt2_requires(cfg: ModelConfig) -> dict:
    return {
        "family": (cfg.family, "lm"),
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


_QKV = ("query", "key", "value")
GPT2 = Spec(
    architecture="GPT2LMHeadModel",
    model_type="gpt2",
    from_hf=_gpt2_from_hf,
    to_hf=_gpt2_to_hf,
    requires=_gpt2_requires,
    needs="learned positions, layernorm, gelu, all biases, multi-head, no rope scaling",
    backbone="transformer.",
    table=(
        Tensor("transformer.wte.weight", "embed/embedding"),
        Tensor("transformer.wpe.weight", "pos_embed"),
        Tensor("transformer.ln_f.weight", "ln_f/scale"),
        Tensor("transformer.ln_f.bias", "ln_f/bias"),
        Tensor("transformer.h.{i}.ln_1.weight", "ln_1/scale"),
        Tensor("transformer.h.{i}.ln_1.bias", "ln_1/bias"),
        Tensor("transformer.h.{i}.ln_2.weight", "ln_2/scale"),
        Tensor("transformer.h.{i}.ln_2.bias", "ln_2/bias"),
        # c_attn is q, k and v side by side along its output axis.
        Tensor("transformer.h.{i}.attn.c_attn.weight", tuple(f"attn/{n}/kernel" for n in _QKV), "e (n h d) -> n e h d"),
        Tensor("transformer.h.{i}.attn.c_attn.bias", tuple(f"attn/{n}/bias" for n in _QKV), "(n h d) -> n h d"),
        Tensor("transformer.h.{i}.attn.c_proj.weight", "attn/out/kernel", "(h d) e -> h d e"),
        Tensor("transformer.h.{i}.attn.c_proj.bias", "attn/out/bias"),
        Tensor("transformer.h.{i}.mlp.c_fc.weight", "mlp/wi/kernel"),
        Tensor("transformer.h.{i}.mlp.c_fc.bias", "mlp/wi/bias"),
        Tensor("transformer.h.{i}.mlp.c_proj.weight", "mlp/wo/kernel"),
        Tensor("transformer.h.{i}.mlp.c_proj.bias", "mlp/wo/bias"),
        Tensor("lm_head.weight", "lm_head/kernel", "v e -> e v", when=_untied),  # nn.Linear: [out, in]
    ),
    # The causal-mask buffers older transformers versions saved with the weights.
    buffers=(".attn.bias", ".attn.masked_bias"),
)


# ----------------------------------------------------------------------------------------------
# LlamaForCausalLM: RoPE, RMSNorm, SwiGLU, grouped-query attention; nn.Linear stores [out, in].


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


def _llama_from_hf(hf_cfg: dict) -> dict:
    _require(hf_cfg, "hidden_act", lambda v: v == "silu", "silu", "llm_jax's Llama MLP is SwiGLU (silu)")
    heads = int(hf_cfg["num_attention_heads"])
    return dict(
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


def _llama_to_hf(cfg: ModelConfig) -> dict:
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
    return dict(
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
        # Both spellings: transformers >= 5 reads rope_parameters, 4.x reads rope_theta + rope_scaling.
        rope_parameters=rope,
        rope_theta=cfg.rope_theta,
        rope_scaling=None if rope["rope_type"] == "default" else dict(rope),
    )


def _llama_requires(cfg: ModelConfig) -> dict:
    return {
        "family": (cfg.family, "lm"),
        "positions": (cfg.positions, "rope"),
        "norm": (cfg.norm, "rmsnorm"),
        "mlp_activation": (cfg.mlp_activation, "swiglu"),
    }


_ATTN, _MLP = "model.layers.{i}.self_attn.", "model.layers.{i}.mlp."
LLAMA = Spec(
    architecture="LlamaForCausalLM",
    model_type="llama",
    from_hf=_llama_from_hf,
    to_hf=_llama_to_hf,
    requires=_llama_requires,
    needs="rope, rmsnorm, swiglu",
    backbone="model.",
    table=(
        Tensor("model.embed_tokens.weight", "embed/embedding"),
        Tensor("model.norm.weight", "ln_f/scale"),
        Tensor("model.layers.{i}.input_layernorm.weight", "ln_1/scale"),
        Tensor("model.layers.{i}.post_attention_layernorm.weight", "ln_2/scale"),
        Tensor(_ATTN + "q_proj.weight", "attn/query/kernel", "(h d) e -> e h d"),
        Tensor(_ATTN + "k_proj.weight", "attn/key/kernel", "(k d) e -> e k d"),
        Tensor(_ATTN + "v_proj.weight", "attn/value/kernel", "(k d) e -> e k d"),
        Tensor(_ATTN + "o_proj.weight", "attn/out/kernel", "e (h d) -> h d e"),
        Tensor(_ATTN + "q_proj.bias", "attn/query/bias", "(h d) -> h d", when=_attention_bias),
        Tensor(_ATTN + "k_proj.bias", "attn/key/bias", "(k d) -> k d", when=_attention_bias),
        Tensor(_ATTN + "v_proj.bias", "attn/value/bias", "(k d) -> k d", when=_attention_bias),
        Tensor(_ATTN + "o_proj.bias", "attn/out/bias", when=_attention_bias),
        Tensor(_MLP + "gate_proj.weight", "mlp/wi_0/kernel", "m e -> e m"),
        Tensor(_MLP + "up_proj.weight", "mlp/wi_1/kernel", "m e -> e m"),
        Tensor(_MLP + "down_proj.weight", "mlp/wo/kernel", "e m -> m e"),
        Tensor(_MLP + "gate_proj.bias", "mlp/wi_0/bias", when=_mlp_bias),
        Tensor(_MLP + "up_proj.bias", "mlp/wi_1/bias", when=_mlp_bias),
        Tensor(_MLP + "down_proj.bias", "mlp/wo/bias", when=_mlp_bias),
        Tensor("lm_head.weight", "lm_head/kernel", "v e -> e v", when=_untied),
    ),
    # Rotary frequency tables some conversions saved with the weights.
    buffers=("rotary_emb.inv_freq",),
)


# ----------------------------------------------------------------------------------------------
# Choosing a spec

SPECS = (GPT2, LLAMA)  # export writes the first one a model fits


def for_config(hf_cfg: dict) -> Spec:
    """The spec of config.json's `architectures`; anything else is an error naming it."""
    by_name = {s.architecture: s for s in SPECS}
    archs = hf_cfg.get("architectures") or []
    if len(archs) != 1 or archs[0] not in by_name:
        raise HFError(
            f"config.json architectures={archs!r} is not supported; llm_jax converts exactly one of {sorted(by_name)}"
        )
    return by_name[archs[0]]


def for_model(cfg: ModelConfig) -> Spec:
    """The first spec that computes exactly what `cfg` computes; an error listing each one's misfits."""
    misfits = {}
    for spec in SPECS:
        misfits[spec.architecture] = spec.misfits(cfg)
        if not misfits[spec.architecture]:
            return spec
    raise HFError(
        "this model matches no Hugging Face architecture llm_jax exports: "
        + "; ".join(f"as {s.architecture} its fields {misfits[s.architecture]} differ (needs {s.needs})" for s in SPECS)
    )
