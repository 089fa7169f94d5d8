"""Reference CPU benchmark size (issue 5): GPT-2 style, 4 layers, 256 wide, 4 heads, context 256,
batch 8, vocabulary 8192, float32, AdamW.

    python -m llm_jax.bench --config configs/bench_cpu.py --steps 10
    python experiments/torch_peer.py            # the same step in PyTorch + transformers, side by side

The benchmark feeds random tokens, so there is no data set or tokenizer to build; `data.*` only
gives the sequence length. The config also trains (`python -m llm_jax.main`) on the stdlib corpus.
"""

import ml_collections

from llm_jax.training.config import base_config


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    if arg:
        raise ValueError(f"configs/bench_cpu.py takes no argument, got {arg!r}")
    c = base_config()
    c.model.update(
        preset="gpt2-bench",
        vocab_size=8192,
        num_layers=4,
        num_heads=4,
        embed_dim=256,
        mlp_dim=1024,
        max_len=256,
        positions="learned",
        norm="layernorm",
        mlp_activation="gelu",
        use_bias=True,
        tie_embeddings=True,
        dropout_rate=0.0,
        dtype="float32",
        param_dtype="float32",
        # Same math, faster on CPU: the loss projects and soft-maxes 64 positions at a time
        # (llm_jax/models/loss.py), never the whole [8, 256, 8192] float32 logits.
        loss_chunk=64,
    )
    c.data.update(source="stdlib", tokenizer="byte", seq_len=256)
    c.optim.update(lr=3e-4, warmup_steps=10, b1=0.9, b2=0.95, weight_decay=0.1, grad_clip=1.0)
    c.train.update(batch_size=8, num_steps=100, log_every=10, eval_every=100, eval_steps=2, checkpoint_every=100)
    c.mesh.update(data=-1, fsdp=1, tensor=1)
    return c
