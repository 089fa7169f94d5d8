"""Gemma 2 and Gemma 3 (text) as data: Gemma2ForCausalLM and Gemma3ForCausalLM `Spec`s (see hf_table.py).

Both are Llama-shaped (hf_llama.decoder_table) with Gemma's differences as ModelConfig fields:
RMSNorm times (1 + w), a post-norm after each sublayer, GeGLU (tanh GELU gate), embeddings times
sqrt(width), attention scaled by `query_pre_attn_scalar`, alternating local (sliding-window) and
global layers; Gemma 2 soft-caps attention and output logits, Gemma 3 adds QK-norm and a RoPE base
of its own for the local layers.
"""

from __future__ import annotations

from llm_jax.interop.hf_llama import decoder_fields, decoder_table, decoder_to_hf, rope_fields, rope_parameters
from llm_jax.interop.hf_table import HFError, Spec, Tensor, fixed, get, layer_pattern, layer_types, window_fields
from llm_jax.models.config import ModelConfig

_GELU = "gelu_pytorch_tanh"


def _gemma_fields(hf_cfg: dict, default_period: int) -> dict:
    """The fields Gemma 2 and 3 share; `default_period`: every how many layers one is global when
    config.json has no `layer_types` (Gemma 2: 2, Gemma 3: `sliding_window_pattern`, default 6)."""
    # transformers reads hidden_activation (older files: hidden_act); either must be the tanh GELU.
    act_key = "hidden_activation" if hf_cfg.get("hidden_activation") else "hidden_act"
    fields = decoder_fields(hf_cfg, act=_GELU, act_key=act_key, head_dim=256)
    n = fields["num_layers"]
    types = hf_cfg.get("layer_types") or [
        "sliding_attention" if (i + 1) % default_period else "full_attention" for i in range(n)
    ]
    softcaps = {
        ours: float(get(hf_cfg, theirs)) if get(hf_cfg, theirs) else None
        for ours, theirs in (("attn_softcap", "attn_logit_softcapping"), ("final_softcap", "final_logit_softcapping"))
    }
    return {
        **fields,
        # transformers' default window when config.json has none; an explicit null is refused.
        **window_fields(layer_pattern(types), hf_cfg.get("sliding_window", 4096)),
        **softcaps,
        "mlp_activation": "geglu",
        "attention_bias": bool(get(hf_cfg, "attention_bias", False)),
        "tie_embeddings": bool(get(hf_cfg, "tie_word_embeddings", True)),
        "norm_plus_one": True,
        "post_norms": True,
        "embed_scale": True,
        "query_scale": float(get(hf_cfg, "query_pre_attn_scalar", 256)),
    }


def _gemma_to_hf(cfg: ModelConfig, architecture: str, model_type: str) -> dict:
    out = {
        "hidden_activation": _GELU,
        "attention_bias": cfg.attention_use_bias,
        # transformers' config validation wants an int here (every published Gemma's is one).
        "query_pre_attn_scalar": int(cfg.query_scale) if float(cfg.query_scale).is_integer() else cfg.query_scale,
        "sliding_window": cfg.sliding_window,
        "layer_types": layer_types(cfg),
        "attn_logit_softcapping": cfg.attn_softcap,
        "final_logit_softcapping": cfg.final_softcap,
    }
    return {**decoder_to_hf(cfg, architecture, model_type), **out}


def _gemma_requires(cfg: ModelConfig, **wanted) -> dict:
    free = ("layer_pattern", "query_scale", "attn_softcap", "final_softcap", "local_rope_theta")
    return {
        **fixed(cfg, free=free, norm_plus_one=True, post_norms=True, embed_scale=True, **wanted),
        "query_scale": (cfg.query_scale is not None, True),
        "positions": (cfg.positions, "rope"),
        "norm": (cfg.norm, "rmsnorm"),
        "mlp_activation": (cfg.mlp_activation, "geglu"),
        "attention_out_bias": (cfg.attention_out_use_bias, cfg.attention_use_bias),
        "mlp_bias": (cfg.mlp_use_bias, False),
    }


def _gemma2_from_hf(hf_cfg: dict) -> dict:
    return {**_gemma_fields(hf_cfg, default_period=2), **rope_fields(hf_cfg)}


