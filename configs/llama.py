"""Llama-style presets (RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases, untied output),
for GPU/TPU with FSDP.

    python -m llm_jax.main --config configs/llama.py:1b --workdir runs/llama_1b \
        --config.data.source=tfds --config.data.tfds_name=c4/en --config.mesh.fsdp=-1 --config.mesh.data=1

Arguments: 1b (~1.2B params, context 2048), 7b (Llama-2-7B shape), `tiny` for a CPU smoke run.
"""

import ml_collections

from llm_jax.training.config import base_config

SIZES = {  # layers, heads, kv heads, width, mlp
    "tiny": (2, 4, 2, 64, 192),
    "1b": (16, 32, 8, 2048, 8192),
    "7b": (32, 32, 32, 4096, 11008),
}


def get_config(arg: str = "1b") -> ml_collections.ConfigDict:
    if arg not in SIZES:
        raise ValueError(f"configs/llama.py: unknown size {arg!r}; use one of {sorted(SIZES)}")
    layers, heads, kv_heads, width, mlp = SIZES[arg]
    c = base_config()
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
        dropout_rate=0.0,
        scan_layers=True,
        remat="dots",
        attention="dot_product",
        dtype="bfloat16",
        param_dtype="float32",
    )
    c.data.update(tokenizer="sentencepiece", vocab_size=32000, seq_len=2048)
    c.optim.update(lr=3e-4, warmup_steps=2000, min_lr_ratio=0.1, b1=0.9, b2=0.95, weight_decay=0.1, grad_clip=1.0)
    c.train.update(batch_size=64, num_steps=100_000, log_every=50, eval_every=2000, checkpoint_every=1000)
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    if arg == "tiny":
        c.model.update(max_len=128, scan_layers=False, remat="none", dtype="float32", attention="einsum")
        c.data.update(tokenizer="byte", seq_len=64, max_chars=300_000)
        c.train.update(batch_size=8, num_steps=10, log_every=5, eval_every=10, eval_steps=2, checkpoint_every=10)
    return c
