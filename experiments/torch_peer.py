"""llm_jax vs PyTorch + Hugging Face transformers at its best: one training step of the same GPT-2.

    .venv/bin/python experiments/torch_peer.py [--config configs/bench_cpu.py] [--rounds 3] [--steps 8]
        [--warmup 2] [--settings eager,foreach,fused,compile_fused] [--threads default,1] [--config.KEY=VALUE ...]

Each round runs every entry once, each in a fresh process (no shared threads or caches), in
alternating order (reversed every other round, so slow drifts in machine load favour no side):

- llm_jax: `python -m llm_jax.bench` on the config, and, when the config uses the chunked loss
  (`model.loss_chunk`, a feature the peer lacks), again with `--config.model.loss_chunk=0`;
- PyTorch: this file's worker, a `GPT2LMHeadModel` of the config's sizes (layers, width, heads,
  mlp, vocab, context, batch), float32, AdamW with the config's lr / betas / eps / weight decay
  (decay on matrices only), gradient clipping at the config's norm, on random tokens, in each
  setting of `--settings` at each thread count of `--threads`:
    eager          torch.optim.AdamW defaults (on CPU: the per-parameter for-loop implementation)
    foreach        AdamW(foreach=True): multi-tensor kernels
    fused          AdamW(fused=True): one fused kernel over all parameters
    compile_fused  torch.compile of the forward + loss (inductor, its backward too), fused AdamW
  at `default` threads (PyTorch's own choice: one per core) and at 1 thread.

It prints every entry of every round, then per entry the median tokens/s with its spread
(min - max over rounds) and its MFU (against the float32 matmul peak the llm_jax runs measured,
the same peak for both sides), and one JSON line: `ratio` = median llm_jax tokens/s / median
tokens/s of the best PyTorch entry (the one with the highest median), `ratio_rounds` per round
against that entry (under load the ratio of medians and the median of these can differ: both are
printed), and `ratio_no_chunk` the same without the chunked loss.

`--config.KEY=VALUE` overrides apply to both sides (the same model); keys the peer has no
equivalent for (loss_chunk, scan_layers, remat, ...) only change the llm_jax side. `--worker`
runs one PyTorch entry and prints its JSON (what the rounds call).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = {  # name -> (torch.compile the forward + loss, AdamW keyword arguments)
    "eager": (False, {}),
    "foreach": (False, {"foreach": True}),
    "fused": (False, {"fused": True}),
    "compile_fused": (True, {"fused": True}),
}


def same_host_memory() -> bool:
    """A PyTorch worker runs under the host-memory settings llm_jax's commands apply first (llm_jax/runtime/hostmem.py:
    glibc keeps freed memory for reuse; PyTorch gains from them too, 4 - 5% on bench_cpu), decided the
    same way for both sides (LLM_JAX_KEEP_FREED_MEMORY=0 turns them off for both). Call it before torch
    is imported: threads pick their malloc arena at their first allocation."""
    sys.path.insert(0, REPO)
    from llm_jax.runtime import hostmem

    return hostmem.keep_freed_memory()


def load_spec(config_path: str, overrides: list[str]) -> dict:
    """The model, batch and optimizer numbers of the config (+ overrides) that both sides share."""
    sys.path.insert(0, REPO)
    from absl import flags
    from ml_collections import config_flags

    from llm_jax.training import config as config_lib

    config_flags.DEFINE_config_file("config", None, lock_config=True)
    flags.FLAGS(["torch_peer", f"--config={config_path}", *overrides])
    c = config_lib.finalize(flags.FLAGS.config)
    if not c.model.vocab_size:
        raise ValueError("the peer needs config.model.vocab_size (random tokens, no tokenizer)")
    m = config_lib.model_config(c, c.model.vocab_size)
    gpt2 = (m.mlp_activation, m.norm, m.positions, m.kv_heads == m.num_heads) == ("gelu", "layernorm", "learned", True)
    if not (gpt2 and m.use_bias):
        raise ValueError("the PyTorch peer is HF GPT-2: gelu, layernorm, learned positions, biases, multi-head")
    o = c.optim
    return {
        "layers": m.num_layers, "width": m.embed_dim, "heads": m.num_heads, "mlp": m.mlp_dim, "vocab": m.vocab_size,
        "max_len": m.max_len, "norm_eps": m.norm_eps, "tied": m.tie_embeddings, "seq": c.data.seq_len,
        "batch": c.train.batch_size, "loss_chunk": m.loss_chunk, "lr": o.lr, "b1": o.b1, "b2": o.b2, "eps": o.eps,
        "weight_decay": o.weight_decay, "grad_clip": o.grad_clip,
    }  # fmt: skip


def build_torch_step(spec: dict, setting: str):
    """(step() -> loss, number of parameters): one training step of HF GPT-2 in `setting`."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    compile_it, adamw_kwargs = SETTINGS[setting]
    hf_cfg = GPT2Config(
        vocab_size=spec["vocab"], n_positions=spec["max_len"], n_embd=spec["width"], n_layer=spec["layers"],
        n_head=spec["heads"], n_inner=spec["mlp"], activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, layer_norm_epsilon=spec["norm_eps"], tie_word_embeddings=spec["tied"],
    )  # fmt: skip
    torch.manual_seed(0)
    model = GPT2LMHeadModel(hf_cfg).float().train()
    named = list(model.named_parameters())
    decays = lambda n, p: p.ndim >= 2 and "wte" not in n and "wpe" not in n  # matrices, as llm_jax's mask
    groups = [
        {"params": [p for n, p in named if decays(n, p)], "weight_decay": spec["weight_decay"]},
        {"params": [p for n, p in named if not decays(n, p)], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=spec["lr"], betas=(spec["b1"], spec["b2"]), eps=spec["eps"], **adamw_kwargs)
    vocab, gen = spec["vocab"], torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (spec["batch"], spec["seq"] + 1), generator=gen)
    inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def loss_fn(inputs, targets):
        logits = model(input_ids=inputs).logits
        return torch.nn.functional.cross_entropy(logits.view(-1, vocab), targets.view(-1))

    forward = torch.compile(loss_fn) if compile_it else loss_fn

    def step():
        loss = forward(inputs, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if spec["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), spec["grad_clip"])
        opt.step()
        return loss.detach()

    return step, sum(p.numel() for p in model.parameters())


def torch_worker(spec: dict, setting: str, threads: str, steps: int, warmup: int) -> dict:
    """One PyTorch entry: `warmup` untimed steps (the first compiles), then `steps` timed ones."""
    kept = same_host_memory()
    import torch

    if threads != "default":
        torch.set_num_threads(int(threads))
    step, num_params = build_torch_step(spec, setting)
    t0 = time.perf_counter()
    first_loss = float(step())  # the first step compiles (compile_fused)
    first_step_s = time.perf_counter() - t0
    for _ in range(warmup - 1):
        step()
    timed, loss = timed_steps(step, steps, spec["batch"] * spec["seq"])
    return {
        **timed, "first_step_s": first_step_s, "first_loss": first_loss, "final_loss": float(loss),
        "num_params": num_params, "setting": setting, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "keep_freed_memory": kept,
    }  # fmt: skip


def timed_steps(step, steps: int, tokens_per_step: int) -> tuple[dict, object]:
    """`steps` timed calls of `step`: tokens/s at the median step time, the step times, the last loss."""
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t)
    step_time = statistics.median(times)
    return {
        "tokens_per_sec": tokens_per_step / step_time, "step_time_s": step_time,
        "step_time_min_s": min(times), "step_time_max_s": max(times),
    }, loss  # fmt: skip


def last_json(cmd: list[str], env: dict | None = None) -> dict:
    """The JSON object on the last stdout line of `cmd` (run from the repository root, with `env` added)."""
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def entries(args, spec: dict, overrides: list[str]) -> dict[str, list[str]]:
    """name -> command of every entry of a round (llm_jax first, then PyTorch)."""
    py, timing = sys.executable, ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    jax_cmd = [py, "-m", "llm_jax.bench", "--config", args.config, *timing, *overrides]
    out = {"llm_jax": jax_cmd}
    if spec["loss_chunk"]:
        out["llm_jax_no_chunk"] = [*jax_cmd, "--config.model.loss_chunk=0"]
    worker = [py, os.path.abspath(__file__), "--worker", "--spec", json.dumps(spec), *timing]
    for setting in args.settings.split(","):
        for threads in args.threads.split(","):
            out[f"torch_{setting}@{threads}"] = [*worker, "--setting", setting, "--threads", threads]
    return out


def run_rounds(cmds: dict[str, list[str]], rounds: int) -> list[dict[str, dict]]:
    """Each round: every entry once, alternating the order; prints each result as it comes."""
    results = []
    for r in range(rounds):
        names = list(cmds) if r % 2 == 0 else list(cmds)[::-1]
        got = {}
        for name in names:
            got[name] = res = last_json(cmds[name])
            print(f"round {r + 1}: {name:26s} {res['tokens_per_sec']:9,.0f} tokens/s", flush=True)
        results.append(got)
    return results


def summarize(results: list[dict[str, dict]], spec: dict, args, overrides: list[str]) -> dict:
    """Medians, spreads, MFU and the ratios against the best PyTorch entry (see the docstring)."""
    names = list(results[0])
    tps = {n: [r[n]["tokens_per_sec"] for r in results] for n in names}
    med = {n: statistics.median(v) for n, v in tps.items()}
    jax_runs = [r[n] for r in results for n in names if n.startswith("llm_jax")]
    peak = statistics.median([j["peak_flops"] for j in jax_runs])
    fpt = jax_runs[0]["flops_per_token"]
    best = max((n for n in names if n.startswith("torch_")), key=med.get)
    out = {
        "config": os.path.relpath(args.config, REPO), "overrides": overrides, "rounds": len(results),
        "steps": args.steps, "warmup": args.warmup, "spec": spec, "best_torch": best,
        "ratio": med["llm_jax"] / med[best], "ratio_rounds": [j / t for j, t in zip(tps["llm_jax"], tps[best])],
        "tokens_per_sec": med, "tokens_per_sec_rounds": tps, "mfu": {n: med[n] * fpt / peak for n in names},
        "peak_flops": peak, "flops_per_token": fpt,
        "torch": next(r[best]["torch"] for r in results), "jax": jax_runs[0]["jax"],
    }  # fmt: skip
    if "llm_jax_no_chunk" in med:
        out["ratio_no_chunk"] = med["llm_jax_no_chunk"] / med[best]
        out["ratio_no_chunk_rounds"] = [j / t for j, t in zip(tps["llm_jax_no_chunk"], tps[best])]
    return out


def print_table(s: dict) -> None:
    print(f"\n{'entry':26s} {'median tok/s':>12s} {'min':>8s} {'max':>8s} {'MFU':>6s}")
    for n, m in sorted(s["tokens_per_sec"].items(), key=lambda kv: -kv[1]):
        lo, hi = min(s["tokens_per_sec_rounds"][n]), max(s["tokens_per_sec_rounds"][n])
        print(f"{n:26s} {m:12,.0f} {lo:8,.0f} {hi:8,.0f} {100 * s['mfu'][n]:5.1f}%")
    spread = lambda xs: f"rounds {min(xs):.3f} - {max(xs):.3f}, median of rounds {statistics.median(xs):.3f}"
    print(f"ratio vs best PyTorch ({s['best_torch']}): {s['ratio']:.3f} ({spread(s['ratio_rounds'])})")
    if "ratio_no_chunk" in s:
        print(f"without the chunked loss: {s['ratio_no_chunk']:.3f} ({spread(s['ratio_no_chunk_rounds'])})")
    peak = s["peak_flops"]
    print(f"MFU against {peak / 1e9:.0f} GFLOP/s (float32 matmul, measured by the llm_jax runs)", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=os.path.join(REPO, "configs", "bench_cpu.py"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, of {list(SETTINGS)}")
    ap.add_argument("--threads", default="default,1", help="comma-separated PyTorch thread counts ('default' or N)")
    ap.add_argument("--worker", action="store_true", help="run one PyTorch entry and print its JSON")
    ap.add_argument("--spec", help="--worker: the JSON of load_spec")
    ap.add_argument("--setting", default="eager", choices=list(SETTINGS), help="--worker: the PyTorch setting")
    args, overrides = ap.parse_known_args()
    if args.worker:
        print(json.dumps(torch_worker(json.loads(args.spec), args.setting, args.threads, args.steps, args.warmup)))
        return
    bad = [a for a in overrides if not a.startswith("--config.")]
    unknown = set(args.settings.split(",")) - set(SETTINGS)
    if bad or unknown or args.warmup < 1 or args.rounds < 1 or args.steps < 1:
        ap.error(f"bad arguments {bad or sorted(unknown) or ''}: --config.KEY=VALUE overrides, known --settings, "
                 "--warmup >= 1 (the first step compiles), --rounds and --steps >= 1")  # fmt: skip
    args.config = os.path.abspath(args.config)  # the rounds run from the repository root
    spec = load_spec(args.config, overrides)
    summary = summarize(run_rounds(entries(args, spec, overrides), args.rounds), spec, args, overrides)
    print_table(summary)
    print(json.dumps(summary), flush=True)
    assert all(math.isfinite(x) for x in summary["tokens_per_sec"].values())


if __name__ == "__main__":
    main()
