"""Gemma presets: the published sizes of Gemma 2 and Gemma 3 (text) written as their config.json,
for GPU/TPU with FSDP.

    python -m llm_jax.aot --config configs/gemma.py:gemma3-4b --topology v5p-64     # will it fit?
    python -m llm_jax.main --config configs/gemma.py:gemma3-1b --workdir runs/gemma3 \
        --config.data.source=text --config.data.path='corpus/*.jsonl' \
        --config.data.tokenizer_path=/models/gemma-3-1b-pt/tokenizer.json

Arguments: gemma2-2b, gemma2-9b, gemma2-27b (local and global layers alternating, 4096-token
window, attention and output soft-capping), gemma3-1b, gemma3-4b, gemma3-12b, gemma3-27b (five
local layers to a global one, QK-norm, a RoPE base per layer kind, 'linear' RoPE scaling from 4b up);
all with Gemma's (1 + w) RMSNorm, post-norms, GeGLU, embedding and query scaling, tied embeddings.
`gemma2-tiny` and `gemma3-tiny` are the same architectures at a CPU smoke size (a 16-token window
inside the 64-token sequences, so the local layers do window). The model keys come from the
config.json through the mapping `convert from_hf` uses (llm_jax/interop/hf.py `pretraining_config`). Gemma 3
4b and up are published as image-text models: these are their text decoders (`text_config`).
"""

import ml_collections

from llm_jax.interop import hf

_COMMON = {"hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6, "attention_bias": False}
_GEMMA2 = {
    **_COMMON,
    "architectures": ["Gemma2ForCausalLM"],
    "model_type": "gemma2",
    "vocab_size": 256000,
    "max_position_embeddings": 8192,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "attn_logit_softcapping": 50.0,
    "final_logit_softcapping": 30.0,
}
_GEMMA3 = {
    **_COMMON,
    "architectures": ["Gemma3ForCausalLM"],
    "model_type": "gemma3_text",
    "vocab_size": 262208,
    "max_position_embeddings": 131072,
    "rope_theta": 1000000.0,
    "rope_local_base_freq": 10000.0,
    "rope_scaling": {"rope_type": "linear", "factor": 8.0},
    "sliding_window": 1024,
    "sliding_window_pattern": 6,
    "attn_logit_softcapping": None,
    "final_logit_softcapping": None,
}
# Gemma 3 1b: a smaller vocabulary and window, 32k context, no RoPE scaling.
_GEMMA3_1B = {
    **_GEMMA3,
    "vocab_size": 262144,
    "max_position_embeddings": 32768,
    "rope_scaling": None,
    "sliding_window": 512,
}
_TINY = {"sliding_window": 16, "max_position_embeddings": 256}
# family, layers, heads, kv heads, width, mlp, head_dim, query_pre_attn_scalar
SIZES = {
    "gemma2-tiny": ({**_GEMMA2, **_TINY}, 4, 4, 2, 64, 192, 16, 16),
    "gemma2-2b": (_GEMMA2, 26, 8, 4, 2304, 9216, 256, 256),
    "gemma2-9b": (_GEMMA2, 42, 16, 8, 3584, 14336, 256, 256),
    "gemma2-27b": (_GEMMA2, 46, 32, 16, 4608, 36864, 128, 144),
    "gemma3-tiny": ({**_GEMMA3_1B, **_TINY, "sliding_window_pattern": 3}, 6, 4, 1, 64, 192, 16, 16),
    "gemma3-1b": (_GEMMA3_1B, 26, 4, 1, 1152, 6912, 256, 256),
    "gemma3-4b": (_GEMMA3, 34, 8, 4, 2560, 10240, 256, 256),
    "gemma3-12b": (_GEMMA3, 48, 16, 8, 3840, 15360, 256, 256),
    "gemma3-27b": (_GEMMA3, 62, 32, 16, 5376, 21504, 128, 168),
}


def published_config(size: str) -> dict:
    """The config.json of the Gemma model `size` (the fields llm_jax reads)."""
    family, layers, heads, kv_heads, width, mlp, head_dim, query_scalar = SIZES[size]
    return {
        **family,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "hidden_size": width,
        "intermediate_size": mlp,
        "head_dim": head_dim,
        "query_pre_attn_scalar": query_scalar,
        "tie_word_embeddings": True,
    }


def get_config(arg: str = "gemma3-4b") -> ml_collections.ConfigDict:
    if arg not in SIZES:
        raise ValueError(f"configs/gemma.py: unknown size {arg!r}; use one of {sorted(SIZES)}")
    return hf.pretraining_config(published_config(arg), arg, seq_len=4096, tiny=arg.endswith("-tiny"))
