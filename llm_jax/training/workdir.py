"""The run directory's life cycle: check what is there, claim it (one writer), move another model's
run aside, prepare it.

A workdir holds `config.json` (the resolved run config), `tokenizer/`, `checkpoints/<step>/`,
`metrics.jsonl`, `tensorboard/` and `lock`. A run of a different model is never overwritten, only
moved aside (`<workdir>.old-<time>`) when asked to. Process 0 writes; the others wait at a barrier.

One writer at a time (`claim`): `llm_jax.main` and `llm_jax.convert from_hf` lock the workdir
before they change anything in it, so a second writer is refused at once with one line naming the
holder (host, pid, start time), or waits for it if asked to (`config.train.wait_for_lock`). Readers
(`llm_jax.generate`, `convert to_hf`, `load_run`) take no lock: they read finished checkpoints only.
The lock is the kernel's `flock` on `workdir/lock`, which the kernel drops when the holder dies
however it dies (kill -9 included), so a killed run's lock is simply taken over; the file also
holds a one-line record of the holder, for the message, cleared on a clean exit. Where `flock` is
not shared between hosts (some NFS set-ups and FUSE mounts, pods on different nodes), the record
decides instead: its holder touches it every HEARTBEAT_S seconds while alive, and a record from
another host is trusted until it is STALE_S seconds old. Multi-process runs: process 0 holds the
lock for all of them.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import tempfile
import threading
import time

import jax
import ml_collections

from llm_jax.data import tokenizer as tok_lib
from llm_jax.models.model import RUNTIME_FIELDS
from llm_jax.runtime import distributed, files
from llm_jax.runtime.errors import BadValue, FileError, UserError, WorkdirBusy
from llm_jax.training import config as config_lib

CONFIG_FILE = "config.json"
TOKENIZER_DIR = "tokenizer"
LOCK_FILE = "lock"
HEARTBEAT_S = 30.0  # how often a holder touches its record
STALE_S = 180.0  # a record from another host this old is a dead run's (NFS caches attributes for up to 60 s)
_POLL_S = 0.5  # how often a waiting run retries


def tokenizer_dir(workdir: str) -> str:
    return os.path.join(workdir, TOKENIZER_DIR)


def has_tokenizer(workdir: str) -> bool:
    return tok_lib.saved_in(tokenizer_dir(workdir))


def sync(name: str) -> None:
    """A barrier across processes (no-op in a single process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def check(workdir: str, config: ml_collections.ConfigDict) -> bool:
    """Compares the model section of workdir/config.json with `config`.

    False: nothing there, or the same model (resume). True: a different model's run that
    config.train.overwrite allows moving aside. Otherwise raises, naming the differences.
    """
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        return False
    try:
        with open(path) as f:
            old = config_lib.upgrade(json.load(f))
        diffs = _model_diffs(old.get("model", {}), json.loads(json.dumps(config.model.to_dict())))
    except OSError as e:  # a permission or I/O error: not a reason to move the run aside (overwrite)
        raise FileError(f"{path} cannot be read ({e.strerror or e}); make it readable or use another --workdir") from e
    except (ValueError, AttributeError) as e:  # not JSON, not UTF-8, not a dict
        diffs = [f"its config.json cannot be read ({type(e).__name__}: {e})"]
    if not diffs:
        return False
    if config.train.overwrite:
        return True
    raise BadValue(
        f"workdir {workdir} holds the run of a different model: " + "; ".join(diffs) + ". Resume it with its "
        "own config, choose another --workdir, or pass --config.train.overwrite=True to move that run to "
        f"{_aside_name(workdir)} (nothing is deleted) and start over"
    )


def _model_diffs(old: dict, new: dict) -> list[str]:
    old_f, new_f = config_lib.flatten(old), config_lib.flatten(new)
    return [
        f"model.{k} is {old_f[k]!r} there but {new_f[k]!r} now"
        for k in sorted(old_f.keys() & new_f.keys())
        if k not in RUNTIME_FIELDS and old_f[k] != new_f[k]
    ]


def _aside_name(workdir: str) -> str:
    return f"{os.path.abspath(workdir).rstrip(os.sep)}.old-{time.strftime('%Y%m%d-%H%M%S')}"


def move_aside(workdir: str, log, held: WorkdirLock | None = None) -> str:
    """Renames the whole old run (process 0) and moves the lock `held` (which went with it) to a
    new, empty workdir; returns the new name."""
    dest = _aside_name(workdir)
    if jax.process_index() == 0:
        n = 1
        while os.path.exists(dest):
            dest, n = f"{_aside_name(workdir)}-{n}", n + 1
        os.rename(workdir, dest)
        log(f"moved the previous run in {workdir} to {dest}")
        if held is not None:
            held.relocate()
    sync("llm_jax:move_run_aside")
    return dest


def prepare(workdir: str, config: ml_collections.ConfigDict, tokenizer=None) -> None:
    """Creates the workdir, writes the resolved config (atomically) as config.json and the tokenizer
    if it is not there yet. Process 0 writes; call only once every check has passed."""
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        files.write_text(os.path.join(workdir, CONFIG_FILE), config_lib.run_json(config))
        if tokenizer is not None and not has_tokenizer(workdir):
            tok_lib.save_whole(tokenizer, tokenizer_dir(workdir))
    sync("llm_jax:prepare_workdir")


# ----------------------------------------------------------------------------------------------
# One writer per workdir


def check_writable(workdir: str) -> bool:
    """Creates `workdir` if missing and writes (then removes) a probe file in it and in its
    checkpoints/; raises FileError naming the directory and the fix. True if it was created."""
    created = not os.path.lexists(workdir)
    try:
        os.makedirs(workdir, exist_ok=True)
    except FileExistsError:
        raise FileError(f"--workdir={workdir} is a file, not a directory; choose another --workdir") from None
    except OSError as e:
        raise FileError(
            f"--workdir={workdir} cannot be created ({e.strerror}: {e.filename}); choose a location you can write to"
        ) from None
    ckpt_dir = os.path.join(workdir, "checkpoints")
    for d in [workdir] + ([ckpt_dir] if os.path.isdir(ckpt_dir) else []):
        try:
            fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=d)
            os.close(fd)
            os.remove(probe)
        except OSError as e:
            raise FileError(
                f"workdir {workdir} is not writable ({d}: {e.strerror}); fix its permissions or choose another "
                "--workdir (llm_jax.generate only reads a workdir: read-only is fine there)"
            ) from None
    return created


