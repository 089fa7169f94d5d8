"""The launch recipes in experiments/ (TPU pod slice, SLURM GPU cluster): each one's training command
line parses with llm_jax.main's own flags, and its config loads (check_keys, finalize,
model_config) and fits the mesh and device count it is written for."""

import json
import os
import subprocess
import sys

import pytest
import runlib as R

RECIPES = {  # recipe -> what its command must say
    "experiments/launch_tpu_pod.sh": {"preset": "gpt2-medium", "mesh": [1, 16, 1, 1, 1]},
    "experiments/launch_slurm_gpu.sbatch": {"preset": "llama-1b", "mesh": [4, 8, 1, 1, 1]},
}

# Parses argv as `python -m llm_jax.main` does, then loads the config as the trainer does and
# checks it against a mesh of the recipe's device count (no device is touched).
CHECK = r"""
import json, sys, types

argv, devices = json.loads(sys.argv[1]), int(sys.argv[2])
sys.argv = ["llm_jax.main"] + argv  # ml_collections defines the --config.KEY flags it finds in sys.argv
from llm_jax import cli
from llm_jax.training import config as config_lib
from llm_jax import main
from llm_jax.runtime import sharding

rest = cli.parse_config_flags(sys.argv)
assert rest == ["llm_jax.main"], f"unparsed arguments {rest[1:]}"
config = main.FLAGS.config
config_lib.check_keys(config)
config = config_lib.finalize(config)
config_lib.check_train(config.train)
vocab = config.data.vocab_size if config.data.tokenizer == "sentencepiece" else 257
model = config_lib.model_config(config, vocab)
shape = sharding.resolve_mesh_shape(sharding.mesh_sizes(config.mesh), devices)
mesh = types.SimpleNamespace(shape=dict(zip(sharding.MESH_AXES, shape)))
sharding.check_divisible(mesh, model, config.train.batch_size)
print(json.dumps({"preset": model.preset, "mesh": list(shape), "workdir": main.FLAGS.workdir,
                  "auto": main.FLAGS.auto_distributed, "source": config.data.source}))
"""


def _recipe(path: str, what: str) -> list[str]:
    proc = subprocess.run(["bash", path, what], cwd=R.REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_command_parses_and_its_config_loads(recipe):
    assert subprocess.run(["bash", "-n", recipe], cwd=R.REPO).returncode == 0  # the script is valid bash
    args = _recipe(recipe, "args")
    (devices,) = _recipe(recipe, "devices")
    env = {**R.env(1), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-c", CHECK, json.dumps(args), devices], cwd=R.REPO, env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, f"{recipe}: {args}\n{proc.stderr[-3000:]}"
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["preset"] == RECIPES[recipe]["preset"] and got["mesh"] == RECIPES[recipe]["mesh"]
    assert got["auto"] is True and got["source"] == "tfds" and os.path.isabs(got["workdir"])
    with open(os.path.join(R.REPO, recipe)) as f:
        text = f.read()
    assert "What you must change" in text  # every recipe tells its user what to edit
