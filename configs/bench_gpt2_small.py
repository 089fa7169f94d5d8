"""Second benchmark size (issues 15 and 16), where the matmuls dominate the step: GPT-2 small,
12 layers, 768 wide, 12 heads, mlp 3072, vocabulary 50304 (GPT-2's 50257 rounded up to a multiple
of 128, as nanoGPT does), context 256, batch 4, float32, AdamW: 123.9M parameters (GPT-2 small's
124M less the 768 positions past 256). Everything else as configs/bench_cpu.py (GPT-2 block, chunked loss, optimizer).

    python -m llm_jax.bench --config configs/bench_gpt2_small.py --steps 5
    python experiments/torch_peer.py --config configs/bench_gpt2_small.py --steps 3 --warmup 1 --threads default

The vocabulary is GPT-2's rather than bench_cpu's 8192 so the size is the one people know; it
makes the output projection about a third of the step's FLOPs.
"""

import importlib.util
import os

import ml_collections


def _bench_cpu(arg: str) -> ml_collections.ConfigDict:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_cpu.py")
    spec = importlib.util.spec_from_file_location("bench_cpu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    if arg:
        raise ValueError(f"configs/bench_gpt2_small.py takes no argument, got {arg!r}")
    c = _bench_cpu("")
    c.model.update(
        preset="gpt2-small-bench", vocab_size=50304, num_layers=12, num_heads=12, embed_dim=768, mlp_dim=3072
    )
    c.train.update(batch_size=4)
    return c
