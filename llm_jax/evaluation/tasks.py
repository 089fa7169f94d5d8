"""lm-eval tasks by name or by file, run on a model: the one place the harness's evaluator is called
(by `python -m llm_jax.evaluate` and by the training loop's periodic evaluation).

A name is an lm-eval task or group (`hellaswag`, `arc_easy`, `lambada_openai`, ...) or a task YAML
file (its directory joins the include path and its `task:` is run). A name lm-eval does not know
and a task whose data cannot be fetched (no network, no cached copy) are one-line errors that say
what to do.
"""

from __future__ import annotations

import difflib
import functools
import os
import re
from collections.abc import Sequence

from llm_jax.runtime.errors import BadValue, Unavailable

# Errors of fetching a task's data (datasets / huggingface_hub / requests), recognised by their
# names so that those libraries need not be imported here.
_FETCH_ERRORS = ("ConnectionError", "DatasetNotFoundError", "LocalEntryNotFoundError", "OfflineModeIsEnabled",
                 "HfHubHTTPError", "Timeout", "MaxRetryError", "ConnectTimeout")  # fmt: skip


def _yaml_task(path: str) -> str:
    """The `task:` name of a task YAML file."""
    with open(path, encoding="utf-8") as f:
        match = re.search(r"^task:\s*([^\s#]+)", f.read(), re.MULTILINE)
    if not match:
        raise BadValue(f"{path} has no 'task:' line: not an lm-eval task YAML")
    return match.group(1).strip("'\"")


@functools.lru_cache(maxsize=8)
def _manager(paths: tuple[str, ...], defaults: bool):
    """lm-eval's TaskManager over `paths` (and its own tasks if `defaults`: indexing those takes seconds,
    so managers are kept for the next evaluation)."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise Unavailable("lm-eval tasks need the eval extra: pip install -e '.[eval]' (lm-eval 0.4)") from None
    return TaskManager(include_path=list(paths) or None, include_defaults=defaults)


def resolve(names: Sequence[str], include_path: str | None = None):
    """(task names, lm-eval TaskManager) for `names`: task names or YAML files. BadValue naming the
    unknown ones (with close matches) and how to list or add tasks."""
    paths = [include_path] if include_path else []
    tasks = []
    for name in names:
        if name.endswith((".yaml", ".yml")):
            if not os.path.isfile(name):
                raise BadValue(f"task file {name} does not exist")
            paths.append(os.path.dirname(os.path.abspath(name)))
            tasks.append(_yaml_task(name))
        elif name:
            tasks.append(name)
    if not tasks:
        raise BadValue("no task given: --tasks hellaswag,arc_easy (lm-eval names) or a task YAML file")
    manager = _manager(tuple(paths), False) if paths else None  # local tasks only: quick to index
    if manager is None or not set(tasks) <= set(manager.all_tasks):
        manager = _manager(tuple(paths), True)
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        close = sorted({c for t in unknown for c in difflib.get_close_matches(t, known, n=3)})
        hint = f" (close: {', '.join(close)})" if close else ""
        raise BadValue(
            f"unknown lm-eval task(s) {', '.join(unknown)}{hint}; list them with `lm_eval ls tasks`, or give a "
            "task YAML file or --include_path DIR holding one"
        )
    return tasks, manager


def evaluate(lm, names: Sequence[str], *, num_fewshot=None, limit=None, include_path=None, log_samples=False) -> dict:
    """lm-eval's `simple_evaluate` of `lm` on `names`; its results dict."""
    import lm_eval

    tasks, manager = resolve(names, include_path)
    try:
        return lm_eval.simple_evaluate(
            model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
            log_samples=log_samples, bootstrap_iters=0, verbosity="ERROR",
        )  # fmt: skip
    except Exception as e:
        if not any(k.__name__ in _FETCH_ERRORS for k in type(e).__mro__):
            raise
        raise Unavailable(
            f"the data of task(s) {', '.join(tasks)} cannot be fetched ({type(e).__name__}: {str(e)[:160]}); "
            "run once where huggingface.co is reachable (datasets caches it in ~/.cache/huggingface, or "
            "$HF_DATASETS_CACHE), then it works offline; or point a local task YAML at a copy (--include_path)"
        ) from None
