"""One writer per workdir (llm_jax/training/workdir.py): a second writer is refused at once naming the holder,
or waits if asked to; a dead holder's lock is taken over; where flock cannot see the holder (another
host), its record decides. End to end: two `llm_jax.main` processes on one workdir."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import runlib as R

from llm_jax.runtime.errors import FileError, WorkdirBusy
from llm_jax.training import workdir as workdir_lib

HOST = socket.gethostname()
GPT2_CONFIG = {"architectures": ["GPT2LMHeadModel"], "vocab_size": 100, "n_embd": 32, "n_layer": 2, "n_head": 2,
               "n_positions": 64}  # fmt: skip

# A process that holds workdir/lock the way llm_jax does (flock + record), without importing jax.
_HOLDER = """
import fcntl, json, os, socket, sys, time
fd = os.open(os.path.join(sys.argv[1], "lock"), os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
record = {"host": socket.gethostname(), "pid": os.getpid(), "started": "earlier", "command": "holder"}
os.write(fd, json.dumps(record).encode())
print("held", flush=True)
time.sleep(600)
"""


def _hold(workdir: str) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", _HOLDER, workdir], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_second_writer_is_refused_naming_the_holder_or_waits(tmp_path):
    wd = str(tmp_path / "run")
    first = workdir_lib.lock(wd, created=workdir_lib.check_writable(wd))
    record = R.lock_record(wd)
    assert record["pid"] == os.getpid() and record["host"] == HOST and record["command"] == "llm_jax.main"
    # flock belongs to an open file: a second claim conflicts even from this same process.
    t0 = time.time()
    with pytest.raises(WorkdirBusy, match=rf"workdir {wd} is in use by another run: pid {os.getpid()} on {HOST}, "):
        workdir_lib.lock(wd, hint=", or wait")
    assert time.time() - t0 < 1.0, "refused at once"
    with pytest.raises(WorkdirBusy, match=r"\(waited 0.6s\)$"):
        workdir_lib.lock(wd, wait_s=0.6, log=lambda m: None)
    assert time.time() - t0 >= 0.6
    # Told to wait: takes the lock as soon as the holder lets go.
    threading.Timer(0.5, first.release).start()
    logs = []
    second = workdir_lib.lock(wd, wait_s=30, log=logs.append)
    assert logs and logs[0].startswith(f"waiting up to 30s for the run holding {wd}: pid {os.getpid()}")
    assert not any("took over" in m for m in logs), "a clean release leaves no record to take over"
    second.release()
    assert R.lock_record(wd) is None, "a clean release clears the record"


def test_lock_of_a_killed_holder_is_taken_over(tmp_path):
    wd = str(tmp_path / "run")
    os.makedirs(wd)
    holder = _hold(wd)
    with pytest.raises(WorkdirBusy, match=rf"pid {holder.pid} on {HOST}, started earlier \(holder\)"):
        workdir_lib.lock(wd)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert R.lock_record(wd)["pid"] == holder.pid, "kill -9 leaves the record behind"
    logs = []
    held = workdir_lib.lock(wd, log=logs.append)
    assert logs == [
        f"took over the lock of {wd} from a run that ended without releasing it: pid {holder.pid} on {HOST}, "
        "started earlier (holder)"
    ]
    assert R.lock_record(wd)["pid"] == os.getpid()
    held.release()


def test_record_of_another_host_decides_until_it_is_stale(tmp_path):
    """flock may not reach across hosts (NFS, pods): a fresh record from another host is a live run."""
    wd = str(tmp_path / "run")
    os.makedirs(wd)
    path = os.path.join(wd, workdir_lib.LOCK_FILE)
    with open(path, "w") as f:
        json.dump({"host": "other-node", "pid": 7, "started": "then", "command": "llm_jax.main"}, f)
    stale = r"pid 7 on other-node, started then .* goes stale 180s after its last heartbeat"
    with pytest.raises(WorkdirBusy, match=stale):
        workdir_lib.lock(wd)
    old = time.time() - workdir_lib.STALE_S - 1
    os.utime(path, (old, old))  # no heartbeat for longer than STALE_S: that run is gone
    logs = []
    workdir_lib.lock(wd, log=logs.append).release()
    assert "took over" in logs[0] and "pid 7 on other-node" in logs[0]


def test_without_flock_the_record_and_the_pid_decide(tmp_path, monkeypatch):
    """A filesystem without flock (ENOLCK): same host, a live pid holds it; a dead one does not."""
    import errno
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    wd = str(tmp_path / "run")
    os.makedirs(wd)
    held = workdir_lib.lock(wd)
    with pytest.raises(WorkdirBusy, match=rf"pid {os.getpid()} on {HOST}"):
        workdir_lib.lock(wd)  # this process is alive
    held.release()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    with open(os.path.join(wd, workdir_lib.LOCK_FILE), "w") as f:
        json.dump({"host": HOST, "pid": int(dead.stdout), "started": "then", "command": "x"}, f)
    logs = []
    workdir_lib.lock(wd, log=logs.append).release()
    assert "took over" in logs[0]


def test_claim_creates_checks_and_cleans_up(tmp_path):
    wd = str(tmp_path / "new" / "run")
    held = workdir_lib.claim(wd, log=lambda m: None)
    assert os.listdir(wd) == ["lock"]
    held.release()
    assert not os.path.exists(wd), "a run that failed before writing leaves no workdir it created behind"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(FileError, match=r"--workdir=\S+afile is a file, not a directory"):
        workdir_lib.claim(str(tmp_path / "afile"))


@pytest.mark.slow
def test_two_runs_on_one_workdir(tmp_path):
    """The second `llm_jax.main` is refused at once, naming the first, and changes nothing; told to
    wait, a third waits for the first to end and then resumes its run. Each step is logged once."""
    corpus = R.write_corpus(str(tmp_path / "corpus.txt"))
    wd, n = str(tmp_path / "run"), 24
    over = R.tiny_overrides(corpus, n, 8)
    first = R.start(wd, over, devices=2)
    R.wait_until(first, lambda: "setup took" in R.output(first) and R.last_logged_step(wd) >= 2)
    R.freeze(first)  # holds the lock while frozen; nothing in the workdir moves
    before = R.snapshot(wd)
    args = ["--config=configs/default.py:tiny", f"--workdir={wd}"] + [f"--config.{k}={v}" for k, v in over.items()]
    second = R.run_cli("llm_jax.main", *args, devices=2)
    R.assert_one_line_error(
        second,
        "main",
        rf"^main: error: workdir {wd} is in use by another run: pid {first.pid} on {HOST}, started \S+ "
        r"\(llm_jax.main\)\. .*--config\.train\.wait_for_lock=SECONDS",
    )
    assert "data:" not in second.stdout, "refused before loading data"
    # `convert from_hf` writes a workdir too: refused the same way (config.json is all it reads first).
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps(GPT2_CONFIG))
    imported = R.run_cli("llm_jax.convert", "from_hf", f"--hf_dir={hf_dir}", f"--workdir={wd}")
    R.assert_one_line_error(imported, "convert", rf"in use by another run: pid {first.pid} on {HOST}.*new --workdir\.$")
    assert R.snapshot(wd) == before, "the refused runs changed nothing"
    third = R.start(wd, {**over, "train.num_steps": n + 4, "train.wait_for_lock": 600}, devices=2,
                    log_path=str(tmp_path / "third.log"))  # fmt: skip
    R.wait_until(third, lambda: "waiting up to 600s" in R.output(third))
    R.thaw(first)
    out_first = R.finish(first)
    out_third = R.finish(third)
    assert f"done: step {n}" in out_first
    assert f"for the run holding {wd}: pid {first.pid} on {HOST}" in out_third
    assert f"checkpoints/{n} (step {n})" in out_third, "it resumed where the first run ended"
    assert R.logged_steps(wd) == list(range(1, n + 5)), "metrics.jsonl holds each step once"
    assert R.lock_record(wd) is None
