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

import importlib.util
import os

import ml_collections


def _default(arg: str) -> ml_collections.ConfigDict:
    """configs/default.py's config: the dense run this one is compared with, so data, training and
    the block's attention stay one place."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default.py")
    spec = importlib.util.spec_from_file_location("default", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    if arg not in ("", "tiny"):
        raise ValueError(f"configs/moe_cpu.py: unknown argument {arg!r}; use '' or 'tiny'")
    c = _default(arg)
    # The default's MLP (352 wide, or 64 in `tiny`) becomes experts of half its width, two per token.
    # Experts are gated MLPs, so `tiny` keeps the full size's RoPE / RMSNorm / SwiGLU block.
    c.model.update(
        preset="moe-cpu", positions="rope", norm="rmsnorm", mlp_activation="swiglu", num_experts=8,
        experts_per_token=2, expert_mlp_dim=176,
        moe_dispatch="blocks",  # dropless; on CPU ~5x faster than ragged_dot (experiments/moe_bench.py)
    )  # fmt: skip
    if arg == "tiny":
        c.model.update(num_experts=4, expert_mlp_dim=32)
    return c
