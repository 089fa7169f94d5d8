"""Evaluation of a run (trained by llm_jax.main or imported by llm_jax.convert from_hf):

    python -m llm_jax.evaluate --workdir runs/x --tasks hellaswag,arc_easy,lambada_openai
        [--num_fewshot K] [--limit N] [--include_path DIR] [--batch_size B] [--output FILE]
    python -m llm_jax.evaluate --workdir runs/x --perplexity 'data/*.txt' [--stride S] [--output FILE]
    python -m llm_jax.evaluate --workdir runs/x --perplexity val   # the run's own validation text

`--tasks`: lm-evaluation-harness tasks (the `eval` extra), by name or as task YAML files; the
harness's table is printed, its JSON results written to `--output` (default
workdir/eval/results-<step>.json), and the scores appended to the run's metrics.jsonl
(`tasks/<task>/<metric>`, drawn by llm_jax.plot). `--perplexity`: token perplexity and bits per byte
of a text file or glob (each file one document) over a sliding window of the run's trained context
and `--stride` (default: the window, what lm-eval's rolling log-likelihood does); lm-eval is not needed.
`--quant int8|int4`: the same with weight-only integer kernels (`saved_run.quantized`); the results
file is then `<kind>-<step>-int8.json` and the metrics `int8/tasks/...`, beside the float ones.

Only reads the run (no lock) besides the metrics line and the results file. A mistake (no such
run, an unknown task, a task whose data cannot be fetched offline) is one line, `evaluate: error: ...`.
"""

from __future__ import annotations

from llm_jax import cli  # first: it sets host memory before numpy and JAX start threads (llm_jax/cli.py)

# isort: split
import json
import os

from absl import app, flags, logging

from llm_jax.evaluation import corpus, perplexity, report, scoring
from llm_jax.runtime.errors import BadValue
from llm_jax.training.saved_run import check_quant, load_run, quantized

FLAGS = flags.FLAGS


def define_flags():
    """The command's flags, defined only when run as a program (importing it defines none)."""
    flags.DEFINE_string("workdir", None, "Run directory of llm_jax.main or llm_jax.convert from_hf.")
    flags.DEFINE_list("tasks", [], "lm-eval task or group names, or task YAML files, comma-separated.")
    flags.DEFINE_integer("num_fewshot", None, "Few-shot examples per task (default: each task's own).")
    flags.DEFINE_float("limit", None, "At most this many examples per task (a fraction if < 1): a quick check.")
    flags.DEFINE_string("include_path", None, "A directory of extra task YAML files.")
    flags.DEFINE_integer("batch_size", 32, "Requests scored or generated together (rounded up to the mesh).")
    flags.DEFINE_integer("max_gen_toks", 256, "New tokens at most for generation tasks that set none.")
    flags.DEFINE_string(
        "perplexity", None, "A text file or glob, or 'val' (the run's own validation text): perplexity, bits per byte."
    )
    flags.DEFINE_integer("stride", None, "Perplexity: tokens predicted per window after the first (default: window).")
    flags.DEFINE_integer("step", None, "Checkpoint step to load (default: the latest).")
    flags.DEFINE_string("quant", "none", "Weight-only quantized kernels: none, int8 or int4 (per-channel scales).")
    flags.DEFINE_string("output", None, "JSON results file (default: workdir/eval/<kind>-<step>.json).")
    flags.mark_flags_as_required(["workdir"])


def _output(run, kind: str) -> str:
    quant = "" if FLAGS.quant == "none" else f"-{FLAGS.quant}"
    path = FLAGS.output or os.path.join(run.workdir, "eval", f"{kind}-{run.step}{quant}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return path


def _log(run, metrics: dict) -> None:
    """The scores into the run's metrics.jsonl; those of quantized weights apart (`int8/tasks/...`)."""
    if FLAGS.quant != "none":
        metrics = {f"{FLAGS.quant}/{k}": v for k, v in metrics.items()}
    report.log_metrics(run.workdir, run.step, metrics)


def run_perplexity(run) -> None:
    own = FLAGS.perplexity == "val"
    texts = corpus.validation_texts(run.config.data) if own else corpus.read_texts(FLAGS.perplexity)
    codec = corpus.Codec.of_run(run.tokenizer, run.workdir)
    scorer = scoring.Scorer(run.model, run.params, run.mesh, run.rules, run.context, FLAGS.batch_size)
    measures = perplexity.perplexity(scorer, codec.encode, texts, codec.prefix, FLAGS.stride)
    measures["source"] = FLAGS.perplexity
    print(report.perplexity_table(measures, FLAGS.perplexity))
    path = _output(run, "perplexity")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(measures, f, indent=2)
    _log(run, report.perplexity_metrics(measures))
    print(f"wrote {path}")


def run_tasks(run) -> None:
    from llm_jax.evaluation import harness, tasks  # lm-eval (the `eval` extra) only for tasks

    lm = harness.LlmJaxLM(run, batch_size=FLAGS.batch_size, max_gen_toks=FLAGS.max_gen_toks)
    limit = None if FLAGS.limit is None else (FLAGS.limit if FLAGS.limit < 1 else int(FLAGS.limit))
    results = tasks.evaluate(
        lm, FLAGS.tasks, num_fewshot=FLAGS.num_fewshot, limit=limit, include_path=FLAGS.include_path
    )
    print(report.results_table(results))
    path = _output(run, "results")
    report.write_json(path, results)
    _log(run, report.task_metrics(results))
    print(f"wrote {path}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    logging.set_verbosity(logging.ERROR)  # orbax reports every read at INFO/WARNING
    if bool(FLAGS.tasks) == bool(FLAGS.perplexity):
        raise BadValue("give either --tasks T1,T2 (lm-eval tasks) or --perplexity FILE_OR_GLOB")
    check_quant(FLAGS.quant)
    if FLAGS.tasks:  # an unknown task fails before the run is loaded
        from llm_jax.evaluation import tasks

        tasks.resolve(FLAGS.tasks, FLAGS.include_path)
    run = quantized(load_run(FLAGS.workdir, FLAGS.step), FLAGS.quant)
    run_perplexity(run) if FLAGS.perplexity else run_tasks(run)


if __name__ == "__main__":
    define_flags()
    cli.run(main, "evaluate")
