"""Llama-style presets (RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases, untied output),
for GPU/TPU with FSDP.

    python -m llm_jax.main --config configs/llama.py:1b --workdir runs/llama_1b \
        --config.data.source=tfds --config.data.tfds_name=c4/en --config.mesh.fsdp=-1 --config.mesh.data=1

Arguments: 1b (~1.2B params, context 2048), 7b (Llama-2-7B shape), `tiny` for a CPU smoke run.
"""

import ml_collections

from llm_jax.training import config as config_lib

SIZES = {  # layers, heads, kv heads, width, mlp
    "tiny": (2, 4, 2, 64, 192),
    "1b": (16, 32, 8, 2048, 8192),
    "7b": (32, 32, 32, 4096, 11008),
}


def get_config(arg: str = "1b") -> ml_collections.ConfigDict:
    if arg not in SIZES:
        raise ValueError(f"configs/llama.py: unknown size {arg!r}; use one of {sorted(SIZES)}")
    layers, heads, kv_heads, width, mlp = SIZES[arg]
    c = config_lib.base_config()
    c.model.update(
        preset=f"llama-{arg}",
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        embed_dim=width,
        mlp_dim=mlp,
        max_len=2048,
        positions="rope",
        rope_theta=500000.0,
        norm="rmsnorm",
        norm_eps=1e-5,
        mlp_activation="swiglu",
        use_bias=False,
        tie_embeddings=False,
    )
    c.data.update(tokenizer="sentencepiece", vocab_size=32000)
    config_lib.pretraining(c, seq_len=2048, batch_size=64, lr=3e-4)
    if arg == "tiny":
        c.model.max_len = 128
        config_lib.cpu_smoke(c)
    return c
