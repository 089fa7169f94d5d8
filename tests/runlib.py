"""Helpers for the reliability tests: tiny trainer runs in subprocesses, and reading their results.

Subprocess runs share a persistent compilation cache (one per test session, the one of the pytest
process itself), so only the first run of a configuration compiles.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The in-process tests' cache when conftest set one (the same programs compile once in all).
_CACHE = os.environ.get("LLM_JAX_TEST_JIT_CACHE") or tempfile.mkdtemp(prefix="llm_jax_test_jit_cache_")


# Every block option of today's open models on at once (Gemma 2/3-style blocks plus Qwen2's biases):
# the shared part of the test models that exercise them (test_blocks, test_sharding, test_interpret).
GEMMA_BLOCK = dict(
    positions="rope",
    norm="rmsnorm",
    norm_plus_one=True,
    post_norms=True,
    qk_norm=True,
    embed_scale=True,
    mlp_activation="geglu",
    use_bias=False,
    local_rope_theta=100.0,
)


def write_corpus(path: str, chars: int = 60_000) -> str:
    """A deterministic UTF-8 text file (Python sources of the standard library's json package)."""
    import json as _json_pkg

    root = os.path.dirname(_json_pkg.__file__)
    text = ""
    for name in sorted(os.listdir(root)):
        if name.endswith(".py"):
            with open(os.path.join(root, name), encoding="utf-8") as f:
                text += f.read()
    while len(text) < chars:
        text += text
    with open(path, "w", encoding="utf-8") as f:
        f.write(text[:chars])
    return path


def tiny_overrides(corpus: str, num_steps: int, checkpoint_every: int, **extra) -> dict:
    """Overrides of configs/default.py:tiny for fast runs on a local text file."""
    o = {
        "data.source": "text",
        "data.path": corpus,
        "train.num_steps": num_steps,
        "train.checkpoint_every": checkpoint_every,
        "train.log_every": 1,
        "train.eval_every": num_steps,
        "train.eval_steps": 1,
        "train.sample_tokens": 0,
        "train.keep_checkpoints": 5,
        "optim.warmup_steps": 2,
    }
    o.update(extra)
    return o


# configs/bench_cpu.py at a 1-layer size that compiles and steps in seconds (bench and peer scripts).
BENCH_TINY = {
    "model.num_layers": 1,
    "model.embed_dim": 64,
    "model.mlp_dim": 128,
    "model.num_heads": 2,
    "model.vocab_size": 512,
    "model.max_len": 32,
    "data.seq_len": 32,
}


def tiny_config(overrides: dict | None = None):
    """configs/default.py:tiny as a ConfigDict, with dotted overrides applied (for in-process runs)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("configs_default", os.path.join(REPO, "configs", "default.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config("tiny")
    for key, value in (overrides or {}).items():
        *parents, leaf = key.split(".")
        node = c
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def env(devices: int) -> dict:
    e = dict(os.environ)
    e.update(
        {
            "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            "JAX_COMPILATION_CACHE_DIR": _CACHE,
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
            "PYTHONPATH": REPO + os.pathsep + e.get("PYTHONPATH", ""),
            "PYTHONUNBUFFERED": "1",
            "LLM_JAX_CPU_PEAK_FLOPS": "1e11",  # skip the trainer's matmul benchmark (for its MFU line)
        }
    )
    return e


def start(
    workdir: str,
    overrides: dict,
    devices: int = 8,
    extra_flags=(),
    log_path: str | None = None,
    config: str = "configs/default.py:tiny",
) -> subprocess.Popen:
    """Starts `python -m llm_jax.main` in the background; stdout+stderr go to `log_path`."""
    cmd = [sys.executable, "-m", "llm_jax.main", f"--config={config}", f"--workdir={workdir}"]
    cmd += [f"--config.{k}={v}" for k, v in overrides.items()]
    cmd += list(extra_flags)
    log_path = log_path or os.path.join(os.path.dirname(os.path.abspath(workdir)), f"{os.path.basename(workdir)}.log")
    out = open(log_path, "a")
    out.write(f"\n=== {' '.join(cmd)}\n")
    out.flush()
    p = subprocess.Popen(cmd, cwd=REPO, env=env(devices), stdout=out, stderr=subprocess.STDOUT)
    p.log_path = log_path
    p.log_offset = os.path.getsize(log_path)
    return p


def output(p: subprocess.Popen) -> str:
    with open(p.log_path) as f:
        f.seek(p.log_offset)
        return f.read()


def finish(p: subprocess.Popen, timeout: float = 240) -> str:
    """Waits for the run; returns its output; fails with the output if it did not exit 0."""
    try:
        p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        raise AssertionError(f"run timed out:\n{output(p)[-3000:]}") from None
    text = output(p)
    assert p.returncode == 0, f"run exited {p.returncode}:\n{text[-4000:]}"
    return text


def wait_until(p: subprocess.Popen, predicate, timeout: float = 240, poll: float = 0.001):
    """Polls `predicate()` until it returns something truthy (returned); fails if the run exits first."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        got = predicate()
        if got:
            return got
        if p.poll() is not None:
            raise AssertionError(f"run exited ({p.returncode}) before the awaited point:\n{output(p)[-3000:]}")
        time.sleep(poll)
    p.kill()
    raise AssertionError(f"timed out waiting:\n{output(p)[-3000:]}")


def logged_steps(workdir: str) -> list[int]:
    return [s for s, _ in losses_list(workdir)]


def losses_list(workdir: str) -> list[tuple[int, float]]:
    """(step, train/loss) of every metrics.jsonl line that has a training loss, in file order."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            if not line.endswith("\n"):
                continue
            m = json.loads(line)
            if "train/loss" in m:
                out.append((m["step"], m["train/loss"]))
    return out


def metric(workdir: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of every metrics.jsonl line holding `key`, in file order."""
    out = []
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            m = json.loads(line)
            if key in m:
                out.append((m["step"], m[key]))
    return out


def last_logged_step(workdir: str) -> int:
    steps = logged_steps(workdir)
    return steps[-1] if steps else 0


def ckpt_root(workdir: str) -> str:
    return os.path.join(workdir, "checkpoints")


def finished_steps(workdir: str) -> list[int]:
    root = ckpt_root(workdir)
    if not os.path.isdir(root):
        return []
    return sorted(int(n) for n in os.listdir(root) if n.isdigit())


def tmp_checkpoints(workdir: str) -> list[str]:
    root = ckpt_root(workdir)
    if not os.path.isdir(root):
        return []
    return sorted(n for n in os.listdir(root) if ".orbax-checkpoint-tmp" in n)


def freeze(p: subprocess.Popen) -> None:
    os.kill(p.pid, signal.SIGSTOP)


def thaw(p: subprocess.Popen) -> None:
    os.kill(p.pid, signal.SIGCONT)


def kill_hard(p: subprocess.Popen) -> None:
    p.kill()  # SIGKILL (works on a stopped process too)
    p.wait()


def read_state(workdir: str, step: int) -> dict:
    """{path: numpy array} of checkpoints/<step>/state, read without knowing the model."""
    import jax
    import orbax.checkpoint as ocp

    path = os.path.join(ckpt_root(workdir), str(step), "state")
    ckptr = ocp.StandardCheckpointer()
    meta = ckptr.metadata(path).item_metadata
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=dev), meta)
    restored = ckptr.restore(path, target)
    flat = jax.tree_util.tree_flatten_with_path(restored)[0]
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys(), (sorted(a.keys() ^ b.keys()))[:5]
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), f"{k} differs"


