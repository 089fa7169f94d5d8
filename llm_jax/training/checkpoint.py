"""Checkpoints with orbax: async saves, keep-last-N, restore into a sharded abstract target.

A checkpoint `workdir/checkpoints/<step>/` holds the train state (params, optimizer state, step)
and the loop state (a small JSON item: the step, which is the whole data-iterator state, the
losses of the unfinished logging window, and the tokenizer's fingerprint).

Atomicity: orbax writes into `<step>.orbax-checkpoint-tmp` and renames it when complete, so a save
interrupted by a crash is never mistaken for a checkpoint (the next manager deletes the leftover).
A finished checkpoint that cannot be read (a file truncated or deleted later) is skipped in favour
of the previous one, with a warning, and then moved to `workdir/checkpoints_corrupt/` (never
deleted). Only the errors that damaged files raise mean "unreadable" (`is_damage`); a permission
error, a transient I/O error or a bug surfaces instead of costing the run its latest checkpoint.
A checkpoint that reads fine but does not fit this run (other shapes, other tokenizer) is a hard
error instead: falling back past it would silently drop a good run.

Restoring into `abstract_state` (ShapeDtypeStructs with shardings) places every array directly in
its shards, on whatever mesh the abstract state names: any mesh shape, any device count.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from llm_jax.runtime.distributed import agreed, all_processes, differing
from llm_jax.runtime.errors import BadValue, NotFound, Unavailable

CORRUPT_DIR = "checkpoints_corrupt"


class IncompatibleCheckpoint(BadValue):
    """A readable checkpoint that does not belong to this run (shapes, tree or tokenizer differ)."""


class DamagedCheckpoint(Exception):
    """A finished checkpoint missing a part that every save writes (an item directory, the tree metadata)."""


# TensorStore's status codes (the prefix of the ValueError it raises, which orbax may wrap in a bare
# Exception) for a file of the checkpoint that was truncated, deleted or overwritten: measured by
# truncating and deleting each file of a saved checkpoint in turn. PERMISSION_DENIED, UNAVAILABLE,
# DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED and the rest are not damage: the same read may work later.
DAMAGE_STATUS = ("DATA_LOSS", "FAILED_PRECONDITION", "NOT_FOUND", "OUT_OF_RANGE")


def is_damage(error: BaseException) -> bool:
    """Whether an error from reading a checkpoint means its files are damaged (use an older one).

    Damage: a truncated JSON file (JSONDecodeError), a deleted one (FileNotFoundError), a
    DamagedCheckpoint, a TensorStore ValueError with a DAMAGE_STATUS, or orbax's bare `Exception`
    wrapped around one of these. Not damage: any other OSError (permission, I/O), any other
    status, and everything else (a bug), which the caller lets surface.
    """
    return _damage(error) is not None


def _damage(error: BaseException) -> BaseException | None:
    """The error that shows damage (inside orbax's wrapper, if any), else None; see is_damage."""
    if isinstance(error, (json.JSONDecodeError, FileNotFoundError, DamagedCheckpoint)):
        return error
    if type(error) is ValueError:
        return error if str(error).split(":", 1)[0].strip() in DAMAGE_STATUS else None
    inner = error.__cause__ or error.__context__
    if type(error) is Exception and inner is not None:  # orbax's wrapper of a failed array read
        return _damage(inner)
    return None


def checkpoint_dir(workdir: str) -> str:
    return os.path.abspath(os.path.join(workdir, "checkpoints"))


def _handlers() -> dict:
    # Registered up front so that metadata (shapes) can be read before anything is restored.
    return {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}


def manager(workdir: str, keep: int, async_save: bool = True, read_only: bool = False) -> ocp.CheckpointManager:
    """The run's CheckpointManager. `read_only` touches nothing on disk (used while validating)."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else keep,
        create=not read_only,
        read_only=read_only,
        save_interval_steps=0 if read_only else 1,  # what orbax sets (with a warning) for read_only
        # Leftover `<step>.orbax-checkpoint-tmp` directories are saves that a crash interrupted.
        cleanup_tmp_directories=not read_only,
        enable_async_checkpointing=async_save,
    )
    if not read_only:
        return ocp.CheckpointManager(checkpoint_dir(workdir), item_handlers=_handlers(), options=options)
    level = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)  # orbax warns that a read-only directory is read only
    try:
        return ocp.CheckpointManager(checkpoint_dir(workdir), item_handlers=_handlers(), options=options)
    finally:
        logging.set_verbosity(level)


def save(mngr: ocp.CheckpointManager, step: int, state: Any, data_state: dict) -> None:
    """Starts an (async) save of `state` and the loop state at `step`."""
    mngr.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)),
        force=True,
    )


def abstract_like(state: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `state` (arrays or abstract values) carrying `shardings`."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """(state, data_state) of checkpoint `step`, sharded as `abstract_state` says."""
    restored = mngr.restore(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()),
    )
    return restored["state"], dict(restored["data"] or {})


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def tree_shapes(tree: Any) -> dict[str, tuple]:
    """{'params/embed/embedding': shape, ...} of a state, an abstract state or orbax tree metadata."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(_key_name(k) for k in path): tuple(getattr(leaf, "shape", ())) for path, leaf in flat}


def check_shapes(where: str, saved_meta: Any, abstract_state: Any) -> None:
    """Raises IncompatibleCheckpoint naming the differences between a checkpoint and this run."""
    saved, here = tree_shapes(saved_meta), tree_shapes(abstract_state)
    problems = [
        f"{p} is {saved[p]} in the checkpoint but {here[p]} here"
        for p in sorted(saved.keys() & here.keys())
        if saved[p] != here[p]
    ]
    only_saved, only_here = sorted(saved.keys() - here.keys()), sorted(here.keys() - saved.keys())
    if only_saved:
        problems.append(f"{len(only_saved)} arrays only in the checkpoint (e.g. {', '.join(only_saved[:3])})")
    if only_here:
        problems.append(f"{len(only_here)} arrays only in this run (e.g. {', '.join(only_here[:3])})")
    if not problems:
        return
    hint = ""
    if any("embed" in p and "embedding" in p for p in problems):
        hint = (
            " The vocabulary size differs: the tokenizer or config.model.vocab_size is not the one this run was "
            "trained with."
        )
    raise IncompatibleCheckpoint(
        f"checkpoint {where} does not match this run's model: "
        + "; ".join(problems[:6])
        + "."
        + hint
        + " Use the config the run was started with, or start over with --config.train.overwrite=True "
        "(the old run is moved aside, not deleted)."
    )


def restore_latest(
    mngr: ocp.CheckpointManager,
    abstract_state: Any,
    check: Callable[[int, dict], None] | None = None,
    log: Callable[[str], None] = print,
) -> tuple[int | None, Any, dict, list[int]]:
    """(step, state, data_state, bad_steps) of the newest checkpoint that restores.

    Newest first: a checkpoint whose files are damaged (`is_damage`) is skipped with a warning naming
    it (its step goes into `bad_steps`, for `move_aside`); any other error while reading it is
    raised. `check(step, data_state)` and the shape check run on every readable checkpoint before
    its arrays are read; their errors are not caught.
    (None, None, {}, []) if there is no checkpoint. Raises if there are checkpoints but none restores.
    """
    bad: list[tuple[int, str]] = []

    def unusable(step, where, error):
        bad.append((step, error))
        log(f"WARNING: checkpoint {where} is corrupt or incomplete ({error}); falling back to the previous one")

    def attempt(read, step, where):
        """read()'s result, or None where the checkpoint is damaged on this or another process (the
        processes must agree on the checkpoint they resume from); any other error is raised."""
        error = result = None
        try:
            result = read()
        except Exception as e:  # noqa: BLE001 - is_damage decides; the rest is re-raised
            error = _damage_or_raise(e)
        if all_processes(error is None):
            return result
        unusable(step, where, error or "unreadable on another process")
        return None

    for step in _steps_of_all(mngr):
        where = os.path.join(str(mngr.directory), str(step))
        small = attempt(lambda: _read_small_parts(mngr, step, where), step, where)  # noqa: B023 - called at once
        if small is None:
            continue
        meta, data_state = small
        # A model or tokenizer that does not fit on one process alone must stop all of them: the
        # others would wait for it for ever in the collective restore.
        agreed(_check_fits, where, meta, abstract_state, check, step, data_state)
        restored = attempt(lambda: restore(mngr, step, abstract_state), step, where)  # noqa: B023 - called at once
        if restored is None:
            continue
        state, data_state = restored
        return step, state, data_state, [s for s, _ in bad]
    if bad:
        raise Unavailable(
            f"no checkpoint in {mngr.directory} can be restored: "
            + "; ".join(f"step {s}: {msg}" for s, msg in bad)
            + ". Move them away to start from scratch, or start over with --config.train.overwrite=True."
        )
    return None, None, {}, []


def _check_fits(where: str, meta: Any, abstract_state: Any, check, step: int, data_state: dict) -> None:
    check_shapes(where, meta, abstract_state)
    if check is not None:
        check(step, data_state)


def _steps_of_all(mngr: ocp.CheckpointManager) -> list[int]:
    """The checkpoint steps, newest first, that every process sees; a process that sees others (a
    workdir that is not shared between hosts) stops all of them with the same line."""
    steps = sorted(mngr.all_steps(), reverse=True)
    seen, other = differing(json.dumps(steps))
    if other is not None:
        raise Unavailable(
            f"the processes see different checkpoints in {mngr.directory}: process 0 steps {seen[0]}, process "
            f"{other} steps {seen[other]}; give every host the same (shared) --workdir"
        )
    return steps


def _read_small_parts(mngr: ocp.CheckpointManager, step: int, where: str) -> tuple[Any, dict]:
    """(tree metadata of the state, loop state) of checkpoint `step`: what is read before its arrays."""
    for item in _handlers():
        if not os.path.isdir(os.path.join(where, item)):
            raise DamagedCheckpoint(f"no {item}/ directory")
    meta = mngr.item_metadata(step)["state"]
    if meta is None:
        raise DamagedCheckpoint("no readable state metadata")
    return meta, dict(mngr.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"] or {})


def _damage_or_raise(error: Exception) -> str:
    """The first line of a damage error (is_damage); any other error is raised again."""
    damage = _damage(error)
    if damage is None:
        raise error
    return _first_line(damage)


def move_aside(workdir: str, steps: list[int], log: Callable[[str], None] = print) -> None:
    """Moves unusable checkpoints to workdir/checkpoints_corrupt/<step> (process 0), so new saves
    of those steps do not collide with them; nothing is deleted."""
    if steps and jax.process_index() == 0:
        dest_root = os.path.join(workdir, CORRUPT_DIR)
        os.makedirs(dest_root, exist_ok=True)
        for step in steps:
            src = os.path.join(checkpoint_dir(workdir), str(step))
            dest = os.path.join(dest_root, str(step))
            if os.path.exists(dest):
                dest = f"{dest}.{time.strftime('%Y%m%d-%H%M%S')}"
            os.rename(src, dest)
            log(f"WARNING: moved unusable checkpoint {src} to {dest}")
    if steps and jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("llm_jax:move_aside")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def restore_params(workdir: str, abstract_params: Any, step: int | None = None) -> tuple[int, Any, dict]:
    """(step, params, loop data) of checkpoint `step` (None: the latest) of a run: the one params-only restore.

    Reads only the params of the saved train state (never the optimizer state). A leaf of
    `abstract_params` (ShapeDtypeStructs) that carries a sharding is restored as a jax.Array in its
    shards; one without (sharding None) as a host numpy array (for export). Touches nothing on disk.
    Raises FileNotFoundError when the run has no such checkpoint, IncompatibleCheckpoint when shapes differ.
    """
    directory = checkpoint_dir(workdir)
    if not os.path.isdir(directory):
        raise NotFound(f"{workdir} has no checkpoints (no {directory}); train it first with llm_jax.main")
    mngr = manager(workdir, keep=1, async_save=False, read_only=True)
    try:
        steps = mngr.all_steps()
        if not steps:
            raise NotFound(f"{directory} holds no finished checkpoint; train longer or wait for a save")
        if step is None:
            step = max(steps)
        elif step not in steps:
            raise NotFound(f"{directory} has no checkpoint of step {step}; it has {sorted(steps)}")
        where = os.path.join(directory, str(step))
        check_shapes(where, {"params": mngr.item_metadata(step)["state"]["params"]}, {"params": abstract_params})
        data = dict(mngr.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"] or {})
    finally:
        mngr.close()

    def restore_arg(x):
        if getattr(x, "sharding", None) is None:
            return ocp.RestoreArgs(restore_type=np.ndarray, dtype=x.dtype)
        return ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype)

    item = {"params": abstract_params}
    # PyTreeRestore with partial_restore: only the arrays named in `item` are read.
    with ocp.PyTreeCheckpointer() as ckptr:
        restored = ckptr.restore(
            os.path.join(where, "state"),
            args=ocp.args.PyTreeRestore(item=item, restore_args=jax.tree.map(restore_arg, item), partial_restore=True),
        )
    return step, restored["params"], data
