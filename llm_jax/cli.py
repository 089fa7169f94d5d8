"""Command-line helpers shared by the entry points that take `--config FILE[:arg] --config.KEY=VALUE`
(`llm_jax.main`, `llm_jax.aot`)."""

import sys

from absl import app


def parse_flags(argv):
    """absl's flag parsing; an override of a key the config does not have (`--config.train.num_step=3`)
    becomes a one-line error naming the flag, instead of ml_collections' traceback."""
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError) as e:
        inner = e
        while inner.args and isinstance(inner.args[0], BaseException):
            inner = inner.args[0]
        text = str(inner.args[0]) if inner.args else str(inner)
        key, _, hint = text.partition("\n")
        key = key.strip("'\"")
        bad = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.") and key in a.split("=")[0].split(".")]
        if not bad:
            raise
        sys.exit(
            f"FATAL Flags parsing error: {bad[0]}: the config has no key {key!r}. {hint}".rstrip()
            + " The keys are those of llm_jax/config.py (base_config)."
        )
