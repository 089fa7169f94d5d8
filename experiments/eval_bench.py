"""lm-eval requests per second: the llm_jax backend (`LlmJaxLM`) against lm-eval's own `hf` backend
(PyTorch, CPU), on the same random GPT-2 checkpoint and the same requests, side by side.

    .venv/bin/python experiments/eval_bench.py [--modes mc,letters,single,gen] [--repeats 3] [--batch_size 16]
        [--layers 4 --width 256 --heads 4 --vocab 4096 --max_len 256] [--docs 48]

Needs the eval and hf extras, and ../shared/data/tinyshakespeare/input.txt ($LLM_JAX_DATA): a BPE
tokenizer is trained on it, and the requests are spans of it, shaped like three kinds of task:

- `mc`: hellaswag-like multiple choice, a ~100-token context and 4 endings of ~10 tokens each
  (4 loglikelihood requests per document);
- `letters`: MMLU-like multiple choice, a ~100-token context and the answers " A" ... " D" (one
  token each: both backends read one forward for the four);
- `single`: lambada-like, a ~100-token context and its next word (one request per document);
- `gen`: generate_until, a ~60-token prompt, at most 32 new tokens, cut at a blank line.

Each backend answers the whole list once to warm up (JAX compiles), then the two are timed in turn
`--repeats` times (so both see the same machine load). The last stdout line is one JSON object:
per mode the median requests/s of each side, their ratio, the largest log-likelihood difference
(or the share of identical generations), each side's first call (llm_jax's includes compiling) and
each side's MFU: model forward FLOPs of the real (unpadded) tokens over the host's float32 matmul
peak measured here.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llm_jax.runtime import hostmem  # noqa: E402 - first: host memory settings before numpy and JAX start threads

hostmem.keep_freed_memory()

# isort: split
import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

flags.DEFINE_list("modes", ["mc", "letters", "single", "gen"], "Request kinds to time: mc, letters, single, gen.")
flags.DEFINE_integer("repeats", 3, "Timed calls per backend (alternating).")
flags.DEFINE_integer("batch_size", 16, "Both backends' batch size.")
flags.DEFINE_integer("docs", 48, "Documents per mode (mc: 4 requests each).")
flags.DEFINE_integer("layers", 4, "GPT-2 layers.")
flags.DEFINE_integer("width", 256, "GPT-2 width.")
flags.DEFINE_integer("heads", 4, "GPT-2 heads.")
flags.DEFINE_integer("vocab", 4096, "BPE vocabulary trained on Tiny Shakespeare.")
flags.DEFINE_integer("max_len", 256, "GPT-2 positions (both backends' max_length).")
flags.DEFINE_integer("seed", 0, "Weights and request sampling.")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.environ.get("LLM_JAX_DATA", os.path.join(REPO, "..", "shared", "data"))


def checkpoint(root: str, text: str, f) -> tuple[str, str]:
    """(HF directory, imported llm_jax workdir) of a random GPT-2 with a BPE trained on `text`."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from llm_jax.interop import hf

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=f.vocab, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([text], trainer)
    torch.manual_seed(f.seed)
    cfg = transformers.GPT2Config(
        vocab_size=tok.get_vocab_size(), n_positions=f.max_len, n_embd=f.width, n_layer=f.layers, n_head=f.heads,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    src, work = os.path.join(root, "hf"), os.path.join(root, "run")
    transformers.GPT2LMHeadModel(cfg).save_pretrained(src)
    tok.save(os.path.join(src, "tokenizer.json"))
    special = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}
    with open(os.path.join(src, "tokenizer_config.json"), "w") as fh:
        json.dump(special, fh)
    hf.import_run(src, work, hf.run_config(src), log=lambda *a: None)
    return src, work


def requests(mode: str, text: str, n: int, rng: np.random.Generator):
    """lm-eval Instances of `mode` cut from `text` (character spans, ~4 characters a token)."""
    from lm_eval.api.instance import Instance

    def span(chars):
        i = int(rng.integers(0, len(text) - chars))
        return text[i : i + chars]

    out = []
    for d in range(n):
        if mode == "mc":
            ctx = span(400)
            for k in range(4):
                out.append(Instance("loglikelihood", {}, (ctx, " " + span(40).strip()), 4 * d + k))
        elif mode == "letters":
            ctx = span(400) + "\nAnswer:"
            for k, letter in enumerate("ABCD"):
                out.append(Instance("loglikelihood", {}, (ctx, " " + letter), 4 * d + k))
        elif mode == "single":
            ctx = span(400).rsplit(" ", 1)[0]
            out.append(Instance("loglikelihood", {}, (ctx, " " + span(30).split()[1]), d))
        else:
            args = {"until": ["\n\n"], "max_gen_toks": 32, "do_sample": False}
            out.append(Instance("generate_until", {}, (span(240), args), d))
    return out


