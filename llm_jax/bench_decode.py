"""Decode benchmark: `python -m llm_jax.bench_decode [--batch 8] [--prompt_len 32] [--new_tokens 128]
[--style gpt2|llama] [--quant int8,int4]`.

What is timed and the JSON it prints: llm_jax/tools/bench_decode.py.
"""

from llm_jax import cli  # first: it sets host memory before numpy and JAX start threads (llm_jax/cli.py)

# isort: split
import json

import jax
import ml_collections
from absl import app, flags

from llm_jax.models import flops
from llm_jax.models.model import count_params
from llm_jax.runtime import sharding
from llm_jax.tools import bench_decode as bd
from llm_jax.training.saved_run import check_quant, quantize_params


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    f = flags.FLAGS
    for kind in f.quant:
        check_quant(kind)
    kinds = [kind for kind in f.quant if kind != "none"]  # float32 is always timed
    cfg, prompts = bd.model_config(f), bd.prompts_of(f)
    model, params = bd.init_model(cfg)
    sides = {"llm_jax": (model, params)}
    mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1}))
    for kind in kinds:  # the same weights, quantized (replicated like the float ones)
        sides[f"llm_jax_{kind}"] = quantize_params(model, params, kind, mesh, sharding.logical_rules())
    runners, first_call_s = {}, None
    for name, (m, p) in sides.items():
        runners[name], first = bd.runner(m, p, prompts, f.new_tokens)
        first_call_s = first if first_call_s is None else first_call_s
        bd.log(f"{name}: first call (compilation + one run) {first:.1f}s")
    times = bd.time_alternating(runners, f.repeats)
    peak, peak_source = flops.peak_flops(jax.devices(), "float32")
    fed, forward = bd.decode_flops(cfg, f.prompt_len, f.new_tokens)
    result = {
        "batch": f.batch, "prompt_len": f.prompt_len, "new_tokens": f.new_tokens, "style": f.style,
        "config": {"layers": cfg.num_layers, "width": cfg.embed_dim, "heads": cfg.num_heads, "mlp": cfg.mlp_dim,
                   "vocab": cfg.vocab_size, "max_len": cfg.max_len, "dtype": cfg.dtype},
        "params": count_params(params), "forward_flops_per_token": forward,
        "peak_flops": peak, "peak_source": peak_source,
    }  # fmt: skip
    for name, t in times.items():
        result.update(bd.summary(name, t, f.batch * f.new_tokens))
        result.update(bd.weights(name, sides[name][1]))
        fed_per_sec = f.batch * fed / result[f"{name}_s"]
        result[f"{name}_mfu"] = flops.mfu(fed_per_sec, forward, peak)
        if name != "llm_jax":
            speedup = result[f"{name}_tokens_per_sec"] / result["llm_jax_tokens_per_sec"]
            result[f"speedup_{name.removeprefix('llm_jax_')}"] = speedup
    result.update(first_call_s=first_call_s, devices=f"{jax.device_count()} x {jax.devices()[0].platform}")
    result["jax"] = jax.__version__
    print(json.dumps(result))


if __name__ == "__main__":
    bd.define_flags()
    cli.run(main, "bench_decode")
