"""Training-step benchmark: `python -m llm_jax.bench --config configs/X.py[:arg] [--config.K=V ...] [--steps N]`.

Builds the run's model, optimizer, mesh, sharded state and jitted step with the trainer's own
builder (`llm_jax.training.state.build`: the same checks), compiles the real `train_step`, runs
warm-up steps, then times `--steps` steps on random tokens of the configured shape
(`train.batch_size` x `data.seq_len`, with the arrays the configured data yields). Progress goes to stderr; the
last line of stdout is one JSON object (a bad config or mesh: one line, `bench: error: ...`):

  tokens_per_sec      global tokens per second at the median step time
  step_time_s         median step time (and step_time_min_s, step_time_max_s)
  compile_s           lowering + XLA compilation of the train step
  flops_per_token     model training FLOPs per token (llm_jax.models.flops: 6N + causal attention)
  mfu                 model FLOPs utilization against peak_flops (a per-device table on GPU/TPU, a
                      float32 matmul measured by this command on CPU)
  peak_memory_bytes   per-device peak of the compiled step (XLA memory analysis)
  cpu_time_per_step_s this process's CPU seconds per step (all threads), system_time_per_step_s the
                      part in the kernel, minor_faults_per_step its page faults (minor_faults_each_step: per step)
  keep_freed_memory   whether the glibc settings of llm_jax/runtime/hostmem.py are in force
  num_params, mesh, devices, ...
"""

from __future__ import annotations

import dataclasses
import resource
import sys
import time
from typing import Any

import jax
import numpy as np

from llm_jax.data import lm_data as data_lib
from llm_jax.models import family as family_lib
from llm_jax.models import flops as flops_lib
from llm_jax.models.model import count_params
from llm_jax.runtime import hostmem, sharding
from llm_jax.training import state as state_lib


def compiled_memory(compiled) -> dict:
    """Per-device bytes from XLA's memory analysis of a compiled executable (None where unavailable)."""
    try:
        ma = compiled.memory_analysis()
    except NotImplementedError:  # a backend without it (JAX documents this; most versions return None)
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


def time_steps(compiled, state, batch, rng, steps: int, warmup: int, frozen=None) -> tuple[list[float], dict, float]:
    """(seconds of each timed step, per-step process figures, last loss) of `compiled` after `warmup` steps.

    The process figures (all threads, from getrusage): CPU seconds, the part of them in the kernel,
    and minor page faults. Faults near the step's temporary bytes / 4096 mean its working memory is
    mapped in afresh every step (llm_jax/runtime/hostmem.py).
    """
    for _ in range(warmup):
        state, metrics = compiled(state, batch, rng, {} if frozen is None else frozen)
    jax.block_until_ready(state)
    times, faults = [], []
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(steps):
        t = time.perf_counter()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        state, metrics = compiled(state, batch, rng, {} if frozen is None else frozen)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    process = {
        "cpu_time_per_step_s": (r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) / steps,
        "system_time_per_step_s": (r1.ru_stime - r0.ru_stime) / steps,
        "minor_faults_per_step": (r1.ru_minflt - r0.ru_minflt) / steps,
        # Each step's own: the heap may still grow in a step after the warm-up (the order in which
        # XLA's threads free varies), which the mean hides and a median does not.
        "minor_faults_each_step": faults,
    }
    return times, process, float(metrics["loss"])


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A config's compiled train step with its inputs, as the trainer would run it."""

    config: Any  # the finalized config
    compiled: Any  # the compiled train_step: (state, batch, rng, frozen) -> (state, metrics)
    state: Any  # sharded TrainState
    batch: dict  # random global batch of train.batch_size x data.seq_len tokens
    rng: jax.Array
    model_cfg: Any
    mesh: jax.sharding.Mesh
    num_params: int
    compile_s: float
    frozen: Any = None  # a LoRA run's frozen base (random), passed to each step


def prepare(config, log=lambda *a: print(*a, file=sys.stderr)) -> Prepared:
    """Builds the run's model, optimizer, mesh and sharded state as the trainer does (`state.build`:
    the same checks, so a config the trainer refuses is refused here), and compiles the real train
    step for a random batch with the arrays of the configured data."""
    b = state_lib.build(config, bench_vocab(config))
    config, mesh, model_cfg = b.config, b.mesh, b.model_cfg
    tc, seq_len = config.train, config.data.seq_len
    state = b.create_state(jax.random.key(config.seed))
    num_params = count_params(state.params)
    options = data_lib.batch_options(config.data)
    host = family_lib.of(b.model).random_batch(model_cfg, tc.batch_size, seq_len, config.seed, **options)
    batch = sharding.host_to_global(host, mesh)
    step_rng = jax.device_put(jax.random.key(1), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))

    frozen = b.create_frozen(jax.random.key(config.seed + 1))  # a LoRA run's base ({} otherwise)
    log(f"bench: {num_params:,} params, mesh {dict(mesh.shape)}, batch {tc.batch_size} x {seq_len}; compiling")
    t0 = time.perf_counter()
    with sharding.use_mesh(mesh, b.rules):  # the context the trainer's step runs in
        compiled = b.p_train.jitted.lower(state, batch, step_rng, frozen).compile()
    return Prepared(
        config, compiled, state, batch, step_rng, model_cfg, mesh, num_params, time.perf_counter() - t0, frozen
    )  # fmt: skip


def run(config, steps: int = 10, warmup: int = 2, log=lambda *a: print(*a, file=sys.stderr)) -> dict:
    """Benchmarks `config`'s train step; returns the result dict (what the command prints)."""
    p = prepare(config, log)
    config, model_cfg, mesh, compiled = p.config, p.model_cfg, p.mesh, p.compiled
    tc, seq_len = config.train, config.data.seq_len
    times, process, loss = time_steps(compiled, p.state, p.batch, p.rng, steps, warmup, p.frozen)

    step_time = float(np.median(times))
    tps = tc.batch_size * seq_len / step_time
    fpt = family_lib.flops_per_token(model_cfg, seq_len)
    peak, peak_source = flops_lib.peak_flops(mesh.devices.flatten().tolist(), model_cfg.dtype)
    mfu = flops_lib.mfu(tps, fpt, peak)
    result = {
        "config": config.model.preset, "tokens_per_sec": tps, "step_time_s": step_time,
        "step_time_min_s": float(np.min(times)), "step_time_max_s": float(np.max(times)), "steps": steps,
        **process, "compile_s": p.compile_s, "flops_per_token": fpt, "model_tflops_per_sec": tps * fpt / 1e12,
        "mfu": mfu, "peak_flops": peak, "peak_flops_source": peak_source, **compiled_memory(compiled),
        "num_params": p.num_params, "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}", "batch_size": tc.batch_size,
        "seq_len": seq_len, "dtype": model_cfg.dtype, "scan_layers": model_cfg.scan_layers, "remat": model_cfg.remat,
        "attention": model_cfg.attention, "final_loss": loss, "jax": jax.__version__,
        "keep_freed_memory": hostmem.in_force(),
    }  # fmt: skip
    mfu_text = "n/a" if mfu is None else f"{100 * mfu:.1f}%"
    log(
        f"bench: {tps:,.0f} tokens/s, step {step_time * 1e3:.1f} ms (min {min(times) * 1e3:.1f}, max "
        f"{max(times) * 1e3:.1f}), compile {p.compile_s:.1f}s, MFU {mfu_text}"
    )
    return result
