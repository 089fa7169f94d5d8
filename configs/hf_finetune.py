"""Fine-tune a Hugging Face GPT-2 / Llama checkpoint (a local directory: config.json, *.safetensors,
tokenizer.json), then hand it back to transformers:

    python -m llm_jax.convert from_hf --hf_dir /models/gpt2 --workdir runs/gpt2_ft
    python -m llm_jax.main --config configs/hf_finetune.py:runs/gpt2_ft --workdir runs/gpt2_ft \
        --config.data.path=../shared/data/tinyshakespeare/input.txt
    python -m llm_jax.convert to_hf --workdir runs/gpt2_ft --hf_dir runs/gpt2_ft_hf

The argument is the run directory `from_hf` made: the model keys (exact vocabulary, no padding),
the layer layout and the tokenizer come from it, and training starts from its checkpoints/0.
Everything else is a fine-tuning recipe: low learning rate, short warmup, no weight decay, FSDP
over all devices, text from `data.path` (default Tiny Shakespeare via $LLM_JAX_DATA or
../shared/data). `PATH,tiny` is a seconds-long CPU smoke run on the standard library's sources.
An HF directory as the argument gives the same architecture from a random init (no checkpoint).

`PATH,long` (or `PATH,long=N`) extends the context: fine-tunes at seq_len N (default 32768) on
windows that each lie inside one document that long (`data.long_documents`), remat 'full'. The
positions past the pre-training context come from the checkpoint's RoPE scaling (Llama 3.1's
'llama3' factor 8 reaches 128k as published); for a checkpoint without one, set it in the HF
config.json before `convert from_hf` (`"rope_scaling": {"rope_type": "linear", "factor": 4.0}` and
`max_position_embeddings` 4x), since the run's model is fixed at import. The run's trained context
(what decoding may use, `saved_run.trained_context`) becomes N after the first save. Add
`--config.mesh.sequence=S` to split each sequence over S devices (README, "How sharding is chosen").
"""

import os

import ml_collections

from llm_jax.interop import hf

LONG_CONTEXT = 32768  # `PATH,long`: the fine-tuning context


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    path, _, variant = arg.partition(",")
    if not path:
        raise ValueError("configs/hf_finetune.py needs the run directory: --config configs/hf_finetune.py:WORKDIR")
    c = hf.run_config(path)
    c.data.source = "text"
    c.data.path = os.path.join(os.environ.get("LLM_JAX_DATA", "../shared/data"), "tinyshakespeare", "input.txt")
    c.data.seq_len = min(256, c.model.max_len)
    c.optim.update(lr=5e-5, schedule="cosine", warmup_steps=30, min_lr_ratio=0.1, weight_decay=0.0, grad_clip=1.0)
    c.train.update(
        batch_size=8,
        num_steps=300,
        log_every=25,
        eval_every=100,
        eval_steps=10,
        checkpoint_every=100,
        sample_prompt="ROMEO:",
        sample_tokens=64,
    )
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    if variant == "tiny":
        c.data.update(source="stdlib", path="", max_chars=30_000, seq_len=min(32, c.model.max_len))
        c.train.update(
            batch_size=8,
            num_steps=2,
            log_every=1,
            eval_every=2,
            eval_steps=1,
            checkpoint_every=2,
            sample_prompt="def ",
            sample_tokens=4,
        )
    elif variant.partition("=")[0] == "long":
        c.data.update(seq_len=int(variant.partition("=")[2] or LONG_CONTEXT), long_documents=True)
        c.model.remat = "full"
    elif variant:
        raise ValueError(f"configs/hf_finetune.py: unknown variant {variant!r}; use PATH, PATH,tiny or PATH,long[=N]")
    return c
