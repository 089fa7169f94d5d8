"""DPO (or SimPO) preference tuning of a run with LoRA adapters, on a JSONL file of preference pairs:
`{"prompt", "chosen", "rejected"}` strings, or chat form (`{"chosen": [messages], "rejected":
[messages]}`, or a `prompt` conversation with the two assistant replies), rendered with the base's
chat template:

    python -m llm_jax.convert from_hf --hf_dir /models/qwen3 --workdir runs/qwen3
    python -m llm_jax.main --config configs/lora.py:runs/qwen3 --workdir runs/qwen3_sft \
        --config.data.path=chats.jsonl
    python -m llm_jax.convert merge --workdir runs/qwen3_sft --out_workdir runs/qwen3_sft_merged
    python -m llm_jax.main --config configs/dpo.py:runs/qwen3_sft_merged --workdir runs/qwen3_dpo \
        --config.data.path=pairs.jsonl [--config.train.objective=simpo]
    python -m llm_jax.plot --workdir runs/qwen3_dpo

The argument is the base run (a plain run: the imported checkpoint itself, or a LoRA run merged
into one); the config is configs/lora.py's recipe with the objective and data changed. The policy
is the base plus new adapters; DPO's reference is the base with the adapters off, exactly (no
second copy of the model). `config.pref.beta` 0 takes the objective's default (0.1 for DPO, 2.0
for SimPO); the learning rate is a quarter of supervised LoRA's; no adapter dropout (the rewards
compare the policy with a deterministic reference). `BASE,tiny` is a seconds-long CPU smoke run.
"""

import importlib.util
import os

import ml_collections


def _lora_config(arg: str) -> ml_collections.ConfigDict:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lora.py")
    spec = importlib.util.spec_from_file_location("llm_jax_configs_lora", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    base, _, variant = arg.partition(",")
    if not base:
        raise ValueError("configs/dpo.py needs the base run directory: --config configs/dpo.py:BASE_WORKDIR")
    if variant not in ("", "tiny"):
        raise ValueError(f"configs/dpo.py: unknown variant {variant!r}; use BASE or BASE,tiny")
    c = _lora_config(arg)
    c.train.objective = "dpo"
    c.data.update(source="preference", path="")
    c.lora.dropout = 0.0
    c.optim.update(lr=5e-5, warmup_steps=10)
    if variant == "tiny":
        c.optim.update(lr=1e-3, warmup_steps=1)
    return c
