"""`python -m llm_jax.prepare --config configs/X.py [--config.data.KEY=VALUE ...] [--workdir DIR]`.

Tokenizes a config's data source ahead of training into the prepared-data cache and prints one
JSON line (directory, tokens per split, seconds). What is prepared, where, and how it resumes:
llm_jax/data/prepare.py. The trainer prepares on first use by itself; this is for preparing ahead
(e.g. once, before a multi-host run).
"""

from llm_jax import cli  # first: it sets host memory before numpy and JAX start threads (llm_jax/cli.py)

# isort: split
import json
import time

from absl import app, flags
from ml_collections import config_flags

from llm_jax.data import prepare as prepare_lib
from llm_jax.training import config as config_lib
from llm_jax.training import workdir as workdir_lib


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; use --config and --config.data.KEY=VALUE")
    config = cli.loaded_config("config")
    config_lib.check_keys(config)
    config_lib.check_data(config.data)
    wd = flags.FLAGS.workdir
    tok_dir = workdir_lib.tokenizer_dir(wd) if wd and workdir_lib.has_tokenizer(wd) else None
    t0 = time.time()
    directory, manifest, _ = prepare_lib.prepare(config.data, tok_dir, log=print)
    summary = {k: manifest["splits"][k]["tokens"] for k in prepare_lib.SPLITS}
    print(json.dumps({"directory": directory, "tokens": summary, "seconds": round(time.time() - t0, 1)}))


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, "Config file: configs/X.py or configs/X.py:arg.")
    flags.DEFINE_string("workdir", None, "Optional: a run directory whose tokenizer to use (as a resumed run would).")
    flags.mark_flags_as_required(["config"])
    cli.run(main, "prepare")
