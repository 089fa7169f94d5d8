"""The researcher's tools as a user runs them on tiny trained runs: `python -m llm_jax.plot` and
`python -m llm_jax.attention` write real pictures; the trainer prints the model summary and logs
the learning rate. Needs the `notebook` extra (matplotlib), which CI installs."""

import contextlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import runlib as R

from llm_jax.training import config as config_lib
from llm_jax.training import loop, optim

pytest.importorskip("matplotlib", reason="the pictures need the notebook extra: pip install -e '.[notebook]'")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny LM runs (seeds 0 and 1, 8 devices) and a tiny translation run; the first's log."""
    root = tmp_path_factory.mktemp("tools")
    corpus = R.write_corpus(str(root / "code.txt"), 40_000)
    out = {}
    for name, seed in (("lm_a", 0), ("lm_b", 1)):
        config = R.tiny_config(R.tiny_overrides(corpus, 6, 6, **{"train.eval_every": 3, "seed": seed}))
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            loop.train_and_evaluate(config, str(root / name))
        out[name], out[name + "_log"] = str(root / name), log.getvalue()
    mt_data = str(root / "mt_data")
    os.makedirs(mt_data)
    rng = np.random.default_rng(0)
    words = ["a", "man", "dog", "red", "runs", "the", "on", "grass", "woman", "blue"]
    src = [" ".join(rng.choice(words, rng.integers(3, 8))) for _ in range(300)]
    for split, n in (("train", 300), ("val", 30)):
        with open(os.path.join(mt_data, f"{split}.en"), "w") as f:
            f.write("\n".join(src[:n]) + "\n")
        with open(os.path.join(mt_data, f"{split}.de"), "w") as f:
            f.write("\n".join(" ".join(w.upper() for w in s.split()[::-1]) for s in src[:n]) + "\n")
    config = _mt_config(mt_data)
    with contextlib.redirect_stdout(io.StringIO()):
        loop.train_and_evaluate(config, str(root / "mt"))
    out["mt"] = str(root / "mt")
    return out