def _gemma2_to_hf(cfg: ModelConfig) -> dict:
    return _gemma_to_hf(cfg, "Gemma2ForCausalLM", "gemma2")


def _gemma2_requires(cfg: ModelConfig) -> dict:
    return {**_gemma_requires(cfg, qk_norm=False), "local_rope_theta": (cfg.local_rope_theta, None)}


def _gemma3_rope(hf_cfg: dict) -> dict:
    """Gemma 3's two RoPEs: `rope_parameters` per layer kind (transformers 5), or `rope_theta` +
    `rope_scaling` for the global layers and `rope_local_base_freq` for the local ones (4.x)."""
    params = hf_cfg.get("rope_parameters") or {}
    if "full_attention" in params:
        glob = rope_fields({**hf_cfg, "rope_parameters": params["full_attention"]}, default_theta=1e6)
        local = params.get("sliding_attention") or {}
    else:
        glob = rope_fields(hf_cfg, default_theta=1e6)
        local = {"rope_theta": get(hf_cfg, "rope_local_base_freq", 10000.0)}
    if local.get("rope_type", "default") != "default":
        raise HFError(
            f"config.json rope_parameters.sliding_attention.rope_type={local['rope_type']!r} is not supported: "
            "llm_jax's local layers use plain RoPE"
        )
    return {**glob, "local_rope_theta": float(local.get("rope_theta", 10000.0))}


def _gemma3_from_hf(hf_cfg: dict) -> dict:
    if get(hf_cfg, "use_bidirectional_attention", False):
        raise HFError("config.json use_bidirectional_attention=true is not supported: llm_jax decoders are causal")
    period = int(get(hf_cfg, "sliding_window_pattern", 6))
    return {**_gemma_fields(hf_cfg, default_period=period), **_gemma3_rope(hf_cfg), "qk_norm": True}


def _gemma3_to_hf(cfg: ModelConfig) -> dict:
    out = _gemma_to_hf(cfg, "Gemma3ForCausalLM", "gemma3_text")
    local = {"rope_type": "default", "rope_theta": cfg.local_rope_theta}
    # transformers 5 reads rope_parameters per layer kind; 4.x reads rope_theta, rope_scaling, rope_local_base_freq.
    out["rope_parameters"] = {"full_attention": rope_parameters(cfg), "sliding_attention": local}
    return {**out, "rope_local_base_freq": cfg.local_rope_theta, "use_bidirectional_attention": False}


def _gemma3_requires(cfg: ModelConfig) -> dict:
    return {**_gemma_requires(cfg, qk_norm=True), "local_rope_theta": (cfg.local_rope_theta is not None, True)}


_LAYER = "model.layers.{i}."
# Gemma's post_attention_layernorm normalises the attention output (a post-norm), unlike Llama's.
GEMMA_NORMS = (
    Tensor(_LAYER + "input_layernorm.weight", "ln_1/scale"),
    Tensor(_LAYER + "post_attention_layernorm.weight", "ln_1_post/scale"),
    Tensor(_LAYER + "pre_feedforward_layernorm.weight", "ln_2/scale"),
    Tensor(_LAYER + "post_feedforward_layernorm.weight", "ln_2_post/scale"),
)
_COMMON = dict(
    backbone="model.",
    table=decoder_table(GEMMA_NORMS, mlp_biases=False),
    buffers=("rotary_emb.inv_freq", "embed_scale"),
)

GEMMA2 = Spec(
    architecture="Gemma2ForCausalLM",
    model_type="gemma2",
    from_hf=_gemma2_from_hf,
    to_hf=_gemma2_to_hf,
    requires=_gemma2_requires,
    needs="Gemma's norms, post-norms, geglu, embedding scale and query scale, no QK-norm",
    **_COMMON,
)
GEMMA3 = Spec(
    architecture="Gemma3ForCausalLM",
    model_type="gemma3_text",
    from_hf=_gemma3_from_hf,
    to_hf=_gemma3_to_hf,
    requires=_gemma3_requires,
    needs="Gemma's norms, post-norms, geglu, embedding and query scale, QK-norm, a local RoPE base",
    **_COMMON,
)
