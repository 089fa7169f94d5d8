"""What an evaluation leaves behind: the harness's table, its JSON results, and one line in the
run's metrics.jsonl (keys `tasks/<task>/<metric>` and `perplexity/<measure>`, read by llm_jax.plot)."""

from __future__ import annotations

import json
import math

import jax

from llm_jax.runtime import files
from llm_jax.training.metrics import MetricsLog


def task_metrics(results: dict) -> dict[str, float]:
    """lm-eval results -> {'tasks/<task>/<metric>': value} for every finite number (filters other
    than 'none' keep their name: `tasks/gsm8k/exact_match,flexible-extract`; standard errors and the
    sample count left out)."""
    out = {}
    for task, metrics in sorted(results.get("results", {}).items()):
        for key, value in metrics.items():
            if "_stderr" in key or key == "sample_len" or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if math.isfinite(value):
                out[f"tasks/{task}/{key.removesuffix(',none')}"] = float(value)
    return out


def perplexity_metrics(measures: dict) -> dict[str, float]:
    """perplexity.perplexity's dict -> {'perplexity/<measure>': value}."""
    keys = ("token_perplexity", "bits_per_byte", "tokens", "bytes")
    return {f"perplexity/{k}": float(measures[k]) for k in keys}


def perplexity_table(measures: dict, source: str) -> str:
    """Two lines for a terminal."""
    return (
        f"{source}: {measures['documents']} documents, {measures['tokens']:,} tokens, {measures['bytes']:,} bytes "
        f"(window {measures['max_length']}, stride {measures['stride']})\n"
        f"token perplexity {measures['token_perplexity']:.4f} | bits per byte {measures['bits_per_byte']:.4f}"
    )


def results_table(results: dict) -> str:
    """The harness's own table (lm-eval's `make_table`), and the group table when there are groups."""
    from lm_eval.utils import make_table  # lm-eval (the `eval` extra) only when there are task results

    table = make_table(results)
    return table + ("\n" + make_table(results, "groups") if results.get("groups") else "")


def write_json(path: str, results: dict) -> None:
    """The results (per-sample logs left out) as JSON, atomically; values JSON lacks become strings."""
    kept = {k: v for k, v in results.items() if k != "samples"}
    files.write_text(path, json.dumps(kept, indent=2, sort_keys=True, default=str) + "\n")


def log_metrics(workdir: str, step: int, metrics: dict[str, float]) -> None:
    """One line of `metrics` at `step` appended to the run's metrics.jsonl (process 0)."""
    log = MetricsLog(workdir, enabled=jax.process_index() == 0)
    try:
        log.write(step, metrics)
    finally:
        log.close()
