"""The README's table: per-chip memory of the presets on a few Cloud TPU slices, from TPU AOT compiles.

    .venv/bin/pip install -e '.[tpu]'
    .venv/bin/python experiments/aot_table.py                      # all presets x slices (~20 min, 2 cores)
    .venv/bin/python experiments/aot_table.py --presets llama:7b --slices v5p-64
    .venv/bin/python experiments/aot_table.py --presets llama3:8b --slices v5e-8 \
        --variants full,lora,qlora-int8,qlora-int4 --set train.batch_size=8 --set data.seq_len=2048

Each row is what `python -m llm_jax.aot --config configs/FAMILY.py:SIZE --topology SLICE` reports
(the same `llm_jax.tools.aot.report`, in one process), with each preset's own mesh, batch and remat
(`--set KEY=VALUE` changes them for every row). `--variants` compiles each preset as full
fine-tuning and as LoRA runs (rank 16 on the attention projections: `lora` a bfloat16 base,
`qlora-int8` / `qlora-int4` integer kernels; the base is never read: planning needs only its shapes)
and prints the LoRA table (trainable, frozen and optimizer bytes per chip, and the bytes the step's
all-gathers, reduce-scatters and collective-permutes move) instead.
Progress goes to stderr; stdout is the markdown table, then one JSON line with every report.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

PRESETS = ("gpt2:small", "gpt2:medium", "gpt2:large", "gpt2:xl", "llama:1b", "llama:7b")
SLICES = ("v5e-8", "v5p-8", "v5p-64", "v6e-8")
# --variants: run-config keys of each way of fine-tuning ('lora.base' is only a name here: aot reads no base).
VARIANTS = {
    "full": {},
    "lora": {"lora.rank": 16, "lora.base": "BASE", "lora.base_dtype": "bfloat16"},
    "qlora-int8": {"lora.rank": 16, "lora.base": "BASE", "lora.base_dtype": "int8"},
    "qlora-int4": {"lora.rank": 16, "lora.base": "BASE", "lora.base_dtype": "int4"},
}


def preset_config(preset: str):
    """'llama:7b' -> configs/llama.py's get_config('7b')."""
    family, size = preset.split(":")
    spec = importlib.util.spec_from_file_location(f"configs_{family}", os.path.join(REPO, "configs", f"{family}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(size)


def table(reports: list[dict]) -> str:
    """Markdown: one row per (preset, slice)."""
    from llm_jax.runtime.sharding import mesh_label
    from llm_jax.tools.aot import gib

    lines = [
        "| preset | params | slice | chips | mesh data/fsdp/tensor | batch x seq | params + optimizer / chip "
        "| total / chip | HBM / chip | fits | compile: wall (CPU) |",
        "| --- | ---: | --- | ---: | --- | --- | ---: | ---: | ---: | --- | ---: |",
    ]
    for r in reports:
        mesh = mesh_label(r["mesh"])
        fits = "yes" if r["fits"] else "**no**"
        state = r["params_bytes"] + r["frozen_bytes"] + r["opt_state_bytes"]
        lines.append(
            f"| {r['preset']} | {r['num_params'] / 1e9:.2f} B | {r['topology']} | {r['num_devices']} | {mesh} | "
            f"{r['batch_size']} x {r['seq_len']} | {gib(state)} | "
            f"{gib(r['per_device_bytes'])} | {gib(r['hbm_bytes'])} | {fits} | "
            f"{r['compile_s']:.0f} s ({r['compile_cpu_s']:.0f} s) |"
        )
    return "\n".join(lines)


def lora_table(reports: list[dict]) -> str:
    """Markdown: one row per (preset, variant, slice), with what each chip holds of the state."""
    from llm_jax.runtime.sharding import mesh_label
    from llm_jax.tools.aot import gib

    lines = [
        "| preset | fine-tuning | slice | mesh data/fsdp/tensor | batch x seq | trainable / chip | frozen / chip "
        "| optimizer / chip | total / chip | HBM / chip | fits | compile: wall (CPU) "
        "| all-gather / reduce-scatter / permute, per chip and step |",
        "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for r in reports:
        how = "full" if not r["lora_rank"] else f"LoRA r{r['lora_rank']}, {r['base_dtype']} base"
        lines.append(
            f"| {r['preset']} | {how} | {r['topology']} | {mesh_label(r['mesh'])} | {r['batch_size']} x {r['seq_len']} "
            f"| {gib(r['params_bytes'])} | {gib(r['frozen_bytes'])} | {gib(r['opt_state_bytes'])} "
            f"| {gib(r['per_device_bytes'])} | {gib(r['hbm_bytes'])} | {'yes' if r['fits'] else '**no**'} "
            f"| {r['compile_s']:.0f} s ({r['compile_cpu_s']:.0f} s) | {moved(r)} |"
        )
    return "\n".join(lines)


def moved(report: dict) -> str:
    """'all-gather / reduce-scatter / permute' bytes per chip and step (what FSDP moves: gathered weights,
    scattered gradients, and both as the rings of windowed matmuls); '-' where the step did not compile."""
    from llm_jax.tools.aot import gib

    c = report.get("collectives")
    if not c:
        return "-"
    return " / ".join(gib(c[k]["bytes"]) for k in ("all-gather", "reduce-scatter", "collective-permute"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default=",".join(PRESETS), help="comma-separated family:size")
    parser.add_argument("--slices", default=",".join(SLICES), help="comma-separated topology names")
    parser.add_argument("--variants", default="", help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE for every row, e.g. data.seq_len=2048")
    args = parser.parse_args()
    sets = {}
    for item in args.set:
        key, value = item.split("=", 1)
        sets[key] = json.loads(value) if value[:1].isdigit() or value in ("true", "false") else value
    variants = [v for v in args.variants.split(",") if v]

    import jax

    jax.config.update("jax_platforms", "cpu")  # as the command does: planning needs no accelerator
    from llm_jax.tools import aot

    reports = []
    for preset, variant in [(p, v) for p in args.presets.split(",") for v in variants or [None]]:
        config = aot.with_overrides(preset_config(preset), {**sets, **VARIANTS.get(variant, {})})
        for topology in args.slices.split(","):
            r = aot.report(config, topology, log=lambda s: print(s, file=sys.stderr, flush=True))
            fits = {True: "fits", False: "does not fit", None: "?"}[r["fits"]]
            done = f"{aot.gib(r['per_device_bytes'])} per chip, {fits}, compile {r['compile_s']:.1f} s"
            print(f"  {done} ({r['compile_cpu_s']:.1f} s CPU)", file=sys.stderr)
            reports.append(r)
    print(lora_table(reports) if variants else table(reports))
    print(json.dumps(reports), flush=True)


if __name__ == "__main__":
    main()
