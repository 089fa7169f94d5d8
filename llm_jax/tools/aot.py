"""Pod-scale planning without the pod: compile the train step ahead of time for a TPU topology.

    python -m llm_jax.aot --config configs/llama.py:7b --topology v5p-64
    python -m llm_jax.aot --config configs/gpt2.py:xl --topology v5e-8 --sweep
    python -m llm_jax.aot --config configs/llama.py:1b --topology v5p:2x2x1 --num_slices 2 --dump /tmp/hlo
    python -m llm_jax.aot --config configs/llama3.py:8b --topology v5e-8 --config.train.batch_size=8 \
        --config.lora.rank=16 --config.lora.base=planned --config.lora.base_dtype=int4   # QLoRA

Builds the trainer's own jitted train step (same model, optimizer, mesh from `config.mesh`, logical
rules, state shardings and donation as `llm_jax.main`), lowers it with abstract arguments (shapes
and shardings only: no parameter is ever allocated) and compiles it with the TPU compiler for the
named chips, which libtpu describes on any machine (`pip install -e '.[tpu]'`). The report: devices
and mesh, parameters and optimizer state per device, temporaries, the total per device against the
chip's HBM, compile time, and the collectives of the optimized HLO (`llm_jax.tools.hlo`). A LoRA
run's frozen base is an abstract argument like the state (the base named by `config.lora.base` is
never read): the report splits the trainable adapters from the frozen base, as stored (bfloat16,
int8, int4 packed). The last line of stdout is one JSON object. `--sweep` reports candidate layouts
(mesh splits, expert-parallel sizes, remat policies, gradient accumulation) as one table sorted by
memory per device.

A program larger than the chip is a result, not an error: the TPU compiler refuses it, and the
report gives fits=false with the compiler's own numbers (exit status 0).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from llm_jax.models.model import ModelConfig
from llm_jax.runtime import files, sharding
from llm_jax.runtime.errors import BadValue, Unavailable
from llm_jax.tools import bench, hlo
from llm_jax.training import state as state_lib
from llm_jax.training import summary

GIB = 2**30
# HBM per chip, from the Cloud TPU system-architecture pages (v4: 32 GiB; v5e: 16 GB; v5p: 95 GB;
# v6e: 32 GB). The compiler keeps a little for itself (it reports 15.75G available on a v5e).
HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
# device_kind as libtpu names each generation; longest first, since 'TPU v5' prefixes 'TPU v5 lite'.
DEVICE_KINDS = (("TPU v5 lite", "v5e"), ("TPU v6 lite", "v6e"), ("TPU v4", "v4"), ("TPU v5", "v5p"))
GENERATIONS = {"v4": "v4", "v5p": "v5p", "v5e": "v5e", "v5litepod": "v5e", "v6e": "v6e"}
THREE_D = ("v4", "v5p")  # 3-d torus; two TensorCores per chip, run as one JAX device (megacore)
# Slice shapes by chip count, as Cloud TPU allocates them (v5p-8 is 2x2x1, v5e-8 is 2x4).
GRIDS_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8), 256: (4, 8, 8)}
GRIDS_3D.update({512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16)})
GRIDS_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}
ACCEPTED_FORMS = (
    "accelerator types v4-N, v5p-N (N counts TensorCores, two per chip: v5p-8 is 4 chips), v5e-N or "
    "v5litepod-N, v6e-N (N counts chips), e.g. v5p-64, v5e-8, v6e-1; or chip grids v4:AxBxC, v5p:AxBxC, "
    "v5e:AxB, v6e:AxB, e.g. v5p:4x4x4, v5e:2x4, v5e:1x1; plus --num_slices N for N such slices"
)
INSTALL_HINT = (
    "TPU ahead-of-time compilation needs libtpu (it describes TPU chips on a machine without any): "
    "pip install -e '.[tpu]' installs the libtpu that matches your JAX (Python 3.11: jax 0.10.2 + "
    "libtpu 0.0.42.1; Python 3.12+: jax 0.12.0.1 + libtpu 0.0.50.*)"
)


class TopologyError(BadValue):
    """A topology name this tool cannot turn into TPU devices; the message lists the accepted forms."""


class LibtpuMissing(Unavailable):
    """libtpu is not installed; the message says how to install it."""


# ----------------------------------------------------------------------------------------------
# Topologies


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # as given, e.g. 'v5p-64'
    generation: str  # 'v4' | 'v5e' | 'v5p' | 'v6e'
    grid: tuple[int, ...]  # chips along each torus dimension of one slice, e.g. (2, 4, 4)
    num_slices: int = 1

    @property
    def chips(self) -> int:
        return math.prod(self.grid) * self.num_slices

    @property
    def libtpu_name(self) -> str:
        return f"{self.generation}:{'x'.join(map(str, self.grid))}"

    def host_bounds(self) -> tuple[int, int, int]:
        """Chips per host along each dimension: libtpu assumes 2x2x1, which a single chip (v5e:1x1) is not."""
        grid = (*self.grid, 1, 1)[:3]
        if self.generation in THREE_D:
            return tuple(min(g, h) for g, h in zip(grid, (2, 2, 1)))
        return grid if math.prod(grid) <= 8 else (2, 2, 1)  # v5e/v6e: up to 8 chips on one host


def parse_topology(name: str, num_slices: int = 1) -> Topology:
    """'v5p-64' | 'v5e-8' | 'v5p:2x4x4' | 'v5e:1x1' ... -> Topology; TopologyError lists the accepted forms."""
    if num_slices < 1:
        raise TopologyError(f"--num_slices={num_slices} must be at least 1")
    m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)(?:-(\d+)|:(\d+(?:x\d+)*))", name.strip().lower())
    if not m:
        raise TopologyError(f"unknown topology {name!r}; accepted forms: {ACCEPTED_FORMS}")
    gen = GENERATIONS[m.group(1)]
    grids = GRIDS_3D if gen in THREE_D else GRIDS_2D
    if m.group(2):  # accelerator type: v4 / v5p count TensorCores, two per chip
        count = int(m.group(2))
        chips = count // 2 if gen in THREE_D else count
        grid = grids.get(chips) if not (gen in THREE_D and count % 2) else None
        if grid is None:
            raise TopologyError(
                f"topology {name!r}: no {gen} slice of that size here; sizes are "
                f"{', '.join(f'{m.group(1)}-{c * 2 if gen in THREE_D else c}' for c in grids)} "
                f"(or give the chip grid, e.g. {gen}:{'x'.join(map(str, next(iter(grids.values()))))}); "
                f"accepted forms: {ACCEPTED_FORMS}"
            )
    else:
        grid = tuple(int(d) for d in m.group(3).split("x"))
        if len(grid) != (3 if gen in THREE_D else 2) or 0 in grid:
            raise TopologyError(
                f"topology {name!r}: a {gen} grid has {3 if gen in THREE_D else 2} positive dimensions; "
                f"accepted forms: {ACCEPTED_FORMS}"
            )
    return Topology(name, gen, grid, num_slices)


def topology_devices(topo: Topology) -> list:
    """Compile-only TPU devices of `topo` from libtpu (no TPU needed, the default backend is untouched)."""
    if importlib.util.find_spec("libtpu") is None:
        raise LibtpuMissing(INSTALL_HINT)
    # libtpu takes a machine-wide lock file as if it owned the chips; describing chips owns nothing,
    # and the lock would stop two planning runs (or a test and a notebook) at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(
            topology_name=topo.libtpu_name,
            platform="tpu",
            chip_config_name="megacore" if topo.generation in THREE_D else "default",
            chips_per_host_bounds=topo.host_bounds(),
            num_slices=topo.num_slices,
        )
    except jax.errors.JaxRuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise TopologyError(
            f"libtpu rejects topology {topo.name!r} ({first}); accepted forms: {ACCEPTED_FORMS}"
        ) from None
    return list(desc.devices)


def generation_of(device_kind: str) -> str | None:
    """'TPU v5 lite' -> 'v5e'; None for a device this table does not know (CPU, GPU)."""
    return next((gen for kind, gen in DEVICE_KINDS if device_kind.startswith(kind)), None)


# ----------------------------------------------------------------------------------------------
# The train step, abstractly


@dataclasses.dataclass
class Step:
    lower: Callable[[], Any]  # () -> jax.stages.Lowered of the trainer's train step
    state: Any  # TrainState of ShapeDtypeStructs carrying the shardings
    batch: dict  # the family's batch_spec for the configured data: ShapeDtypeStructs [batch_size, seq_len]
    mesh: jax.sharding.Mesh
    model_cfg: ModelConfig
    frozen: Any  # a LoRA run's frozen base (ShapeDtypeStructs with shardings, at its stored dtypes); {} otherwise


def build_train_step(config: ml_collections.ConfigDict, devices: Sequence) -> Step:
    """The jitted train step `llm_jax.main` would run on `devices`, with abstract arguments.

    The trainer's own builder (`llm_jax.training.state.build`: config checks, `check_batch`, abstract
    state, `make_steps`, the batch the configured data yields), on shapes only. Raises a UserError
    for a config that does not fit the devices (a mesh that does not divide them, a batch that does
    not split).
    """
    b = state_lib.build(config, bench.bench_vocab(config), devices)
    key = jax.eval_shape(lambda: jax.random.key(b.config.seed))  # a key's type; nothing runs anywhere
    rng = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=NamedSharding(b.mesh, P()))

    def lower():
        with sharding.use_mesh(b.mesh, b.rules):  # the context the trainer's step is traced in
            return b.p_train.jitted.lower(b.state, b.batch, rng, b.frozen)

    return Step(lower, b.state, b.batch, b.mesh, b.model_cfg, b.frozen)


def bytes_per_device(tree: Any) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs with shardings (its shard of each leaf;
    int4 packed two to a byte, as a TPU stores it)."""
    return summary.tree_bytes(tree)[1]


