"""Compile time of the train step with nn.scan over layers, shallow vs deep, side by side.

    .venv/bin/python experiments/compile_time.py [--layers 2 24] [--rounds 3] [--config configs/bench_cpu.py]

Runs `python -m llm_jax.bench --config.model.scan_layers=True --steps 1` at each depth, alternating,
and prints the median `compile_s` per depth and the ratio deep / shallow (issue 5 asks <= 1.5).
Extra `--config.KEY=VALUE` arguments pass through (e.g. `--config.model.remat=dots`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/bench_cpu.py")
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 24])
    ap.add_argument("--rounds", type=int, default=3)
    args, overrides = ap.parse_known_args()
    times = {n: [] for n in args.layers}
    env = dict(os.environ, LLM_JAX_CPU_PEAK_FLOPS=os.environ.get("LLM_JAX_CPU_PEAK_FLOPS", "1e11"))
    for r in range(args.rounds):
        for n in args.layers if r % 2 == 0 else args.layers[::-1]:
            cmd = [
                sys.executable,
                "-m",
                "llm_jax.bench",
                "--config",
                args.config,
                "--steps",
                "1",
                "--warmup",
                "0",
                "--config.model.scan_layers=True",
                f"--config.model.num_layers={n}",
                *overrides,
            ]
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
            out = json.loads(proc.stdout.strip().splitlines()[-1])
            times[n].append(out["compile_s"])
            print(f"round {r + 1}: {n} layers compile {out['compile_s']:.2f}s", flush=True)
    med = {n: statistics.median(t) for n, t in times.items()}
    lo, hi = min(args.layers), max(args.layers)
    print(
        json.dumps(
            {
                "compile_s": {str(n): med[n] for n in args.layers},
                "all": {str(n): times[n] for n in args.layers},
                "ratio": med[hi] / med[lo],
                "overrides": overrides,
            }
        )
    )


if __name__ == "__main__":
    main()
