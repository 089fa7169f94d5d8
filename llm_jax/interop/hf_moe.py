"""Mixture-of-experts decoders as data: MixtralForCausalLM and Qwen3MoeForCausalLM, each a `Spec`
(see hf_table.py).

Both are Llama-shaped decoders (hf_llama.py) whose MLP is, on MoE layers, a softmax router over E
experts picking the top k (`models/moe.py`): Mixtral renormalises the k weights and has MoE in
every layer (with Mistral's optional sliding window); Qwen3-MoE renormalises them only with
`norm_topk_prob`, has QK-norm, its own expert size (`moe_intermediate_size`) and may keep some
layers dense (`decoder_sparse_step`, `mlp_only_layers`: our `moe_every`, `moe_first_dense`).
Checkpoints save one tensor per expert ('experts.{j}...'), stacked on our leading experts axis.

OLMoE (OlmoeForCausalLM) is not here: its QK-norm normalises the whole q / k projection across
heads, where our block (like Qwen3's) normalises each head.
"""

from __future__ import annotations

import dataclasses

from llm_jax.interop.hf_llama import (
    LLAMA_NORMS,
    _mistral_from_hf,
    _mistral_requires,
    _mistral_to_hf,
    _qwen3_from_hf,
    _qwen3_requires,
    _qwen3_to_hf,
    decoder_table,
)
from llm_jax.interop.hf_table import HFError, Spec, Tensor, always, dense_layer, get, moe_layer, untied
from llm_jax.models.config import ModelConfig

# ----------------------------------------------------------------------------------------------
# config.json <-> ModelConfig


def _experts(hf_cfg: dict) -> int:
    """The expert count: `num_local_experts` (Mixtral; what transformers 5 writes for Qwen3-MoE too)
    or `num_experts` (Qwen3-MoE's own config.json)."""
    return int(get(hf_cfg, "num_local_experts", get(hf_cfg, "num_experts", 0)))


def _moe_fields(hf_cfg: dict, norm_topk: bool) -> dict:
    return dict(
        num_experts=_experts(hf_cfg),
        experts_per_token=int(hf_cfg["num_experts_per_tok"]),
        router_score="softmax",
        norm_topk=norm_topk,
        num_shared_experts=0,
    )


def _moe_requires(cfg: ModelConfig, norm_topk: bool | None) -> dict:
    """The MoE fields both architectures fix: routed softmax experts, none shared."""
    out = {
        "num_experts": (cfg.num_experts > 0, True),
        "router_score": (cfg.router_score, "softmax"),
        "num_shared_experts": (cfg.num_shared_experts, 0),
    }
    return out if norm_topk is None else {**out, "norm_topk": (cfg.norm_topk, norm_topk)}


def _mixtral_from_hf(hf_cfg: dict) -> dict:
    return {**_mistral_from_hf(hf_cfg), **_moe_fields(hf_cfg, norm_topk=True)}


def _mixtral_to_hf(cfg: ModelConfig) -> dict:
    out = _mistral_to_hf(cfg)
    return {
        **out,
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "num_local_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.experts_per_token,
        "router_jitter_noise": 0.0,
    }


def _mixtral_requires(cfg: ModelConfig) -> dict:
    return {
        **_mistral_requires(cfg),
        **_moe_requires(cfg, norm_topk=True),
        "moe_every": (cfg.moe_every, 1),
        "moe_first_dense": (cfg.moe_first_dense, 0),
        "expert_mlp_dim": (cfg.expert_dim, cfg.mlp_dim),  # one intermediate_size
    }


def _moe_layers(hf_cfg: dict) -> dict:
    """Qwen3-MoE's MoE layers (those not in `mlp_only_layers` with (i + 1) % decoder_sparse_step == 0)
    as our `moe_first_dense` and `moe_every`; a set they cannot express is an error."""
    n = int(hf_cfg["num_hidden_layers"])
    step, dense = int(get(hf_cfg, "decoder_sparse_step", 1)), set(get(hf_cfg, "mlp_only_layers", []))
    layers = [i for i in range(n) if i not in dense and (i + 1) % step == 0]
    if not layers or not _experts(hf_cfg):
        raise HFError("config.json has no mixture-of-experts layer: convert it as Qwen3ForCausalLM")
    first = layers[0]
    every = layers[1] - first if len(layers) > 1 else n - first
    if layers != list(range(first, n, every)):
        raise HFError(
            f"config.json MoE layers {layers} (decoder_sparse_step={step}, mlp_only_layers={sorted(dense)}) are not "
            "supported: llm_jax has MoE layers every k-th layer after the first dense ones"
        )
    return {"moe_first_dense": first, "moe_every": every}