# ----------------------------------------------------------------------------------------------
# Memory, and the compiler's verdict when it does not fit


def _to_bytes(number: str, unit: str) -> int:
    return int(float(number) * 1024 ** "BKMGT".index(unit.upper()[0]))


def parse_oom(message: str) -> dict | None:
    """The numbers of the TPU compiler's out-of-memory error, or None for another error.

    Two forms: 'Used 21.95G of 15.48G hbm' (the program was laid out) and 'the total memory
    required for HLO temporaries (20.19G) exceeds available HBM (15.75G)' (refused before that).
    Sizes are binary (G = GiB), as XLA prints them.
    """
    size = r"([\d.]+)\s*([KMGT]i?B?|B)"
    used = re.search(rf"Used {size} of {size} hbm", message)
    if used:
        required, available = _to_bytes(*used.group(1, 2)), _to_bytes(*used.group(3, 4))
    else:
        early = re.search(rf"required for HLO temporaries \({size}\) exceeds available HBM \({size}\)", message)
        if not early:
            return None
        required, available = _to_bytes(*early.group(1, 2)), _to_bytes(*early.group(3, 4))
    first = next((line.strip() for line in message.splitlines() if "memory" in line.lower()), message.strip())
    return {"per_device_bytes": required, "compiler_hbm_bytes": available, "error": first[:300]}


