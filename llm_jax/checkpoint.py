"""Checkpoints with orbax: async saves, keep-last-N, restore into a sharded abstract target.

A checkpoint `workdir/checkpoints/<step>/` holds the train state (params, optimizer state, step)
and the data iterator's state (a small JSON item). Orbax writes into a temporary directory and
renames it when complete, so a save interrupted by a crash is never mistaken for a checkpoint.
Restoring into `abstract_state` (ShapeDtypeStructs with shardings) places every array directly in
its shards, on whatever mesh the abstract state names.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


def manager(workdir: str, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=True,
        enable_async_checkpointing=async_save,
    )
    return ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, "checkpoints")),
        item_names=("state", "data"),
        options=options,
    )


def save(mngr: ocp.CheckpointManager, step: int, state: Any, data_state: dict) -> None:
    """Starts an (async) save of `state` and the data iterator state at `step`."""
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
