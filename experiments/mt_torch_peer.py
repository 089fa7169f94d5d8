"""Translation training step: llm_jax's encoder-decoder vs PyTorch's `torch.nn.Transformer`, side by side.

    .venv/bin/python experiments/mt_torch_peer.py [--rounds 3] [--steps 6] [--settings eager,fused,compile]
        [--config configs/multi30k_ende.py] [--config.KEY=VALUE ...]

The same model on both sides, from the config: a pre-norm Transformer (`norm_first=True`, final
encoder and decoder norms), GELU, the config's layers / width / heads / feed-forward width, dropout
and label smoothing, one embedding table shared by source, target and output projection,
sinusoidal positions, float32, AdamW with the config's betas, eps, weight decay and gradient
clipping. The same batch: `train.batch_size` rows of `data.seq_len` random source and target tokens.

Each round runs, one after the other in fresh processes (alternating which goes first), the
llm_jax bench (`python -m llm_jax.bench`, the real jitted train step) and one PyTorch worker per
setting: `eager` (default AdamW), `fused` (AdamW(fused=True)), `compile` (torch.compile of the
model + fused AdamW). Prints every round, then one JSON line with the medians, each setting's ratio,
and `ratio_vs_best` = llm_jax / the fastest PyTorch setting (tokens/s; > 1: llm_jax is faster).
Tokens are target tokens. `--worker SETTING` runs one PyTorch setting and prints its JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_peer import last_json, same_host_memory, timed_steps  # noqa: E402 - the sibling script's helpers

SETTINGS = ("eager", "fused", "compile")


def load_config(path: str, overrides: list[str]):
    sys.path.insert(0, REPO)
    import importlib.util

    from llm_jax.training import config as config_lib

    spec = importlib.util.spec_from_file_location("mt_config", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    for item in overrides:  # --config.a.b=V, for the sizes this worker reads
        key, _, value = item.removeprefix("--config.").partition("=")
        *parents, leaf = key.split(".")
        node = c
        for p in parents:
            node = node[p]
        node[leaf] = type(node[leaf])(value) if not isinstance(node[leaf], bool) else value == "True"
    return config_lib.finalize(c)


def build_torch_model(m, vocab: int):
    import torch
    from torch import nn

    class Seq2Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(vocab, m.embed_dim)
            nn.init.normal_(self.embed.weight, std=m.init_std)
            self.transformer = nn.Transformer(
                d_model=m.embed_dim, nhead=m.num_heads, num_encoder_layers=m.num_encoder_layers or m.num_layers,
                num_decoder_layers=m.num_layers, dim_feedforward=m.mlp_dim, dropout=m.dropout_rate,
                activation="gelu", batch_first=True, norm_first=True,
            )  # fmt: skip
            half = m.embed_dim // 2
            inv = 1.0 / (10000.0 ** (torch.arange(0, m.embed_dim, 2).float() / m.embed_dim))
            angles = torch.arange(m.max_len).float()[:, None] * inv[None, :half]
            self.register_buffer("pos", torch.cat([angles.sin(), angles.cos()], dim=-1), persistent=False)
            self.drop = nn.Dropout(m.dropout_rate)

        def forward(self, source, inputs, causal):
            src = self.drop(self.embed(source) + self.pos[: source.shape[1]])
            tgt = self.drop(self.embed(inputs) + self.pos[: inputs.shape[1]])
            hidden = self.transformer(src, tgt, tgt_mask=causal, tgt_is_causal=True)
            return hidden @ self.embed.weight.T  # tied output projection

    torch.manual_seed(0)
    return Seq2Seq().float().train()


def torch_worker(config_path: str, overrides: list[str], setting: str, steps: int, warmup: int) -> dict:
    kept = same_host_memory()  # the llm_jax side's host-memory settings, before torch starts threads
    import torch

    c = load_config(config_path, overrides)
    m, o, seq, batch = c.model, c.optim, c.data.seq_len, c.train.batch_size
    vocab = math.ceil((m.vocab_size or c.data.vocab_size) / m.vocab_multiple) * m.vocab_multiple
    model = build_torch_model(m, vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.b1, o.b2), eps=o.eps,
                            weight_decay=o.weight_decay, fused=setting != "eager")  # fmt: skip
    forward = torch.compile(model) if setting == "compile" else model
    g = torch.Generator().manual_seed(0)
    source = torch.randint(4, vocab, (batch, seq), generator=g)
    tokens = torch.randint(4, vocab, (batch, seq + 1), generator=g)
    inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    causal = torch.nn.Transformer.generate_square_subsequent_mask(seq)

    def step():
        logits = forward(source, inputs, causal)
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, vocab), targets.reshape(-1), label_smoothing=m.label_smoothing
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if o.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        return loss

    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    warm_s = time.perf_counter() - t0
    timed, loss = timed_steps(step, steps, batch * seq)
    return {
        "setting": setting, **timed, "warmup_s": warm_s, "num_params": sum(p.numel() for p in model.parameters()),
        "final_loss": float(loss), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "keep_freed_memory": kept,
    }  # fmt: skip


def summarize(rounds: list[dict], settings: list[str]) -> dict:
    med = statistics.median
    jax_tps = [r["jax"]["tokens_per_sec"] for r in rounds]
    out = {"jax_tokens_per_sec": med(jax_tps), "jax_spread": [min(jax_tps), max(jax_tps)],
           "jax_mfu": med([r["jax"]["mfu"] or 0.0 for r in rounds])}  # fmt: skip
    fpt, peak = rounds[-1]["jax"]["flops_per_token"], med([r["jax"]["peak_flops"] for r in rounds])
    for s in settings:
        tps = [r[s]["tokens_per_sec"] for r in rounds]
        out[s] = {"tokens_per_sec": med(tps), "spread": [min(tps), max(tps)], "mfu": med(tps) * fpt / peak,
                  "ratio": med([r["jax"]["tokens_per_sec"] / r[s]["tokens_per_sec"] for r in rounds])}  # fmt: skip
    best = max(settings, key=lambda s: out[s]["tokens_per_sec"])
    out.update(best_torch_setting=best, ratio_vs_best=out[best]["ratio"])
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=os.path.join(REPO, "configs", "multi30k_ende.py"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--worker", choices=SETTINGS, help="run one PyTorch setting and print its JSON")
    args, overrides = ap.parse_known_args()
    bad = [a for a in overrides if not a.startswith("--config.")]
    if bad:
        ap.error(f"unknown arguments {bad}; only --config.KEY=VALUE overrides pass through")
    if args.worker:
        print(json.dumps(torch_worker(args.config, overrides, args.worker, args.steps, args.warmup)), flush=True)
        return
    settings = args.settings.split(",")
    common = ["--config", args.config, "--steps", str(args.steps), "--warmup", str(args.warmup), *overrides]
    cmds = {"jax": [sys.executable, "-m", "llm_jax.bench", *common]}
    for s in settings:
        cmds[s] = [sys.executable, os.path.abspath(__file__), "--worker", s, *common]
    rounds = []
    for r in range(args.rounds):
        order = list(cmds.items()) if r % 2 == 0 else list(reversed(cmds.items()))
        res = {name: last_json(cmd) for name, cmd in order}
        rounds.append(res)
        shown = " | ".join(f"{s} {res[s]['tokens_per_sec']:,.0f}" for s in settings)
        print(f"round {r + 1}: llm_jax {res['jax']['tokens_per_sec']:,.0f} tok/s | torch {shown}", flush=True)
    print(json.dumps({"config": os.path.relpath(args.config, REPO), "overrides": overrides, "rounds": rounds,
                      **summarize(rounds, settings)}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