def compiled_sizes(compiled, platform: str) -> dict:
    """Per-device bytes of a compiled step (XLA's memory analysis) and the total held against HBM.

    On TPU the total is XLA's peak of live buffers (arguments and outputs included) plus the program
    itself: that is what the TPU compiler checks, and a step it accepts can have a buffer sum
    (arguments + outputs + temporaries - donated) well above the chip, its temporaries not all
    being live at once (gpt2-small on v5e-8: peak 12.4 GiB, sum 17.5 GiB, accepted at 15.75).
    Elsewhere the peak leaves temporaries out, so the buffer sum is the total.
    """
    sizes = bench.compiled_memory(compiled)
    sizes.pop("peak_memory_bytes")
    ma = compiled.memory_analysis()
    program = int(getattr(ma, "generated_code_size_in_bytes", 0) or 0) if ma is not None else 0
    peak = int(getattr(ma, "peak_memory_in_bytes", 0) or 0) if ma is not None else 0
    if "argument_bytes" not in sizes:
        return {"program_bytes": program, "per_device_bytes": None}
    buffer_sum = sizes["argument_bytes"] + sizes["output_bytes"] + sizes["temp_bytes"] - sizes["alias_bytes"]
    total = peak if platform == "tpu" and peak else buffer_sum
    return {
        **sizes,
        "program_bytes": program,
        "peak_bytes": peak,
        "buffer_sum_bytes": buffer_sum,
        "per_device_bytes": total + program,
    }


