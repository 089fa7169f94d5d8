"""Decode benchmark: `python -m llm_jax.bench_decode [--batch 8] [--prompt_len 32] [--new_tokens 128]`.

What is timed and the JSON it prints: llm_jax/tools/bench_decode.py.
"""

from llm_jax import cli  # first: it sets host memory before numpy and JAX start threads (llm_jax/cli.py)

# isort: split
import json

import jax
from absl import app, flags

from llm_jax.tools import bench_decode as bd


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    f = flags.FLAGS
    cfg, prompts = bd.model_config(f), bd.prompts_of(f)
    run, first_call_s = bd.llm_jax_runner(cfg, prompts, f.new_tokens)
    bd.log(f"llm_jax: first call (compilation + one run) {first_call_s:.1f}s")
    times = bd.time_alternating({"llm_jax": run}, f.repeats)
    result = {
        "batch": f.batch, "prompt_len": f.prompt_len, "new_tokens": f.new_tokens,
        "config": {"layers": cfg.num_layers, "width": cfg.embed_dim, "heads": cfg.num_heads, "mlp": cfg.mlp_dim,
                   "vocab": cfg.vocab_size, "max_len": cfg.max_len, "dtype": cfg.dtype},
        **bd.summary("llm_jax", times["llm_jax"], f.batch * f.new_tokens),
        "first_call_s": first_call_s,
        "devices": f"{jax.device_count()} x {jax.devices()[0].platform}",
        "jax": jax.__version__,
    }  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    bd.define_flags()
    cli.run(main, "bench_decode")
