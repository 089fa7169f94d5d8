"""Llama 3.x presets: the published sizes, written as their config.json (Meta's Llama-3.2-1B / 3B,
Llama-3.1-8B / 70B), for GPU/TPU with FSDP.

    python -m llm_jax.aot --config configs/llama3.py:8b --topology v5p-64     # will it fit?
    python -m llm_jax.main --config configs/llama3.py:8b --workdir runs/llama3_8b \
        --config.data.source=text --config.data.path='corpus/*.jsonl' \
        --config.data.tokenizer_path=/models/Llama-3.1-8B/tokenizer.json

Arguments: 1b, 3b, 8b, 70b; `tiny` is the same architecture (GQA, llama3 RoPE scaling, tied
embeddings) at a CPU smoke size. The model keys come from the config.json through the same
mapping `convert from_hf` uses (llm_jax/interop/hf.py `pretraining_config`), so a preset and an imported
checkpoint of that size are the same model; the vocabulary is Llama 3's 128,256 tokens, whose
tokenizer.json the run reads (`data.tokenizer_path`). To fine-tune the published weights instead,
import them (`python -m llm_jax.convert from_hf`, configs/hf_finetune.py).
"""

import ml_collections

from llm_jax.interop import hf

_LLAMA3 = {  # what every Llama 3.x config.json shares
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "rope_theta": 500000.0,
    "attention_bias": False,
    "mlp_bias": False,
}
_SCALING = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0}
_ROPE_8K = {**_SCALING, "original_max_position_embeddings": 8192}
# layers, heads, kv heads, width, mlp, head_dim, tied, rope scaling factor
SIZES = {
    "tiny": (2, 4, 2, 64, 192, 16, True, 32.0),
    "1b": (16, 32, 8, 2048, 8192, 64, True, 32.0),
    "3b": (28, 24, 8, 3072, 8192, 128, True, 32.0),
    "8b": (32, 32, 8, 4096, 14336, 128, False, 8.0),
    "70b": (80, 64, 8, 8192, 28672, 128, False, 8.0),
}


def published_config(size: str) -> dict:
    """The config.json of Llama 3.x at `size` (the fields llm_jax reads)."""
    layers, heads, kv_heads, width, mlp, head_dim, tied, factor = SIZES[size]
    return {
        **_LLAMA3,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "hidden_size": width,
        "intermediate_size": mlp,
        "head_dim": head_dim,
        "tie_word_embeddings": tied,
        "rope_scaling": {**_ROPE_8K, "factor": factor},
    }


def get_config(arg: str = "8b") -> ml_collections.ConfigDict:
    if arg not in SIZES:
        raise ValueError(f"configs/llama3.py: unknown size {arg!r}; use one of {sorted(SIZES)}")
    c = hf.pretraining_config(published_config(arg), f"llama3-{arg}", seq_len=8192, tiny=arg == "tiny")
    if arg == "70b":  # keeping the matmuls' outputs needs 158.7 GiB a chip on v5p-128; recomputing, 57.5 (README)
        c.model.remat = "full"
    return c
