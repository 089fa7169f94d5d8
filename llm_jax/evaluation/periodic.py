"""lm-eval tasks as a periodic action of the training loop (`config.train.eval_tasks`).

    python -m llm_jax.main --config configs/default.py --workdir runs/x \
        --config.train.eval_tasks=tests/eval_tasks/llm_jax_mc.yaml --config.train.eval_tasks_every=500

Every `eval_tasks_every` steps (and after the last), the tasks run on the current params through
`LlmJaxLM` (the trainer's model, mesh, tokenizer and trained context, nothing reloaded), at most
`eval_tasks_limit` examples each; the scores go to metrics.jsonl as `tasks/<task>/<metric>` (drawn
by llm_jax.plot) and to the log line. The tasks are resolved before training starts, so an unknown
task or a missing `eval` extra fails at once, not at the first evaluation.
"""

from __future__ import annotations

import time

import ml_collections

from llm_jax.evaluation import report, tasks
from llm_jax.training import loop
from llm_jax.training.saved_run import Run


def task_names(config: ml_collections.ConfigDict) -> list[str]:
    return [n.strip() for n in str(config.train.get("eval_tasks", "")).split(",") if n.strip()]


def actions(config: ml_collections.ConfigDict) -> list[loop.Periodic]:
    """The loop's lm-eval action for `config` (none without `train.eval_tasks`); checks the tasks now."""
    names = task_names(config)
    if not names:
        return []
    tc = config.train
    include = tc.get("eval_tasks_include_path") or None
    tasks.resolve(names, include)

    def run_eval_tasks(trainer: loop.Trainer, ls: loop.LoopState) -> None:
        from llm_jax.evaluation import harness  # lm-eval, the `eval` extra

        loop.fetch(trainer, ls)
        t0 = time.time()
        run = Run(
            trainer.workdir, trainer.config, trainer.data.tokenizer, trainer.model, trainer.params(ls), trainer.mesh,
            trainer.rules, ls.step, ls.trained_context, {},
        )  # fmt: skip
        lm = harness.LlmJaxLM(run, batch_size=tc.eval_batch_size or tc.batch_size)
        results = tasks.evaluate(lm, names, limit=tc.get("eval_tasks_limit") or None, include_path=include)
        metrics = report.task_metrics(results)
        trainer.metrics.write(ls.step, metrics)
        ls.eval_record.update(metrics)
        shown = " | ".join(f"{k.removeprefix('tasks/')} {v:.4f}" for k, v in metrics.items())
        trainer.log(f"step {ls.step:6d} | {shown} | {time.time() - t0:.1f}s for lm-eval tasks")

    return [loop.Periodic(tc.get("eval_tasks_every", 0), run_eval_tasks, at_end=True)]


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """`training.loop.train_and_evaluate` with the lm-eval tasks of `config.train.eval_tasks`."""
    return loop.train_and_evaluate(config, workdir, actions(config))
