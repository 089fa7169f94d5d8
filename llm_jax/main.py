"""Entry point: `python -m llm_jax.main --config configs/X.py[:arg] --workdir DIR [--config.a.b=V ...]`.

The only absl flags of the trainer live here. The config file's `get_config(arg)` builds the
config, command-line overrides are applied to it, and a key that does not exist is an error.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from llm_jax import train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file: configs/X.py or configs/X.py:arg.", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, config.json, metrics, tokenizer. Resumed if present.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; options are --config, --workdir and --config.KEY=VALUE")
    # Orbax logs every save step at INFO; our own progress lines are printed, so keep absl quiet.
    logging.set_verbosity(logging.WARNING)
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
