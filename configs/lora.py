"""LoRA / QLoRA fine-tuning of a run (one trained by llm_jax.main or imported by `convert from_hf`)
on a JSONL file of `{"messages": [...]}` conversations or `{"prompt", "completion"}` pairs:

    python -m llm_jax.convert from_hf --hf_dir /models/qwen3 --workdir runs/qwen3
    python -m llm_jax.main --config configs/lora.py:runs/qwen3 --workdir runs/qwen3_lora \
        --config.data.path=chats.jsonl [--config.lora.base_dtype=int8]
    python -m llm_jax.generate --workdir runs/qwen3_lora --chat "Hello"
    python -m llm_jax.convert merge --workdir runs/qwen3_lora --out_workdir runs/qwen3_merged

The argument is the base run: its model, tokenizer (and chat template) and newest checkpoint,
which stays frozen (`config.lora.base`); the run trains rank-16 adapters on the attention
projections (`config.lora.targets`: layer names or regexes over parameter paths, e.g.
`query,key,value,out,wi_0,wi_1,wo` for every projection) and its checkpoints hold only them and
their optimizer state. `config.lora.base_dtype`: 'bfloat16' halves the base's bytes, 'int8' /
'int4' quantize it per output channel (QLoRA). The loss covers the assistant turns (or
completions). `PATH,tiny` is a seconds-long CPU smoke run.
"""

import ml_collections

from llm_jax.training import config as config_lib


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    base, _, variant = arg.partition(",")
    if not base:
        raise ValueError("configs/lora.py needs the base run directory: --config configs/lora.py:BASE_WORKDIR")
    saved = config_lib.load_run_config(base)
    c = config_lib.base_config()
    c.model.update(saved.model.to_dict())  # the base's model, exactly (checked again at start)
    c.data.update(tokenizer=saved.data.tokenizer, tokenizer_path=saved.data.tokenizer_path)
    c.data.update(source="jsonl", path="", val_fraction=0.05, seq_len=min(512, c.model.max_len))
    c.lora.update(base=base, rank=16, alpha=32.0, targets="query,key,value,out", dropout=0.05)
    c.optim.update(lr=2e-4, schedule="cosine", warmup_steps=20, min_lr_ratio=0.1, weight_decay=0.0, grad_clip=1.0)
    c.train.update(
        batch_size=8, num_steps=300, log_every=25, eval_every=100, eval_steps=5, checkpoint_every=100,
        sample_tokens=64, sample_temperature=0.0,
    )  # fmt: skip
    c.mesh.update(data=-1, fsdp=1, tensor=1)
    if variant == "tiny":
        c.data.seq_len = min(64, c.model.max_len)
        c.lora.rank = 4
        c.train.update(batch_size=8, num_steps=4, log_every=1, eval_every=4, eval_steps=1, checkpoint_every=2,
                       sample_tokens=8)  # fmt: skip
    elif variant:
        raise ValueError(f"configs/lora.py: unknown variant {variant!r}; use BASE or BASE,tiny")
    return c
