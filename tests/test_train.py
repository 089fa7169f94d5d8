"""End to end: a few steps of `train_and_evaluate` and of the CLI on a tiny config; resume."""

import contextlib
import importlib.util
import io
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax.data import tokenizer as tok_lib
from llm_jax.models import loss as loss_lib
from llm_jax.training import checkpoint as ckpt_lib
from llm_jax.training import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The same overrides in-process and on the command line: the same programs, so the CLI run reuses
# the compilations of the in-process runs through the session's persistent compilation cache
# (tests/conftest.py). A short warmup and a decay horizon that does not depend on num_steps: a run
# stopped at step 3 and resumed to 6 follows the schedule of a 6-step run.
OVERRIDES = {
    "optim.lr": 1e-2,
    "optim.warmup_steps": 1,
    "optim.decay_steps": 6,
    "train.log_every": 1,
    "train.eval_every": 3,
    "train.checkpoint_every": 2,
}


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "code.txt"
    with open(os.path.join(os.path.dirname(os.__file__), "textwrap.py"), encoding="utf-8") as f:
        path.write_text(f.read() * 3, encoding="utf-8")
    return str(path)


def tiny_config(text_file, num_steps):
    spec = importlib.util.spec_from_file_location("cfg_default", os.path.join(REPO, "configs", "default.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config("tiny")
    c.data.update(source="text", path=text_file)
    for key, value in OVERRIDES.items():
        section, name = key.split(".")
        c[section][name] = value
    c.train.num_steps = num_steps
    return c


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def train_losses(metrics):
    return {m["step"]: m["train/loss"] for m in metrics if "train/loss" in m}


def eval_losses(metrics):
    return {m["step"]: m["eval/loss"] for m in metrics if "eval/loss" in m}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, text_file):
    """Run A: 3 steps (checkpoints at 2 and 3). Run B: the same workdir raised to 6 steps (resumes).
    Run C: 6 steps without interruption, in another workdir."""
    root = tmp_path_factory.mktemp("runs")
    resumed, straight = str(root / "resumed"), str(root / "straight")
    out = {"resumed": resumed, "straight": straight}
    out["a"] = loop.train_and_evaluate(tiny_config(text_file, 3), resumed)
    out["a_metrics"] = read_metrics(resumed)
    out["a_checkpoints"] = sorted(os.listdir(os.path.join(resumed, "checkpoints")))
    with contextlib.redirect_stdout(io.StringIO()) as log:
        out["b"] = loop.train_and_evaluate(tiny_config(text_file, 6), resumed)
    out["b_log"] = log.getvalue()
    out["c"] = loop.train_and_evaluate(tiny_config(text_file, 6), straight)
    return out


def test_end_to_end_run_leaves_metrics_config_tokenizer_and_checkpoints(runs, text_file):
    workdir, metrics, final = runs["resumed"], runs["a_metrics"], runs["a"]
    # metrics.jsonl: one JSON object per line, train/loss every step, eval/loss on the eval step.
    assert sorted(train_losses(metrics)) == [1, 2, 3]
    assert sorted(eval_losses(metrics)) == [3]
    for m in metrics:
        assert isinstance(m["step"], int)
    losses = list(train_losses(metrics).values()) + list(eval_losses(metrics).values())
    assert all(math.isfinite(x) and 0 < x < 10 for x in losses)
    # It starts near log(vocab) (257 bytes padded to 384) and learns: lr 1e-2 lowers it in 3 steps.
    assert losses[0] == pytest.approx(math.log(384), rel=0.05)
    assert losses[2] < losses[0] - 0.2
    assert final["step"] == 3 and final["eval/loss"] == pytest.approx(eval_losses(metrics)[3])
    assert final["eval/perplexity"] == pytest.approx(math.exp(final["eval/loss"]))
    assert isinstance(final.get("sample"), str) and final["sample"].startswith("def ")
    # The resolved config, the tokenizer and the checkpoints live in the workdir.
    with open(os.path.join(workdir, "config.json")) as f:
        saved = json.load(f)
    assert saved["train"]["num_steps"] == 6  # run B rewrote it
    assert saved["data"]["path"] == text_file and saved["optim"]["decay_steps"] == 6
    assert tok_lib.load(os.path.join(workdir, "tokenizer")).kind == "byte"
    assert runs["a_checkpoints"] == ["2", "3"]
    assert os.path.isdir(os.path.join(workdir, "tensorboard"))


def test_resume_continues_from_the_last_saved_step(runs):
    workdir = runs["resumed"]
    b, c = runs["b"], runs["c"]
    assert b["step"] == 6 and c["step"] == 6
    resumed, straight = read_metrics(workdir), read_metrics(runs["straight"])
    # Run B restored step 3 and did steps 4..6 only: run A's records are still there, untouched
    # (their timings included), and every step is logged once.
    assert "resumed" in runs["b_log"]
    assert resumed[: len(runs["a_metrics"])] == runs["a_metrics"]
    steps = [m["step"] for m in resumed if "train/loss" in m]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert sorted(eval_losses(resumed)) == [3, 6]
    # ... and the result is that of an uninterrupted run: same losses at every step.
    np.testing.assert_allclose(list(train_losses(resumed).values()), list(train_losses(straight).values()), rtol=1e-6)
    np.testing.assert_allclose(list(eval_losses(resumed).values()), list(eval_losses(straight).values()), rtol=1e-6)
    assert b["eval/loss"] == pytest.approx(c["eval/loss"], rel=1e-6)
    mngr = ckpt_lib.manager(workdir, keep=3)
    assert mngr.latest_step() == 6
    mngr.close()


def test_cli_end_to_end(tmp_path, compile_cache):
    workdir = tmp_path / "cli"
    env = dict(os.environ)
    # The XLA flags of this process (8 CPU devices, from conftest): the same compiled programs.
    flags = env.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        flags += " --xla_force_host_platform_device_count=8"
    env.update(
        XLA_FLAGS=flags,
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=compile_cache,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
    )
    overrides = [f"--config.{k}={v}" for k, v in OVERRIDES.items()] + ["--config.train.num_steps=2"]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "llm_jax.main",
            "--config",
            "configs/default.py:tiny",
            f"--workdir={workdir}",
            *overrides,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "eval loss" in proc.stdout and "sample:" in proc.stdout
    metrics = read_metrics(str(workdir))
    assert sorted(train_losses(metrics)) == [1, 2] and sorted(eval_losses(metrics)) == [2]
    with open(workdir / "config.json") as f:
        saved = json.load(f)
    assert saved["train"]["num_steps"] == 2 and saved["data"]["source"] == "stdlib"
    assert saved["optim"]["lr"] == 1e-2  # the command-line overrides were applied
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2"]
    assert os.path.exists(workdir / "tokenizer" / tok_lib.META)


# ----------------------------------------------------------------------------------------------
# The loss


def test_token_loss_hand_values():
    token_loss = jax.jit(loss_lib.token_loss, compiler_options={"xla_backend_optimization_level": 0})
    # Uniform logits over 4 classes: every token costs log 4.
    logits = jnp.zeros((2, 3, 4))
    targets = jnp.asarray([[0, 1, 2], [3, 0, 1]])
    total, count = token_loss(logits, targets, None)
    assert float(count) == 6 and float(total) == pytest.approx(6 * math.log(4), rel=1e-6)
    # A confident right answer costs ~0, a confident wrong one ~margin; weights select tokens.
    logits = jnp.asarray([[[10.0, 0.0], [0.0, 10.0]]])
    total, count = token_loss(logits, jnp.asarray([[0, 0]]), jnp.asarray([[1.0, 0.0]]))
    assert float(count) == 1 and float(total) == pytest.approx(math.log1p(math.exp(-10.0)), abs=2e-6)
    total, _ = token_loss(logits, jnp.asarray([[0, 0]]), jnp.asarray([[0.0, 1.0]]))
    assert float(total) == pytest.approx(10.0 + math.log1p(math.exp(-10.0)), abs=2e-6)


@pytest.mark.parametrize("error", [TypeError("a bug"), ValueError("a bug's plain ValueError")])
def test_sample_lets_a_bug_surface(monkeypatch, error):
    trainer, ls, logs = _sample_fixture()

    def complete(*args, **kwargs):
        raise error

    monkeypatch.setattr(loop.decode_lib, "complete", complete)
    with pytest.raises(type(error), match="a bug"):
        loop.sample(trainer, ls)
    assert logs == []


def test_sample_skips_a_prompt_the_vocabulary_cannot_encode():
    trainer, ls, logs = _sample_fixture(prompt="zebra")  # the vocabulary holds only "ab\n"
    assert loop.sample(trainer, ls) == ""
    assert len(logs) == 1 and logs[0].startswith("sample skipped: character 'z' is not in this run's")


def _sample_fixture(prompt="ab"):
    """What `loop.sample` reads of a Trainer and LoopState: a 2-layer model on a 3-character vocabulary."""
    from types import SimpleNamespace

    from llm_jax.models.model import ModelConfig, TransformerLM
    from llm_jax.runtime import sharding
    from llm_jax.training.config import base_config

    config = base_config()
    config.train.update(sample_prompt=prompt, sample_tokens=2)
    model = TransformerLM(ModelConfig(vocab_size=8, num_layers=1, num_heads=2, embed_dim=8, mlp_dim=16, max_len=8))
    params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    logs = []
    trainer = SimpleNamespace(
        config=config, data=SimpleNamespace(tokenizer=tok_lib.CharTokenizer.train("ab\n")), model=model,
        mesh=sharding.make_mesh(SimpleNamespace(data=1, fsdp=1, tensor=1), jax.devices()[:1]),
        rules=sharding.LOGICAL_RULES, log=logs.append, params=lambda ls: ls.state.params,
    )  # fmt: skip
    ls = SimpleNamespace(step=0, state=SimpleNamespace(params=params), trained_context=8)
    return trainer, ls, logs
