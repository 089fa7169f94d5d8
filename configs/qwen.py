"""Qwen presets: the published sizes of Qwen2.5 and Qwen3 written as their config.json, for GPU/TPU
with FSDP.

    python -m llm_jax.aot --config configs/qwen.py:qwen3-8b --topology v5p-64     # will it fit?
    python -m llm_jax.main --config configs/qwen.py:qwen3-0.6b --workdir runs/qwen3 \
        --config.data.source=text --config.data.path='corpus/*.jsonl' \
        --config.data.tokenizer_path=/models/Qwen3-0.6B/tokenizer.json

Arguments: qwen2.5-0.5b, qwen2.5-7b (q/k/v biases, no output bias), qwen3-0.6b, qwen3-1.7b,
qwen3-4b, qwen3-8b, qwen3-32b (QK-norm, head_dim 128 whatever the width); `qwen2.5-tiny` and
`qwen3-tiny` are the same architectures at a CPU smoke size. The model keys come from the
config.json through the mapping `convert from_hf` uses (llm_jax/interop/hf.py `pretraining_config`).
"""

import ml_collections

from llm_jax.interop import hf

_COMMON = {"hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "use_sliding_window": False}
_QWEN2 = {**_COMMON, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}
_QWEN3 = {**_COMMON, "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "attention_bias": False}
# family, layers, heads, kv heads, width, mlp, head_dim (None: width / heads), tied, vocabulary, context
SIZES = {
    "qwen2.5-tiny": (_QWEN2, 2, 4, 2, 64, 192, None, True, 151936, 32768),
    "qwen2.5-0.5b": (_QWEN2, 24, 14, 2, 896, 4864, None, True, 151936, 32768),
    "qwen2.5-7b": (_QWEN2, 28, 28, 4, 3584, 18944, None, False, 152064, 131072),
    "qwen3-tiny": (_QWEN3, 2, 4, 2, 64, 192, 32, True, 151936, 40960),
    "qwen3-0.6b": (_QWEN3, 28, 16, 8, 1024, 3072, 128, True, 151936, 40960),
    "qwen3-1.7b": (_QWEN3, 28, 16, 8, 2048, 6144, 128, True, 151936, 40960),
    "qwen3-4b": (_QWEN3, 36, 32, 8, 2560, 9728, 128, True, 151936, 40960),
    "qwen3-8b": (_QWEN3, 36, 32, 8, 4096, 12288, 128, False, 151936, 40960),
    "qwen3-32b": (_QWEN3, 64, 64, 8, 5120, 25600, 128, False, 151936, 40960),
}


def published_config(size: str) -> dict:
    """The config.json of the Qwen model `size` (the fields llm_jax reads)."""
    family, layers, heads, kv_heads, width, mlp, head_dim, tied, vocab, context = SIZES[size]
    out = {
        **family,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "hidden_size": width,
        "intermediate_size": mlp,
        "tie_word_embeddings": tied,
        "vocab_size": vocab,
        "max_position_embeddings": context,
    }
    if head_dim is not None:
        out["head_dim"] = head_dim
    return out


def get_config(arg: str = "qwen3-8b") -> ml_collections.ConfigDict:
    if arg not in SIZES:
        raise ValueError(f"configs/qwen.py: unknown size {arg!r}; use one of {sorted(SIZES)}")
    return hf.pretraining_config(published_config(arg), arg, seq_len=4096, tiny=arg.endswith("-tiny"))
