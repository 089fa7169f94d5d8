"""Training-step benchmark: `python -m llm_jax.bench --config configs/X.py[:arg] [--config.K=V ...] [--steps N]`.

Compiles the trainer's own train step for the config and times it on random tokens; the last line
of stdout is one JSON object (its fields: llm_jax/tools/bench.py).
"""

from llm_jax import cli  # first: it sets host memory before numpy and JAX start threads (llm_jax/cli.py)

# isort: split
import json

from absl import app, flags
from ml_collections import config_flags

from llm_jax.tools import bench


def main(argv):
    f = flags.FLAGS
    if len(argv) > 1:
        raise app.UsageError(
            f"unexpected arguments {argv[1:]}; options are --config, --steps, --warmup, --config.KEY=VALUE"
        )
    if f.steps < 1:
        raise app.UsageError(f"--steps={f.steps} must be at least 1")
    result = bench.run(cli.loaded_config("config"), f.steps, f.warmup)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, "Config file: configs/X.py or configs/X.py:arg.", lock_config=True)
    flags.DEFINE_integer("steps", 10, "Timed training steps.")
    flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
    flags.mark_flags_as_required(["config"])
    cli.run(main, "bench")
