"""Llama-shaped decoders as data: LlamaForCausalLM (incl. Llama 3.x rope scaling), MistralForCausalLM,
Qwen2ForCausalLM and Qwen3ForCausalLM, each a `Spec` (see hf_table.py) over one shared tensor table.

All four are RoPE + RMSNorm + SwiGLU + grouped-query attention with nn.Linear weights ([out, in]);
they differ in config only: Mistral's sliding window, Qwen2's q/k/v biases without an output bias,
Qwen3's QK-norm and decoupled head_dim, Qwen's optional sliding-window layers.
"""

from __future__ import annotations

from llm_jax.interop.hf_table import (
    HFError,
    Spec,
    Tensor,
    attention_bias,
    fixed,
    get,
    layer_pattern,
    layer_types,
    mlp_bias,
    out_bias,
    qk_norm,
    require,
    untied,
    window_fields,
)
from llm_jax.models.config import ModelConfig

# ----------------------------------------------------------------------------------------------
# RoPE: config.json <-> ModelConfig


def rope_fields(hf_cfg: dict, default_theta: float = 10000.0) -> dict:
    """ModelConfig rope fields from either `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling`."""
    field = "rope_parameters" if hf_cfg.get("rope_parameters") else "rope_scaling"
    params = dict(hf_cfg.get(field) or {})
    theta = float(params.get("rope_theta", get(hf_cfg, "rope_theta", default_theta)))
    kind = params.get("rope_type", params.get("type", "default"))
    partial = params.get("partial_rotary_factor", get(hf_cfg, "partial_rotary_factor", 1.0))
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


def rope_parameters(cfg: ModelConfig) -> dict:
    """The `rope_parameters` dict (transformers 5) of `cfg`'s global layers."""
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
    return rope


# ----------------------------------------------------------------------------------------------
# config.json <-> ModelConfig