# ----------------------------------------------------------------------------------------------
# The report


def report(
    config: ml_collections.ConfigDict,
    topology: str | Topology | None = None,
    *,
    devices: Sequence | None = None,
    num_slices: int = 1,
    dump_dir: str | None = None,
    log: Callable[[str], None] = lambda s: None,
) -> dict:
    """Compiles `config`'s train step for a TPU topology (a name, or `devices` directly); the report as a dict.

    Keys: topology, num_devices, device_kind, num_hosts, mesh, batch_size, seq_len, grad_accum_steps,
    remat, lora_rank, base_dtype, num_params (the whole model), trainable_params, frozen_params (a LoRA
    run's base, else 0), params_bytes (the trainable ones) / frozen_bytes (at their stored dtypes,
    int4 packed) / opt_state_bytes / batch_bytes (what one device holds of each),
    argument/output/alias/temp/program/peak/buffer_sum_bytes (XLA), per_device_bytes (the total held
    against HBM, see `compiled_sizes`), hbm_bytes, headroom_bytes,
    fits, lower_s, compile_s, compile_cpu_s, collectives ({kind: {ops, count per step, bytes per step
    and device}}, see llm_jax.tools.hlo.summarize).
    Sizes in bytes, times in seconds. Out of memory: fits=False, per_device_bytes and
    compiler_hbm_bytes from the compiler's message, the XLA sizes None. Raises TopologyError,
    LibtpuMissing, or BadValue for a config that does not fit the devices' count.
    """
    topo = parse_topology(topology, num_slices) if isinstance(topology, str) else topology
    if devices is None:
        if topo is None:
            raise ValueError("report() needs a topology name (e.g. 'v5p-8') or a list of devices")
        devices = topology_devices(topo)
    step = build_train_step(config, devices)
    out = describe(config, step, devices, topo)
    log(f"aot: {out['preset']} on {out['topology']}: {len(devices)} x {out['device_kind']}, mesh {out['mesh']}")
    measured, lowered, compiled_text = compile_step(step, out["hbm_bytes"])
    out.update(measured)
    if dump_dir and compiled_text is not None:
        out["dump"] = dump_hlo(dump_dir, out, lowered.as_text(), compiled_text)
    return out


def describe(config: ml_collections.ConfigDict, step: Step, devices: Sequence, topo: Topology | None) -> dict:
    """What is known before compiling: devices, mesh, run shape, and the state one device holds (bytes)."""
    kind = devices[0].device_kind
    gen = topo.generation if topo else generation_of(kind)
    count = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))  # noqa: E731
    trainable, frozen = count(step.state.params), count(step.frozen)
    return {
        "topology": topo.name if topo else f"{len(devices)} x {kind}",
        "topology_desc": f"{topo.libtpu_name} x {topo.num_slices} slice(s)" if topo else None,
        "num_devices": len(devices),
        "device_kind": kind,
        "num_hosts": len({d.process_index for d in devices}),
        "mesh": {k: int(v) for k, v in step.mesh.shape.items()},
        "preset": config.model.preset,
        "batch_size": config.train.batch_size,
        "seq_len": config.data.seq_len,
        "grad_accum_steps": config.train.grad_accum_steps,
        "remat": step.model_cfg.remat,
        "lora_rank": step.model_cfg.lora_rank,
        "base_dtype": config.lora.base_dtype if step.model_cfg.lora_rank else None,
        "num_params": trainable + frozen,
        "trainable_params": trainable,
        "frozen_params": frozen,
        "params_bytes": bytes_per_device(step.state.params),
        "frozen_bytes": bytes_per_device(step.frozen),
        "opt_state_bytes": bytes_per_device(step.state.opt_state),
        "batch_bytes": bytes_per_device(step.batch),
        "hbm_bytes": HBM_GIB[gen] * GIB if gen in HBM_GIB else None,
    }