def _qwen3_moe_from_hf(hf_cfg: dict) -> dict:
    head_dim = get(hf_cfg, "head_dim", int(hf_cfg["hidden_size"]) // int(hf_cfg["num_attention_heads"]))
    fields = {**_qwen3_from_hf({**hf_cfg, "head_dim": head_dim}), **_moe_layers(hf_cfg)}
    norm_topk = bool(get(hf_cfg, "norm_topk_prob", False))
    return {**fields, **_moe_fields(hf_cfg, norm_topk), "expert_mlp_dim": int(hf_cfg["moe_intermediate_size"])}


def _qwen3_moe_to_hf(cfg: ModelConfig) -> dict:
    return {
        **_qwen3_to_hf(cfg),
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "num_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.experts_per_token,
        "moe_intermediate_size": cfg.expert_dim,
        "norm_topk_prob": cfg.norm_topk,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [i for i in range(cfg.num_layers) if not cfg.is_moe(i)],
    }


def _qwen3_moe_requires(cfg: ModelConfig) -> dict:
    return {**_qwen3_requires(cfg), **_moe_requires(cfg, norm_topk=None)}


# ----------------------------------------------------------------------------------------------
# The tensor tables: the Llama table with its MLP rows on dense layers only, and the experts'


def _on_dense_layers(table: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return tuple(dataclasses.replace(t, layers=dense_layer) if ".mlp." in t.hf else t for t in table)


def _expert_rows(moe: str, gate: str, up: str, down: str) -> tuple[Tensor, ...]:
    """The router and per-expert rows of an MoE layer whose module is `moe` (e.g. 'mlp')."""
    expert = "model.layers.{i}." + moe + ".experts.{j}."
    return (
        Tensor("model.layers.{i}." + moe + ".gate.weight", "mlp/router/kernel", "x e -> e x", layers=moe_layer),
        Tensor(expert + gate + ".weight", "mlp/wi_gate", "f e -> e f", layers=moe_layer),
        Tensor(expert + up + ".weight", "mlp/wi_up", "f e -> e f", layers=moe_layer),
        Tensor(expert + down + ".weight", "mlp/wo", "e f -> f e", layers=moe_layer),
    )


_BUFFERS = ("rotary_emb.inv_freq",)
# Mixtral: no biases, no QK-norm, no dense layer: the Llama table's attention, norm and embedding rows.
_MIXTRAL_ATTENTION = tuple(
    t for t in decoder_table(LLAMA_NORMS, mlp_biases=False) if t.when in (always, untied) and ".mlp." not in t.hf
)

MIXTRAL = Spec(
    architecture="MixtralForCausalLM",
    model_type="mixtral",
    from_hf=_mixtral_from_hf,
    to_hf=_mixtral_to_hf,
    requires=_mixtral_requires,
    needs="Mistral's block with softmax top-k experts (renormalised) in every layer, no shared experts",
    backbone="model.",
    table=_MIXTRAL_ATTENTION + _expert_rows("block_sparse_moe", "w1", "w3", "w2"),
    buffers=_BUFFERS,
)
QWEN3_MOE = Spec(
    architecture="Qwen3MoeForCausalLM",
    model_type="qwen3_moe",
    from_hf=_qwen3_moe_from_hf,
    to_hf=_qwen3_moe_to_hf,
    requires=_qwen3_moe_requires,
    needs="Qwen3's block with softmax top-k experts every k-th layer after the first dense ones, no shared experts",
    backbone="model.",
    table=_on_dense_layers(decoder_table(LLAMA_NORMS, mlp_biases=False))
    + _expert_rows("mlp", "gate_proj", "up_proj", "down_proj"),
    buffers=_BUFFERS,
)
