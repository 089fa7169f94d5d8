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
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("config", nargs="?", default="configs/bench_cpu.py")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=40)
    args, overrides = ap.parse_known_args()

    import jax
    import numpy as np
    from absl import flags
    from ml_collections import config_flags

    from llm_jax import config as config_lib
    from llm_jax import optim, sharding, train
    from llm_jax.model import TransformerLM

    config_flags.DEFINE_config_file("config", None)  # parsed below: a default would load the file twice
    flags.FLAGS(["prog", f"--config={args.config}", *overrides])
    config = config_lib.finalize(flags.FLAGS.config)
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.logical_rules(config)
    model = TransformerLM(config_lib.model_config(config, config.model.vocab_size or 256))
    tx = optim.make_optimizer(config.optim)
    state, sh = train.create_sharded_state(model, tx, mesh, rules, jax.random.key(0), config.data.seq_len)
    p_train, _ = train.make_steps(model, tx, mesh, rules, sh, config.train.grad_accum_steps)
    b, t = config.train.batch_size, config.data.seq_len
    tok = np.random.default_rng(0).integers(0, model.cfg.vocab_size, (b, t + 1), dtype=np.int32)
    batch = sharding.host_to_global({"inputs": tok[:, :-1], "targets": tok[:, 1:]}, mesh)
    rng = jax.random.key(1)
    for _ in range(2):
        state, m = p_train(state, batch, rng)
    jax.block_until_ready(state)

    d = tempfile.mkdtemp()
    t0 = time.perf_counter()
    with jax.profiler.trace(d):
        for _ in range(args.steps):
            state, m = p_train(state, batch, rng)
        jax.block_until_ready(state)
    wall = (time.perf_counter() - t0) / args.steps
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
    with sharding.use_mesh(mesh, rules):
        hlo = p_train.jitted.lower(state, batch, rng).compile().as_text()
    # fusion name -> (shape, the jax op it came from), from the optimized HLO's metadata
    where = {}
    for line in hlo.splitlines():
        mt = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) .*?op_name=\"([^\"]*)\"", line)
        if mt:
            where[mt.group(1)] = (mt.group(2), mt.group(3).replace("jit(train_step)/", ""))
    skip = ("PjitFunction", "ExecuteHelper", "Thunk", "PjRt", "TfrtCpu", "XlaModule", "ThunkExecutor")
    items = [(k, v) for k, v in totals.items() if not any(s in k for s in skip)]
    total = sum(v for _, v in items)
    print(
        f"wall {wall * 1e3:.1f} ms/step; op events total {total / 1e6 / args.steps:.1f} ms/step (summed over threads)"
    )
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
