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
