"""llm_jax/runtime/hostmem.py: where the glibc malloc settings apply, and that they end the step's page faults."""

import json
import os
import statistics
import subprocess
import sys

import pytest
import runlib as R

from llm_jax.runtime import hostmem
from llm_jax.runtime.errors import BadValue


def test_applied_where_the_cpu_is_the_platform(tmp_path):
    (tmp_path / "nvidia0").write_text("")
    gpu_host, cpu_host = (str(tmp_path / "nvidia[0-9]*"),), (str(tmp_path / "accel[0-9]*"),)
    assert hostmem.cpu_is_the_platform({}, devices=cpu_host)
    assert not hostmem.cpu_is_the_platform({}, devices=gpu_host)
    assert hostmem.cpu_is_the_platform({"JAX_PLATFORMS": "cpu"}, devices=gpu_host)
    assert not hostmem.cpu_is_the_platform({"JAX_PLATFORMS": "cuda,cpu"}, devices=cpu_host)
    assert hostmem.wanted({"JAX_PLATFORMS": "cpu"})
    assert not hostmem.wanted({"JAX_PLATFORMS": "cpu", hostmem.ENV: "0"})
    assert hostmem.wanted({"JAX_PLATFORMS": "tpu", hostmem.ENV: "1"})
    with pytest.raises(BadValue, match="LLM_JAX_KEEP_FREED_MEMORY='maybe': use 1"):
        hostmem.wanted({hostmem.ENV: "maybe"})


def test_bad_setting_is_one_line_from_a_command():
    env = {**R.env(1), hostmem.ENV: "maybe"}
    cmd = [sys.executable, "-m", "llm_jax.bench", "--config", "configs/bench_cpu.py", "--steps", "1"]
    proc = subprocess.run(cmd, cwd=R.REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "bench: error: LLM_JAX_KEEP_FREED_MEMORY='maybe': use 1 (keep freed memory) or 0 (the C library's default)"
    ]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings: Linux only")
def test_kept_memory_ends_the_page_faults_of_each_step():
    """bench_cpu's step has 343 MB of temporaries; with the C library's default every step faults
    them in afresh (about 90,000 pages); with the settings (on by default here) none, once the heap
    has grown to its steady size: usually within the first 1 - 3 steps, but under Python 3.12 and
    JAX 0.12 a later step sometimes grows it once more (CI: one of 3 timed steps faulted 84,000
    pages). So the median step is what must fault nothing."""
    cmd = [sys.executable, "-m", "llm_jax.bench", "--config", "configs/bench_cpu.py", "--steps", "5", "--warmup", "3"]
    out = {}
    for keep in ("1", "0"):
        env = {**R.env(1), hostmem.ENV: keep}  # one device, as README's commands run
        proc = subprocess.run(cmd, cwd=R.REPO, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
        out[keep] = json.loads(proc.stdout.strip().splitlines()[-1])
    temp_pages = out["1"]["temp_bytes"] / 4096
    print({k: (v["keep_freed_memory"], v["minor_faults_each_step"], v["tokens_per_sec"]) for k, v in out.items()})
    assert out["1"]["keep_freed_memory"] and not out["0"]["keep_freed_memory"]
    assert statistics.median(out["1"]["minor_faults_each_step"]) < 0.1 * temp_pages
    assert min(out["0"]["minor_faults_each_step"]) > 0.5 * temp_pages  # the default faults every step
    assert out["0"]["final_loss"] == out["1"]["final_loss"]  # where memory comes from changes no result


COMMANDS = ("main", "generate", "translate", "convert", "prepare", "aot", "bench", "bench_decode", "plot", "attention")
# Run in a fresh interpreter: imports `module`, then prints the state of hostmem when numpy or jax
# was first imported (None: not applied, or hostmem not even imported yet) and after the import.
_WATCH = """
import importlib, importlib.abc, json, sys
seen = {}
class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name in ("numpy", "jax") and "first" not in seen:
            hostmem = sys.modules.get("llm_jax.runtime.hostmem")
            seen["first"] = [name, hostmem and hostmem._applied]
        return None
sys.meta_path.insert(0, Watch())
importlib.import_module(sys.argv[1])
from llm_jax.runtime import hostmem
print(json.dumps({**seen, "after": hostmem._applied}))
"""


def _watch(module: str, env: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", _WATCH, module], cwd=R.REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", ["llm_jax", "llm_jax.training.loop", "llm_jax.runtime.hostmem"])
def test_importing_the_library_leaves_malloc_alone(module):
    env = {**R.env(1), hostmem.ENV: "1"}  # wanted here, so only the import decides
    assert _watch(module, env)["after"] is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings: Linux only")
def test_every_command_sets_host_memory_before_numpy_and_jax_start():
    env = {**R.env(1), hostmem.ENV: "1"}
    procs = {  # in parallel: each imports JAX afresh
        name: subprocess.Popen(
            [sys.executable, "-c", _WATCH, f"llm_jax.{name}"], cwd=R.REPO, env=env, stdout=subprocess.PIPE, text=True
        )
        for name in COMMANDS
    }
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, name
        got = json.loads(out.strip().splitlines()[-1])
        # (a command that imports neither at its import, e.g. convert, imports them later: after)
        assert got.get("first", [None, True])[1] is True and got["after"] is True, (name, got)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings: Linux only")
def test_the_explicit_call_for_notebooks_and_scripts():
    code = "from llm_jax.runtime import hostmem; print(hostmem.keep_freed_memory(), hostmem.in_force())"
    for keep, want in (("1", "True True"), ("0", "False False")):
        env = {**R.env(1), hostmem.ENV: keep}
        proc = subprocess.run([sys.executable, "-c", code], cwd=R.REPO, env=env, capture_output=True, text=True)
        assert proc.stdout.strip() == want, proc.stderr[-2000:]


def test_commands_tell_jax_a_cpu_only_host_is_one(tmp_path):
    """No GPU or TPU device and no JAX_PLATFORMS: a command sets it to 'cpu', so libtpu (the tpu extra)
    is not started and prints nothing; a set JAX_PLATFORMS or an accelerator leaves JAX to choose."""
    from llm_jax import cli

    (tmp_path / "accel0").write_text("")
    none, tpu = (str(tmp_path / "nvidia[0-9]*"),), (str(tmp_path / "accel[0-9]*"),)
    for environ, devices, want in (({}, none, "cpu"), ({}, tpu, None), ({"JAX_PLATFORMS": "cuda"}, none, "cuda")):
        cli.cpu_only_host(environ, devices)
        assert environ.get("JAX_PLATFORMS") == want
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    code = "from llm_jax import cli; import jax; print(jax.devices()[0].platform)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=R.REPO, env=env, capture_output=True, text=True)
    if hostmem.cpu_is_the_platform(env):
        assert proc.stdout.strip() == "cpu" and "libtpu" not in proc.stderr and "TPU" not in proc.stderr, proc.stderr