def call(lm, reqs):
    fn = lm.generate_until if reqs[0].request_type == "generate_until" else lm.loglikelihood
    t0 = time.perf_counter()
    out = fn(reqs, disable_tqdm=True)
    return time.perf_counter() - t0, out


def forward_tokens(lm, reqs, outs) -> int:
    """Real tokens the model must read to answer `reqs` (contexts truncated as lm-eval does; plus the
    generated tokens for generation). Requests with the same input (one-token answers after one
    context) count once: both backends read it once."""
    total, seen = 0, set()
    for req, out in zip(reqs, outs):
        if req.request_type == "generate_until":
            total += min(len(lm.tok_encode(req.args[0])), lm.max_length - 32) + len(lm.tok_encode(out))
            continue
        ctx, cont = lm._encode_pair(*req.args)
        inputs = tuple((ctx + cont)[-(lm.max_length + 1) :][:-1])
        if inputs not in seen:
            seen.add(inputs)
            total += len(inputs)
    return total


def compare(mode, a, b) -> dict:
    if mode == "gen":
        return {"identical_generations": float(np.mean([x == y for x, y in zip(a, b)]))}
    return {"max_abs_loglikelihood_diff": float(max(abs(x[0] - y[0]) for x, y in zip(a, b)))}


def main(argv):
    import torch
    from lm_eval.models.huggingface import HFLM

    from llm_jax.evaluation.harness import LlmJaxLM
    from llm_jax.models import flops
    from llm_jax.training.saved_run import load_run

    f = flags.FLAGS
    with open(os.path.join(DATA, "tinyshakespeare", "input.txt"), encoding="utf-8") as fh:
        text = fh.read()
    src, work = checkpoint(tempfile.mkdtemp(prefix="eval_bench_"), text, f)
    ours = LlmJaxLM(load_run(work), batch_size=f.batch_size)
    ref = HFLM(pretrained=src, batch_size=f.batch_size, device="cpu", dtype="float32")
    peak = flops.measure_cpu_matmul_flops(seconds=2.0)
    fwd_per_token = flops.decoder_flops_per_token(ours.run.model.cfg, f.max_len // 2) / 3  # forward only
    result = {
        "host_peak_gflops": peak / 1e9, "devices": f"{jax.device_count()} x {jax.devices()[0].platform}",
        "torch_threads": torch.get_num_threads(), "batch_size": f.batch_size, "repeats": f.repeats,
        "model": {"layers": f.layers, "width": f.width, "heads": f.heads, "vocab": ours.run.tokenizer.vocab_size,
                  "max_len": f.max_len},
    }  # fmt: skip
    rng = np.random.default_rng(f.seed)
    for mode in f.modes:
        reqs = requests(mode, text, f.docs, rng)
        (first_ours, a), (first_hf, b) = call(ours, reqs), call(ref, reqs)  # warm-up: JAX compiles
        times = {"llm_jax": [], "hf": []}
        for _ in range(f.repeats):
            for name, lm in (("llm_jax", ours), ("hf", ref)):
                times[name].append(call(lm, reqs)[0])
        work_flops = forward_tokens(ours, reqs, a) * fwd_per_token
        row = {
            "requests": len(reqs),
            **compare(mode, a, b),
            "llm_jax_first_call_s": first_ours,
            "hf_first_call_s": first_hf,
        }
        for name, t in times.items():
            med = statistics.median(t)
            row[f"{name}_requests_per_sec"] = len(reqs) / med
            row[f"{name}_mfu"] = work_flops / med / peak
        row["ratio"] = row["llm_jax_requests_per_sec"] / row["hf_requests_per_sec"]
        result[mode] = row
        print(f"{mode:7s} llm_jax {row['llm_jax_requests_per_sec']:7.1f} req/s | hf {row['hf_requests_per_sec']:7.1f} "
              f"req/s | ratio {row['ratio']:.2f}", file=sys.stderr)  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    app.run(main)
