"""Smoke tests of every benchmark and peer script (experiments/, llm_jax.bench_decode) on a tiny
size, one or two steps each, through their command lines: none of them can rot unnoticed. The fast
subset (-m "not slow") keeps the two that only need JAX and take seconds: the decode benchmark and
the profiler's step breakdown.

The PyTorch peers need the hf extra (torch, transformers), the qwix comparison the quant extra; CI
installs both on Python 3.11, where nothing may be skipped. On Python 3.12 CI has neither and those
tests skip, naming the extra.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import runlib as R

NEEDS_HF = "needs the hf extra (torch, transformers): pip install torch==2.13.0 transformers safetensors"
NEEDS_QWIX = "needs the quant extra (qwix): pip install -e '.[quant]'"
# A 1-layer GPT-2 of bench_cpu's kind (with its chunked loss): every script below runs it in seconds.
TINY = {**R.BENCH_TINY, "model.loss_chunk": 16}
TINY_DECODE = ["--layers=1", "--width=32", "--heads=2", "--vocab=256", "--max_len=32", "--batch=2"]
TINY_DECODE += ["--prompt_len=4", "--new_tokens=4", "--repeats=2"]


def overrides(skip=()) -> list[str]:
    return [f"--config.{k}={v}" for k, v in TINY.items() if k not in skip]


def run(args: list[str], timeout: float = 400, env=None) -> str:
    """Runs a command from the repository root (1 CPU device, a fixed MFU peak); returns stdout."""
    proc = subprocess.run(
        args, cwd=R.REPO, env=env or R.env(1), capture_output=True, text=True, timeout=timeout
    )  # fmt: skip
    assert proc.returncode == 0, f"{' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    return proc.stdout


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_bench_decode_command():
    out = last_json(run([sys.executable, "-m", "llm_jax.bench_decode", *TINY_DECODE, "--quant=int8"]))
    assert out["new_tokens"] == 4 and out["config"]["layers"] == 1
    for side in ("llm_jax", "llm_jax_int8"):
        assert 0 < out[f"{side}_tokens_per_sec"] <= out[f"best_{side}_tokens_per_sec"] and out[f"{side}_mfu"] > 0
    assert out["llm_jax_int8_weight_bytes"] < out["llm_jax_weight_bytes"] and out["speedup_int8"] > 0


@pytest.mark.slow
def test_decode_peer_times_both_thread_counts():
    pytest.importorskip("torch", reason=NEEDS_HF)
    out = last_json(run([sys.executable, "experiments/decode_peer.py", *TINY_DECODE]))
    assert set(out["ratio_by_threads"]) == {"hf@default", "hf@1"}
    assert out["best_hf"] in out["ratio_by_threads"] and out["ratio"] == out["ratio_by_threads"][out["best_hf"]]
    for name in ("llm_jax", "hf@default", "hf@1"):
        assert 0 < out[f"worst_{name}_tokens_per_sec"] <= out[f"best_{name}_tokens_per_sec"], name


@pytest.mark.slow
def test_torch_peer_settings_train_the_same_model():
    """Every PyTorch setting (eager, foreach, fused AdamW, torch.compile + fused) builds the same
    GPT-2 (same first loss, before any update) and trains it (a finite loss after a step)."""
    pytest.importorskip("torch", reason=NEEDS_HF)
    sys.path.insert(0, os.path.join(R.REPO, "experiments"))
    import torch_peer

    spec = {"layers": 1, "width": 64, "heads": 2, "mlp": 128, "vocab": 512, "max_len": 32, "norm_eps": 1e-5}
    spec.update(tied=True, seq=16, batch=4, loss_chunk=0, lr=1e-2, b1=0.9, b2=0.95, eps=1e-8)
    spec.update(weight_decay=0.1, grad_clip=1.0)
    got = {s: torch_peer.torch_worker(spec, s, "default", steps=1, warmup=1) for s in torch_peer.SETTINGS}
    first = got["eager"]["first_loss"]
    assert first == pytest.approx(math.log(512), rel=0.05)  # a fresh model: close to uniform
    for setting, out in got.items():
        assert out["first_loss"] == pytest.approx(first, rel=1e-5), setting
        assert math.isfinite(out["final_loss"]) and out["final_loss"] < first, setting


@pytest.mark.slow
def test_torch_peer_rounds_and_ratios():
    pytest.importorskip("torch", reason=NEEDS_HF)
    args = ["--rounds=1", "--steps=1", "--warmup=1", "--settings=eager", "--threads=default,1"]
    stdout = run([sys.executable, "experiments/torch_peer.py", *args, *overrides()])
    out = last_json(stdout)
    entries = {"llm_jax", "llm_jax_no_chunk", "torch_eager@default", "torch_eager@1"}
    assert set(out["tokens_per_sec"]) == set(out["mfu"]) == entries
    assert out["best_torch"] in entries and len(out["ratio_rounds"]) == 1
    best = out["tokens_per_sec"][out["best_torch"]]
    assert out["ratio"] == pytest.approx(out["tokens_per_sec"]["llm_jax"] / best)
    assert out["ratio_no_chunk"] == pytest.approx(out["tokens_per_sec"]["llm_jax_no_chunk"] / best)
    assert out["peak_flops"] == 1e11 and out["spec"]["layers"] == 1
    assert all(f"round 1: {name}" in stdout for name in entries)


@pytest.mark.slow
def test_mt_torch_peer_runs_the_same_size_translation_model():
    pytest.importorskip("torch", reason=NEEDS_HF)
    tiny = ["--config.model.num_layers=1", "--config.model.num_encoder_layers=1", "--config.model.embed_dim=64"]
    tiny += ["--config.model.mlp_dim=128", "--config.model.num_heads=2", "--config.data.vocab_size=512"]
    tiny += ["--config.data.seq_len=16", "--config.model.max_len=16", "--config.train.batch_size=4"]
    args = ["--rounds=1", "--steps=1", "--warmup=1", "--settings=eager,fused", *tiny]
    stdout = run([sys.executable, "experiments/mt_torch_peer.py", *args])
    out = last_json(stdout)
    (res,) = out["rounds"]
    assert res["jax"]["num_params"] == res["eager"]["num_params"] == res["fused"]["num_params"]
    assert res["eager"]["tokens_per_sec"] > 0 and math.isfinite(res["eager"]["final_loss"])
    best = max(res[s]["tokens_per_sec"] for s in ("eager", "fused"))
    assert out["ratio_vs_best"] == pytest.approx(res["jax"]["tokens_per_sec"] / best)
    assert "round 1: llm_jax" in stdout


@pytest.mark.slow
def test_ab_bench_alternates_two_sides():
    sys.path.insert(0, os.path.join(R.REPO, "experiments"))
    import ab_bench

    assert ab_bench.side("LLM_JAX_X=0 --config.model.loss_chunk=0") == (
        {"LLM_JAX_X": "0"}, ["--config.model.loss_chunk=0"]
    )  # fmt: skip
    args = ["--a", "LLM_JAX_KEEP_FREED_MEMORY=0", "--b=LLM_JAX_KEEP_FREED_MEMORY=1", "--rounds=2", "--steps=1"]
    stdout = run([sys.executable, "experiments/ab_bench.py", *args, "--warmup=1", *overrides()])
    order = [line.split()[2] for line in stdout.splitlines() if line.startswith("round")]
    assert order == ["a", "b", "b", "a"], stdout
    out = last_json(stdout)
    assert out["a"]["final_loss"] == out["b"]["final_loss"]  # where memory comes from changes no result
    assert len(out["ratio_rounds"]) == 2 and math.isfinite(out["ratio"]) and out["ratio"] > 0


@pytest.mark.slow
def test_compile_time_script():
    out = last_json(run([sys.executable, "experiments/compile_time.py", "--layers", "1", "2", "--rounds", "1"]
                        + overrides(skip=("model.num_layers",))))  # fmt: skip
    assert set(out["compile_s"]) == {"1", "2"} and all(t > 0 for t in out["compile_s"].values())


def test_profile_step_script():
    stdout = run([sys.executable, "experiments/profile_step.py", "configs/bench_cpu.py", "--steps=1", "--top=6"]
                 + overrides())  # fmt: skip
    assert "ms/step" in stdout and "by scope" in stdout and "by op:" in stdout
    # The named scopes reach the profile: the loss and the optimizer update have time of their own.
    parts = [line.split() for line in stdout.splitlines() if line.startswith(("loss ", "optimizer "))]
    rows = {p[0]: p[1:] for p in parts}
    assert float(rows["loss"][-1]) > 0 and float(rows["optimizer"][-1]) > 0, stdout
    assert "matmul" in stdout.split("by part and op kind")[1].splitlines()[1], stdout


@pytest.mark.slow
def test_data_throughput_script_on_a_small_corpus(tmp_path):
    corpus = tmp_path / "corpus"
    stdout = run([sys.executable, "experiments/data_throughput.py", "--gb=0.005", "--sp_mb=1", f"--dir={corpus}"])
    out = last_json(stdout)
    assert out["corpus_bytes"] >= 5e6 and out["prepare_s"] > 0 and out["sp_prepare_mb"] >= 1
    assert out["loader_tokens_per_s"] > 0 and out["step_tokens_per_s"] > 0
    packed_over_step = out["loader_packed_tokens_per_s"] / out["step_tokens_per_s"]  # the slower loader
    assert out["loader_over_step"] == pytest.approx(packed_over_step, rel=0.01)
    assert not corpus.exists(), "the corpus and its cache are removed unless --keep"


@pytest.mark.slow
def test_h200_script_on_a_tiny_llama(tmp_path):
    """The H200 script's command at a tiny size on CPU (its figures need the GPU)."""
    tiny = "--config.model.num_layers=1 --config.model.embed_dim=64 --config.model.mlp_dim=128"
    tiny += " --config.model.num_heads=4 --config.model.num_kv_heads=2 --config.model.vocab_size=512"
    env = R.env(1)
    env.update(PYTHON=sys.executable, OUT=str(tmp_path), BATCHES="2", STEPS="1", SEQ="32", LOSS_CHUNK="16")
    env.update(EXTRA=tiny + " --config.model.max_len=64")
    run(["bash", "experiments/h200_llama1b.sh"], env=env)
    out = json.loads((tmp_path / "h200_llama1b_b2.json").read_text())
    assert out["config"] == "llama-1b" and out["seq_len"] == 32 and out["dtype"] == "bfloat16"
    assert out["num_params"] > 0 and out["tokens_per_sec"] > 0


