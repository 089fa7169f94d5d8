"""Quickstart: a tiny code model trained on the Python standard library's own sources (offline).

    python -m llm_jax.main --config configs/default.py --workdir runs/default

About 2 minutes on 2 CPU cores (110 s measured in a session whose benchmarks measured a float32
matmul peak of ~500 GFLOP/s; eval loss 1.32); prints validation loss and a
generated sample, leaves a checkpoint.
`configs/default.py:tiny` is a seconds-long smoke run (GPT-2 block, 2 x 32 wide) that the tests use.
"""

import ml_collections

from llm_jax.training.config import base_config


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    c = base_config()
    c.data.source = "stdlib"
    c.data.tokenizer = "byte"
    c.data.seq_len = 128
    # A Llama-style block (RoPE, RMSNorm, SwiGLU 352 wide: the parameters of a 4x GELU MLP): after
    # the same 1500 steps its eval loss is ~1.32 nats/byte, where the GPT-2 block stopped at 1.54.
    c.model.update(
        num_layers=4, num_heads=4, embed_dim=128, mlp_dim=352, max_len=256, positions="rope", norm="rmsnorm",
        mlp_activation="swiglu",
    )  # fmt: skip
    c.train.update(
        batch_size=16, num_steps=1500, log_every=100, eval_every=500, checkpoint_every=500, sample_prompt="def ",
        sample_tokens=300, sample_top_k=40,
    )  # fmt: skip
    c.optim.update(lr=3e-3, warmup_steps=100)
    if arg == "tiny":
        c.data.max_chars = 200_000
        c.data.seq_len = 32
        c.model.update(num_layers=2, embed_dim=32, mlp_dim=64, num_heads=2, max_len=64, positions="learned",
                       norm="layernorm", mlp_activation="gelu")  # fmt: skip
        c.train.update(batch_size=8, num_steps=5, log_every=1, eval_every=5, eval_steps=2, checkpoint_every=5,
                       sample_tokens=16, sample_top_k=0)  # fmt: skip
        c.optim.update(lr=2e-3)
    elif arg:
        raise ValueError(f"configs/default.py: unknown argument {arg!r}; use '' or 'tiny'")
    return c
