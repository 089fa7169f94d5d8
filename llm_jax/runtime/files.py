"""Files: written whole or not at all, locked between processes, and read plain or gzipped.

- Atomic writes (`atomic_path`, `write_bytes`, `write_text`, `write_json`): the new content goes to
  a temporary sibling `<path>.tmp<pid>` (same directory, so the rename stays on one filesystem),
  which is flushed and fsync-ed, renamed over `path`, and the directory fsync-ed so the rename
  itself survives a power cut. A reader sees the old file or the new one, never half of either; an
  exception while writing removes the temporary and leaves the old file as it was. A process
  killed midway leaves only the temporary, whose name contains ".tmp" (prepare clears those).
- Locks: `locked(path)`, a POSIX record lock (`lockf`) held around a block, for caches that one
  process fills while the others wait; the kernel drops it when the holder dies, however it dies.
  (The workdir's one-writer lock is a holder record instead, which needs no kernel lock:
  llm_jax/training/workdir.py.)
- `open_bytes`: a file to read, through gzip when its name ends in `.gz` (callers decode it
  themselves, to name the byte offset of text that is not UTF-8).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gzip
import json
import os
import shutil
from collections.abc import Callable, Iterator

# ----------------------------------------------------------------------------------------------
# Atomic writes


def fsync(path: str) -> None:
    """Flushes a file's content, or a directory's entries (a rename or a new file in it), to disk."""
    fd = os.open(path or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: str) -> None:
    """fsync of a file, or of a directory and the files directly in it."""
    if os.path.isdir(path):
        for name in os.listdir(path):
            if os.path.isfile(os.path.join(path, name)):
                fsync(os.path.join(path, name))
    fsync(path)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def replace(src: str, dst: str) -> None:
    """`os.replace(src, dst)`, then the directory of `dst` flushed so the rename is durable."""
    os.replace(src, dst)
    fsync(os.path.dirname(dst))


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yields a temporary sibling path for the caller to create (a file or a directory, written by
    any library); when the block ends normally it is flushed to disk and renamed to `path`.

    A directory replaces only a missing or empty `path`. If the block raises, the temporary is
    removed and `path` is left as it was.
    """
    tmp = f"{path}.tmp{os.getpid()}"
    _remove(tmp)  # left by a killed process that had our pid
    try:
        yield tmp
        _fsync_tree(tmp)
        replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w", encoding: str | None = None):
    """`open(path, mode)` for writing, atomically (see `atomic_path`): the file appears under `path`
    complete, when the block ends without an exception. `mode`: 'w' or 'wb'."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes a new file: mode 'w' or 'wb', not {mode!r}")  # a caller's bug
    if mode == "w" and encoding is None:
        encoding = "utf-8"
    with atomic_path(path) as tmp:
        with open(tmp, mode, encoding=encoding) as f:
            yield f
            f.flush()


def write_bytes(path: str, data: bytes) -> None:
    """`data` as the whole content of `path`, atomically."""
    with atomic_open(path, "wb") as f:
        f.write(data)


def write_text(path: str, text: str) -> None:
    """`text` (UTF-8) as the whole content of `path`, atomically."""
    with atomic_open(path, "w") as f:
        f.write(text)


def write_json(path: str, obj, indent: int | None = 2) -> None:
    """`obj` as JSON with sorted keys and a final newline, atomically."""
    write_text(path, json.dumps(obj, indent=indent, sort_keys=True) + "\n")


# ----------------------------------------------------------------------------------------------
# Locks


@contextlib.contextmanager
def locked(path: str, on_wait: Callable[[], None] | None = None):
    """Holds an exclusive lock on `path` (created, with its directory, if missing) for the block,
    waiting for another process that holds it; `on_wait()` is called once before waiting.

    A POSIX record lock: held per process (a second `locked` of the same path in this process does
    not wait), shared over NFS through its lock manager, dropped by the kernel when the holder dies.
    """
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):  # held by another process: wait; else a real error
                raise
            if on_wait is not None:
                on_wait()
            fcntl.lockf(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(f, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------------------------
# Reading


def open_bytes(path: str):
    """`path` opened for reading bytes; decompressed on the fly when its name ends in `.gz`."""
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")
