"""Training-step benchmark: `python -m llm_jax.bench --config configs/X.py[:arg] [--config.K=V ...] [--steps N]`.

Builds the run's model, optimizer, mesh and sharded state exactly as the trainer does, compiles the
real `train_step` (`train.make_steps`), runs warm-up steps, then times `--steps` steps on random
tokens of the configured shape (`train.batch_size` x `data.seq_len`). Progress goes to stderr; the
last line of stdout is one JSON object (a bad config or mesh: one line, `bench: error: ...`):

  tokens_per_sec      global tokens per second at the median step time
  step_time_s         median step time (and step_time_min_s, step_time_max_s)
  compile_s           lowering + XLA compilation of the train step
  flops_per_token     model training FLOPs per token (llm_jax.flops: 6N + causal attention)
  mfu                 model FLOPs utilization against peak_flops (a per-device table on GPU/TPU, a
                      float32 matmul measured by this command on CPU)
  peak_memory_bytes   per-device peak of the compiled step (XLA memory analysis)
  num_params, mesh, devices, ...
"""

from __future__ import annotations

import json
import sys
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from llm_jax import cli, optim, sharding, train
from llm_jax import config as config_lib
from llm_jax import family as family_lib
from llm_jax import flops as flops_lib
from llm_jax.model import count_params

FLAGS = flags.FLAGS


def define_flags():
    """The command's flags, defined only when run as a command: `llm_jax.aot` imports this module's
    functions and defines its own `--config`."""
    config_flags.DEFINE_config_file("config", None, "Config file: configs/X.py or configs/X.py:arg.", lock_config=True)
    flags.DEFINE_integer("steps", 10, "Timed training steps.")
    flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
    flags.mark_flags_as_required(["config"])


def compiled_memory(compiled) -> dict:
    """Per-device bytes from XLA's memory analysis of a compiled executable (None where unavailable)."""
    try:
        ma = compiled.memory_analysis()
    except Exception:  # some backends do not implement it
        ma = None
    if ma is None:
        return {"peak_memory_bytes": None}
    get = lambda name: int(getattr(ma, name, 0) or 0)
    out = {
        "argument_bytes": get("argument_size_in_bytes"),
        "output_bytes": get("output_size_in_bytes"),
        "temp_bytes": get("temp_size_in_bytes"),
        "alias_bytes": get("alias_size_in_bytes"),
    }
    # XLA's own peak where the backend computes it (GPU/TPU); the CPU one leaves out temporaries,
    # so take at least arguments + outputs + temporaries, less the buffers donation aliases.
    bound = out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"] - out["alias_bytes"]
    out["peak_memory_bytes"] = max(get("peak_memory_in_bytes"), bound)
    return out


def bench_vocab(config) -> int:
    """Random tokens need no tokenizer: the configured vocabulary, else the one the tokenizer would have."""
    if config.model.vocab_size:
        return config.model.vocab_size
    if config.data.tokenizer == "sentencepiece":
        return config.data.vocab_size
    return 256  # byte / char tokenizers: at most a byte's worth of symbols


def time_steps(compiled, state, batch, rng, steps: int, warmup: int) -> tuple[list[float], float, float]:
    """(seconds of each timed step, CPU seconds per step, last loss) of `compiled` after `warmup` steps."""
    for _ in range(warmup):
        state, metrics = compiled(state, batch, rng)
    jax.block_until_ready(state)
    times = []
    cpu0 = time.process_time()
    for _ in range(steps):
        t = time.perf_counter()
        state, metrics = compiled(state, batch, rng)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t)
    return times, (time.process_time() - cpu0) / steps, float(metrics["loss"])


def run(config, steps: int = 10, warmup: int = 2, log=lambda *a: print(*a, file=sys.stderr)) -> dict:
    """Benchmarks `config`'s train step; returns the result dict (what the command prints)."""
    config = config_lib.finalize(config)
    tc, seq_len = config.train, config.data.seq_len
    mesh, rules = sharding.make_mesh(config.mesh), sharding.logical_rules(config)
    model_cfg = config_lib.model_config(config, bench_vocab(config))
    sharding.check_divisible(mesh, model_cfg, tc.batch_size)
    model = family_lib.build(model_cfg)
    tx = optim.make_optimizer(config.optim)
    state, state_sh = train.create_sharded_state(model, tx, mesh, rules, jax.random.key(config.seed), seq_len)
    num_params = count_params(state.params)
    p_train, _ = train.make_steps(model, tx, mesh, rules, state_sh, tc.grad_accum_steps)
    host = family_lib.of(model).random_batch(model_cfg, tc.batch_size, seq_len, config.seed)
    batch = sharding.host_to_global(host, mesh)
    step_rng = jax.device_put(jax.random.key(1), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))

    log(f"bench: {num_params:,} params, mesh {dict(mesh.shape)}, batch {tc.batch_size} x {seq_len}; compiling")
    t0 = time.perf_counter()
    with sharding.use_mesh(mesh, rules):  # the context the trainer's step runs in
        compiled = p_train.jitted.lower(state, batch, step_rng).compile()
    compile_s = time.perf_counter() - t0
    times, cpu_per_step, loss = time_steps(compiled, state, batch, step_rng, steps, warmup)

    step_time = float(np.median(times))
    tps = tc.batch_size * seq_len / step_time
    fpt = flops_lib.flops_per_token(model_cfg, seq_len)
    peak, peak_source = flops_lib.peak_flops(mesh.devices.flatten().tolist(), model_cfg.dtype)
    mfu = flops_lib.mfu(tps, fpt, peak)
    result = {
        "config": config.model.preset, "tokens_per_sec": tps, "step_time_s": step_time,
        "step_time_min_s": float(np.min(times)), "step_time_max_s": float(np.max(times)), "steps": steps,
        "cpu_time_per_step_s": cpu_per_step,  # this process's CPU seconds (all threads) per step
        "compile_s": compile_s, "flops_per_token": fpt, "model_tflops_per_sec": tps * fpt / 1e12, "mfu": mfu,
        "peak_flops": peak, "peak_flops_source": peak_source, **compiled_memory(compiled), "num_params": num_params,
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}", "batch_size": tc.batch_size,
        "seq_len": seq_len, "dtype": model_cfg.dtype, "scan_layers": model_cfg.scan_layers, "remat": model_cfg.remat,
        "attention": model_cfg.attention, "final_loss": loss, "jax": jax.__version__,
    }  # fmt: skip
    mfu_text = "n/a" if mfu is None else f"{100 * mfu:.1f}%"
    log(
        f"bench: {tps:,.0f} tokens/s, step {step_time * 1e3:.1f} ms (min {min(times) * 1e3:.1f}, max "
        f"{max(times) * 1e3:.1f}), compile {compile_s:.1f}s, MFU {mfu_text}"
    )
    return result


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(
            f"unexpected arguments {argv[1:]}; options are --config, --steps, --warmup, --config.KEY=VALUE"
        )
    if FLAGS.steps < 1:
        raise app.UsageError(f"--steps={FLAGS.steps} must be at least 1")
    result = run(cli.loaded_config("config"), FLAGS.steps, FLAGS.warmup)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    define_flags()
    cli.run(main, "bench")
