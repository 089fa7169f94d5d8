"""Two processes on 127.0.0.1 (2 CPU devices each, gloo collectives, jax.distributed from the
trainer's flags) train like one process with 4 devices: the same batches, losses and parameters.

Not to the bit: the gradient all-reduce adds the 4 devices' partial sums in another order when
half of them are in another process (gloo: (d0+d1)+(d2+d3)), which moves float32 results by an
ulp or so (measured: losses differ by at most 1 ulp over these steps).
"""

import os
import socket

import leafcheck
import numpy as np
import runlib as R

STEPS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_process_with_four_devices(tmp_path):
    corpus = R.write_corpus(str(tmp_path / "corpus.txt"))
    over = R.tiny_overrides(corpus, STEPS, STEPS)
    single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
    addr = f"127.0.0.1:{_free_port()}"
    procs = [R.start(single, over, devices=4)]
    for i in range(2):
        flags = (f"--coordinator_address={addr}", "--num_processes=2", f"--process_id={i}")
        procs.append(R.start(multi, over, devices=2, extra_flags=flags, log_path=str(tmp_path / f"multi{i}.log")))
    out_single, out0, out1 = [R.finish(p) for p in procs]

    assert "over 4 cpu devices in 2 processes" in out0
    assert "step" not in out1 and "loss" not in out1, "only process 0 logs"
    # Each write happens once, from process 0: one metrics line per step, one config, one tokenizer;
    # process 0 held the workdir's lock for both (process 1 taking it too would have been refused).
    assert R.logged_steps(multi) == list(range(1, STEPS + 1))
    assert R.lock_record(multi) is None  # released: no record left behind
    assert sorted(os.listdir(multi)) == sorted(os.listdir(single))
    (s_steps, s_losses), (m_steps, m_losses) = (zip(*R.losses_list(d)) for d in (single, multi))
    assert s_steps == m_steps
    np.testing.assert_allclose(m_losses, s_losses, rtol=2e-6, atol=0)
    # Weights and AdamW moments, every leaf to 1e-5 of its own largest value (tests/leafcheck.py);
    # the key bias has no gradient in exact arithmetic (its values are rounding noise).
    a, b = (leafcheck.state_parts(R.read_state(d, STEPS)) for d in (multi, single))
    for part in a:
        leafcheck.assert_close(a[part], b[part], noise=("['key']['bias']",), what=part)


def test_a_host_whose_data_differs_stops_every_host_with_the_same_line(tmp_path):
    """The same relative --config.data.path holds different text on each 'host' (each process runs
    in its own directory, with its own cache there): their char tokenizers differ, so their models
    would differ too. Both processes stop with one identical line (never a hang in a collective),
    and the shared workdir, which neither had written yet, is left as it was: absent. (Before
    issue 26 both trained to the end, each host feeding ids that the other's tokenizer never made.)"""
    import subprocess
    import sys

    addr, workdir = f"127.0.0.1:{_free_port()}", str(tmp_path / "run")
    over = R.tiny_overrides("corpus.txt", 2, 2, **{"data.tokenizer": "char", "data.cache_dir": "cache"})
    procs = []
    for i, text in enumerate(("abcdefgh ijk\n" * 4000, "ABCDEFGH IJK LMN\n" * 4000)):
        host = tmp_path / f"host{i}"
        host.mkdir()
        (host / "corpus.txt").write_text(text)
        cmd = [sys.executable, "-m", "llm_jax.main", f"--config={R.REPO}/configs/default.py:tiny"]
        cmd += [f"--workdir={workdir}", *(f"--config.{k}={v}" for k, v in over.items())]
        cmd += [f"--coordinator_address={addr}", "--num_processes=2", f"--process_id={i}"]
        pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
        procs.append(subprocess.Popen(cmd, cwd=host, env=R.env(2), **pipes))
    results = []
    for p in procs:
        try:
            results.append(p.communicate(timeout=150))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError("a process hung instead of stopping with the other") from None
    lines = []
    for p, (_, err) in zip(procs, results):
        assert p.returncode != 0 and "Traceback" not in err, err[-3000:]
        lines.append(err.strip().splitlines()[-1])
    assert lines[0] == lines[1], lines
    assert lines[0].startswith("main: error: the processes hold different data: process 0 tokenizer"), lines[0]
    assert "process 1 tokenizer" in lines[0] and "cache of process 1's host" in lines[0], lines[0]
    assert not os.path.exists(workdir)
