"""Decode benchmark: `python -m llm_jax.bench_decode [--batch 8] [--prompt_len 32] [--new_tokens 128]`.

Builds one model size twice, with random weights in float32: an llm_jax `TransformerLM` (GPT-2
style: learned positions, LayerNorm, GELU, tied embeddings) decoded by `llm_jax.decode.generate`,
and a Hugging Face `GPT2LMHeadModel` of the same shape decoded by
`model.generate(do_sample=False, use_cache=True)` on the PyTorch CPU. Both greedily continue the
same batch of random prompts by exactly `--new_tokens` tokens (no stop token), prefill included.
After a warm-up (compilation for JAX), the two are timed alternately `--repeats` times each, so
both see the same machine load; the median time of each gives new tokens per second (and the
fastest call, less sensitive to other processes on a shared machine, the `best_` figures). PyTorch
runs with `--torch_threads` (default 1: on a loaded 2-core machine its OpenMP threads spin-wait,
and 2 threads measured 10-20x slower than 1). Progress goes to stderr; the last line of stdout is
one JSON object:

  llm_jax_tokens_per_sec, hf_tokens_per_sec   new tokens per second (batch * new_tokens / median time)
  ratio                                        llm_jax / hf (medians)
  best_llm_jax_tokens_per_sec, best_hf_tokens_per_sec, best_ratio   the same from the fastest calls
  llm_jax_s, hf_s                              median seconds per generate call
  first_call_s                                 the first llm_jax call: compilation + one run
  config, torch_threads, devices, versions
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import flax.linen as nn
import jax
import numpy as np
from absl import app, flags

from llm_jax import decode
from llm_jax import family as family_lib
from llm_jax.model import ModelConfig, count_params

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch", 8, "Prompts per batch.")
flags.DEFINE_integer("prompt_len", 32, "Tokens per prompt.")
flags.DEFINE_integer("new_tokens", 128, "New tokens per prompt.")
flags.DEFINE_integer("layers", 4, "Transformer blocks.")
flags.DEFINE_integer("width", 256, "Embedding width.")
flags.DEFINE_integer("heads", 4, "Attention heads.")
flags.DEFINE_integer("vocab", 8192, "Vocabulary size.")
flags.DEFINE_integer("max_len", 256, "Context length (position table).")
flags.DEFINE_integer("repeats", 5, "Timed calls of each implementation (alternating).")
flags.DEFINE_integer("torch_threads", 1, "torch.set_num_threads; 0 keeps PyTorch's default (one per core).")
flags.DEFINE_bool("hf", True, "Also run the Hugging Face peer (needs torch and transformers).")


def _log(*args):
    print(*args, file=sys.stderr, flush=True)


def llm_jax_runner(cfg: ModelConfig, prompts: np.ndarray, new_tokens: int):
    """(run, first_call_s): run() greedily generates `new_tokens` for `prompts` [b, p] and waits for it."""
    model = family_lib.build(cfg)
    params = jax.jit(lambda: nn.meta.unbox(family_lib.init_params(model, jax.random.key(0), 8)))()
    _log(f"llm_jax: {count_params(params):,} parameters")
    tokens, start = decode.left_pad(prompts.tolist())
    args = (model, params, tokens, start, jax.random.key(0))
    kwargs = dict(max_new_tokens=new_tokens, temperature=0.0)

    def run():
        out = decode.generate(*args, **kwargs)
        out.tokens.block_until_ready()
        assert out.tokens.shape == (len(prompts), new_tokens)

    t0 = time.perf_counter()
    run()  # compiles
    return run, time.perf_counter() - t0


def hf_runner(cfg: ModelConfig, prompts: np.ndarray, new_tokens: int):
    """run(): `GPT2LMHeadModel.generate` of the same shape, greedy with the KV cache, on CPU."""
    import torch
    import transformers

    hf_cfg = transformers.GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.max_len,
        n_embd=cfg.embed_dim,
        n_layer=cfg.num_layers,
        n_head=cfg.num_heads,
        n_inner=cfg.mlp_dim,
        activation_function="gelu_new",
        layer_norm_epsilon=cfg.norm_eps,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(hf_cfg).to(torch.float32).eval()
    _log(
        f"hf: {sum(p.numel() for p in model.parameters()):,} parameters, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, {torch.get_num_threads()} threads"
    )
    input_ids = torch.as_tensor(prompts, dtype=torch.long)
    attention_mask = torch.ones_like(input_ids)

    def run():
        with torch.inference_mode():
            out = model.generate(
                input_ids,
                attention_mask=attention_mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                use_cache=True,
                pad_token_id=0,
            )
        assert out.shape == (len(prompts), prompts.shape[1] + new_tokens), out.shape

    return run


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if FLAGS.prompt_len + FLAGS.new_tokens - 1 > FLAGS.max_len:
        raise app.UsageError(f"--prompt_len + --new_tokens - 1 must fit --max_len={FLAGS.max_len}")
    cfg = ModelConfig(
        vocab_size=FLAGS.vocab,
        num_layers=FLAGS.layers,
        num_heads=FLAGS.heads,
        embed_dim=FLAGS.width,
        mlp_dim=4 * FLAGS.width,
        max_len=FLAGS.max_len,
        positions="learned",
        norm="layernorm",
        mlp_activation="gelu",
        use_bias=True,
        tie_embeddings=True,
        dtype="float32",
        param_dtype="float32",
    )
    prompts = np.random.default_rng(0).integers(1, FLAGS.vocab, size=(FLAGS.batch, FLAGS.prompt_len))
    new_tokens = FLAGS.batch * FLAGS.new_tokens

    runners = {}
    jax_run, first_call_s = llm_jax_runner(cfg, prompts, FLAGS.new_tokens)
    runners["llm_jax"] = jax_run
    _log(f"llm_jax: first call (compilation + one run) {first_call_s:.1f}s")
    torch_threads = None
    if FLAGS.hf:
        import torch

        if FLAGS.torch_threads > 0:
            torch.set_num_threads(FLAGS.torch_threads)
        torch_threads = torch.get_num_threads()
        runners["hf"] = hf_runner(cfg, prompts, FLAGS.new_tokens)

    for name, run in runners.items():  # warm-up: caches, allocators, lazy initialisation
        run()
    times = {name: [] for name in runners}
    for r in range(FLAGS.repeats):
        for name, run in runners.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
        _log(f"repeat {r + 1}/{FLAGS.repeats}: " + ", ".join(f"{n} {t[-1]:.3f}s" for n, t in times.items()))

    result = {
        "batch": FLAGS.batch,
        "prompt_len": FLAGS.prompt_len,
        "new_tokens": FLAGS.new_tokens,
        "config": {
            "layers": cfg.num_layers,
            "width": cfg.embed_dim,
            "heads": cfg.num_heads,
            "mlp": cfg.mlp_dim,
            "vocab": cfg.vocab_size,
            "max_len": cfg.max_len,
            "dtype": cfg.dtype,
        },
        "llm_jax_s": statistics.median(times["llm_jax"]),
        "llm_jax_tokens_per_sec": new_tokens / statistics.median(times["llm_jax"]),
        "best_llm_jax_tokens_per_sec": new_tokens / min(times["llm_jax"]),
        "first_call_s": first_call_s,
        "devices": f"{jax.device_count()} x {jax.devices()[0].platform}",
        "jax": jax.__version__,
    }
    if "hf" in times:
        result.update(
            {
                "hf_s": statistics.median(times["hf"]),
                "hf_tokens_per_sec": new_tokens / statistics.median(times["hf"]),
                "best_hf_tokens_per_sec": new_tokens / min(times["hf"]),
                "torch_threads": torch_threads,
            }
        )
        result["ratio"] = result["llm_jax_tokens_per_sec"] / result["hf_tokens_per_sec"]
        result["best_ratio"] = result["best_llm_jax_tokens_per_sec"] / result["best_hf_tokens_per_sec"]
    print(json.dumps(result))


if __name__ == "__main__":
    app.run(main)