@pytest.mark.slow
def test_long_context_script(tmp_path):
    """Reference vs blockwise attention at two short lengths: compiled memory of each, both run."""
    png = tmp_path / "lc.png"
    stdout = run([sys.executable, "experiments/long_context.py", "--lengths", "256,512", "--out", str(png)])
    rows = [json.loads(line) for line in stdout.strip().splitlines()]
    steps, summary = rows[:-1], rows[-1]
    assert [(r["attention"], r["length"]) for r in steps] == [
        ("einsum", 256), ("blockwise", 256), ("einsum", 512), ("blockwise", 512)
    ]  # fmt: skip
    assert all(r["temp_gib"] > 0 and r["tokens_per_s"] > 0 for r in steps)
    assert set(summary["temp_growth_per_doubling"]) == {"einsum", "blockwise"} and png.stat().st_size > 0


def test_lora_bench_script_the_lora_step_skips_the_frozen_weight_gradients():
    args = ["--layers=2", "--width=128", "--seq_len=64", "--batch_size=4", "--rank=4", "--rounds=2", "--steps=1"]
    out = last_json(run([sys.executable, "experiments/lora_bench.py", *args, "--warmup=1"]))
    full, lora, ratio = out["full"], out["lora"], out["lora_over_full"]
    assert lora["frozen_params"] == full["trainable_params"] > 10 * lora["trainable_params"] > 0
    assert lora["opt_state_bytes"] < full["opt_state_bytes"] / 10 and full["frozen_bytes"] == 0
    # XLA's count of the compiled LoRA step follows the 4N count (no weight gradient of the base),
    # well under the full step's 6N.
    assert ratio["xla_flops"] == pytest.approx(ratio["counted_flops"], rel=0.1) and ratio["xla_flops"] < 0.8
    assert 0 < lora["mfu_counted"] < lora["mfu_6n"] and full["mfu_counted"] == full["mfu_6n"]


