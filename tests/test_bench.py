"""The benchmark command and the FLOP / MFU accounting it shares with the trainer."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
import runlib as R

from llm_jax.models import family as family_lib
from llm_jax.models import flops
from llm_jax.models.model import ModelConfig, TransformerLM
from llm_jax.runtime.errors import BadValue
from llm_jax.tools import bench
from llm_jax.training import config as config_lib
from llm_jax.training import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench_cpu():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_cpu", os.path.join(REPO, "configs", "bench_cpu.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def test_flops_per_token_gpt2_by_hand():
    """bench_cpu: 4 layers x (qkv 3*256*256 + out 256*256 + mlp 2*256*1024) + head 256*8192 matmul
    weights, 6 FLOPs each, plus causal attention 6 * t * h * d per layer."""
    cfg = config_lib.model_config(config_lib.finalize(_bench_cpu()), 8192)
    matmul = 4 * (3 * 256 * 256 + 256 * 256 + 2 * 256 * 1024) + 256 * 8192
    assert family_lib.flops_per_token(cfg, 256) == 6 * matmul + 6 * 256 * 4 * 64 * 4 == 33_030_144


def test_flops_per_token_llama_gqa_swiglu():
    cfg = ModelConfig(
        vocab_size=1000,
        num_layers=2,
        num_heads=8,
        num_kv_heads=2,
        embed_dim=64,
        mlp_dim=96,
        mlp_activation="swiglu",
        tie_embeddings=False,
        use_bias=False,
        positions="rope",
    )
    d = 8
    per_layer = 64 * (8 + 2 * 2) * d + 8 * d * 64 + 3 * 64 * 96
    assert family_lib.flops_per_token(cfg, 128) == 6 * (2 * per_layer + 64 * 1000) + 6 * 128 * 8 * d * 2
    # 6N: the matmul weights are the parameters less norms and the embedding lookup table.
    params = TransformerLM(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    n = sum(x.size for x in jax.tree.leaves(params))
    assert 6 * (2 * per_layer + 64 * 1000) == 6 * (n - 1000 * 64 - 64 * 5)  # 5 norm scales of width 64


@pytest.mark.parametrize(
    "kind,dtype,peak",
    [
        ("NVIDIA H200", "bfloat16", 989e12),
        ("NVIDIA H100 80GB HBM3", "bfloat16", 989e12),
        ("NVIDIA A100-SXM4-80GB", "bfloat16", 312e12),
        ("NVIDIA A100-SXM4-80GB", "float32", 156e12),
        ("TPU v4", "bfloat16", 275e12),
        ("TPU v5 lite", "bfloat16", 197e12),
        ("TPU v5p", "float32", 459e12),
        ("TPU v6 lite", "bfloat16", 918e12),
        ("Some Future Chip", "bfloat16", None),
    ],
)
def test_peak_table(kind, dtype, peak):
    assert flops._device_peak(kind, dtype) == peak


def test_mfu_and_cpu_peak(monkeypatch):
    assert flops.mfu(1000.0, 1e9, 4e12) == pytest.approx(0.25)
    assert flops.mfu(1000.0, 1e9, None) is None
    monkeypatch.delenv("LLM_JAX_CPU_PEAK_FLOPS", raising=False)  # other modules set it for speed
    peak, how = flops.peak_flops(jax.devices()[:1])
    assert peak > 1e9 and "measured" in how  # any CPU does more than 1 GFLOP/s in float32


def test_bench_run_reports_every_key():
    config = _bench_cpu()
    for k, v in R.BENCH_TINY.items():
        section, key = k.split(".")
        config[section][key] = v
    out = bench.run(config, steps=2, warmup=1, log=lambda *a: None)
    for key in (
        "tokens_per_sec",
        "step_time_s",
        "step_time_min_s",
        "step_time_max_s",
        "compile_s",
        "flops_per_token",
        "mfu",
        "peak_memory_bytes",
        "num_params",
        "mesh",
    ):
        assert out[key] is not None, key
    assert out["tokens_per_sec"] == pytest.approx(8 * 32 / out["step_time_s"])
    assert out["step_time_min_s"] <= out["step_time_s"] <= out["step_time_max_s"]
    assert 0 < out["mfu"] < 1
    assert out["num_params"] == 512 * 64 + 32 * 64 + (4 * 64 * 64 + 4 * 64) + (2 * 64 * 128 + 128 + 64) + 3 * 2 * 64
    assert out["peak_memory_bytes"] >= 2 * 4 * out["num_params"] // jax.device_count()  # params + grads at least
    assert out["mesh"] == {"data": jax.device_count(), "fsdp": 1, "expert": 1, "sequence": 1, "tensor": 1}


def test_bench_command_prints_json_last_line():
    """The command line: config file + overrides + --steps; last stdout line is one JSON object."""
    args = [f"--config.{k}={v}" for k, v in R.BENCH_TINY.items()]
    env = dict(os.environ, LLM_JAX_CPU_PEAK_FLOPS="1e11")  # skip the peak measurement: a fixed scale
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "llm_jax.bench",
            "--config",
            "configs/bench_cpu.py",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--config.model.loss_chunk=16",
            *args,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["peak_flops"] == 1e11 and out["peak_flops_source"] == "LLM_JAX_CPU_PEAK_FLOPS"
    assert out["mfu"] == pytest.approx(out["tokens_per_sec"] * out["flops_per_token"] / 1e11)


def test_scan_compiles_the_same_program_at_any_depth():
    """nn.scan keeps compile time flat with depth: the lowered train step of 24 layers is the same
    program as that of 2 (one while loop over the stacked layers), not 12x longer."""
    import flax.linen as nn
    import optax

    from llm_jax.training import state as state_lib

    def lowered_size(layers):
        cfg = ModelConfig(
            vocab_size=256,
            num_layers=layers,
            num_heads=2,
            embed_dim=32,
            mlp_dim=64,
            max_len=16,
            scan_layers=True,
            remat="dots",
        )
        model = TransformerLM(cfg)
        tx = optax.adamw(1e-3)
        state = jax.eval_shape(state_lib.init_state_fn(model, tx, 16), jax.random.key(0))
        state = nn.meta.unbox(state)
        batch = {
            "inputs": jax.ShapeDtypeStruct((2, 16), jnp.int32),
            "targets": jax.ShapeDtypeStruct((2, 16), jnp.int32),
        }
        step = jax.jit(lambda s, b: state_lib.train_step(s, b, jax.random.key(0), model=model, tx=tx))
        return len(step.lower(state, batch).as_text())

    assert lowered_size(24) <= 1.02 * lowered_size(2)


@pytest.mark.parametrize(
    "overrides, message",
    [
        # 8 rows do not split into 3 micro-batches: the trainer's check_batch, now bench's too.
        ({"train.grad_accum_steps": 3}, r"batch_size=8 must split into grad_accum_steps=3 micro-batches"),
        ({"train.num_stesp": 5}, r"unknown config key: config\.train\.num_stesp"),  # check_keys
        ({"train.on_nan": "ignore"}, r"config\.train\.on_nan='ignore'"),  # check_train
    ],
)
def test_bench_refuses_what_the_trainer_refuses(tmp_path, overrides, message):
    """bench builds its step with the trainer's builder (`state.build`): the same config errors, word for word."""
    corpus = R.write_corpus(str(tmp_path / "corpus.txt"))
    config = R.tiny_config({"data.source": "text", "data.path": corpus, "train.batch_size": 8, **overrides})
    with pytest.raises(BadValue, match=message) as from_trainer:
        loop.train_and_evaluate(config, str(tmp_path / "run"))
    with pytest.raises(BadValue, match=message) as from_bench:
        bench.prepare(config, log=lambda *a: None)
    assert str(from_bench.value) == str(from_trainer.value)
