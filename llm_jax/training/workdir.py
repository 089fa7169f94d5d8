"""The run directory's life cycle: check what is there, claim it (one writer), move another model's
run aside, prepare it.

A workdir holds `config.json` (the resolved run config), `tokenizer/`, `checkpoints/<step>/`,
`metrics.jsonl`, `tensorboard/` and `lock`. A run of a different model is never overwritten, only
moved aside (`<workdir>.old-<time>`) when asked to. Process 0 writes; the others wait at a barrier.

One writer at a time (`claim`): `llm_jax.main` and `llm_jax.convert from_hf` lock the workdir
before they change anything in it, so a second writer is refused at once with one line naming the
holder (host, pid, start time), or waits for it if asked to (`config.train.wait_for_lock`). Readers
(`llm_jax.generate`, `convert to_hf`, `load_run`) take no lock: they read finished checkpoints only.

The lock is the holder's record, `workdir/lock`, and relies on no `flock` (which some NFS set-ups
and FUSE mounts lack, or keep per host): it is created whole and atomically (a hard link of a
written temporary, or O_CREAT|O_EXCL), so of two runs starting at once exactly one gets it. A record
names its holder by host name, boot id and pid namespace, pid and the pid's start time: on the same
host a record is alive while that very process runs, so a killed run's lock (kill -9 included) is
taken over at once; from another host, while its own heartbeat time (rewritten in place every
HEARTBEAT_S seconds; the record's clock, not the file server's) is under STALE_S old. A stale record
is taken over by renaming it to a name of our own and checking it is the one judged stale (else it
is put back), and `release` removes only this run's own record the same way, never a successor's.
A holder whose record was taken over (its host lost touch for STALE_S) finds out before its next
save (`check`) and stops with one line. Multi-process runs: process 0 holds the lock for all of them.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import tempfile
import threading
import time
import uuid

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
        diffs += _lora_diffs(old.get("lora", {}), config.lora.to_dict())
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


def _lora_diffs(old: dict, new: dict) -> list[str]:
    """What makes the adapters another function: rank, alpha, targets and the base (a run saved
    before `config.lora` existed had none)."""
    old = {**config_lib.lora_section().to_dict(), **old}
    return [
        f"lora.{k} is {old[k]!r} there but {new[k]!r} now"
        for k in ("rank", "alpha", "targets", "base")
        if old[k] != new[k]
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
            held.relocate(dest)
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


def _read_text(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except (OSError, ValueError):
        return ""


def _pid_start(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, /proc/<pid>/stat field 22); None if unknown.
    With the pid it names one process, even after the pid is reused."""
    stat = _read_text(f"/proc/{pid}/stat")
    fields = stat[stat.rfind(")") + 2 :].split()  # after "pid (comm) ": field 3 on
    return fields[19] if len(fields) > 19 else None


def _this_host() -> dict:
    """What names this host beyond its hostname: the boot (another machine, or this one rebooted, has
    another boot id) and the pid namespace (a container beside us sees other pids)."""
    boot = _read_text("/proc/sys/kernel/random/boot_id") or _read_text("/etc/machine-id")
    try:
        pid_ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pid_ns = ""
    return {"host": socket.gethostname(), "boot": boot, "pid_ns": pid_ns}


def _stamp() -> str:
    """The holder's clock as a fixed-width string, so a heartbeat rewrites the record in place."""
    return f"{time.time():017.3f}"


def _holder_record(command: str, token: str) -> dict:
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    pid = os.getpid()
    return {**_this_host(), "pid": pid, "pid_start": _pid_start(pid), "started": started, "command": command,
            "token": token, "beat": _stamp()}  # fmt: skip


def describe(record: dict | None) -> str:
    if not record:
        return "a run that is starting (its record is not written yet)"
    return f"pid {record.get('pid')} on {record.get('host')}, started {record.get('started')} ({record.get('command')})"


def _same_host(record: dict) -> bool:
    here = _this_host()
    return all(record.get(k) == here[k] for k in here)


def _record_alive(record: dict, mtime: float) -> bool:
    """Whether the holder named by `record` may still be running. On this host (same name, boot and
    pid namespace): its pid is alive and started when the record says. Elsewhere: its last
    heartbeat, by the record's own clock, is under STALE_S old (a record of an older llm_jax without
    one: the file's modification time)."""
    if _same_host(record):
        try:
            pid = int(record["pid"])
            os.kill(pid, 0)
        except (ProcessLookupError, ValueError, KeyError, TypeError):
            return False
        except PermissionError:
            pass  # alive, as another user
        return record.get("pid_start") in (None, _pid_start(pid))
    try:
        beat = float(record["beat"])
    except (KeyError, TypeError, ValueError):
        beat = mtime
    return time.time() - beat < STALE_S


def _read(path: str) -> tuple[bytes | None, dict | None, float]:
    """(raw bytes or None if there is no record, the record if it parses, its modification time)."""
    try:
        with open(path, "rb") as f:
            raw, mtime = f.read(4096), os.fstat(f.fileno()).st_mtime
    except FileNotFoundError:
        return None, None, 0.0
    try:
        record = json.loads(raw) if raw.strip() else None
    except ValueError:
        record = None
    return raw, record if isinstance(record, dict) else None, mtime


def _create(path: str, data: bytes, token: str) -> bool:
    """Creates the record at `path` atomically, whole: False if one is there. A hard link of a
    written temporary (atomic on NFS too); O_CREAT|O_EXCL where the filesystem has no hard links."""
    tmp = f"{path}.new-{token}"
    files.write_bytes(tmp, data)  # FileNotFoundError: no workdir (any more)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # no hard links here (some FUSE mounts)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True
    finally:
        os.remove(tmp)


