"""The generate CLI (python -m llm_jax.generate) on a tiny trained run: end to end in a subprocess,
the same text as the trainer's decode code, and clear errors for what can be wrong."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from decode_fixtures import REPO, qa_run

from llm_jax import generate as gen_cli
from llm_jax.inference import decode
from llm_jax.runtime.errors import NotFound
from llm_jax.training.saved_run import load_run


@pytest.mark.slow
def test_cli_end_to_end_matches_in_process_decoding(tmp_path):
    workdir, _ = qa_run()
    prompts = ["up abc =", "up jihgfe ="]
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": prompts[1], "completion": "ignored"}) + "\n")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "PYTHONPATH": REPO}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "llm_jax.generate",
            "--workdir",
            workdir,
            "--prompt",
            prompts[0],
            "--prompt_file",
            str(tmp_path / "p.jsonl"),
            "--max_new_tokens",
            "12",
            "--format",
            "jsonl",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == prompts

    run = load_run(workdir)
    assert run.step == 40 and run.context == 64  # the run's data.seq_len
    with run.use_mesh():
        expected = decode.complete(run.model, run.params, run.tokenizer, prompts, 12, context=run.context)
    assert [r["completion"] for r in rows] == expected
    assert all(len(c) < 12 for c in expected)  # stopped at EOS: the run learned to end its completions


def test_clear_errors(tmp_path):
    with pytest.raises(NotFound, match="config.json does not exist"):
        load_run(str(tmp_path))
    workdir, _ = qa_run()
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(os.path.join(workdir, "config.json"), bare)
    with pytest.raises(NotFound, match="tokenizer"):
        load_run(str(bare))
    shutil.copytree(os.path.join(workdir, "tokenizer"), bare / "tokenizer")
    with pytest.raises(NotFound, match="has no checkpoints"):
        load_run(str(bare))
    with pytest.raises(NotFound, match="no checkpoint of step 7"):
        load_run(workdir, step=7)
    with pytest.raises(gen_cli.GenerateError, match="no prompt"):
        gen_cli.read_prompts([], None)
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(gen_cli.GenerateError, match="p.jsonl:2: expected a JSON object with a 'prompt'"):
        gen_cli.read_prompts([], str(tmp_path / "p.jsonl"))
    (tmp_path / "p.txt").write_text("one\n\ntwo\n")
    assert gen_cli.read_prompts(["zero"], str(tmp_path / "p.txt")) == ["zero", "one", "two"]


def test_sampling_defaults_to_the_runs_own_sample_settings():
    import ml_collections

    cfg = ml_collections.ConfigDict({"train": {"sample_temperature": 0.8, "sample_top_k": 40}})
    assert gen_cli.sampling(cfg, None, None) == (0.8, 40)  # as the run's training-time samples
    assert gen_cli.sampling(cfg, 0.0, None) == (0.0, 40)  # --temperature 0: greedy
    assert gen_cli.sampling(cfg, 1.2, 0) == (1.2, 0)
    assert gen_cli.sampling(ml_collections.ConfigDict({"model": {}}), None, None) == (0.0, 0)  # an older run


def test_inference_mesh_falls_back_only_for_another_device_count(monkeypatch):
    from llm_jax.runtime import sharding
    from llm_jax.training.config import base_config
    from llm_jax.training.saved_run import inference_mesh

    config = base_config()
    config.mesh.update(data=2, fsdp=4, tensor=1)  # fits the 8 devices of the tests
    assert sharding.shown_axes(inference_mesh(config).shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    config.mesh.update(data=2, fsdp=2, tensor=1)  # trained on 4 devices: all 8 data-parallel
    assert sharding.shown_axes(inference_mesh(config).shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    config.mesh.update(data=-1, fsdp=1, tensor=1)
    real = sharding.make_mesh

    def make_mesh(mesh_config, *args):  # a bug in building the run's own mesh (the fallback would work)
        if mesh_config is config.mesh:
            raise ValueError("a bug in placing devices")
        return real(mesh_config, *args)

    monkeypatch.setattr(sharding, "make_mesh", make_mesh)
    with pytest.raises(ValueError, match="a bug in placing devices"):  # not hidden by the fallback
        inference_mesh(config)
