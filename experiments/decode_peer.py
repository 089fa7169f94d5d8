"""Decode speed against Hugging Face `generate` (PyTorch, CPU): the same GPT-2 shape, side by side.

    .venv/bin/python experiments/decode_peer.py [--batch 8] [--prompt_len 32] [--new_tokens 128] [--repeats 5]
        [--torch_threads 1]

Both greedily continue the same random prompts by exactly `--new_tokens` tokens (no stop token),
prefill included: llm_jax through `llm_jax.bench_decode` (`decode.generate`), Hugging Face through
`GPT2LMHeadModel.generate(do_sample=False, use_cache=True)`. After a warm-up (compilation for
JAX) the two are timed alternately, so both see the same machine load. Needs the hf extra. The
last stdout line is one JSON object: llm_jax_* and hf_* figures, `ratio` (medians), `best_ratio`
(fastest calls), torch_threads.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from absl import app, flags  # noqa: E402

from llm_jax import bench_decode as bd  # noqa: E402
from llm_jax.model import ModelConfig  # noqa: E402

flags.DEFINE_integer("torch_threads", 1, "torch.set_num_threads; 0 keeps PyTorch's default (one per core).")
bd.define_flags()
_log = bd.log


def hf_runner(cfg: ModelConfig, prompts, new_tokens: int):
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
    import torch

    f = flags.FLAGS
    cfg, prompts = bd.model_config(f), bd.prompts_of(f)
    jax_run, first_call_s = bd.llm_jax_runner(cfg, prompts, f.new_tokens)
    if f.torch_threads > 0:
        torch.set_num_threads(f.torch_threads)
    runners = {"llm_jax": jax_run, "hf": hf_runner(cfg, prompts, f.new_tokens)}
    times = bd.time_alternating(runners, f.repeats)
    n = f.batch * f.new_tokens
    result = {
        "batch": f.batch, "prompt_len": f.prompt_len, "new_tokens": f.new_tokens,
        **bd.summary("llm_jax", times["llm_jax"], n), **bd.summary("hf", times["hf"], n),
        "first_call_s": first_call_s, "torch_threads": torch.get_num_threads(),
        "devices": f"{jax.device_count()} x {jax.devices()[0].platform}", "jax": jax.__version__,
        "torch": torch.__version__,
    }  # fmt: skip
    result["ratio"] = result["llm_jax_tokens_per_sec"] / result["hf_tokens_per_sec"]
    result["best_ratio"] = result["best_llm_jax_tokens_per_sec"] / result["best_hf_tokens_per_sec"]
    print(json.dumps(result))


if __name__ == "__main__":
    app.run(main)