def _remove_if(path: str, token: str, expect: bytes | None = None) -> bool:
    """Removes the record at `path` only if it is the one meant (its `token`, or exactly `expect`):
    it is renamed to a name of our own first, so a record another run put there in the meantime is
    never deleted but put back. True if the path is now free of the meant record."""
    aside = f"{path}.gone-{token}"
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return True
    raw, record, _ = _read(aside)
    meant = raw == expect if expect is not None else (record or {}).get("token") == token
    if not meant:
        try:
            os.link(aside, path)  # put the other run's record back, unless a third one is there by now
        except FileExistsError:
            pass
        except OSError:  # no hard links here (some FUSE mounts): put it back by renaming
            os.rename(aside, path)
            return False
    os.remove(aside)
    return meant


class WorkdirLock:
    """Process 0's claim on a workdir (see the module docstring); `check` says if it still holds,
    `release` ends it."""

    def __init__(self, workdir: str, command: str, created: bool):
        self.workdir, self.command, self.created = workdir, command, created
        self.path = os.path.join(workdir, LOCK_FILE)
        self.token = ""
        self.fd: int | None = None
        self.taken_over: dict | None = None  # the record of a dead holder this lock replaced
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def try_acquire(self) -> dict | None:
        """None once held; else the record of the run holding it (or {} if it has none yet)."""
        found = {}
        for _ in range(5):  # a record removed or replaced while we looked: look again
            self.token = uuid.uuid4().hex
            record = _holder_record(self.command, self.token)
            try:
                created = _create(self.path, json.dumps(record).encode() + b"\n", self.token)
            except FileNotFoundError:  # the holder had created the workdir, failed and removed it
                os.makedirs(self.workdir, exist_ok=True)
                self.created = True
                continue
            if created:
                self._hold(record)
                return None
            raw, found, mtime = _read(self.path)
            if raw is None:
                continue
            if found is None and raw.strip() and time.time() - mtime < STALE_S:
                found = {}  # not JSON yet: a holder writing it (O_EXCL), or corrupt: stale in STALE_S
            elif found is None or not _record_alive(found, mtime):  # empty: released by an older llm_jax
                if _remove_if(self.path, self.token, expect=raw) and found:
                    self.taken_over = found
                continue
            return found
        return found or {}

    def _hold(self, record: dict) -> None:
        self.fd = os.open(self.path, os.O_RDWR)
        self.record = record
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, name="llm_jax-workdir-lock", daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        """Rewrites the record's `beat` in place (same length) in the file this lock created: if the
        lock was taken over, that file is no longer at `path` and the new holder's record is untouched."""
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.pwrite(self.fd, json.dumps({**self.record, "beat": _stamp()}).encode() + b"\n", 0)
            except OSError:  # the record may go stale
                pass

    def lost(self) -> dict | None:
        """None while this lock holds; else the record now in its place ({} if there is none)."""
        if self.fd is None:
            return None
        try:
            _, record, _ = _read(self.path)
        except OSError:  # cannot tell (an I/O error): not a reason to stop a run
            return None
        return None if record and record.get("token") == self.token else (record or {})

    def check(self) -> None:
        """Raises WorkdirBusy if another run took this lock over (a record judged stale, a host that
        cannot see ours): the run stops before its next save, so two runs never write one workdir."""
        other = self.lost()
        if other is not None:
            raise WorkdirBusy(
                f"the lock of workdir {self.workdir} was taken over by {describe(other) if other else 'nobody'}"
                f" (its record in {self.path} is not this run's); stopped before saving so that two runs never "
                "write one workdir. Stop the other run, or resume from another --workdir"
            )

    def relocate(self, old_workdir: str) -> None:
        """The same claim on a new, empty workdir at the same path, after the old one (with this
        lock's record in it) was renamed to `old_workdir`; the old record is dropped once the new one is held."""
        self._stop_heartbeat()
        old_fd, old_token, self.fd = self.fd, self.token, None
        os.makedirs(self.workdir, exist_ok=True)
        self.created = True
        try:
            record = self.try_acquire()
        finally:
            os.close(old_fd)
            _remove_if(os.path.join(old_workdir, LOCK_FILE), old_token)
        if record is not None:  # another run started in the instant the path was free
            raise WorkdirBusy(f"while the old run was moved aside, another run took {self.workdir}: {describe(record)}")

    def _stop_heartbeat(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
            self._beat = None

    def release(self) -> None:
        """Removes the record (a clean end) if it is still this run's, never a successor's. A workdir
        this run created and left empty (it failed before writing) is removed again."""
        if self.fd is None:
            return
        self._stop_heartbeat()
        os.close(self.fd)
        self.fd = None
        _remove_if(self.path, self.token)
        if self.created:
            try:
                os.rmdir(self.workdir)  # only if empty
            except OSError:
                pass


def check_held(held: WorkdirLock | None) -> None:
    """Raises on every process if process 0's lock (`held`) was taken over (a collective)."""
    error = None
    if held is not None:
        try:
            held.check()
        except WorkdirBusy as e:
            error = e
    if not distributed.all_processes(error is None):
        raise error or WorkdirBusy("process 0 lost the workdir's lock to another run; its output says which")


def busy_message(workdir: str, record: dict, hint: str) -> str:
    holder = describe(record)
    if record and not _same_host(record):
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