def compile_step(step: Step, hbm_bytes: int | None) -> tuple[dict, Any, str | None]:
    """(timings, XLA's sizes, fits and collectives; the Lowered step; the optimized HLO text or None).

    The TPU compiler refuses a program larger than the chip: that refusal becomes fits=False with
    its numbers; any other compile error is raised.
    """
    t0 = time.perf_counter()
    lowered = step.lower()
    t1, cpu1 = time.perf_counter(), time.process_time()
    # Wall and CPU seconds (this process, all threads): on a shared machine the CPU figure is the stable one.
    timing = lambda: {
        "lower_s": t1 - t0,
        "compile_s": time.perf_counter() - t1,
        "compile_cpu_s": time.process_time() - cpu1,
    }
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        oom = parse_oom(str(e))
        if oom is None:
            raise
        out = {**oom, **timing(), "fits": False, "headroom_bytes": None, "collectives": None}
        return out, lowered, None
    out = {**timing(), **compiled_sizes(compiled, step.mesh.devices.flat[0].platform)}
    total = out["per_device_bytes"]
    out["headroom_bytes"] = None if hbm_bytes is None or total is None else hbm_bytes - total
    out["fits"] = None if out["headroom_bytes"] is None else out["headroom_bytes"] >= 0
    text = compiled.as_text()
    ops, out["unknown_loops"] = hlo.collective_ops(text)
    out["collectives"] = hlo.summarize(ops)
    return out, lowered, text


def dump_hlo(dump_dir: str, r: dict, lowered_text: str, compiled_text: str) -> list[str]:
    """Writes the step's StableHLO (before XLA) and optimized HLO (after) to `dump_dir`; returns the paths."""
    os.makedirs(dump_dir, exist_ok=True)
    layout = "x".join(map(str, r["mesh"].values())) + f"_remat-{r['remat']}_accum{r['grad_accum_steps']}"
    stem = re.sub(r"[^\w.\-]+", "_", f"{r['preset']}_{r['topology']}_{layout}")
    paths = [os.path.join(dump_dir, f"{stem}.stablehlo.mlir"), os.path.join(dump_dir, f"{stem}.optimized.hlo.txt")]
    for path, text in zip(paths, (lowered_text, compiled_text)):
        files.write_text(path, text)
    return paths


def gib(n: int | None) -> str:
    """Bytes in binary units, e.g. '18.61 GiB', '512.00 KiB'; '?' when unknown."""
    if n is None:
        return "?"
    unit = max(i for i in range(4) if i == 0 or abs(n) >= 1024**i)
    return f"{n / 1024**unit:.2f} {('B', 'KiB', 'MiB', 'GiB')[unit]}"


def _parameter_lines(r: dict) -> list[str]:
    """Trainable and frozen parameters per device (a LoRA run: the adapters, and the base as stored)."""
    if not r.get("lora_rank"):
        return [f"  parameters       {gib(r['params_bytes']):>12} per device ({r['num_params']:,} parameters, trained)"]
    return [
        f"  trainable        {gib(r['params_bytes']):>12} per device ({r['trainable_params']:,} LoRA adapter "
        f"parameters, rank {r['lora_rank']})",
        f"  frozen base      {gib(r['frozen_bytes']):>12} per device ({r['frozen_params']:,} parameters, "
        f"stored as {r['base_dtype']})",
    ]