def _mt_config(data_dir):
    import importlib.util

    spec = importlib.util.spec_from_file_location("mt_cfg", os.path.join(R.REPO, "configs", "multi30k_ende.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config("tiny")
    c.data.path = data_dir
    c.train.update(num_steps=4, log_every=2, eval_every=4, decode_eval_every=4, decode_eval_examples=8)
    return c


def _cli(module: str, *args: str, devices: int = 4) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=R.REPO, env=R.env(devices), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip


def test_startup_prints_the_model_summary_and_metrics_hold_the_learning_rate(runs):
    log = runs["lm_a_log"]
    assert "parameters per module:" in log and "FLOPs per token (training, context 32)" in log
    assert "layers_[0-1]/attn/query/kernel x2" in log and "mesh: data=8 x fsdp=1 x tensor=1" in log
    config = config_lib.finalize(R.tiny_config(R.tiny_overrides("", 6, 6)))  # decay over num_steps
    schedule = optim.make_schedule(config.optim)
    lrs = R.metric(runs["lm_a"], "train/lr")
    assert [s for s, _ in lrs] == list(range(1, 7))
    np.testing.assert_allclose([v for _, v in lrs], [float(schedule(s - 1)) for s in range(1, 7)], rtol=1e-6)


def test_plot_cli_overlays_runs_in_a_real_picture(runs, tmp_path):
    out = str(tmp_path / "curves.png")
    proc = _cli("llm_jax.plot", f"--workdir={runs['lm_a']}", f"--workdir={runs['lm_b']}", f"--workdir={runs['mt']}",
                "--label=seed 0", "--label=seed 1", "--label=translation", f"--output={out}")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "plot: wrote" in proc.stdout and "(3 runs)" in proc.stdout
    w, h = R.assert_real_image(out)
    assert w > h  # 4 panels across, 2 down
    bad = _cli("llm_jax.plot", f"--workdir={tmp_path}", f"--output={out}")
    assert bad.returncode != 0 and "plot: error: " in bad.stderr and "metrics.jsonl does not exist" in bad.stderr
    default = _cli("llm_jax.plot", f"--workdir={runs['mt']}")  # no --output: the run's own curves.png
    assert default.returncode == 0 and f"wrote {runs['mt']}/curves.png" in default.stdout, default.stderr[-3000:]
    R.assert_real_image(f"{runs['mt']}/curves.png")


def test_attention_cli_draws_a_language_model_on_another_mesh(runs, tmp_path):
    out = str(tmp_path / "attention.png")
    text = "def add(a, b):\n    return a + b  # " + "x" * 40  # longer than the trained context: cut
    proc = _cli("llm_jax.attention", f"--workdir={runs['lm_a']}", f"--text={text}", f"--output={out}", devices=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "self-attention 2x2" in proc.stdout
    R.assert_real_image(out)


def test_attention_cli_draws_translation_alignment(runs, tmp_path):
    out = str(tmp_path / "alignment.png")
    args = [f"--workdir={runs['mt']}", "--source=a man runs on the grass", "--target=GRASS THE ON RUNS MAN A"]
    proc = _cli("llm_jax.attention", *args, f"--output={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for part in ("encoder self-attention", "decoder self-attention", "cross-attention alignment"):
        assert part in proc.stdout
    R.assert_real_image(out)
    bad = _cli("llm_jax.attention", f"--workdir={runs['mt']}", "--text=a man", f"--output={out}")
    assert bad.returncode != 0 and "attention: error: this run is an encoder-decoder" in bad.stderr


def test_metrics_of_the_translation_run_carry_bleu(runs):
    with open(os.path.join(runs["mt"], "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert any("eval/bleu" in r for r in records) and any("train/lr" in r for r in records)


def test_interpret_cli_patches_a_language_model_on_a_mesh(runs, tmp_path):
    out = str(tmp_path / "patch")
    args = [f"--workdir={runs['lm_a']}", "patch", "--text=def add(a, b):", "--corrupt=def add(x, b):"]
    proc = _cli("llm_jax.interpret", *args, f"--output={out}", devices=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"wrote {out}.json and {out}.png" in proc.stdout
    with open(out + ".json") as f:
        data = json.load(f)
    recovered = np.asarray(data["recovered"])
    assert recovered.shape == (2, len("def add(a, b):")) and data["index"] == "position"
    # positions before the changed byte are the same in both runs; the last layer's scored position
    # is the clean run's own
    np.testing.assert_allclose(recovered[:, : len("def add(")], 0.0, atol=1e-4)
    np.testing.assert_allclose(recovered[-1, -1], 1.0, atol=1e-4)
    R.assert_real_image(out + ".png", min_px=200)
    bad = _cli("llm_jax.interpret", f"--workdir={runs['lm_a']}", "patch", "--text=def")
    assert bad.returncode != 0 and "interpret: error: patch needs --corrupt TEXT" in bad.stderr


def test_interpret_api_on_a_language_model_and_a_translation_run(runs, tmp_path):
    from llm_jax.tools import interpret_run
    from llm_jax.training.saved_run import load_run

    lm = load_run(runs["lm_a"])
    lens = interpret_run.lens(lm, "def add(a, b):", top_k=3)
    rank = np.asarray(lens.data["goal_rank"])
    assert rank.shape == (3, len("def add(a, b):")) and np.all(rank[-1] == 0)  # the output row: its own top
    assert [row[0] for row in lens.data["top"][-1]] == lens.data["goal"]
    ablate = interpret_run.ablate(lm, "def add(a, b):", mode="mean")
    assert np.asarray(ablate.data["effect"]).shape == (2, 2)
    mt = load_run(runs["mt"])
    attr = interpret_run.attribute(mt, "GRASS THE", source="a man runs on the grass", steps=64)
    ig = attr.data["integrated_gradients"]
    assert len(ig["source_embed"]) == len(attr.data["source_tokens"]) and len(ig["embed"]) == len(attr.data["tokens"])
    assert attr.data["completeness_gap"] < 0.01
    paths = attr.save(str(tmp_path / "mt_attr"))
    R.assert_real_image(paths[1], min_px=200)
    lens = interpret_run.lens(mt, "GRASS THE", source="a man runs on the grass")
    assert len(lens.data["layers"]) == mt.model.cfg.num_layers + 1 and len(lens.data["tokens"]) == len(ig["embed"])
    patched = interpret_run.patch(
        mt, "GRASS THE", "GRASS THE", source="a man runs on the grass", corrupt_source="a dog runs on the grass"
    )
    assert patched.data["site"] == "decoder/residual" and patched.data["clean_score"] != patched.data["corrupt_score"]
    with pytest.raises(interpret_run.BadValue, match="give --source TEXT"):
        interpret_run.lens(mt, "GRASS")
