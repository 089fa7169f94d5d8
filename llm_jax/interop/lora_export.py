"""A LoRA run out of llm_jax: merged into a plain run, or its adapters in PEFT's format.

    python -m llm_jax.convert merge --workdir runs/qwen3_lora --out_workdir runs/qwen3_merged
    python -m llm_jax.convert to_hf --workdir runs/qwen3_lora --hf_dir out/qwen3_lora_peft --peft

`merge_run` writes a new run directory that `llm_jax.main` resumes (full fine-tuning from step 0),
`generate` and `to_hf` read: config.json (the LoRA run's with `config.lora` back to its defaults),
tokenizer/ (the LoRA run's), hf/ (the base's carried Hugging Face files, when the base was imported)
and checkpoints/0 with the merged weights (`lora.merged`: W + (alpha / r) A B; a QLoRA base is
dequantized first, so the sum is onto the int8 / int4 weights as dequantized, the function the
adapters were trained with) and a fresh optimizer state (`hf.save_initial`, as `import_run` writes).
It never writes into the LoRA run or its base, and refuses a non-empty --out_workdir.

`export_peft` writes what `peft.PeftModel.from_pretrained(base, DIR)` loads on the base's Hugging
Face model: adapter_config.json (LORA, r, lora_alpha, target_modules as HF module names, dropout)
and adapter_model.safetensors ('base_model.model.<HF module>.lora_A.weight' [r, in] and
'.lora_B.weight' [out, r]); each row's layout comes from the architecture's tensor table
(`Tensor.lora_rows`), so PEFT's names and shapes have no second description here. Architectures whose
adapted layers are nn.Linear (Llama, Mistral, Qwen2, Qwen3, Gemma 2 / 3, the MoE models' attention)
export; GPT-2's Conv1D / fused c_attn are refused, naming the merged export instead.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from llm_jax.interop import hf, hf_export, hf_specs, safetensors_io
from llm_jax.models import lora
from llm_jax.models.config import ModelConfig
from llm_jax.runtime import files
from llm_jax.runtime.errors import AlreadyExists, BadValue
from llm_jax.training import config as config_lib
from llm_jax.training import lora_base
from llm_jax.training import saved_run as run_lib
from llm_jax.training import workdir as workdir_lib

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModel's prefix before the transformers model's own tensor names


def lora_config(workdir: str, what: str) -> ml_collections.ConfigDict:
    """The run config of `workdir`, which must be a LoRA run (`what`: the command, for the error)."""
    config = config_lib.load_run_config(workdir)
    if not config.lora.rank:
        raise BadValue(
            f"{what} needs a LoRA run, and --workdir={workdir} is not one (config.lora.rank=0); "
            "export a plain run with `convert to_hf` (without --peft)"
        )
    return config


def _inside(path: str, root: str) -> bool:
    path, root = os.path.realpath(path), os.path.realpath(root)
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep) or root.startswith(path + os.sep)


def _check_out(workdir: str, base: str, out: str) -> None:
    """`out` must be a new (or empty) directory apart from the LoRA run and its base."""
    for flag, run in (("--workdir", workdir), ("config.lora.base", base)):
        if _inside(out, run):
            raise BadValue(f"--out_workdir={out} overlaps the LoRA run's {flag}={run}; merge into a new directory")
    if os.path.lexists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise AlreadyExists(f"--out_workdir={out} exists and is not empty; choose a new --out_workdir")


def merged_config(config: ml_collections.ConfigDict, out: str, hf_tokenizer: bool) -> ml_collections.ConfigDict:
    """The merged run's config: the LoRA run's with `config.lora` at its defaults (no adapters, no
    base) and, for an HF tokenizer, the tokenizer path in the new run."""
    out_config = ml_collections.ConfigDict(config.to_dict())
    out_config.lora = config_lib.lora_section()
    if hf_tokenizer:
        out_config.data.tokenizer_path = os.path.join(workdir_lib.tokenizer_dir(out), "tokenizer.json")
    return out_config


def merge_run(workdir: str, out: str, log=print) -> ml_collections.ConfigDict:
    """Writes `out`, a plain run with the LoRA run's adapters merged into its base (module docstring)."""
    config = lora_config(workdir, "convert merge")
    base = config.lora.base
    _check_out(workdir, base, out)
    lora_base.base_config(config)  # the base is there and is this run's model: before `out` is created
    lock = workdir_lib.claim(out, 0.0, log, "llm_jax.convert merge", ", or merge into a new --out_workdir")
    try:
        run = run_lib.load_run(workdir)
        if config.lora.base_dtype in ("int8", "int4"):
            log(f"{workdir} has a {config.lora.base_dtype} base (QLoRA): merging onto its dequantized weights")
        cfg, params = lora.merged(run.model.cfg, run.params)
        src_tok = workdir_lib.tokenizer_dir(workdir)
        out_config = merged_config(run.config, out, os.path.isfile(os.path.join(src_tok, "tokenizer.json")))
        workdir_lib.prepare(out, out_config)
        if jax.process_index() == 0:
            shutil.copytree(src_tok, workdir_lib.tokenizer_dir(out))
            if os.path.isdir(os.path.join(base, "hf")):  # so `to_hf` of the merged run writes the base's files
                # Not its record of the import: the merged weights are not the imported checkpoint's.
                ignore = shutil.ignore_patterns(hf_export.IMPORTED_FROM)
                shutil.copytree(os.path.join(base, "hf"), os.path.join(out, "hf"), ignore=ignore)
        hf.save_initial(out, out_config, cfg, params, run.context)
    finally:
        if lock is not None:
            lock.release()
    log(f"wrote {out}: {workdir}/checkpoints/{run.step} merged into {base} (config.json, tokenizer/, checkpoints/0)")
    return out_config


