"""Character-level Tiny Shakespeare, nanoGPT's CPU recipe size (4 layers, 4 heads, 128 wide, context 64).

A Llama-style block (RoPE, RMSNorm, SwiGLU with mlp_dim 352 so the parameter count matches the
GPT-2 block's 4x MLP: ~0.8M parameters) with a short cosine schedule: it needs about half the tokens
of nanoGPT's GPT-2 block to reach a validation loss of 1.88 (~720k vs 1.5M).

    python -m llm_jax.main --config configs/shakespeare_char.py --workdir runs/shakespeare_char \
        --config.data.path=../shared/data/tinyshakespeare/input.txt

The path may also come from $LLM_JAX_DATA (a folder holding tinyshakespeare/input.txt). First 90%
trains, last 10% validates. Stops once the validation loss (20 fixed batches) reaches 1.88.
"""

import os

import ml_collections

from llm_jax.training.config import base_config


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    c = base_config()
    c.data.source = "text"
    c.data.path = os.path.join(os.environ.get("LLM_JAX_DATA", "../shared/data"), "tinyshakespeare", "input.txt")
    c.data.tokenizer = "char"
    c.data.seq_len = 64
    c.data.val_fraction = 0.1
    c.model.update(
        num_layers=4,
        num_heads=4,
        embed_dim=128,
        mlp_dim=352,
        max_len=64,
        dropout_rate=0.0,
        positions="rope",
        norm="rmsnorm",
        mlp_activation="swiglu",
        vocab_multiple=1,
    )
    c.optim.update(lr=3e-3, warmup_steps=50, min_lr_ratio=0.1, b2=0.99, weight_decay=0.1)
    c.train.update(
        batch_size=32,
        num_steps=400,
        log_every=50,
        eval_every=50,
        eval_steps=20,
        target_eval_loss=1.88,
        checkpoint_every=200,
        sample_tokens=300,
    )
    if arg:
        raise ValueError(f"configs/shakespeare_char.py takes no argument, got {arg!r}")
    return c