def decoder_fields(hf_cfg: dict, act: str = "silu", act_key: str = "hidden_act", head_dim=None) -> dict:
    """The fields every Llama-shaped config.json shares (sizes, RMSNorm eps, RoPE), with `act` the
    only activation accepted under `act_key`."""
    require(hf_cfg, act_key, lambda v: v == act, act, f"llm_jax's gated MLP for this architecture uses {act!r}")
    heads = int(hf_cfg["num_attention_heads"])
    return dict(
        vocab_size=int(hf_cfg["vocab_size"]),
        num_layers=int(hf_cfg["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(get(hf_cfg, "num_key_value_heads", heads)),
        embed_dim=int(hf_cfg["hidden_size"]),
        mlp_dim=int(hf_cfg["intermediate_size"]),
        head_dim=int(get(hf_cfg, "head_dim", head_dim or int(hf_cfg["hidden_size"]) // heads)),
        max_len=int(get(hf_cfg, "max_position_embeddings", 2048)),
        positions="rope",
        norm="rmsnorm",
        norm_eps=float(get(hf_cfg, "rms_norm_eps", 1e-6)),
        use_bias=False,
        mlp_bias=bool(get(hf_cfg, "mlp_bias", False)),
        tie_embeddings=bool(get(hf_cfg, "tie_word_embeddings", False)),
    )


def decoder_to_hf(cfg: ModelConfig, architecture: str, model_type: str) -> dict:
    """The config.json fields every Llama-shaped architecture shares."""
    rope = rope_parameters(cfg)
    return dict(
        architectures=[architecture],
        model_type=model_type,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.embed_dim,
        intermediate_size=cfg.mlp_dim,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.dim_per_head,
        max_position_embeddings=cfg.max_len,
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        attention_dropout=0.0,
        # Both spellings: transformers >= 5 reads rope_parameters, 4.x reads rope_theta + rope_scaling.
        rope_parameters=rope,
        rope_theta=cfg.rope_theta,
        rope_scaling=None if rope["rope_type"] == "default" else dict(rope),
    )


def _llama_from_hf(hf_cfg: dict) -> dict:
    bias = bool(get(hf_cfg, "attention_bias", False))
    return {**decoder_fields(hf_cfg), "mlp_activation": "swiglu", "attention_bias": bias, **rope_fields(hf_cfg)}


def _llama_to_hf(cfg: ModelConfig) -> dict:
    return {
        **decoder_to_hf(cfg, "LlamaForCausalLM", "llama"),
        "hidden_act": "silu",
        "attention_bias": cfg.attention_use_bias,
        "mlp_bias": cfg.mlp_use_bias,
        "pretraining_tp": 1,
    }


def _llama_requires(cfg: ModelConfig) -> dict:
    return {
        **fixed(cfg),
        "positions": (cfg.positions, "rope"),
        "norm": (cfg.norm, "rmsnorm"),
        "mlp_activation": (cfg.mlp_activation, "swiglu"),
        "attention_out_bias": (cfg.attention_out_use_bias, cfg.attention_use_bias),
    }


def _mistral_from_hf(hf_cfg: dict) -> dict:
    window = get(hf_cfg, "sliding_window")
    pattern = "l" if window else "g"  # Mistral's window (when set) applies to every layer
    fields = {**decoder_fields(hf_cfg), "mlp_activation": "swiglu", "attention_bias": False, **rope_fields(hf_cfg)}
    return {**fields, **window_fields(pattern, window)}


def _mistral_to_hf(cfg: ModelConfig) -> dict:
    out = decoder_to_hf(cfg, "MistralForCausalLM", "mistral")
    return {**out, "hidden_act": "silu", "sliding_window": cfg.sliding_window}


def _mistral_requires(cfg: ModelConfig) -> dict:
    return {
        **fixed(cfg, free=("layer_pattern",)),
        "layer_pattern": (cfg.layer_pattern in ("g", "l"), True),
        "positions": (cfg.positions, "rope"),
        "norm": (cfg.norm, "rmsnorm"),
        "mlp_activation": (cfg.mlp_activation, "swiglu"),
        "attention_bias": (cfg.attention_use_bias, False),
        "attention_out_bias": (cfg.attention_out_use_bias, False),
        "mlp_bias": (cfg.mlp_use_bias, False),
    }


def _qwen_layers(hf_cfg: dict) -> dict:
    """Qwen's sliding-window layers: `layer_types`, else `use_sliding_window` from layer `max_window_layers` on."""
    n = int(hf_cfg["num_hidden_layers"])
    window = get(hf_cfg, "sliding_window") if get(hf_cfg, "use_sliding_window", False) else None
    types = hf_cfg.get("layer_types")
    if not types:
        first = int(get(hf_cfg, "max_window_layers", n))
        types = ["sliding_attention" if window and i >= first else "full_attention" for i in range(n)]
    return window_fields(layer_pattern(types), window)


def _qwen_to_hf(cfg: ModelConfig) -> dict:
    local = "l" in cfg.layer_pattern
    return dict(
        hidden_act="silu",
        use_sliding_window=local,
        sliding_window=cfg.sliding_window,
        max_window_layers=cfg.num_layers,  # only read without layer_types; layer_types says which
        layer_types=layer_types(cfg),
    )


def _qwen2_from_hf(hf_cfg: dict) -> dict:
    fields = {**decoder_fields(hf_cfg), "mlp_activation": "swiglu", **rope_fields(hf_cfg), **_qwen_layers(hf_cfg)}
    return {**fields, "attention_bias": True, "attention_out_bias": False}  # Qwen2: q/k/v biases, none on o_proj


def _qwen2_to_hf(cfg: ModelConfig) -> dict:
    return {**decoder_to_hf(cfg, "Qwen2ForCausalLM", "qwen2"), **_qwen_to_hf(cfg)}


def _qwen_requires(cfg: ModelConfig, **wanted) -> dict:
    return {
        **fixed(cfg, free=("layer_pattern",), **wanted),
        "positions": (cfg.positions, "rope"),
        "norm": (cfg.norm, "rmsnorm"),
        "mlp_activation": (cfg.mlp_activation, "swiglu"),
        "mlp_bias": (cfg.mlp_use_bias, False),
    }


def _qwen2_requires(cfg: ModelConfig) -> dict:
    return {
        **_qwen_requires(cfg),
        "attention_bias": (cfg.attention_use_bias, True),
        "attention_out_bias": (cfg.attention_out_use_bias, False),
    }


def _qwen3_from_hf(hf_cfg: dict) -> dict:
    bias = bool(get(hf_cfg, "attention_bias", False))
    fields = {**decoder_fields(hf_cfg, head_dim=128), "mlp_activation": "swiglu", **rope_fields(hf_cfg)}
    return {**fields, **_qwen_layers(hf_cfg), "attention_bias": bias, "qk_norm": True}


def _qwen3_to_hf(cfg: ModelConfig) -> dict:
    out = {**decoder_to_hf(cfg, "Qwen3ForCausalLM", "qwen3"), **_qwen_to_hf(cfg)}
    return {**out, "attention_bias": cfg.attention_use_bias}


def _qwen3_requires(cfg: ModelConfig) -> dict:
    return {
        **_qwen_requires(cfg, qk_norm=True),
        "attention_out_bias": (cfg.attention_out_use_bias, cfg.attention_use_bias),
    }


# ----------------------------------------------------------------------------------------------
# The tensor table (norm rows differ: Gemma's post_attention_layernorm is a post-norm, see hf_gemma.py)

_ATTN, _MLP = "model.layers.{i}.self_attn.", "model.layers.{i}.mlp."
LLAMA_NORMS = (
    Tensor("model.layers.{i}.input_layernorm.weight", "ln_1/scale"),
    Tensor("model.layers.{i}.post_attention_layernorm.weight", "ln_2/scale"),
)


def decoder_table(norms: tuple[Tensor, ...], mlp_biases: bool = True) -> tuple[Tensor, ...]:
    """The tensor table of a Llama-shaped decoder whose per-layer norms are `norms` (and, where the
    architecture has them, optional MLP biases)."""
    biases = (
        Tensor(_MLP + "gate_proj.bias", "mlp/wi_0/bias", when=mlp_bias),
        Tensor(_MLP + "up_proj.bias", "mlp/wi_1/bias", when=mlp_bias),
        Tensor(_MLP + "down_proj.bias", "mlp/wo/bias", when=mlp_bias),
    )
    return (
        Tensor("model.embed_tokens.weight", "embed/embedding"),
        Tensor("model.norm.weight", "ln_f/scale"),
        *norms,
        Tensor(_ATTN + "q_proj.weight", "attn/query/kernel", "(h d) e -> e h d"),
        Tensor(_ATTN + "k_proj.weight", "attn/key/kernel", "(k d) e -> e k d"),
        Tensor(_ATTN + "v_proj.weight", "attn/value/kernel", "(k d) e -> e k d"),
        Tensor(_ATTN + "o_proj.weight", "attn/out/kernel", "e (h d) -> h d e"),
        Tensor(_ATTN + "q_proj.bias", "attn/query/bias", "(h d) -> h d", when=attention_bias),
        Tensor(_ATTN + "k_proj.bias", "attn/key/bias", "(k d) -> k d", when=attention_bias),
        Tensor(_ATTN + "v_proj.bias", "attn/value/bias", "(k d) -> k d", when=attention_bias),
        Tensor(_ATTN + "o_proj.bias", "attn/out/bias", when=out_bias),
        Tensor(_ATTN + "q_norm.weight", "attn/query_norm/scale", when=qk_norm),
        Tensor(_ATTN + "k_norm.weight", "attn/key_norm/scale", when=qk_norm),
        Tensor(_MLP + "gate_proj.weight", "mlp/wi_0/kernel", "m e -> e m"),
        Tensor(_MLP + "up_proj.weight", "mlp/wi_1/kernel", "m e -> e m"),
        Tensor(_MLP + "down_proj.weight", "mlp/wo/kernel", "e m -> m e"),
        *(biases if mlp_biases else ()),
        Tensor("lm_head.weight", "lm_head/kernel", "v e -> e v", when=untied),
    )


_TABLE = decoder_table(LLAMA_NORMS)
_BUFFERS = ("rotary_emb.inv_freq",)  # rotary frequency tables some conversions saved with the weights
_COMMON = dict(backbone="model.", table=_TABLE, buffers=_BUFFERS)

LLAMA = Spec(
    architecture="LlamaForCausalLM",
    model_type="llama",
    from_hf=_llama_from_hf,
    to_hf=_llama_to_hf,
    requires=_llama_requires,
    needs="rope, rmsnorm, swiglu, global layers, no QK-norm",
    **_COMMON,
)
MISTRAL = Spec(
    architecture="MistralForCausalLM",
    model_type="mistral",
    from_hf=_mistral_from_hf,
    to_hf=_mistral_to_hf,
    requires=_mistral_requires,
    needs="rope, rmsnorm, swiglu, no biases, all layers global or all local",
    **_COMMON,
)
QWEN2 = Spec(
    architecture="Qwen2ForCausalLM",
    model_type="qwen2",
    from_hf=_qwen2_from_hf,
    to_hf=_qwen2_to_hf,
    requires=_qwen2_requires,
    needs="rope, rmsnorm, swiglu, q/k/v biases without an output bias",
    **_COMMON,
)
QWEN3 = Spec(
    architecture="Qwen3ForCausalLM",
    model_type="qwen3",
    from_hf=_qwen3_from_hf,
    to_hf=_qwen3_to_hf,
    requires=_qwen3_requires,
    needs="rope, rmsnorm, swiglu, QK-norm",
    **_COMMON,
)
