"""Where `convert to_hf` may write, and how it replaces what is there without ever destroying it.

An export goes to a temporary sibling `<hf_dir>.tmp<pid>` and is renamed into place only once it
is whole, so a full disk or a kill leaves the previous export as it was. `check_target` refuses,
before anything is read or written, a directory that is the run itself (the workdir, inside it or
holding it), the directory the run was imported from (`IMPORTED_FROM`, written by `import_run`),
a file, and a non-empty directory that is not an earlier export of this run (`MARKER` names the run
an export came from) unless `overwrite` is given: that directory is then moved aside
(`<hf_dir>.old-<time>`), never deleted. An earlier export of the same run is replaced.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterator

from llm_jax.runtime import files
from llm_jax.runtime.errors import AlreadyExists, BadValue, FileError

MARKER = "llm_jax_export.json"  # in an export: {"workdir": the run's real path, "step": ...}
IMPORTED_FROM = "imported_from.json"  # in workdir/hf/: {"hf_dir": the real path a run was imported from}


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(path))


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _read_json(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            found = json.loads(f.read(1 << 16))
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def record_import(workdir: str, hf_dir: str) -> None:
    """Notes in workdir/hf/ which directory the run was imported from (an export may not go there)."""
    files.write_json(os.path.join(workdir, "hf", IMPORTED_FROM), {"hf_dir": _real(hf_dir)})


def _check_apart(run_dir: str, flag: str, hf_dir: str, which: str = "this run") -> None:
    """A BadValue if `hf_dir` is, holds or lies inside the run `run_dir` or is its import source."""
    target, run = _real(hf_dir), _real(run_dir)
    if _within(target, run) or _within(run, target):
        where = "is" if target == run else "is inside" if _within(target, run) else "holds"
        raise BadValue(f"--hf_dir={hf_dir} {where} the run's {flag}={run_dir}; export to a directory of its own")
    source = _read_json(os.path.join(run_dir, "hf", IMPORTED_FROM)).get("hf_dir")
    if source == target:
        raise BadValue(
            f"--hf_dir={hf_dir} is the directory {which} was imported from; export to a new directory "
            "(the original checkpoint is kept as it was)"
        )


def check_target(workdir: str, hf_dir: str, overwrite: bool, base: str | None = None) -> str | None:
    """What is at `hf_dir` now: None (nothing, or an empty directory), 'export' (an earlier export of
    this run: replaced) or 'foreign' (moved aside, `overwrite` only); a BadValue / AlreadyExists
    naming the directory and the fix for a target that must not be written. `base`: a LoRA run's
    base run, kept apart like the run itself."""
    _check_apart(workdir, "--workdir", hf_dir)
    if base:
        _check_apart(base, "config.lora.base", hf_dir, f"config.lora.base={base}")
    run = _real(workdir)
    if not os.path.lexists(hf_dir):
        return None
    if not os.path.isdir(hf_dir):
        raise AlreadyExists(f"--hf_dir={hf_dir} is a file, not a directory; choose another --hf_dir")
    names = sorted(os.listdir(hf_dir))
    if not names:
        return None
    if _read_json(os.path.join(hf_dir, MARKER)).get("workdir") == run:
        return "export"
    if overwrite:
        return "foreign"
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    raise AlreadyExists(
        f"--hf_dir={hf_dir} is not empty ({shown}) and is not an export of {workdir}; choose a new or empty "
        f"directory, or pass --overwrite to move it to {hf_dir.rstrip(os.sep)}.old-<time> (nothing is deleted)"
    )


def _write_failed(e: BaseException) -> bool:
    """Whether `e` is the filesystem refusing a write: an OSError, or safetensors' own error wrapping
    one (its Rust writer reports `I/O error: ... (os error N)`)."""
    if isinstance(e, OSError) and not isinstance(e, (FileNotFoundError, PermissionError)):
        return True
    return type(e).__name__ == "SafetensorError" and "os error" in str(e)


@contextlib.contextmanager
def writing(workdir: str, hf_dir: str, overwrite: bool, step: int, log=print, base: str | None = None) -> Iterator[str]:
    """Yields a temporary sibling of `hf_dir` to write the export into; once the block ends it gets the
    marker, is flushed to disk and renamed to `hf_dir` (see the module docstring). If the block raises,
    the temporary is removed and `hf_dir` is left as it was."""
    there = check_target(workdir, hf_dir, overwrite, base)
    hf_dir = hf_dir.rstrip(os.sep) or os.sep
    tmp = f"{hf_dir}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed export that had our pid
    try:
        os.makedirs(tmp)
        yield tmp
        files.write_json(os.path.join(tmp, MARKER), {"workdir": _real(workdir), "step": step})
        for name in os.listdir(tmp):
            files.fsync(os.path.join(tmp, name))
        if there is None:
            files.replace(tmp, hf_dir)  # onto nothing or an empty directory
            return
        stamp = time.strftime("%Y%m%d-%H%M%S") if there == "foreign" else f"{os.getpid()}"
        aside = f"{hf_dir}.old-{stamp}"
        os.rename(hf_dir, aside)
        try:
            files.replace(tmp, hf_dir)
        except BaseException:
            os.rename(aside, hf_dir)
            raise
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if _write_failed(e):  # a full disk, a quota, a file-size limit: the user's to fix, in one line
            raise FileError(
                f"writing the export into {tmp} failed ({e}); {hf_dir} was left as it was and the temporary "
                "removed: free space on that filesystem (or choose another --hf_dir) and run it again"
            ) from None
        raise
    if there == "export":
        shutil.rmtree(aside)
    else:
        log(f"moved what was in {hf_dir} to {aside} (--overwrite; nothing was deleted)")
