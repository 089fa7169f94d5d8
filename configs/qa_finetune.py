"""Prompt-completion fine-tuning (question answering, instructions) on a JSONL file:

    python -m llm_jax.main --config configs/qa_finetune.py --workdir runs/qa \
        --config.data.path=train.jsonl [--config.data.val_path=val.jsonl]
    python -m llm_jax.generate --workdir runs/qa --prompt "Q: What is the capital of France?
    A:"

Each line of the file is {"prompt": "...", "completion": "..."}. Examples are packed into rows of
`data.seq_len + 1` tokens; the loss (and the validation loss) covers only the completion tokens and
the EOS that ends each completion, so the generate CLI stops where the completions stopped.
Without `val_path` the last `val_fraction` of the examples validate. `configs/qa_finetune.py:tiny`
is a seconds-long smoke run.
"""

import ml_collections

from llm_jax.training.config import base_config


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    c = base_config()
    c.data.update(source="jsonl", path="", val_path="", val_fraction=0.05, tokenizer="byte", seq_len=256)
    c.model.update(num_layers=4, num_heads=4, embed_dim=128, mlp_dim=512, max_len=256)
    c.optim.update(lr=1e-3, warmup_steps=50, weight_decay=0.1)
    c.train.update(
        batch_size=16,
        num_steps=1000,
        log_every=50,
        eval_every=200,
        eval_steps=10,
        checkpoint_every=500,
        sample_tokens=64,
        sample_temperature=0.0,
    )
    if arg == "tiny":
        c.data.seq_len = 64
        c.model.update(num_layers=2, num_heads=2, embed_dim=32, mlp_dim=64, max_len=64)
        c.train.update(
            batch_size=8, num_steps=5, log_every=1, eval_every=5, eval_steps=2, checkpoint_every=5, sample_tokens=16
        )
    elif arg:
        raise ValueError(f"configs/qa_finetune.py: unknown argument {arg!r}; use '' or 'tiny'")
    return c
