"""Mixture of experts against the dense model at equal active FLOPs: the training step's tokens/s.

    PYTHONPATH=. .venv/bin/python experiments/moe_bench.py [--rounds 3] [--steps 10] [--batch_size 16]

Four steps, each built and compiled by the trainer's own builder (`llm_jax.tools.bench`):
configs/default.py (dense SwiGLU MLP, 352 wide) and configs/moe_cpu.py (8 experts of 176, top-2:
the same active FLOPs per token, +0.4% for the router) with each dispatch: dropless
(`ragged_dot`), blocks (dropless in padded blocks) and capacity (capacity factor 1.25). Each round
times every variant once, in a rotating order, so a drift in the machine's load favours none.
Prints one JSON line: per variant the median tokens/s over the rounds (with every round's), step
time, FLOPs per token (active parameters), MFU against the host's float32 matmul peak (measured
here, in `peak_flops`), parameters; and the ratios moe / dense and capacity / dropless.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config_of(name: str, batch_size: int, **model):
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", os.path.join(REPO, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.train.batch_size = batch_size
    c.model.update(model)
    return c


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch_size", type=int, default=16)
    args = ap.parse_args()
    from llm_jax.runtime import hostmem

    hostmem.keep_freed_memory()  # before numpy and JAX start threads, as every command line does

    from llm_jax.models import flops as flops_lib
    from llm_jax.tools import bench

    variants = {
        "dense": config_of("default", args.batch_size),
        "moe_dropless": config_of("moe_cpu", args.batch_size, moe_dispatch="dropless"),
        "moe_blocks": config_of("moe_cpu", args.batch_size, moe_dispatch="blocks"),
        "moe_capacity": config_of("moe_cpu", args.batch_size, moe_dispatch="capacity", capacity_factor=1.25),
    }
    log = lambda *a: print(*a, file=sys.stderr)  # noqa: E731
    results: dict[str, list[dict]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            log(f"moe_bench: round {r + 1}, {name}")
            results[name].append(bench.run(variants[name], steps=args.steps, warmup=args.warmup, log=log))
    out = {"peak_flops": flops_lib.measure_cpu_matmul_flops(seconds=2.0), "rounds": args.rounds, "steps": args.steps}
    for name, runs in results.items():
        tps = [x["tokens_per_sec"] for x in runs]
        median = statistics.median(tps)
        last = runs[-1]
        out[name] = {
            "tokens_per_sec": median, "tokens_per_sec_rounds": tps,
            "step_time_s": statistics.median(x["step_time_s"] for x in runs),
            "flops_per_token": last["flops_per_token"], "mfu": median * last["flops_per_token"] / out["peak_flops"],
            "num_params": last["num_params"], "compile_s": last["compile_s"],
            "batch_size": last["batch_size"], "seq_len": last["seq_len"],
        }  # fmt: skip
    out["ratio_moe_dropless_to_dense"] = out["moe_dropless"]["tokens_per_sec"] / out["dense"]["tokens_per_sec"]
    out["ratio_moe_blocks_to_dense"] = out["moe_blocks"]["tokens_per_sec"] / out["dense"]["tokens_per_sec"]
    out["ratio_capacity_to_dropless"] = out["moe_capacity"]["tokens_per_sec"] / out["moe_dropless"]["tokens_per_sec"]
    out["ratio_capacity_to_blocks"] = out["moe_capacity"]["tokens_per_sec"] / out["moe_blocks"]["tokens_per_sec"]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
