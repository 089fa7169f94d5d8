"""Entry point: `python -m llm_jax.main --config configs/X.py[:arg] --workdir DIR [--config.a.b=V ...]`.

The only absl flags of the trainer live here. The config file's `get_config(arg)` builds the
config, command-line overrides are applied to it, and a key that does not exist is an error.

Multi-process (one process per host, JAX's own runtime): give every process the same command plus
`--coordinator_address=HOST0:PORT --num_processes=N --process_id=I`; under SLURM, Open MPI or on a
multi-host Cloud TPU slice these are detected and the flags can be left out.

SIGTERM (preemption) finishes the current step, saves a checkpoint and exits 0; the same command
resumes. A workdir holding another model's run is refused unless `--config.train.overwrite=True`,
which moves it aside (never deletes it). A workdir in use by another run is refused at once, naming
that run, or waited for with `--config.train.wait_for_lock=SECONDS` (llm_jax/training/workdir.py).

A mistake in the input (a config key or value, the mesh, the data, the workdir) ends with one line,
`main: error: ...`, and exit status 1; `--debug` or LLM_JAX_DEBUG=1 shows its traceback (llm_jax/cli.py).
"""

from llm_jax import cli  # first: it sets host memory before numpy and JAX start threads (llm_jax/cli.py)

# isort: split
from absl import app, flags, logging
from ml_collections import config_flags

from llm_jax.evaluation import periodic
from llm_jax.runtime import distributed

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file: configs/X.py or configs/X.py:arg.", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, config.json, metrics, tokenizer. Resumed if present.")
flags.DEFINE_string("coordinator_address", None, "Multi-process: HOST:PORT of process 0 (jax.distributed).")
flags.DEFINE_integer("num_processes", None, "Multi-process: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-process: this process's index, 0..num_processes-1.")
flags.DEFINE_bool(
    "auto_distributed", True, "Initialize jax.distributed when SLURM / Open MPI / a TPU slice is detected."
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; options are --config, --workdir and --config.KEY=VALUE")
    # Orbax logs every save step at INFO; our own progress lines are printed, so keep absl quiet.
    logging.set_verbosity(logging.WARNING)
    config = cli.loaded_config("config")
    distributed.initialize(
        FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id, auto=FLAGS.auto_distributed
    )
    periodic.train_and_evaluate(config, FLAGS.workdir)  # training.loop's, with config.train.eval_tasks


if __name__ == "__main__":
    cli.run(main, "main", flags_parser=cli.parse_config_flags)
