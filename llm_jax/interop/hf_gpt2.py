"""GPT2LMHeadModel as data: its config.json mapping and tensor table (see hf_table.py)."""

from __future__ import annotations

from llm_jax.interop.hf_table import Spec, Tensor, fixed, get, require, untied
from llm_jax.models.config import ModelConfig

# ----------------------------------------------------------------------------------------------
# GPT2LMHeadModel: learned positions, LayerNorm, tanh-GELU, biases everywhere; Conv1D stores [in, out].


def _gpt2_from_hf(hf_cfg: dict) -> dict:
    require(
        hf_cfg,
        "activation_function",
        lambda v: v in ("gelu_new", "gelu_pytorch_tanh"),
        "gelu_new",
        "llm_jax's GPT-2 MLP is the tanh-approximate GELU ('gelu_new' / 'gelu_pytorch_tanh')",
    )
    require(hf_cfg, "scale_attn_weights", lambda v: v is True, True, "attention is always scaled by 1/sqrt(head_dim)")
    require(
        hf_cfg,
        "scale_attn_by_inverse_layer_idx",
        lambda v: v is False,
        False,
        "per-layer attention scaling is not implemented",
    )
    require(hf_cfg, "add_cross_attention", lambda v: v is False, False, "decoder-only models have no cross-attention")
    embed = int(hf_cfg["n_embd"])
    return dict(
        vocab_size=int(hf_cfg["vocab_size"]),
        num_layers=int(hf_cfg["n_layer"]),
        num_heads=int(hf_cfg["n_head"]),
        embed_dim=embed,
        mlp_dim=int(get(hf_cfg, "n_inner", 4 * embed)),
        max_len=int(hf_cfg["n_positions"]),
        positions="learned",
        norm="layernorm",
        norm_eps=float(get(hf_cfg, "layer_norm_epsilon", 1e-5)),
        mlp_activation="gelu",
        use_bias=True,
        tie_embeddings=bool(get(hf_cfg, "tie_word_embeddings", True)),
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
        **fixed(cfg),
        "attention_out_bias": (cfg.attention_out_use_bias, True),
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
        Tensor("lm_head.weight", "lm_head/kernel", "v e -> e v", when=untied),  # nn.Linear: [out, in]
    ),
    # The causal-mask buffers older transformers versions saved with the weights.
    buffers=(".attn.bias", ".attn.masked_bias"),
)
