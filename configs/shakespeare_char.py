"""Character-level Tiny Shakespeare, nanoGPT's CPU recipe size (4 layers, 4 heads, 128 wide, context 64).

    python -m llm_jax.main --config configs/shakespeare_char.py --workdir runs/shakespeare_char \
        --config.data.path=../shared/data/tinyshakespeare/input.txt

The path may also come from $LLM_JAX_DATA (a folder holding tinyshakespeare/input.txt). First 90%
trains, last 10% validates. Stops once the validation loss (20 fixed batches) reaches 1.88.
"""

import os

from llm_jax.config import base_config


def get_config(arg: str = "") -> "ml_collections.ConfigDict":
    c = base_config()
    c.data.source = "text"
    c.data.path = os.path.join(os.environ.get("LLM_JAX_DATA", "../shared/data"), "tinyshakespeare", "input.txt")
    c.data.tokenizer = "char"
    c.data.seq_len = 64
    c.data.val_fraction = 0.1
    c.model.update(num_layers=4, num_heads=4, embed_dim=128, mlp_dim=512, max_len=64, dropout_rate=0.0,
                   vocab_multiple=1)
    c.optim.update(lr=2e-3, warmup_steps=100, min_lr_ratio=0.1, b2=0.99, weight_decay=0.1)
    c.train.update(batch_size=32, num_steps=2000, log_every=100, eval_every=100, eval_steps=20,
                   target_eval_loss=1.88, checkpoint_every=1000, sample_tokens=300)
    if arg:
        raise ValueError(f"configs/shakespeare_char.py takes no argument, got {arg!r}")
    return c
