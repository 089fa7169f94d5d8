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

# A process that holds workdir/lock the way llm_jax does, with its own command name.
_HOLDER = """
import sys, time
from llm_jax.training import workdir
workdir.lock(sys.argv[1], command="holder")
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
    with pytest.raises(WorkdirBusy, match=rf"pid {holder.pid} on {HOST}, started \S+ \(holder\)"):
        workdir_lib.lock(wd)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert R.lock_record(wd)["pid"] == holder.pid, "kill -9 leaves the record behind"
    logs = []
    held = workdir_lib.lock(wd, log=logs.append)
    took = f"took over the lock of {wd} from a run that ended without releasing it: pid {holder.pid} on {HOST}, "
    assert len(logs) == 1 and logs[0].startswith(took) and logs[0].endswith(" (holder)")
    assert R.lock_record(wd)["pid"] == os.getpid()
    held.release()


def _text(path):
    with open(path) as f:
        return f.read().strip()


def _pid_start(pid):
    stat = _text(f"/proc/{pid}/stat")
    return stat[stat.rfind(")") + 2 :].split()[19]  # field 22, the start time


def _write_record(wd, **fields):
    """A holder's record written by hand (another host's, a dead run's, ...): this host's and this
    process's by default. The format of workdir/lock, spelled out here on purpose."""
    record = {
        "host": HOST,
        "boot": _text("/proc/sys/kernel/random/boot_id"),
        "pid_ns": os.readlink("/proc/self/ns/pid"),
    }
    record.update({"pid": os.getpid(), "pid_start": _pid_start(os.getpid()), "started": "then"})
    record.update({"command": "llm_jax.main", "token": "theirs", "beat": f"{time.time():017.3f}"})
    record.update(fields)
    os.makedirs(wd, exist_ok=True)
    with open(os.path.join(wd, "new-record"), "w") as f:
        json.dump(record, f)
    os.replace(os.path.join(wd, "new-record"), os.path.join(wd, workdir_lib.LOCK_FILE))  # as a takeover does
    return record


def _age(wd, seconds):
    """Sets the lock file's modification time `seconds` into the past (what a file server reports)."""
    t = time.time() - seconds
    os.utime(os.path.join(wd, workdir_lib.LOCK_FILE), (t, t))


def test_record_of_another_host_decides_by_its_own_heartbeat(tmp_path):
    """Another host's record is alive until its own heartbeat time is STALE_S old, whatever the
    file's modification time says (a file server's clock, or a copy, is not the holder's)."""
    wd = str(tmp_path / "run")
    old = f"{time.time() - workdir_lib.STALE_S - 1:017.3f}"
    _write_record(wd, host="other-node", pid=7)
    _age(wd, 10 * workdir_lib.STALE_S)  # the server's clock runs behind: an old mtime, a live holder
    stale = r"pid 7 on other-node, started then .* goes stale 180s after its last heartbeat"
    with pytest.raises(WorkdirBusy, match=stale):
        workdir_lib.lock(wd)
    _write_record(wd, host="other-node", pid=7, beat=old)  # a fresh mtime, but no heartbeat for STALE_S
    logs = []
    workdir_lib.lock(wd, log=logs.append).release()
    assert "took over" in logs[0] and "pid 7 on other-node" in logs[0]


def test_a_host_is_more_than_its_hostname(tmp_path):
    """Same host name, another boot (another machine or container called the same): its pid means
    nothing here, its heartbeat decides. Same host, a live pid that started later: the pid was
    reused, the holder is gone."""
    wd = str(tmp_path / "run")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _write_record(wd, boot="another-boot", pid=int(dead.stdout))
    with pytest.raises(WorkdirBusy, match=rf"pid {int(dead.stdout)} on {HOST}.* goes stale"):
        workdir_lib.lock(wd)
    _write_record(wd, pid=os.getppid(), pid_start="1")  # alive, but not the process that wrote the record
    logs = []
    workdir_lib.lock(wd, log=logs.append).release()
    assert "took over" in logs[0] and f"pid {os.getppid()} on {HOST}" in logs[0]


