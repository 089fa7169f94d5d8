"""GPT-2 family presets (learned positions, LayerNorm, GELU, tied embeddings, biases), for GPU/TPU.

    python -m llm_jax.main --config configs/gpt2.py:small --workdir runs/gpt2_small \
        --config.data.source=tfds --config.data.tfds_name=lm1b

Arguments: small (124M), medium (350M), large (774M), xl (1.5B); `tiny` is a CPU smoke size.
Data defaults to the offline stdlib corpus with a 32k SentencePiece vocabulary; point it at real
text (`--config.data.source=text --config.data.path=FILE` or a prepared tfds dataset).
"""

import ml_collections

from llm_jax.training import config as config_lib

SIZES = {  # layers, heads, width
    "tiny": (2, 2, 64),
    "small": (12, 12, 768),
    "medium": (24, 16, 1024),
    "large": (36, 20, 1280),
    "xl": (48, 25, 1600),
}


def get_config(arg: str = "small") -> ml_collections.ConfigDict:
    if arg not in SIZES:
        raise ValueError(f"configs/gpt2.py: unknown size {arg!r}; use one of {sorted(SIZES)}")
    layers, heads, width = SIZES[arg]
    c = config_lib.base_config()
    c.model.update(
        preset=f"gpt2-{arg}",
        num_layers=layers,
        num_heads=heads,
        embed_dim=width,
        mlp_dim=4 * width,
        max_len=1024,
        positions="learned",
        norm="layernorm",
        mlp_activation="gelu",
        use_bias=True,
        tie_embeddings=True,
        dropout_rate=0.0,
        scan_layers=True,
        remat="dots",
        attention="dot_product",
        dtype="bfloat16",
        param_dtype="float32",
    )
    c.data.update(tokenizer="sentencepiece", vocab_size=32000, seq_len=1024)
    c.optim.update(lr=6e-4, warmup_steps=2000, min_lr_ratio=0.1, b1=0.9, b2=0.95, weight_decay=0.1, grad_clip=1.0)
    c.train.update(batch_size=256, num_steps=100_000, log_every=100, eval_every=2000, checkpoint_every=2000)
    c.mesh.update(data=-1, fsdp=1, tensor=1)
    if arg == "tiny":
        c.model.max_len = 128
        config_lib.cpu_smoke(c)
    return c
