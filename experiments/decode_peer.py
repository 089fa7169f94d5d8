"""Decode speed against Hugging Face `generate` (PyTorch, CPU): the same GPT-2 shape, side by side.

    .venv/bin/python experiments/decode_peer.py [--batch 8] [--prompt_len 32] [--new_tokens 128] [--repeats 5]
        [--torch_threads default,1] [--layers 4 --width 256 --heads 4 --vocab 8192 --max_len 256]

Both greedily continue the same random prompts by exactly `--new_tokens` tokens (no stop token),
prefill included: llm_jax through `llm_jax.bench_decode` (`decode.generate`), Hugging Face through
`GPT2LMHeadModel.generate(do_sample=False, use_cache=True)` at each PyTorch thread count of
`--torch_threads` ('default' is PyTorch's own choice, one per core; the thread count is set
before each call). After a warm-up (compilation for JAX) all are timed in turn, `--repeats`
times, so all see the same machine load. Needs the hf extra. The last stdout line is one JSON
object: per runner the median and fastest new tokens/s and the spread; `ratio` = llm_jax median /
the best PyTorch thread count's median (`best_hf`), `ratio_by_threads`, `best_ratio` (fastest
calls).
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llm_jax.runtime import hostmem  # noqa: E402 - first: host memory settings before numpy and JAX start threads

hostmem.keep_freed_memory()  # as the command lines do (llm_jax/cli.py); `import llm_jax` alone does not

# isort: split
import jax  # noqa: E402
from absl import app, flags  # noqa: E402

from llm_jax.models.model import ModelConfig  # noqa: E402
from llm_jax.tools import bench_decode as bd  # noqa: E402

flags.DEFINE_list("torch_threads", ["default", "1"], "PyTorch thread counts to time ('default': one per core).")
bd.define_flags()
_log = bd.log
_DEFAULT_THREADS = 0  # PyTorch's default thread count, read in main() before any change


def hf_runner(cfg: ModelConfig, prompts, new_tokens: int, threads: str):
    """run(): `GPT2LMHeadModel.generate` of the same shape, greedy with the KV cache, on CPU, at
    `threads` PyTorch threads ('default': PyTorch's own count, read at start-up)."""
    import torch
    import transformers

    from llm_jax.interop import hf

    # The same config.json llm_jax would export for this model (hf_specs.GPT2), so both sides agree.
    hf_cfg = transformers.GPT2Config.from_dict({**hf.hf_config_from_model(cfg), "pad_token_id": 0})
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(hf_cfg).to(torch.float32).eval()
    num_threads = _DEFAULT_THREADS if threads == "default" else int(threads)
    _log(
        f"hf: {sum(p.numel() for p in model.parameters()):,} parameters, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, {num_threads} threads"
    )
    input_ids = torch.as_tensor(prompts, dtype=torch.long)
    attention_mask = torch.ones_like(input_ids)

    def run():
        torch.set_num_threads(num_threads)
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


def spread(name: str, times: list[float], new_tokens: int) -> dict:
    """bench_decode's summary plus the slowest call's tokens/s (the spread over repeats)."""
    return {**bd.summary(name, times, new_tokens), f"worst_{name}_tokens_per_sec": new_tokens / max(times)}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    import torch

    global _DEFAULT_THREADS
    _DEFAULT_THREADS = torch.get_num_threads()  # PyTorch's own choice, before anything changes it
    f = flags.FLAGS
    if f.style != "gpt2" or f.quant:
        raise app.UsageError("decode_peer compares the float GPT-2 model: leave --style and --quant unset")
    cfg, prompts = bd.model_config(f), bd.prompts_of(f)
    jax_run, first_call_s = bd.llm_jax_runner(cfg, prompts, f.new_tokens)
    runners = {"llm_jax": jax_run}
    for threads in f.torch_threads:
        runners[f"hf@{threads}"] = hf_runner(cfg, prompts, f.new_tokens, threads)
    times = bd.time_alternating(runners, f.repeats)
    n = f.batch * f.new_tokens
    result = {
        "batch": f.batch, "prompt_len": f.prompt_len, "new_tokens": f.new_tokens, "repeats": f.repeats,
        "config": {"layers": cfg.num_layers, "width": cfg.embed_dim, "heads": cfg.num_heads, "vocab": cfg.vocab_size,
                   "max_len": cfg.max_len},
        "first_call_s": first_call_s, "torch_default_threads": _DEFAULT_THREADS,
        "devices": f"{jax.device_count()} x {jax.devices()[0].platform}", "jax": jax.__version__,
        "torch": torch.__version__,
    }  # fmt: skip
    for name, t in times.items():
        result.update(spread(name, t, n))
    hf = [name for name in runners if name != "llm_jax"]
    best = max(hf, key=lambda name: result[f"{name}_tokens_per_sec"])
    jax_tps = result["llm_jax_tokens_per_sec"]
    result["best_hf"] = best
    result["ratio"] = jax_tps / result[f"{best}_tokens_per_sec"]
    result["ratio_by_threads"] = {name: jax_tps / result[f"{name}_tokens_per_sec"] for name in hf}
    result["best_ratio"] = result["best_llm_jax_tokens_per_sec"] / max(result[f"best_{h}_tokens_per_sec"] for h in hf)
    for name in runners:
        _log(
            f"{name:12s} median {result[f'{name}_tokens_per_sec']:8,.0f} new tokens/s (calls "
            f"{result[f'worst_{name}_tokens_per_sec']:,.0f} - {result[f'best_{name}_tokens_per_sec']:,.0f})"
        )
    _log(f"ratio vs best PyTorch ({best}): {result['ratio']:.3f}; by threads {result['ratio_by_threads']}")
    print(json.dumps(result))


if __name__ == "__main__":
    app.run(main)
