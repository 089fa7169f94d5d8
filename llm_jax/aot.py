"""Pod-scale planning without the pod: compile the train step ahead of time for a TPU topology.

    python -m llm_jax.aot --config configs/llama.py:7b --topology v5p-64
    python -m llm_jax.aot --config configs/gpt2.py:xl --topology v5e-8 --sweep
    python -m llm_jax.aot --config configs/llama.py:1b --topology v5p:2x2x1 --num_slices 2 --dump /tmp/hlo

The report (per-chip memory against HBM, fits or not, compile time, collectives) and the sweep:
llm_jax/tools/aot.py. The last line of stdout is one JSON object.
"""

from llm_jax import cli  # first: it sets host memory before numpy and JAX start threads (llm_jax/cli.py)

# isort: split
import json
import os
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from llm_jax.tools import aot


def define_flags():
    config_flags.DEFINE_config_file("config", None, "Config file: configs/X.py or configs/X.py:arg.", lock_config=True)
    flags.DEFINE_string("topology", None, "TPU slice to compile for: " + aot.ACCEPTED_FORMS + ".")
    flags.DEFINE_integer("num_slices", 1, "Number of such slices (multi-slice over the data-centre network).")
    flags.DEFINE_bool(
        "sweep", False, "Report candidate layouts (mesh splits, expert sizes of an MoE, remat, grad accumulation)."
    )
    flags.DEFINE_list("sweep_axes", list(aot.SWEEP_AXES), f"What --sweep varies, any of {', '.join(aot.SWEEP_AXES)}.")
    flags.DEFINE_string("dump", None, "Directory to write the step's StableHLO and optimized HLO text to.")
    flags.mark_flags_as_required(["config", "topology"])


def main(argv):
    f = flags.FLAGS
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; see --help")
    bad_axes = sorted(set(f.sweep_axes) - set(aot.SWEEP_AXES))
    if bad_axes:
        raise app.UsageError(f"--sweep_axes: unknown {bad_axes}; use any of {', '.join(aot.SWEEP_AXES)}")
    if not os.environ.get("JAX_PLATFORMS"):  # planning needs no accelerator; a TPU VM's chips stay free
        jax.config.update("jax_platforms", "cpu")
    log = lambda s: print(s, file=sys.stderr, flush=True)
    config = cli.loaded_config("config")
    if f.sweep:
        rows = aot.sweep(config, f.topology, f.num_slices, f.sweep_axes, f.dump, log)
        print(aot.format_sweep(rows))
        result = aot.sweep_summary(rows)
    else:
        result = aot.report(config, f.topology, num_slices=f.num_slices, dump_dir=f.dump, log=log)
        print(aot.format_report(result))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    define_flags()
    cli.run(main, "aot", flags_parser=cli.parse_config_flags)