def format_report(r: dict) -> str:
    """The report as text (the dict of `report`)."""
    mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items())
    desc = f" ({r['topology_desc']})" if r.get("topology_desc") else ""
    lines = [
        f"{r['preset']} on {r['topology']}{desc}: {r['num_devices']} x {r['device_kind']}, {r['num_hosts']} host(s)",
        f"mesh {mesh}; batch {r['batch_size']} x {r['seq_len']} tokens, grad_accum_steps {r['grad_accum_steps']}, "
        f"remat {r['remat']}",
        *_parameter_lines(r),
        f"  optimizer state  {gib(r['opt_state_bytes']):>12} per device",
        f"  batch            {gib(r['batch_bytes']):>12} per device",
    ]
    if r.get("temp_bytes") is not None:
        lines.append(f"  temporaries      {gib(r['temp_bytes']):>12} allocated (not all live at once)")
        lines.append(f"  program          {gib(r['program_bytes']):>12}")
        lines.append(
            f"  buffer sum       {gib(r['buffer_sum_bytes']):>12} (arguments + outputs + temporaries - donated)"
        )
    hbm = r["hbm_bytes"]
    total = f"  total            {gib(r['per_device_bytes']):>12} per device (XLA's peak of live buffers + program)"
    if hbm is None:
        lines.append(total + " (no HBM figure for this device)")
    elif r["fits"]:
        lines.append(total + f" of {gib(hbm)} HBM: FITS, {gib(r['headroom_bytes'])} headroom")
    else:
        avail = f", {gib(r['compiler_hbm_bytes'])} usable by programs" if r.get("compiler_hbm_bytes") else ""
        lines.append(total + f" of {gib(hbm)} HBM{avail}: DOES NOT FIT")
        if r.get("error"):
            lines.append(f"  compiler: {r['error']}")
    lines.append(f"compile {r['compile_s']:.1f} s ({r['compile_cpu_s']:.1f} s CPU), lowering {r['lower_s']:.1f} s")
    if r.get("collectives"):
        lines.append("collectives per train step, per device (ops in the HLO; executions; bytes):")
        for k, c in r["collectives"].items():
            lines.append(f"  {k:<19} {c['ops']:>4} ops {c['count']:>6} per step {gib(c['bytes']):>12}")
            if c.get("gathered_bytes"):
                done_as = "are all-gathers done as all-reduces (shards written into zeros)"
                lines.append(f"    of which {gib(c['gathered_bytes'])} {done_as}")
            if c.get("windowed_bytes"):
                lines.append(
                    f"    of which {gib(c['windowed_bytes'])} in windowed matmul loops (FSDP's all-gathers and "
                    "reduce-scatters as rings overlapping the matmuls)"
                )
        if r.get("unknown_loops"):
            lines.append(f"  ({r['unknown_loops']} loop(s) of unknown trip count counted once)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Sweep: the same report for candidate layouts

SWEEP_AXES = ("mesh", "expert", "remat", "accum")


def mesh_splits(n: int) -> list[tuple[int, int, int]]:
    """(data, fsdp, tensor) layouts worth comparing on n devices: all data, all fsdp, fsdp with
    tensor 2 or 4, 2-way data over fsdp, and all tensor on up to 8 devices."""
    cands = [(n, 1, 1), (1, n, 1)]
    cands += [(1, n // t, t) for t in (2, 4) if n % t == 0 and n > t]
    cands += [(2, n // 2, 1)] if n % 2 == 0 and n > 2 else []
    cands += [(1, 1, n)] if 1 < n <= 8 else []
    return list(dict.fromkeys(cands))


def expert_splits(num_experts: int, n: int) -> list[int]:
    """Expert-parallel sizes worth comparing for a model of `num_experts` on n devices: the powers of
    two from 2 that divide both (the rest of the devices go to fsdp)."""
    out, e = [], 2
    while e <= min(num_experts, n):
        if num_experts % e == 0 and n % e == 0:
            out.append(e)
        e *= 2
    return out


def sweep_candidates(config: ml_collections.ConfigDict, n: int, axes: Sequence[str] = SWEEP_AXES) -> list:
    """[(label, {config key: value})]: the config as it is, then one axis changed at a time."""
    out = [("as configured", {})]
    m = config.mesh
    try:
        own = sharding.resolve_mesh_shape(sharding.mesh_sizes(m), n)
    except BadValue:  # the config's own mesh does not fit n devices: every split is a candidate
        own = None
    if "mesh" in axes:
        for d, f, t in mesh_splits(n):
            if (d, f, 1, 1, t) != own:
                split = {"mesh.data": d, "mesh.fsdp": f, "mesh.expert": 1, "mesh.sequence": 1, "mesh.tensor": t}
                out.append((f"mesh {d}/{f}/{t}", split))
    if "expert" in axes:  # a mixture of experts: experts over `expert`, FSDP over the rest
        for e in expert_splits(int(config.model.get("num_experts") or 0), n):
            split = {"mesh.data": 1, "mesh.fsdp": n // e, "mesh.expert": e, "mesh.sequence": 1, "mesh.tensor": 1}
            if (1, n // e, e, 1, 1) != own:
                out.append((f"expert {e}", split))
    if "remat" in axes:
        out += [(f"remat {r}", {"model.remat": r}) for r in ("none", "dots", "full") if r != config.model.remat]
    if "accum" in axes:
        k0 = config.train.grad_accum_steps
        out += [(f"grad_accum {k}", {"train.grad_accum_steps": k}) for k in (2, 4, 8) if k != k0]
    return out


def with_overrides(config: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
    """A copy of `config` with dotted keys set, e.g. {'mesh.fsdp': 8}."""
    c = ml_collections.ConfigDict(config.to_dict())
    for path, value in overrides.items():
        *parents, leaf = path.split(".")
        node = c
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def sweep(
    config: ml_collections.ConfigDict,
    topology: str,
    num_slices: int = 1,
    axes: Sequence[str] = SWEEP_AXES,
    dump_dir: str | None = None,
    log: Callable[[str], None] = lambda s: None,
) -> list[dict]:
    """Reports of the candidate layouts, sorted by memory per device; a layout the devices cannot
    take (e.g. a batch that does not split) is a row with 'invalid' set, last."""
    topo = parse_topology(topology, num_slices)
    devices = topology_devices(topo)
    rows = []
    for label, overrides in sweep_candidates(config, len(devices), axes):
        try:
            r = report(with_overrides(config, overrides), topo, devices=devices, dump_dir=dump_dir, log=log)
        except BadValue as e:  # a layout these devices cannot take; any other error is a bug
            r = {"invalid": str(e), "per_device_bytes": None, "fits": False}
        rows.append({"layout": label, **r})
    return sorted(rows, key=lambda r: (r["per_device_bytes"] is None, r["per_device_bytes"] or 0))


def format_sweep(rows: list[dict]) -> str:
    """The sweep as one table, smallest memory per device first."""
    valid = [r for r in rows if "invalid" not in r]
    head = valid[0] if valid else {}
    lines = [
        f"{head.get('preset', '?')} on {head.get('topology', '?')}: {head.get('num_devices', '?')} x "
        f"{head.get('device_kind', '?')}, HBM {gib(head.get('hbm_bytes'))} per chip",
        f"{'layout':<20} {'data/fsdp/tensor':>16} {'accum':>5} {'remat':>5} {'params+opt':>11} {'temps':>11} "
        f"{'total/device':>13} {'fits':>4} {'compile':>8}",
    ]
    for r in rows:
        if "invalid" in r:
            lines.append(f"{r['layout']:<20} invalid: {r['invalid']}")
            continue
        mesh = sharding.mesh_label(r["mesh"])
        state = r["params_bytes"] + r["frozen_bytes"] + r["opt_state_bytes"]
        temps = gib(r.get("temp_bytes"))
        fits = {True: "yes", False: "NO", None: "?"}[r["fits"]]
        lines.append(
            f"{r['layout']:<20} {mesh:>16} {r['grad_accum_steps']:>5} {r['remat']:>5} {gib(state):>11} "
            f"{temps:>11} {gib(r['per_device_bytes']):>13} {fits:>4} {r['compile_s']:>7.1f}s"
        )
    return "\n".join(lines)


def sweep_summary(rows: list[dict]) -> dict:
    """The sweep's JSON line: the configured layout's report, plus one compact row per candidate."""
    keys = ("layout", "mesh", "grad_accum_steps", "remat", "per_device_bytes", "fits", "compile_s", "invalid")
    base = next((r for r in rows if r["layout"] == "as configured"), rows[0])
    return {**base, "sweep": [{k: r[k] for k in keys if k in r} for r in rows]}