@pytest.mark.slow
def test_qwix_compare_quantizes_the_same_kernels_both_ways():
    """Ours and qwix's weight-only int8 / int4 of the same 1-layer Llama: the same seven kernels,
    the same bytes, weight errors within 10% of each other (one scheme: per output channel, round
    to nearest; qwix's levels span +-(qmax + 0.5) steps, ours +-qmax), int8 decoding as float's."""
    pytest.importorskip("qwix", reason=NEEDS_QWIX)
    args = [*TINY_DECODE, "--style=llama", "--qwix_tile=16", "--batches=1,2"]
    out = last_json(run([sys.executable, "experiments/qwix_compare.py", *args]))
    assert out["quantized_kernels"] == 7  # query, key, value, out, wi_0, wi_1, wo
    for kind in ("int8", "int4"):
        ours, qwix = out[f"ours_{kind}"], out[f"qwix_{kind}"]
        assert ours["weight_bytes"] == qwix["weight_bytes"] < out["float"]["weight_bytes"], kind
        assert 0 < ours["weight_rel_rms"] == pytest.approx(qwix["weight_rel_rms"], rel=0.1), kind
    assert out["qwix_int4_g16"]["weight_bytes"] > out["qwix_int4"]["weight_bytes"]  # a scale per 16 inputs
    for side in ("ours_int8", "qwix_int8"):
        assert out[side]["greedy_match"] == out[side]["argmax_agreement"] == 1.0 and out[side]["max_dlogit_rel"] < 0.05
    for batch in (1, 2):
        timed = out[f"batch_{batch}"]
        assert timed["peak_flops"] == 1e11 and timed["float"]["vs_float"] == 1.0
        assert all(timed[side]["tokens_per_sec"] > 0 and timed[side]["mfu"] > 0 for side in out["sides"])
