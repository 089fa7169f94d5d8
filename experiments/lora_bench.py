"""LoRA against full fine-tuning of the same model on this host: step speed, MFU, optimizer state, FLOPs.

    .venv/bin/python experiments/lora_bench.py                     # ~28M-parameter llama-style model
    .venv/bin/python experiments/lora_bench.py --rounds 2 --steps 2 --layers 2 --width 128   # a smoke run

Both steps are built by the trainer's own builder through `llm_jax.tools.bench.prepare` (the LoRA
side: `config.lora.rank` > 0, its random frozen base from `Built.create_frozen`, the real
`train_step` that differentiates the adapters only). The timing alternates the two sides, `--steps`
steps each per round, so a neighbour's load falls on both alike; each side's figure is the median
over all its timed steps. The host's float32 matmul peak is measured once, in this run
(`flops.peak_flops`; LLM_JAX_CPU_PEAK_FLOPS overrides it).

MFU is given two ways. `mfu_6n`: the 6N count of `llm_jax.models.flops` on both sides (the base's
N; what the trainer logs for a LoRA run too). `mfu_counted`: the LoRA step counted as it is done,
4 FLOPs per frozen matmul weight and token (forward 2, the activations' gradient 2, no weight
gradient) plus 6 per adapter weight (`flops.lora_decoder_flops_per_token`). XLA's own count of each
compiled step (`cost_analysis`) is printed beside it, and the ratio of the two steps' XLA FLOPs
against the ratio of the counts: the check that the LoRA step computes no weight gradient of the
frozen base. Progress goes to stderr; stdout's last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def model_config(args):
    """A llama-style run config (RMSNorm, RoPE, SwiGLU, grouped-query attention) on random byte tokens."""
    from llm_jax.training import config as config_lib

    c = config_lib.base_config()
    c.model.update(
        num_layers=args.layers, embed_dim=args.width, num_heads=args.width // 64 or 1, num_kv_heads=None,
        mlp_dim=3 * args.width, head_dim=64 if args.width >= 64 else None, max_len=args.seq_len, positions="rope",
        norm="rmsnorm", mlp_activation="swiglu", use_bias=False, vocab_size=256, tie_embeddings=True,
        dtype="float32", remat="none", attention="einsum", scan_layers=False,
    )  # fmt: skip
    c.data.update(source="stdlib", tokenizer="byte", seq_len=args.seq_len)
    c.train.update(batch_size=args.batch_size, eval_batch_size=args.batch_size)
    c.optim.update(lr=1e-4, warmup_steps=0)
    c.mesh.update(data=1, fsdp=1, tensor=1)
    return c


def lora_config(config, args):
    c = config.copy_and_resolve_references()
    c.lora.update(rank=args.rank, alpha=2.0 * args.rank, targets=args.targets, base="random", base_dtype="float32")
    return c


def xla_flops(compiled) -> float | None:
    """FLOPs of one call of a compiled step by XLA's cost analysis (a dict, or a list of one in older JAX)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return None if not cost or "flops" not in cost else float(cost["flops"])


def alternate(sides: dict, rounds: int, steps: int, warmup: int) -> dict:
    """{name: [seconds of each timed step]}, the sides' steps alternating `steps` at a time."""
    import jax

    states = {name: p.state for name, p in sides.items()}

    def one(name):
        p = sides[name]
        t = time.perf_counter()
        states[name], metrics = p.compiled(states[name], p.batch, p.rng, p.frozen or {})
        jax.block_until_ready((states[name], metrics))
        return time.perf_counter() - t

    for name in sides:
        for _ in range(warmup):
            one(name)
    times = {name: [] for name in sides}
    for r in range(rounds):
        for name in sides:
            times[name] += [one(name) for _ in range(steps)]
        print(
            f"round {r + 1}/{rounds}: " + ", ".join(f"{n} {times[n][-1] * 1e3:.0f} ms" for n in sides), file=sys.stderr
        )
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--targets", default="query,key,value,out,wi_0,wi_1,wo", help="config.lora.targets")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=3, help="steps per side per round")
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()

    from llm_jax import cli  # noqa: F401, I001 - first: the command lines' host set-up (malloc, JAX on the CPU)

    import jax
    from llm_jax.models import flops as flops_lib
    from llm_jax.models import lora
    from llm_jax.tools import bench
    from llm_jax.training import summary

    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    full_config = model_config(args)
    sides = {"full": bench.prepare(full_config, log), "lora": bench.prepare(lora_config(full_config, args), log)}
    peak, peak_source = flops_lib.peak_flops(jax.devices()[:1], "float32")  # this host's float32 matmul
    times = alternate(sides, args.rounds, args.steps, args.warmup)

    out = {"peak_flops": peak, "peak_flops_source": peak_source, "rounds": args.rounds, "steps_per_round": args.steps}
    for name, p in sides.items():
        cfg, seq_len, batch = p.model_cfg, p.config.data.seq_len, p.config.train.batch_size
        adapters = lora.count(p.state.params) if cfg.lora_rank else 0
        fpt_6n = flops_lib.decoder_flops_per_token(cfg, seq_len)
        counted = flops_lib.lora_decoder_flops_per_token(cfg, seq_len, adapters) if cfg.lora_rank else fpt_6n
        step = statistics.median(times[name])
        tps = batch * seq_len / step
        params, frozen = summary.tree_bytes(p.state.params)[0], summary.tree_bytes(p.frozen or {})[0]
        out[name] = {
            "trainable_params": p.num_params, "trainable_bytes": params, "frozen_bytes": frozen,
            "frozen_params": sum(x.size for x in jax.tree.leaves(p.frozen or {})),
            "opt_state_bytes": summary.tree_bytes(p.state.opt_state)[0],
            "step_time_s": step, "step_time_min_s": min(times[name]), "tokens_per_sec": tps,
            "flops_per_token_6n": fpt_6n, "flops_per_token_counted": counted,
            "mfu_6n": tps * fpt_6n / peak, "mfu_counted": tps * counted / peak,
            "xla_flops_per_step": xla_flops(p.compiled), "counted_flops_per_step": counted * batch * seq_len,
            **bench.compiled_memory(p.compiled), "compile_s": p.compile_s,
        }  # fmt: skip
    full, lo = out["full"], out["lora"]
    out["model"] = {"layers": args.layers, "width": args.width, "seq_len": args.seq_len, "batch_size": args.batch_size,
                    "rank": args.rank, "targets": args.targets, "params": full["trainable_params"]}  # fmt: skip
    out["lora_over_full"] = {
        "tokens_per_sec": lo["tokens_per_sec"] / full["tokens_per_sec"],
        "opt_state_bytes": lo["opt_state_bytes"] / full["opt_state_bytes"],
        "xla_flops": None if not full["xla_flops_per_step"] else lo["xla_flops_per_step"] / full["xla_flops_per_step"],
        "counted_flops": lo["counted_flops_per_step"] / full["counted_flops_per_step"],
        "temp_bytes": None if not full.get("temp_bytes") else lo["temp_bytes"] / full["temp_bytes"],
    }
    log(json.dumps(out["lora_over_full"]))
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
