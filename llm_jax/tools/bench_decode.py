"""Decode benchmark: `python -m llm_jax.bench_decode [--batch 8] [--prompt_len 32] [--new_tokens 128]
[--style gpt2|llama] [--quant int8,int4]`.

Builds a GPT-2 style `TransformerLM` (learned positions, LayerNorm, GELU, tied embeddings; or with
`--style llama` RoPE, RMSNorm, SwiGLU, no biases, an untied output head) with random float32
weights and times `llm_jax.inference.decode.generate` greedily continuing a batch of random prompts
by exactly `--new_tokens` tokens (no stop token), prefill included, `--repeats` times after a first
call that compiles. `--quant int8[,int4]` times the same weights with weight-only integer kernels
too (`saved_run.quantize_params`), each side called in turn with the float one so all see the same
machine load. Progress goes to stderr; the last line of stdout is one JSON object:

  llm_jax_tokens_per_sec       new tokens per second (batch * new_tokens / median time)
  best_llm_jax_tokens_per_sec  the same from the fastest call
  llm_jax_s                    median seconds per generate call
  llm_jax_weight_bytes         parameter bytes, int4 counted packed (two to a byte, as TPUs and GPUs
                               store it; `quant.weight_bytes`)
  llm_jax_weight_bytes_here    parameter bytes as stored on this backend (XLA on CPU: int4 a byte each)
  llm_jax_mfu                  forward model FLOPs of every token fed (prompt and new) per second,
                               over `peak_flops` (on CPU: a float32 matmul measured on the spot)
  llm_jax_int8_... (--quant)   the same of each quantized side; `speedup_int8`: its tokens/s over float's
  first_call_s                 the first call: compilation + one run
  config, params, peak_flops, devices, jax

`experiments/decode_peer.py` runs the same size through Hugging Face `generate` in PyTorch,
alternating with `Runner` from this module, and prints the ratio.
"""

from __future__ import annotations

import statistics
import sys
import time

import flax.linen as nn
import jax
import numpy as np
from absl import app, flags

from llm_jax.inference import decode
from llm_jax.models import family as family_lib
from llm_jax.models import quant
from llm_jax.models.model import ModelConfig, count_params


def define_flags():
    """Flags of this benchmark (also parsed by experiments/decode_peer.py)."""
    flags.DEFINE_integer("batch", 8, "Prompts per batch.")
    flags.DEFINE_integer("prompt_len", 32, "Tokens per prompt.")
    flags.DEFINE_integer("new_tokens", 128, "New tokens per prompt.")
    flags.DEFINE_integer("layers", 4, "Transformer blocks.")
    flags.DEFINE_integer("width", 256, "Embedding width.")
    flags.DEFINE_integer("heads", 4, "Attention heads.")
    flags.DEFINE_integer("vocab", 8192, "Vocabulary size.")
    flags.DEFINE_integer("max_len", 256, "Context length (position table).")
    flags.DEFINE_integer("repeats", 5, "Timed calls (alternating with the peer, if any).")
    flags.DEFINE_enum("style", "gpt2", ["gpt2", "llama"], "gpt2: learned positions, LayerNorm, GELU, tied; "
                      "llama: RoPE, RMSNorm, SwiGLU, no biases, untied head.")  # fmt: skip
    flags.DEFINE_integer("mlp", 0, "MLP width (0: 4 x width for gpt2, 8/3 x width rounded up to 256 for llama).")
    flags.DEFINE_list("quant", [], "Also time weight-only quantized kernels: int8, int4 or both (int8,int4).")


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def model_config(f) -> ModelConfig:
    """The benchmark's GPT-2 or Llama style model (`--style`) from the parsed flags `f`."""
    if f.prompt_len + f.new_tokens - 1 > f.max_len:
        raise app.UsageError(f"--prompt_len + --new_tokens - 1 must fit --max_len={f.max_len}")
    if f.style == "llama":
        mlp = f.mlp or -(-8 * f.width // 3 // 256) * 256
        style = dict(positions="rope", norm="rmsnorm", mlp_activation="swiglu", use_bias=False, tie_embeddings=False)
    else:
        mlp = f.mlp or 4 * f.width
        style = dict(positions="learned", norm="layernorm", mlp_activation="gelu", use_bias=True, tie_embeddings=True)
    return ModelConfig(
        vocab_size=f.vocab, vocab_multiple=1, num_layers=f.layers, num_heads=f.heads, embed_dim=f.width,
        mlp_dim=mlp, max_len=f.max_len, dtype="float32", param_dtype="float32", **style,
    )  # fmt: skip


def prompts_of(f) -> np.ndarray:
    """[batch, prompt_len] random prompt tokens (never 0, the pad id)."""
    return np.random.default_rng(0).integers(1, f.vocab, size=(f.batch, f.prompt_len))


def init_model(cfg: ModelConfig):
    """(model, random float params) of `cfg`."""
    model = family_lib.build(cfg)
    params = jax.jit(lambda: nn.meta.unbox(family_lib.init_params(model, jax.random.key(0), 8)))()
    log(f"llm_jax: {count_params(params):,} parameters")
    return model, params


def llm_jax_runner(cfg: ModelConfig, prompts: np.ndarray, new_tokens: int):
    """(run, first_call_s): run() greedily generates `new_tokens` for `prompts` [b, p] and waits for it."""
    return runner(*init_model(cfg), prompts, new_tokens)


def runner(model, params, prompts: np.ndarray, new_tokens: int):
    """`llm_jax_runner` of a given model and params."""
    tokens, start = decode.left_pad(prompts.tolist())

    def run():
        out = decode.generate(model, params, tokens, start, jax.random.key(0), max_new_tokens=new_tokens)
        out.tokens.block_until_ready()
        assert out.tokens.shape == (len(prompts), new_tokens)

    t0 = time.perf_counter()
    run()  # compiles
    return run, time.perf_counter() - t0


def time_alternating(runners: dict, repeats: int, rotate: bool = False) -> dict[str, list[float]]:
    """Seconds per call of each runner, the runners called in turn `repeats` times after a warm-up
    call each (so all see the same machine load); with `rotate`, round r starts at the r-th runner,
    so no side always runs first."""
    for run in runners.values():
        run()
    times = {name: [] for name in runners}
    for r in range(repeats):
        order, first = list(runners.items()), r % len(runners) if rotate else 0
        for name, run in order[first:] + order[:first]:
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
        log(f"repeat {r + 1}/{repeats}: " + ", ".join(f"{n} {t[-1]:.3f}s" for n, t in times.items()))
    return times


def weights(name: str, params) -> dict:
    """{name}_weight_bytes (int4 packed) and {name}_weight_bytes_here (as this backend stores them)."""
    here = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    return {f"{name}_weight_bytes": quant.weight_bytes(params), f"{name}_weight_bytes_here": here}


def decode_flops(cfg: ModelConfig, prompt_len: int, new_tokens: int) -> tuple[int, float]:
    """(tokens each row goes through the model: the prompt, then one a step; forward model FLOPs per
    such token, the forward third of the training count): the MFU of a generate call."""
    fed = prompt_len + new_tokens - 1
    return fed, family_lib.flops_per_token(cfg, fed) / 3


def summary(name: str, times: list[float], new_tokens: int) -> dict:
    """{name}_s, {name}_tokens_per_sec (median) and best_{name}_tokens_per_sec (fastest call)."""
    return {
        f"{name}_s": statistics.median(times),
        f"{name}_tokens_per_sec": new_tokens / statistics.median(times),
        f"best_{name}_tokens_per_sec": new_tokens / min(times),
    }
