"""Peak memory and tokens/s against sequence length: reference (einsum) vs blockwise attention.

    PYTHONPATH=. .venv/bin/python experiments/long_context.py                  # 1k - 32k, runs up to 16k
    PYTHONPATH=. .venv/bin/python experiments/long_context.py --lengths 1024,2048 --out /tmp/lc.png

For each length and attention path: a training step's forward and backward (loss and gradients
of every parameter; no optimizer update) of a small Llama-shaped model (2 layers, 4 heads of 32,
RoPE, SwiGLU, batch 1), jitted and compiled once. Memory is the compiled step's own account
(`compiled.memory_analysis()`: temporaries, and arguments + outputs), so a step too large for this
machine is still measured; a step is only run (one warm-up, then timed) when its temporaries fit
`--run_budget_gib` and the length is at most `--run_max_len` (a 32k blockwise step takes minutes
on 2 CPU cores). Prints one JSON line per (length, attention), then a summary line with the
growth of memory per doubling of length, and draws experiments/long_context.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from llm_jax.models.model import ModelConfig, TransformerLM  # noqa: E402

GIB = 2**30


def model_config(attention: str, max_len: int, dtype: str = "float32") -> ModelConfig:
    return ModelConfig(
        vocab_size=256, num_layers=2, num_heads=4, embed_dim=128, mlp_dim=256, max_len=max_len,
        positions="rope", norm="rmsnorm", mlp_activation="swiglu", use_bias=False, attention=attention,
        attention_block=512, loss_chunk=1024, dtype=dtype,
    )  # fmt: skip


def train_step(cfg: ModelConfig):
    """(params, tokens [1, t]) -> (loss, grads): next-token cross-entropy, forward and backward."""
    model = TransformerLM(cfg)

    def loss(params, tokens):
        logits = model.apply({"params": params}, tokens[:, :-1]).astype(jnp.float32)
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

    return model, jax.jit(jax.value_and_grad(loss))


def measure(attention: str, length: int, run_budget_gib: float, repeats: int, dtype: str = "float32", run=True) -> dict:
    cfg = model_config(attention, length, dtype)
    model, step = train_step(cfg)
    params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    tokens = jax.random.randint(jax.random.key(1), (1, length + 1), 0, cfg.vocab_size)
    t0 = time.perf_counter()
    compiled = step.lower(params, tokens).compile()
    mem = compiled.memory_analysis()
    row = {
        "attention": attention,
        "length": length,
        "temp_gib": mem.temp_size_in_bytes / GIB,
        "args_out_gib": (mem.argument_size_in_bytes + mem.output_size_in_bytes) / GIB,
        "compile_s": time.perf_counter() - t0,
        "tokens_per_s": None,
    }
    if run and row["temp_gib"] <= run_budget_gib:
        jax.block_until_ready(compiled(params, tokens))  # warm-up: first touch of the buffers
        t0 = time.perf_counter()
        for _ in range(repeats):
            loss, _ = compiled(params, tokens)
        jax.block_until_ready(loss)
        row["step_s"] = (time.perf_counter() - t0) / repeats
        row["tokens_per_s"] = length / row["step_s"]
    return row


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_mem, ax_speed) = plt.subplots(1, 2, figsize=(11, 4))
    for attention in sorted({r["attention"] for r in rows}):
        style = {"einsum": "o-", "blockwise": "s-"}.get(attention, "^-")
        mine = [r for r in rows if r["attention"] == attention]
        ax_mem.plot([r["length"] for r in mine], [r["temp_gib"] for r in mine], style, label=attention)
        ran = [r for r in mine if r["tokens_per_s"]]
        ax_speed.plot([r["length"] for r in ran], [r["tokens_per_s"] for r in ran], style, label=attention)
    for ax in (ax_mem, ax_speed):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length (tokens, batch 1)")
        ax.legend()
        ax.grid(alpha=0.3)
    ax_mem.set_yscale("log", base=2)
    ax_mem.set_ylabel("compiled temporaries of the step (GiB)")
    ax_mem.set_title("memory: quadratic (reference) vs linear (blockwise)")
    ax_speed.set_ylabel("tokens / s (forward + backward, CPU)")
    ax_speed.set_title("speed (steps whose temporaries fit the run budget)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def growth(rows: list[dict], attention: str) -> list[float]:
    """Temporaries' ratio per doubling of length: ~2 is linear, ~4 quadratic."""
    mine = sorted((r for r in rows if r["attention"] == attention), key=lambda r: r["length"])
    return [round(b["temp_gib"] / a["temp_gib"], 2) for a, b in zip(mine, mine[1:])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768")
    parser.add_argument("--attentions", default="einsum,blockwise")
    parser.add_argument("--run_budget_gib", type=float, default=6.0, help="run (and time) steps up to this")
    parser.add_argument("--run_max_len", type=int, default=16384, help="longer steps: memory only (CPU time)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--dtype", default="float32", help="compute dtype (cuDNN attention needs bfloat16)")
    parser.add_argument("--out", default=os.path.join(REPO, "experiments", "long_context.png"))
    args = parser.parse_args()
    rows = []
    for length in (int(x) for x in args.lengths.split(",")):
        for attention in args.attentions.split(","):
            rows.append(
                measure(attention, length, args.run_budget_gib, args.repeats, args.dtype, length <= args.run_max_len)
            )
            print(json.dumps(rows[-1]), flush=True)
    plot(rows, args.out)
    summary = {a: growth(rows, a) for a in args.attentions.split(",")}
    print(json.dumps({"temp_growth_per_doubling": summary, "plot": args.out, "backend": jax.default_backend()}))


if __name__ == "__main__":
    main()
