"""A small mixture-of-experts code model beside configs/default.py, at the same active FLOPs per token.

    python -m llm_jax.main --config configs/moe_cpu.py --workdir runs/moe_cpu
    python -m llm_jax.plot --workdir runs/default --workdir runs/moe_cpu    # the two runs overlaid

The default dense model's block with its SwiGLU MLP (352 wide) replaced in every layer by 8 experts
of 176, two per token: every token multiplies the same 2 x 176 = 352 hidden units (plus a router of
128 x 8: +0.4% FLOPs per token, 5.53 M against 5.51 M), while the model holds 4x the MLP parameters
(2.48 M parameters, 0.86 M active; the dense model 0.86 M). Dropless dispatch in padded blocks (the
fast one on CPU; `--config.model.moe_dispatch=dropless` is `ragged_dot`, the GPU/TPU grouped
matmul), the Switch load-balancing loss (0.01) and the router z-loss (0.001); `train/aux_loss`,
`train/router_z_loss` and `train/expert_load` are logged, and `llm_jax.plot` draws the load.
`configs/moe_cpu.py:tiny` is a seconds-long smoke run.
"""

import ml_collections

from llm_jax.training.config import base_config


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    c = base_config()
    c.data.source = "stdlib"
    c.data.tokenizer = "byte"
    c.data.seq_len = 128
    c.model.update(
        preset="moe-cpu", num_layers=4, num_heads=4, embed_dim=128, mlp_dim=352, max_len=256, positions="rope",
        norm="rmsnorm", mlp_activation="swiglu", num_experts=8, experts_per_token=2, expert_mlp_dim=176,
        moe_dispatch="blocks",  # dropless; on CPU ~5x faster than ragged_dot (experiments/moe_bench.py)
    )  # fmt: skip
    c.train.update(
        batch_size=16, num_steps=1500, log_every=100, eval_every=500, checkpoint_every=500, sample_prompt="def ",
        sample_tokens=300, sample_top_k=40,
    )  # fmt: skip
    c.optim.update(lr=3e-3, warmup_steps=100)
    if arg == "tiny":
        c.data.max_chars = 200_000
        c.data.seq_len = 32
        c.model.update(num_layers=2, embed_dim=32, mlp_dim=64, num_heads=2, max_len=64, num_experts=4,
                       expert_mlp_dim=32)  # fmt: skip
        c.train.update(batch_size=8, num_steps=5, log_every=1, eval_every=5, eval_steps=2, checkpoint_every=5,
                       sample_tokens=16, sample_top_k=0)  # fmt: skip
        c.optim.update(lr=2e-3)
    elif arg:
        raise ValueError(f"configs/moe_cpu.py: unknown argument {arg!r}; use '' or 'tiny'")
    return c
