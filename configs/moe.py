"""Mixture-of-experts presets: Mixtral and Qwen3-MoE written as their config.json, for TPU/GPU with
expert parallelism (experts over `config.mesh.expert`, the rest FSDP).

    python -m llm_jax.aot --config configs/moe.py:mixtral-8x7b --topology v5p-64 \
        --config.mesh.expert=8                                                  # will it fit?
    python -m llm_jax.aot --config configs/moe.py:qwen3-30b-a3b --topology v5p-64 --sweep --sweep_axes=expert
    python -m llm_jax.main --config configs/moe.py:mixtral-tiny --workdir runs/mixtral-tiny   # CPU, seconds

Arguments: mixtral-8x7b (8 experts, top 2, every layer), qwen3-30b-a3b (128 experts of width 768,
top 8, QK-norm); `mixtral-tiny` and `qwen3-moe-tiny` are the same architectures at a CPU smoke size.
The model keys come from the config.json through the mapping `convert from_hf` uses
(llm_jax/interop/hf.py `pretraining_config`; the tables are llm_jax/interop/hf_moe.py).
"""

import ml_collections

from llm_jax.interop import hf

_MIXTRAL = {
    "architectures": ["MixtralForCausalLM"],
    "model_type": "mixtral",
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "rope_theta": 1000000.0,
    "sliding_window": None,
    "tie_word_embeddings": False,
}
_QWEN3_MOE = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "use_sliding_window": False,
    "attention_bias": False,
    "tie_word_embeddings": False,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
}
# family, layers, heads, kv heads, head_dim (None: width / heads), width, dense mlp, experts, top k,
# expert width (None: the dense mlp's), vocabulary, context
SIZES = {
    "mixtral-tiny": (_MIXTRAL, 2, 4, 2, None, 64, 128, 4, 2, None, 32000, 32768),
    "mixtral-8x7b": (_MIXTRAL, 32, 32, 8, None, 4096, 14336, 8, 2, None, 32000, 32768),
    "qwen3-moe-tiny": (_QWEN3_MOE, 2, 4, 2, 32, 64, 192, 8, 2, 64, 151936, 40960),
    "qwen3-30b-a3b": (_QWEN3_MOE, 48, 32, 4, 128, 2048, 6144, 128, 8, 768, 151936, 40960),
}


def published_config(size: str) -> dict:
    """The config.json of the model `size` (the fields llm_jax reads)."""
    family, layers, heads, kv_heads, head_dim, width, mlp, experts, k, expert_mlp, vocab, context = SIZES[size]
    out = {
        **family,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "hidden_size": width,
        "intermediate_size": mlp,
        "num_experts_per_tok": k,
        "vocab_size": vocab,
        "max_position_embeddings": context,
    }
    out["num_local_experts" if family is _MIXTRAL else "num_experts"] = experts
    if head_dim is not None:
        out["head_dim"] = head_dim
    if expert_mlp is not None:
        out["moe_intermediate_size"] = expert_mlp
    return out


def get_config(arg: str = "mixtral-8x7b") -> ml_collections.ConfigDict:
    if arg not in SIZES:
        raise ValueError(f"configs/moe.py: unknown size {arg!r}; use one of {sorted(SIZES)}")
    return hf.pretraining_config(published_config(arg), arg, seq_len=4096, tiny=arg.endswith("-tiny"))