def _no_op_flock(monkeypatch):
    """flock that does nothing and says it worked (a lock kept per host, or a FUSE mount)."""
    import fcntl

    monkeypatch.setattr(fcntl, "flock", lambda fd, op: None)


def test_two_claims_at_once_one_wins_without_flock(tmp_path, monkeypatch):
    """Two runs judge the same stale record dead at the same moment: the record is taken atomically,
    so exactly one holds the lock and the other is refused naming it (no flock to help)."""
    _no_op_flock(monkeypatch)
    wd = str(tmp_path / "run")
    stale = time.time() - workdir_lib.STALE_S - 1
    _write_record(wd, host="gone-node", pid=7, beat=f"{stale:017.3f}")
    _age(wd, workdir_lib.STALE_S + 1)
    judge, winners, raced = workdir_lib._record_alive, [], []

    def racing(*args):  # the first run takes the lock over between the second's verdict and its act
        verdict = judge(*args)
        if not raced:
            raced.append(True)
            winners.append(workdir_lib.lock(wd, log=lambda m: None))
        return verdict

    monkeypatch.setattr(workdir_lib, "_record_alive", racing)
    with pytest.raises(WorkdirBusy, match=rf"in use by another run: pid {os.getpid()} on {HOST}"):
        workdir_lib.lock(wd, log=lambda m: None)
    assert R.lock_record(wd)["token"] == winners[0].token and winners[0].lost() is None
    winners[0].release()
    assert R.lock_record(wd) is None


def test_without_flock_the_record_and_the_pid_decide(tmp_path, monkeypatch):
    """flock that fails (ENOLCK) or does nothing: a live pid on this host holds the lock, a dead one does not."""
    import errno
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    for broken in (no_flock, lambda fd, op: None):
        monkeypatch.setattr(fcntl, "flock", broken)
        wd = str(tmp_path / broken.__name__)
        os.makedirs(wd)
        held = workdir_lib.lock(wd)
        with pytest.raises(WorkdirBusy, match=rf"pid {os.getpid()} on {HOST}"):
            workdir_lib.lock(wd)  # this process is alive
        held.release()
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        _write_record(wd, pid=int(dead.stdout), pid_start=None)
        logs = []
        workdir_lib.lock(wd, log=logs.append).release()
        assert "took over" in logs[0]


def test_release_never_deletes_a_successors_record(tmp_path):
    """Another run (a host that saw this one's record go stale) took the lock over: this run's
    `release` leaves the new holder's record as it is."""
    wd = str(tmp_path / "run")
    held = workdir_lib.lock(wd)
    successor = _write_record(wd, host="node-2", pid=42, started="now")
    before = R.snapshot(wd)
    held.release()
    assert R.lock_record(wd) == successor, "release never deletes a successor's record"
    assert R.snapshot(wd) == before


def test_holder_notices_a_takeover(tmp_path):
    """`check` (which the loop calls before each save) says in one line that the lock was taken over."""
    wd = str(tmp_path / "run")
    held = workdir_lib.lock(wd)
    held.check()  # still ours
    _write_record(wd, host="node-2", pid=42, started="now")
    with pytest.raises(WorkdirBusy) as e:
        held.check()
    assert str(e.value).startswith(f"the lock of workdir {wd} was taken over by pid 42 on node-2, started now")
    assert "\n" not in str(e.value) and "stopped before saving" in str(e.value)
    held.release()


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


def test_without_hard_links_the_record_is_created_exclusively(tmp_path, monkeypatch):
    """A filesystem without hard links (some FUSE mounts): O_CREAT|O_EXCL creates the record instead."""
    import errno

    def no_link(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_link)
    wd = str(tmp_path / "run")
    held = workdir_lib.lock(wd)
    with pytest.raises(WorkdirBusy, match=rf"pid {os.getpid()} on {HOST}"):
        workdir_lib.lock(wd)
    successor = _write_record(wd, host="node-2", pid=42)
    held.release()
    assert R.lock_record(wd) == successor, "put back by a rename"
    os.remove(os.path.join(wd, workdir_lib.LOCK_FILE))
    workdir_lib.lock(wd).release()
    assert R.lock_record(wd) is None
