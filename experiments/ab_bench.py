"""One change, measured: `llm_jax.bench` with and without it, alternating in fresh processes.

    .venv/bin/python experiments/ab_bench.py --config configs/bench_cpu.py --a "LLM_JAX_KEEP_FREED_MEMORY=0" \
        --b "" [--rounds 3] [--steps 10] [--warmup 2] [--config.KEY=VALUE ...]

`--a` and `--b` describe the two sides, each a space-separated list: `NAME=VALUE` items (a name in
capitals) set environment variables, the others are extra `llm_jax.bench` flags (e.g.
`--config.model.loss_chunk=128`). Each round runs A then B (B then A every other round, so a drift
in machine load favours neither); `--config.KEY=VALUE` given to this script apply to both. It
prints every run, and one JSON line: per side the median tokens/s with its rounds, system CPU
seconds and minor page faults per step, and `ratio` = median B / median A with `ratio_rounds`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_peer import REPO, last_json  # noqa: E402 - the sibling script's runner

ENV_ITEM = re.compile(r"^[A-Z_][A-Z0-9_]*=")


def side(spec: str) -> tuple[dict, list[str]]:
    """'NAME=VALUE --flag=x' -> ({NAME: VALUE}, ['--flag=x'])."""
    items = spec.split()
    env = dict(item.split("=", 1) for item in items if ENV_ITEM.match(item))
    return env, [item for item in items if not ENV_ITEM.match(item)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=os.path.join(REPO, "configs", "bench_cpu.py"))
    ap.add_argument("--a", required=True, help="side A: NAME=VALUE environment items and bench flags")
    ap.add_argument("--b", required=True, help="side B, as --a")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    args, overrides = ap.parse_known_args()
    bad = [a for a in overrides if not a.startswith("--config.")]
    if bad or args.rounds < 1 or args.steps < 1 or args.warmup < 1:
        ap.error(f"bad arguments {bad or ''}: --config.KEY=VALUE overrides; --rounds, --steps, --warmup >= 1")
    base = [sys.executable, "-m", "llm_jax.bench", "--config", os.path.abspath(args.config)]
    base += ["--steps", str(args.steps), "--warmup", str(args.warmup), *overrides]
    sides = {"a": side(args.a), "b": side(args.b)}
    runs = {"a": [], "b": []}
    for r in range(args.rounds):
        for name in ("a", "b") if r % 2 == 0 else ("b", "a"):
            env, flags = sides[name]
            runs[name].append(res := last_json([*base, *flags], env))
            sys_ms = res["system_time_per_step_s"] * 1e3
            print(f"round {r + 1}: {name} {res['tokens_per_sec']:9,.0f} tokens/s, {res['minor_faults_per_step']:9,.0f} "
                  f"faults/step, system {sys_ms:6.1f} ms/step, loss {res['final_loss']:.6f}", flush=True)  # fmt: skip
    med = statistics.median
    out = {"config": os.path.relpath(args.config, REPO), "overrides": overrides, "rounds": args.rounds}
    for name in ("a", "b"):
        tps = [x["tokens_per_sec"] for x in runs[name]]
        out[name] = {
            "spec": getattr(args, name), "tokens_per_sec": med(tps), "tokens_per_sec_rounds": tps,
            "mfu": med([x["mfu"] for x in runs[name]]),
            "system_time_per_step_s": med([x["system_time_per_step_s"] for x in runs[name]]),
            "minor_faults_per_step": med([x["minor_faults_per_step"] for x in runs[name]]),
            "final_loss": runs[name][-1]["final_loss"],
        }  # fmt: skip
    out["ratio"] = out["b"]["tokens_per_sec"] / out["a"]["tokens_per_sec"]
    out["ratio_rounds"] = [b / a for a, b in zip(out["a"]["tokens_per_sec_rounds"], out["b"]["tokens_per_sec_rounds"])]
    print(f"B / A: {out['ratio']:.3f} (rounds {', '.join(f'{x:.3f}' for x in out['ratio_rounds'])})")
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
