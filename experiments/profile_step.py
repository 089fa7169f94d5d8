"""Where does a train step's time go? Per-XLA-op totals of a few profiled steps.

    .venv/bin/python experiments/profile_step.py [configs/bench_cpu.py] [--config.K=V ...] [--top 40]

Traces `--steps` steps of the real train step with `jax.profiler`, then sums the host-thread
events per op name (on CPU every XLA thunk is one event) and prints the top ones with their share.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

AREAS = ("model forward", "model backward", "loss", "optimizer", "other")


def area(op: str) -> str:
    """The part of the step an op belongs to, from its HLO op_name (the jax name stack)."""
    if "optimizer" in op:
        return "optimizer"
    if re.search(r"(^|[/(])loss[/)]", op):
        return "loss"
    if "transpose(" in op:
        return "model backward"
    if "Transformer" in op or "Encoder" in op or "Decoder" in op:
        return "model forward"
    return "other"


def kind(name: str, op: str) -> str:
    """The kind of an XLA op from its thunk name (fusions are named after what they fuse) and op_name."""
    if op.endswith("dot_general") or name.startswith(("dot", "ynn_fusion", "onednn")):
        return "matmul"
    if "transpose" in name or name.startswith("copy") or "copy_fusion" in name:
        return "copy/transpose"
    if "broadcast" in name or name.startswith("memset"):
        return "fill/broadcast"
    if "reduce" in name:
        return "reduction"
    if name.startswith(("while", "conditional", "call")) or "Await" in name:
        return "loop/wait"
    return "elementwise"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("config", nargs="?", default="configs/bench_cpu.py")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=40)
    args, overrides = ap.parse_known_args()

    from llm_jax.runtime import hostmem

    hostmem.keep_freed_memory()  # first, as llm_jax.bench does: before numpy and JAX start threads (hostmem.py)

    import jax
    from absl import flags
    from ml_collections import config_flags

    from llm_jax.tools import bench

    config_flags.DEFINE_config_file("config", None)  # parsed below: a default would load the file twice
    flags.FLAGS(["prog", f"--config={args.config}", *overrides])
    p = bench.prepare(flags.FLAGS.config)  # the step llm_jax.bench times, as the trainer runs it
    state, batch, rng = p.state, p.batch, p.rng
    for _ in range(2):
        state, m = p.compiled(state, batch, rng, p.frozen)
    jax.block_until_ready(state)

    d = tempfile.mkdtemp()
    t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    with jax.profiler.trace(d):
        for _ in range(args.steps):
            state, m = p.compiled(state, batch, rng, p.frozen)
        jax.block_until_ready(state)
    wall, r1 = (time.perf_counter() - t0) / args.steps, resource.getrusage(resource.RUSAGE_SELF)
    path = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)[0]
    prof = jax.profiler.ProfileData.from_file(path)
    totals = collections.Counter()
    counts = collections.Counter()
    for plane in prof.planes:
        if not plane.name.startswith("/host:CPU"):
            continue
        for line in plane.lines:
            if "python" in line.name.lower():
                continue
            for ev in line.events:
                totals[ev.name] += ev.duration_ns
                counts[ev.name] += 1
    hlo = p.compiled.as_text()
    # fusion name -> (shape, the jax op it came from), from the optimized HLO's metadata
    where = {}
    for line in hlo.splitlines():
        mt = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) .*?op_name=\"([^\"]*)\"", line)
        if mt:
            where[mt.group(1)] = (mt.group(2), mt.group(3).replace("jit(train_step)/", ""))
    skip = ("PjitFunction", "ExecuteHelper", "Thunk", "PjRt", "TfrtCpu", "XlaModule", "ThunkExecutor")
    items = [(k, v) for k, v in totals.items() if not any(s in k for s in skip)]
    total = sum(v for _, v in items)
    faults = (r1.ru_minflt - r0.ru_minflt) / args.steps
    print(
        f"wall {wall * 1e3:.1f} ms/step; op events total {total / 1e6 / args.steps:.1f} ms/step (summed over "
        f"threads); system CPU {(r1.ru_stime - r0.ru_stime) / args.steps * 1e3:.1f} ms/step, {faults:,.0f} minor "
        f"page faults/step (temp buffers {p.compiled.memory_analysis().temp_size_in_bytes / 4096:,.0f} pages)"
    )
    # Where the time goes: the part of the step (model forward / backward, loss, optimizer) by the
    # kind of op (matmul, copy or transpose, fill, reduction, other fused elementwise, loop control).
    table = collections.Counter()
    for name, ns in items:
        op = where.get(name, ("", ""))[1]
        table[area(op), kind(name, op)] += ns
    kinds = sorted({k for _, k in table}, key=lambda k: -sum(v for (_, kk), v in table.items() if kk == k))
    print("by part and op kind (ms/step):")
    print(f"{'':16s}" + "".join(f"{k[:14]:>15s}" for k in kinds) + f"{'total':>15s}")
    for a in AREAS:
        row = [table[a, k] for k in kinds]
        print(
            f"{a:16s}" + "".join(f"{v / 1e6 / args.steps:15.2f}" for v in row) + f"{sum(row) / 1e6 / args.steps:15.2f}"
        )
    col = [sum(table[a, k] for a in AREAS) for k in kinds]
    print(f"{'total':16s}" + "".join(f"{v / 1e6 / args.steps:15.2f}" for v in col))
    print(f"{'share':16s}" + "".join(f"{100 * v / total:14.1f}%" for v in col))
    # The same time grouped by where in the model it comes from (layers folded together).
    groups = collections.Counter()
    for name, ns in items:
        shape, op = where.get(name, ("", name.split(".")[0]))
        op = re.sub(r"layers_\d+/", "layers/", op)
        groups["bwd " if "transpose(" in op else "fwd "] += 0  # keep the two passes apart below
        key = ("bwd " if "transpose(" in op else "fwd ") + re.sub(r"(transpose\(|jvp\(|\)|TransformerLM/?)", "", op)
        groups[key] += ns
    print(f"by scope (top {args.top // 2}):")
    for key, ns in groups.most_common(args.top // 2):
        print(f"{ns / 1e6 / args.steps:8.2f} ms {100 * ns / total:5.1f}%  {key[-90:]}")
    print("by op:")
    for name, ns in sorted(items, key=lambda kv: -kv[1])[: args.top]:
        shape, op = where.get(name, ("", ""))
        print(
            f"{ns / 1e6 / args.steps:8.2f} ms {100 * ns / total:5.1f}% x{counts[name] // args.steps:<3d} "
            f"{name[:28]:28s} {shape[:22]:22s} {op[-70:]}"
        )


if __name__ == "__main__":
    main()