def _holder_record(command: str) -> dict:
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": started, "command": command}


def describe(record: dict | None) -> str:
    if not record:
        return "a run that is starting (its record is not written yet)"
    return f"pid {record.get('pid')} on {record.get('host')}, started {record.get('started')} ({record.get('command')})"


def _read_record(fd: int) -> dict | None:
    """The record in a lock file we flock-ed; None if empty or unreadable (nothing to go by)."""
    try:
        raw = os.pread(fd, 4096, 0)
        record = json.loads(raw) if raw.strip() else None
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _open_locked(path: str) -> tuple[int | None, bool]:
    """(fd, kernel_lock): `path` opened and flock-ed exclusively, or (None, True) when another
    process holds it. kernel_lock is False where the filesystem has no flock (the record decides)."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:
            raise
        except OSError as e:
            why = f"lock file {path} cannot be opened for writing ({e.strerror})"
            raise FileError(f"{why}; fix its permissions") from None
        try:
            held = files.try_flock(fd)
        except OSError:
            os.close(fd)
            raise
        if held is False:
            os.close(fd)
            return None, True
        kernel_lock = held is True
        # Between open and flock the file may have been moved aside with its workdir, or removed by
        # a run that failed in a workdir it had created: then this lock guards nothing; start over.
        try:
            here = os.stat(path)
        except FileNotFoundError:
            here = None
        st = os.fstat(fd)
        if here is not None and (here.st_dev, here.st_ino) == (st.st_dev, st.st_ino):
            return fd, kernel_lock
        os.close(fd)


def _record_alive(record: dict, fd: int, kernel_lock: bool) -> bool:
    """Whether the holder named by a record left in a lock file we could flock may still be running."""
    fresh = time.time() - os.fstat(fd).st_mtime < STALE_S  # a live holder touches it every HEARTBEAT_S
    if record.get("host") != socket.gethostname():
        return fresh
    if kernel_lock:
        return False  # same kernel: a live holder would still hold the flock
    try:  # no flock here: its pid must be alive, and its record fresh (a pid may be reused)
        os.kill(int(record["pid"]), 0)
    except (ProcessLookupError, ValueError, KeyError, TypeError):
        return False
    except PermissionError:
        pass  # alive, as another user
    return fresh


class WorkdirLock:
    """Process 0's claim on a workdir (see the module docstring); `release` ends it."""

    def __init__(self, workdir: str, command: str, created: bool):
        self.workdir, self.command, self.created = workdir, command, created
        self.path = os.path.join(workdir, LOCK_FILE)
        self.fd: int | None = None
        self.taken_over: dict | None = None  # the record of a dead holder this lock replaced
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def try_acquire(self) -> dict | None:
        """None once held; else the record of the run holding it (or {} if it has none yet)."""
        try:
            fd, kernel_lock = _open_locked(self.path)
        except FileNotFoundError:  # the holder had created the workdir, failed and removed it
            os.makedirs(self.workdir, exist_ok=True)
            self.created = True
            fd, kernel_lock = _open_locked(self.path)
        if fd is None:
            return self._current_record()
        left = _read_record(fd)
        if left and _record_alive(left, fd, kernel_lock):
            os.close(fd)
            return left
        self.fd, self.taken_over = fd, left
        data = json.dumps(_holder_record(self.command)).encode() + b"\n"
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, name="llm_jax-workdir-lock", daemon=True)
        self._beat.start()
        return None

    def _current_record(self) -> dict:
        try:
            with open(self.path, "rb") as f:
                raw = f.read(4096)
            return json.loads(raw) if raw.strip() else {}
        except (OSError, ValueError):
            return {}

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.fd)
            except OSError:  # the record may go stale; the kernel lock, where there is one, still holds
                pass

    def relocate(self) -> None:
        """The same claim on a new, empty workdir at the same path, after the old one (with this
        lock file in it) was renamed; the old lock is dropped only once the new one is held."""
        self._stop_heartbeat()
        old, self.fd = self.fd, None
        os.makedirs(self.workdir, exist_ok=True)
        self.created = True
        try:
            record = self.try_acquire()
        finally:
            os.ftruncate(old, 0)
            os.close(old)
        if record is not None:  # another run started in the instant the path was free
            raise WorkdirBusy(f"while the old run was moved aside, another run took {self.workdir}: {describe(record)}")

    def _stop_heartbeat(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
            self._beat = None

    def release(self) -> None:
        """Clears the record (a clean end) and unlocks. A workdir this run created and left holding
        nothing but the lock (it failed before writing) is removed again."""
        if self.fd is None:
            return
        self._stop_heartbeat()
        try:
            os.ftruncate(self.fd, 0)
        finally:
            os.close(self.fd)  # closing the last descriptor drops the flock
            self.fd = None
        if self.created:
            try:
                if os.listdir(self.workdir) == [LOCK_FILE]:
                    os.remove(self.path)
                    os.rmdir(self.workdir)
            except OSError:
                pass


def busy_message(workdir: str, record: dict, hint: str) -> str:
    holder = describe(record)
    if record and record.get("host") != socket.gethostname():
        holder += (
            f"; if that host is gone, its record in {os.path.join(workdir, LOCK_FILE)} goes stale {STALE_S:.0f}s "
            "after its last heartbeat"
        )
    return f"workdir {workdir} is in use by another run: {holder}. Wait for it to end or stop it{hint}."


def lock(workdir: str, wait_s: float = 0.0, log=print, command: str = "llm_jax.main", hint: str = "",
         created: bool = False) -> WorkdirLock:  # fmt: skip
    """Takes `workdir`'s lock, waiting up to `wait_s` seconds for another holder; raises WorkdirBusy."""
    held = WorkdirLock(workdir, command, created)
    t0, told = time.time(), False
    while (record := held.try_acquire()) is not None:
        if time.time() - t0 >= wait_s:
            waited = f" (waited {wait_s:g}s)" if wait_s > 0 else ""
            raise WorkdirBusy(busy_message(workdir, record, hint) + waited)
        if not told:
            log(f"waiting up to {wait_s:g}s for the run holding {workdir}: {describe(record)}")
            told = True
        time.sleep(_POLL_S)
    if held.taken_over:
        log(f"took over the lock of {workdir} from a run that ended without releasing it: {describe(held.taken_over)}")
    return held


def claim(workdir: str, wait_s: float = 0.0, log=print, command: str = "llm_jax.main",
          hint: str = "") -> WorkdirLock | None:  # fmt: skip
    """Makes sure `workdir` can be written (created if missing) and takes its lock: process 0 holds
    it (returned), the others get None once it does. Call after the cheap checks and before any
    heavy work; every process raises if process 0 could not claim it."""
    held, error = None, None
    if jax.process_index() == 0:
        try:
            held = lock(workdir, wait_s, log, command, hint, created=check_writable(workdir))
        except UserError as e:
            error = e
    if not distributed.all_processes(error is None):
        raise error or WorkdirBusy(f"process 0 could not claim workdir {workdir}; its output says why")
    if jax.process_index() != 0:
        error = None
        try:
            check_writable(workdir)  # orbax writes from every process
        except FileError as e:
            error = e
    if not distributed.all_processes(error is None):
        if held is not None:
            held.release()
        raise error or FileError(f"workdir {workdir} is not writable from every process; their output says which")
    return held