def snapshot(directory: str) -> dict:
    """{relative path: (size, mtime_ns, sha256)} of every file, and every directory, under `directory`.

    Leaves out the top-level `lock` file: it records who holds the workdir, not the run, and a run
    refused after it claimed the workdir (bad data, say) created it (and removed it again)."""
    out = {}
    for root, dirs, files in os.walk(directory):
        for d in dirs:
            rel = os.path.relpath(os.path.join(root, d), directory)
            out[rel + "/"] = "dir"
        for name in files:
            full = os.path.join(root, name)
            if root == directory and name == "lock":
                continue
            st = os.stat(full)
            with open(full, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            out[os.path.relpath(full, directory)] = (st.st_size, st.st_mtime_ns, digest)
    return out


def read_loop_data(workdir: str, step: int) -> dict:
    """The loop state saved beside the train state of checkpoints/<step> (JSON)."""
    with open(os.path.join(ckpt_root(workdir), str(step), "data", "metadata")) as f:
        return json.load(f)


def lock_record(workdir: str) -> dict | None:
    """The holder record in workdir/lock (None when there is none: released cleanly, or never held)."""
    path = os.path.join(workdir, "lock")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        text = f.read()
    return json.loads(text) if text.strip() else None


def run_cli(module: str, *args: str, devices: int = 8, timeout: float = 180, extra_env=None, prefix=(), **kw):
    """`[PREFIX] python -m MODULE ARGS` to completion (a CompletedProcess with text stdout / stderr)."""
    e = env(devices)
    e.update(extra_env or {})
    cmd = [*prefix, sys.executable, "-m", module, *args]
    return subprocess.run(cmd, cwd=REPO, env=e, capture_output=True, text=True, timeout=timeout, **kw)


def assert_one_line_error(p, tool: str, match: str) -> str:
    """A user error: non-zero exit, no traceback, and stderr ending in one line `<tool>: error: ...`
    that matches the regular expression `match`; returns that line."""
    import re

    last = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ""
    assert p.returncode != 0, f"exit 0:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
    assert "Traceback" not in p.stderr and "Traceback" not in p.stdout, p.stderr[-4000:]
    assert last.startswith(f"{tool}: error: "), p.stderr[-3000:]
    assert re.search(match, last), (match, last)
    return last


def corrupt_one_file(step_dir: str) -> str:
    """Truncates the largest data file of a checkpoint's state (as a failed disk or copy would)."""
    files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "*"), recursive=True) if os.path.isfile(f)]
    victim = max(files, key=os.path.getsize)
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    return victim


def assert_real_image(path_or_bytes, min_px: int = 300, max_px: int = 12_000) -> tuple[int, int]:
    """A PNG (a path or its bytes) that decodes, of a sensible size, and is not blank: its pixels
    vary and hold many distinct colours. Returns (width, height). Needs matplotlib."""
    import io

    import matplotlib.image

    raw = path_or_bytes if isinstance(path_or_bytes, bytes) else open(path_or_bytes, "rb").read()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    img = matplotlib.image.imread(io.BytesIO(raw), format="png")
    h, w = img.shape[:2]
    assert min_px <= h <= max_px and min_px <= w <= max_px, f"{w}x{h} pixels"
    rgb = img[..., :3]
    assert rgb.std() > 0.05, "the picture is (nearly) one colour"
    colours = np.unique((rgb.reshape(-1, 3) * 255).astype(np.uint8), axis=0)
    assert len(colours) > 50, f"only {len(colours)} colours"
    return w, h
