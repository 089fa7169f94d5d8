"""llm_jax/runtime/files.py: atomic writes (a failure midway keeps the old file), locks (a second
holder waits; a dead holder's lock is dropped), plain and gzipped reading."""

import gzip
import os
import subprocess
import sys
import threading
import time

import pytest

from llm_jax.runtime import files


def _leftovers(directory) -> list[str]:
    return [n for n in os.listdir(directory) if ".tmp" in n]


# ----------------------------------------------------------------------------------------------
# Atomic writes


def test_write_replaces_whole_and_leaves_no_temporary(tmp_path):
    path = str(tmp_path / "f.txt")
    files.write_text(path, "old\n")
    files.write_text(path, "new – ü\n")
    with open(path, encoding="utf-8") as f:
        assert f.read() == "new – ü\n"
    files.write_bytes(path, b"\x00\x01")
    with open(path, "rb") as f:
        assert f.read() == b"\x00\x01"
    files.write_json(path, {"b": 1, "a": [2]})
    with open(path) as f:
        assert f.read() == '{\n  "a": [\n    2\n  ],\n  "b": 1\n}\n'
    assert _leftovers(tmp_path) == []


def test_failure_midway_keeps_the_old_file(tmp_path):
    path = str(tmp_path / "f.txt")
    files.write_text(path, "old content\n")
    with pytest.raises(RuntimeError, match="disk on fire"):
        with files.atomic_open(path) as f:
            f.write("half of the new")
            f.flush()
            raise RuntimeError("disk on fire")
    with open(path) as f:
        assert f.read() == "old content\n"
    assert _leftovers(tmp_path) == []


def test_failure_before_first_write_creates_nothing(tmp_path):
    path = str(tmp_path / "never.bin")
    with pytest.raises(KeyboardInterrupt):
        with files.atomic_open(path, "wb"):
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def test_atomic_path_for_a_library_that_wants_a_name(tmp_path):
    """A directory (written by any code under the temporary name) appears whole, or not at all."""
    target = str(tmp_path / "tok")
    with pytest.raises(OSError):
        with files.atomic_path(target) as tmp:
            os.makedirs(tmp)
            files.write_text(os.path.join(tmp, "a"), "1")
            raise OSError("killed")
    assert os.listdir(tmp_path) == []
    with files.atomic_path(target) as tmp:
        os.makedirs(tmp)
        files.write_text(os.path.join(tmp, "a"), "1")
    assert os.listdir(target) == ["a"] and _leftovers(tmp_path) == []


def test_atomic_open_refuses_append(tmp_path):
    with pytest.raises(ValueError, match="mode"):
        with files.atomic_open(str(tmp_path / "x"), "a"):
            pass


def test_replace_moves_a_directory(tmp_path):
    (tmp_path / "a.partial").mkdir()
    (tmp_path / "a.partial" / "m").write_text("x")
    files.replace(str(tmp_path / "a.partial"), str(tmp_path / "a"))
    assert sorted(os.listdir(tmp_path)) == ["a"] and (tmp_path / "a" / "m").read_text() == "x"


# ----------------------------------------------------------------------------------------------
# Reading plain and gzipped files


def test_open_bytes_reads_plain_and_gzip_alike(tmp_path):
    data = "line one\nzwei – ü\n".encode()
    (tmp_path / "t.txt").write_bytes(data)
    with gzip.open(tmp_path / "t.txt.gz", "wb") as f:
        f.write(data)
    for name in ("t.txt", "t.txt.gz"):
        with files.open_bytes(str(tmp_path / name)) as f:
            assert f.read() == data
            f.seek(5)  # callers seek (pieces of a file); gzip does it by decompressing
            assert f.readline() == b"one\n"
    # The suffix decides: a gzip file under a plain name is read as the bytes it holds.
    (tmp_path / "z.txt").write_bytes((tmp_path / "t.txt.gz").read_bytes())
    with files.open_bytes(str(tmp_path / "z.txt")) as f:
        assert f.read() != data


# ----------------------------------------------------------------------------------------------
# Locks

# Holds `locked(path)` in another process until its stdin closes.
_HOLDER = """
import sys
from llm_jax.runtime import files
with files.locked(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()
"""


def _env():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_locked_excludes_a_second_process_until_released(tmp_path):
    path = str(tmp_path / "sub" / "x.lock")  # its directory is created
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, path], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=_env())  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        waited, entered = [], threading.Event()

        def second():
            with files.locked(path, on_wait=lambda: waited.append(time.time())):
                entered.set()

        t = threading.Thread(target=second, daemon=True)
        t.start()
        assert not entered.wait(1.0), "a second holder got the lock while the first held it"
        assert len(waited) == 1  # told once that it waits
        holder.stdin.close()  # the holder leaves its block
        assert entered.wait(30), "the lock was not handed over once released"
        t.join(5)
    finally:
        holder.kill()
        holder.wait()


def test_locked_is_dropped_when_the_holder_dies(tmp_path):
    path = str(tmp_path / "x.lock")
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, path], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=_env())  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    holder.kill()  # no clean exit: the kernel drops the lock
    holder.wait()
    told = []
    with files.locked(path, on_wait=lambda: told.append(1)):
        pass
    assert told == []