# ----------------------------------------------------------------------------------------------
# PEFT's adapter format


def peft_tensors(spec: hf_specs.Spec, cfg: ModelConfig, adapters: dict) -> tuple[dict[str, np.ndarray], list[str]]:
    """(PEFT's {tensor name: array}, the adapted HF modules) of a LoRA model's `adapters` (host
    arrays, `lora.split`'s first half) under `spec`'s table; an HFError naming any adapted layer
    that has no nn.Linear row there."""
    flat = traverse_util.flatten_dict(adapters)
    dims = {**hf_specs.sizes(cfg), "r": cfg.lora_rank}
    out, modules, used = {}, [], set()
    for entry, i, j, name in hf.table_rows(spec, cfg):
        if j is not None or len(entry.ours) != 1:
            continue
        key = hf.param_key(entry.paths()[0][:-1], i, cfg.scan_layers)
        if key + ("lora_a",) not in flat:
            continue
        a, b = flat[key + ("lora_a",)], flat[key + ("lora_b",)]
        a, b = (a[i], b[i]) if i is not None and cfg.scan_layers else (a, b)
        rows = entry.lora_rows(num_in=a.ndim - 1)
        if rows is None:
            continue
        for row, x in zip(rows, (a, b)):
            out[PREFIX + row.hf.format(i=i)] = row.to_hf([np.asarray(x, np.float32)], dims)
        modules.append(name.removesuffix(".weight"))
        used.add(key)
    left = sorted("/".join(k[:-1]) for k in flat if k[-1] == "lora_a" and k[:-1] not in used)
    if left:
        raise hf_specs.HFError(
            f"the adapters of {left[:4]} have no nn.Linear weight in the {spec.architecture} table, so PEFT's "
            "format cannot hold them; export the merged model instead: convert to_hf without --peft"
        )
    return out, modules


def target_modules(spec: hf_specs.Spec, cfg: ModelConfig, modules: list[str]) -> list[str]:
    """PEFT's `target_modules`: the short HF names ('q_proj', ...) when every layer adapts them,
    else the full module names (PEFT matches either as a suffix)."""
    short = sorted({m.rsplit(".", 1)[-1] for m in modules})
    every = [name.removesuffix(".weight") for entry, _, _, name in hf.table_rows(spec, cfg) if entry.per_layer]
    covered = {m for m in every if m.rsplit(".", 1)[-1] in short}
    return short if covered == set(modules) else sorted(modules)


def adapter_config(config: ml_collections.ConfigDict, targets: list[str], source: str | None) -> dict:
    """adapter_config.json: PEFT's LoraConfig fields for these adapters (scale lora_alpha / r, as ours)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": source,
        "r": int(config.lora.rank),
        "lora_alpha": float(config.lora.alpha),
        "lora_dropout": float(config.lora.dropout),
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def _read_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def export_peft(workdir: str, hf_dir: str, step: int | None = None, overwrite: bool = False, log=print) -> None:
    """Writes a LoRA run's adapters (checkpoint `step`, default the latest) as a PEFT adapter
    directory, whole or not at all and under `hf_export`'s rules (module docstring)."""
    config = lora_config(workdir, "to_hf --peft")
    base = config.lora.base
    hf_export.check_target(workdir, hf_dir, overwrite, base)  # before the checkpoint is read
    carried = _read_json(os.path.join(base, "hf", "config.json"))
    imported = _read_json(os.path.join(base, "hf", hf_export.IMPORTED_FROM)) or {}
    run = run_lib.load_run(workdir, step, on_host=True)
    cfg = lora.without_adapters(run.model.cfg)
    spec = hf_specs.for_model(cfg, (carried or {}).get("architectures", [None])[0])
    adapters, _ = lora.split(run.params)
    tensors, modules = peft_tensors(spec, run.model.cfg, adapters)
    # The import's directory is the adapters' base only while the base run still holds its weights
    # (checkpoint 0 of an import); a base trained further has no Hugging Face name.
    source = imported.get("hf_dir") if run.loop_data.get(lora_base.BASE_STEP) == 0 else None
    if source is None:
        log(
            f"adapter_config.json names no base model: the base {base} is not an imported checkpoint's weights; "
            f"export it too (to_hf --workdir {base}) and load the adapters on that export"
        )
    settings = adapter_config(config, target_modules(spec, cfg, modules), source)
    if config.lora.base_dtype != "float32":
        log(
            f"the adapters were trained on a {config.lora.base_dtype} base; PEFT applies them to the base's float "
            "weights (the merged export, without --peft, merges onto the weights they were trained with)"
        )
    with hf_export.writing(workdir, hf_dir, overwrite, run.step, log, base) as tmp:
        safetensors_io.write_file(os.path.join(tmp, ADAPTER_WEIGHTS), tensors)
        files.write_json(os.path.join(tmp, ADAPTER_CONFIG), settings)
    log(f"wrote {hf_dir}: PEFT LoRA adapters of {len(modules)} {spec.architecture} modules, step {run.step}")
