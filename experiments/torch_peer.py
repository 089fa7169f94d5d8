"""llm_jax vs PyTorch + Hugging Face transformers, one training step of the same GPT-2, side by side.

    .venv/bin/python experiments/torch_peer.py [--rounds 3] [--steps 8] [--config configs/bench_cpu.py]

Each round runs, one after the other in fresh processes (so neither shares threads or caches with
the other), the llm_jax bench (`python -m llm_jax.bench`) and this file's PyTorch worker: a
`GPT2LMHeadModel` of the config's sizes (layers, width, heads, mlp, vocab, context, batch), float32,
AdamW (the config's betas / weight decay / learning rate, decay on matrices only), gradient clipping
at the config's norm, on random tokens. Alternating rounds spread machine noise over both sides.
Prints per-round figures, then one JSON line with the medians and `ratio` = llm_jax / torch
tokens/s (> 1: llm_jax is faster).

Extra `--config.KEY=VALUE` arguments go to the llm_jax side only (e.g. to compare a variant).
`--worker` runs only the PyTorch side and prints its JSON (what the rounds call).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(path: str):
    sys.path.insert(0, REPO)
    import importlib.util

    from llm_jax import config as config_lib

    spec = importlib.util.spec_from_file_location("bench_config", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return config_lib.finalize(mod.get_config())


def torch_worker(config_path: str, steps: int, warmup: int) -> dict:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.set_num_threads(os.cpu_count())
    c = load_config(config_path)
    m, o, seq, batch = c.model, c.optim, c.data.seq_len, c.train.batch_size
    assert m.mlp_activation == "gelu" and m.norm == "layernorm" and m.positions == "learned", "GPT-2 configs only"
    vocab = -(-m.vocab_size // m.vocab_multiple) * m.vocab_multiple
    hf_cfg = GPT2Config(
        vocab_size=vocab,
        n_positions=m.max_len,
        n_embd=m.embed_dim,
        n_layer=m.num_layers,
        n_head=m.num_heads,
        n_inner=m.mlp_dim,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=m.norm_eps,
        tie_word_embeddings=m.tie_embeddings,
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(hf_cfg).float().train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "wte" not in n and "wpe" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "wte" not in n and "wpe" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=o.lr,
        betas=(o.b1, o.b2),
        eps=o.eps,
    )
    tokens = torch.randint(0, vocab, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def step():
        logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.view(-1, vocab), targets.view(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if o.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        return loss

    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t)
    step_time = statistics.median(times)
    return {
        "tokens_per_sec": batch * seq / step_time,
        "step_time_s": step_time,
        "step_time_min_s": min(times),
        "step_time_max_s": max(times),
        "num_params": sum(p.numel() for p in model.parameters()),
        "final_loss": float(loss),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def last_json(cmd: list[str]) -> dict:
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=os.path.join(REPO, "configs", "bench_cpu.py"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--worker", action="store_true", help="run only the PyTorch side and print its JSON")
    args, jax_overrides = ap.parse_known_args()
    if args.worker:
        print(json.dumps(torch_worker(args.config, args.steps, args.warmup)), flush=True)
        return
    bad = [a for a in jax_overrides if not a.startswith("--config.")]
    if bad:
        ap.error(f"unknown arguments {bad}; only --config.KEY=VALUE overrides pass through to llm_jax")

    py = sys.executable
    jax_cmd = [
        py,
        "-m",
        "llm_jax.bench",
        "--config",
        args.config,
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        *jax_overrides,
    ]
    torch_cmd = [
        py,
        os.path.abspath(__file__),
        "--worker",
        "--config",
        args.config,
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
    ]
    rounds = []
    for r in range(args.rounds):
        # Alternate which side goes first so slow drifts in machine load do not favour one.
        order = [("jax", jax_cmd), ("torch", torch_cmd)]
        if r % 2:
            order.reverse()
        res = {name: last_json(cmd) for name, cmd in order}
        ratio = res["jax"]["tokens_per_sec"] / res["torch"]["tokens_per_sec"]
        rounds.append({"jax": res["jax"], "torch": res["torch"], "ratio": ratio})
        print(
            f"round {r + 1}: llm_jax {res['jax']['tokens_per_sec']:,.0f} tok/s "
            f"(MFU {100 * (res['jax']['mfu'] or 0):.1f}%)"
            f" | torch {res['torch']['tokens_per_sec']:,.0f} tok/s | ratio {ratio:.3f}",
            flush=True,
        )

    med = lambda xs: statistics.median(xs)
    j = rounds[-1]["jax"]
    peak = med([x["jax"]["peak_flops"] for x in rounds])
    jtps = med([x["jax"]["tokens_per_sec"] for x in rounds])
    ttps = med([x["torch"]["tokens_per_sec"] for x in rounds])
    summary = {
        "config": os.path.relpath(args.config, REPO),
        "overrides": jax_overrides,
        "rounds": args.rounds,
        "steps": args.steps,
        "jax_tokens_per_sec": jtps,
        "torch_tokens_per_sec": ttps,
        "ratio": med([x["ratio"] for x in rounds]),
        "ratios": [x["ratio"] for x in rounds],
        "jax_mfu": med([x["jax"]["mfu"] for x in rounds]),
        "torch_mfu": ttps * j["flops_per_token"] / peak,
        "peak_flops": peak,
        "flops_per_token": j["flops_per_token"],
        "jax_num_params": j["num_params"],
        "torch_num_params": rounds[-1]["torch"]["num_params"],
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
