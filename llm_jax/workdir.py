"""The run directory's life cycle: check what is there, move another model's run aside, prepare it.

A workdir holds `config.json` (the resolved run config), `tokenizer/`, `checkpoints/<step>/`,
`metrics.jsonl` and `tensorboard/`. Nothing in it changes until every check has passed; a run of
a different model is never overwritten, only moved aside (`<workdir>.old-<time>`) when asked to.
Process 0 writes; the others wait at a barrier.
"""

from __future__ import annotations

import json
import os
import time

import jax
import ml_collections

from llm_jax import config as config_lib
from llm_jax import tokenizer as tok_lib
from llm_jax.errors import BadValue
from llm_jax.model import RUNTIME_FIELDS

CONFIG_FILE = "config.json"
TOKENIZER_DIR = "tokenizer"


def tokenizer_dir(workdir: str) -> str:
    return os.path.join(workdir, TOKENIZER_DIR)


def has_tokenizer(workdir: str) -> bool:
    return os.path.exists(os.path.join(tokenizer_dir(workdir), tok_lib.META))


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
    except (OSError, ValueError, AttributeError) as e:
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


def move_aside(workdir: str, log) -> str:
    """Renames the whole old run (process 0); returns the new name."""
    dest = _aside_name(workdir)
    if jax.process_index() == 0:
        n = 1
        while os.path.exists(dest):
            dest, n = f"{_aside_name(workdir)}-{n}", n + 1
        os.rename(workdir, dest)
        log(f"moved the previous run in {workdir} to {dest}")
    sync("llm_jax:move_run_aside")
    return dest


def prepare(workdir: str, config: ml_collections.ConfigDict, tokenizer=None) -> None:
    """Creates the workdir, writes the resolved config (atomically) as config.json and the tokenizer
    if it is not there yet. Process 0 writes; call only once every check has passed."""
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        path = os.path.join(workdir, CONFIG_FILE)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(config_lib.to_json(config))
        os.replace(tmp, path)
        if tokenizer is not None and not has_tokenizer(workdir):
            tokenizer.save(tokenizer_dir(workdir))
    sync("llm_jax:prepare_workdir")
