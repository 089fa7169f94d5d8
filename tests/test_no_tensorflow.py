"""README's claim "the training path never imports TensorFlow", checked on the loaded modules.

TensorFlow is not installed here, so "not in sys.modules" alone could never fail. The run puts a
stand-in first on `sys.meta_path`: TensorFlow then looks installed to every probe (etils and tfds
ask `importlib.util.find_spec('tensorflow')` and change course when it is there), and every real
import of it is recorded (then refused). A recorded import is one that would load TensorFlow on a
machine that has it.
"""

import json
import subprocess
import sys

import runlib as R

# Runs in a fresh interpreter: a tiny training run of the CLI (steps, evaluation, sample,
# checkpoint), then the tfds source (its offline error path), then a probe import that proves the
# stand-in records imports.
SCRIPT = r"""
import importlib.abc, importlib.util, json, runpy, sys

imported = []


class StandIn(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            return importlib.util.spec_from_loader(name, self)
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        imported.append(module.__name__)
        raise ImportError("tensorflow is a stand-in in this test")


sys.meta_path.insert(0, StandIn())
sys.argv = ["llm_jax.main", *sys.argv[1:]]
try:
    runpy.run_module("llm_jax.main", run_name="__main__", alter_sys=True)
except SystemExit as e:
    assert not e.code, f"training exited {e.code}"

from llm_jax.training import config
from llm_jax.data import lm_data as data
from llm_jax.runtime import errors

cfg = config.base_config().data
cfg.update(source="tfds", tfds_name="tiny_shakespeare", tfds_data_dir=sys.argv[-1] + "_tfds")
try:
    data.load_data(cfg, log=lambda *a: None)
except errors.UserError:
    pass  # not prepared offline: the clear error
loaded = sorted(m for m in sys.modules if m == "tensorflow" or m.startswith("tensorflow."))
seen = list(imported)
try:
    import tensorflow  # the probe: the stand-in must record this one
except ImportError:
    pass
print(json.dumps({"imported": seen, "loaded": loaded, "probe_seen": imported[len(seen):] == ["tensorflow"]}))
"""


def test_training_never_imports_tensorflow(tmp_path):
    workdir = str(tmp_path / "run")
    args = ["--config=configs/default.py:tiny", "--config.train.num_steps=2", "--config.train.eval_every=2"]
    args += ["--config.train.checkpoint_every=2", "--config.train.sample_tokens=4", f"--workdir={workdir}"]
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, *args], cwd=R.REPO, env=R.env(2), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "eval loss" in proc.stdout and R.logged_steps(workdir) == [1, 2], proc.stdout[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["probe_seen"], "the stand-in did not record the probe import; the check below would mean nothing"
    assert out["imported"] == [] and out["loaded"] == [], out
