"""The command lines' shared edge: host memory set first, expected errors as one line, the traceback on request.

    from llm_jax import cli  # a command module's first import
    ...
    if __name__ == "__main__":
        cli.run(main, "generate")

Importing this module applies llm_jax/runtime/hostmem.py's malloc settings, which must come before
the first thread of numpy or JAX: so every command module imports it first, and it imports neither
at its top (only the standard library, absl, ml_collections and llm_jax/runtime's light modules;
the run config, which imports JAX, where it is used).

A `UserError` (llm_jax/runtime/errors.py), an absl `UsageError` or a flag that does not parse ends the
program with one line on stderr, `<tool>: error: <message>`, and exit status 1. `--debug` (every
tool has it) or `LLM_JAX_DEBUG=1` shows the traceback instead. Any other exception is a bug and
keeps its traceback, whatever the flags.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import ml_collections
from absl import app, flags

from llm_jax.runtime import hostmem
from llm_jax.runtime.errors import BadValue, UserError

DEBUG_ENV = "LLM_JAX_DEBUG"
EXIT_USER_ERROR = 1
_TRACEBACK = "Traceback (most recent call last)"


def keep_freed_memory() -> None:
    """hostmem.keep_freed_memory() for a command line, run at this module's import (see the module
    docstring). A bad LLM_JAX_KEEP_FREED_MEMORY is left to `run`, which reports it in one line."""
    try:
        hostmem.keep_freed_memory()
    except BadValue:
        pass


keep_freed_memory()


def cpu_only_host(environ=os.environ, devices=hostmem.ACCELERATOR_DEVICES) -> None:
    """On a host without a GPU or TPU (JAX_PLATFORMS unset, hostmem.cpu_is_the_platform), tell JAX the
    platform is the CPU: else, with the `tpu` extra installed, JAX starts libtpu, which prints five
    lines of start-up errors (no TPU workers) into every command's output. `llm_jax.aot` still finds
    libtpu: it describes TPU topologies through it whatever JAX's platform is."""
    if not environ.get("JAX_PLATFORMS", "").strip() and hostmem.cpu_is_the_platform(environ, devices):
        environ["JAX_PLATFORMS"] = "cpu"


cpu_only_host()


def debugging(argv: list[str]) -> bool:
    """--debug or LLM_JAX_DEBUG=1; read from argv when the flags did not parse."""
    if os.environ.get(DEBUG_ENV, "").lower() not in ("", "0", "false", "no"):
        return True
    if flags.FLAGS.is_parsed() and "debug" in flags.FLAGS:
        return bool(flags.FLAGS["debug"].value)
    return any(a in ("--debug", "-debug", "--debug=true", "--debug=True", "--debug=1") for a in argv)


def one_line(error: BaseException) -> str:
    """The message on one line. A message that embeds a traceback (ml_collections does, for a config
    file whose get_config raised) keeps its first line and the exception at its end."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if any(_TRACEBACK in line for line in lines):
        return f"{lines[0].rstrip(':')}: {lines[-1]}"
    return " ".join(lines)


def fail(tool: str, error: BaseException) -> None:
    """Prints `<tool>: error: <message>` and exits with EXIT_USER_ERROR."""
    sys.stdout.flush()  # what the run printed so far comes before the error in a merged log
    sys.stderr.write(f"{tool}: error: {one_line(error)}\n")
    sys.stderr.flush()
    sys.exit(EXIT_USER_ERROR)


def run(main: Callable[[list[str]], object], tool: str, flags_parser: Callable | None = None) -> None:
    """`absl.app.run(main)` with expected errors shown as one line (see the module docstring).

    `flags_parser(argv)` parses the flags (default: absl's); it may raise a UserError too.
    """
    if "debug" not in flags.FLAGS:
        flags.DEFINE_bool("debug", False, f"Show the traceback of an expected error too (or set {DEBUG_ENV}=1).")
    parser = flags_parser or flags.FLAGS

    def parse(argv):
        try:
            hostmem.wanted()  # a bad LLM_JAX_KEEP_FREED_MEMORY: one line (keep_freed_memory let it pass)
            return parser(argv)
        except (flags.Error, UserError) as e:
            if debugging(argv):
                raise
            fail(tool, e)

    def guarded(argv):
        try:
            return main(argv)
        except (UserError, app.UsageError) as e:
            if debugging(argv):
                raise
            fail(tool, e)

    app.run(guarded, flags_parser=parse)


def loaded_config(name: str = "config") -> ml_collections.ConfigDict:
    """The ConfigDict of an ml_collections config-file flag. ml_collections defers a file that failed
    to load (missing, a syntax error) to the first use of the config; this names it at once."""
    flag = flags.FLAGS[name]
    config = flag.value
    if isinstance(config, ml_collections.ConfigDict):
        return config
    try:
        config.to_dict()
    except OSError as e:
        cause = str(e.__cause__ or e).strip().splitlines()[-1].strip()  # the OS error, after the paths tried
        raise BadValue(f"--{name}={flag.config_filename}: the config file cannot be loaded ({cause})") from e
    raise BadValue(f"--{name}={flag.config_filename}: get_config() returned {type(config).__name__}, not a ConfigDict")


def parse_config_flags(argv):
    """absl's flag parsing for the commands that take `--config FILE[:arg] --config.KEY=VALUE`
    (`llm_jax.main`, `llm_jax.aot`); an override of a key the config does not have (`--config.train.num_step=3`)
    is a BadValue naming the flag, instead of ml_collections' traceback."""
    from llm_jax.training import config as config_lib  # here, not at the top: it imports JAX (module docstring)

    for arg in argv[1:]:
        renamed = config_lib.renamed_key_message(arg.split("=")[0].removeprefix("--"))
        if renamed and arg.startswith("--config."):
            raise BadValue(f"{arg.split('=')[0]}: {renamed}; use --{renamed.split()[-1]}=VALUE")
    try:
        return flags.FLAGS(argv)
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
        raise BadValue(
            f"{bad[0]}: the config has no key {key!r}. {hint}".rstrip()
            + " The keys are those of llm_jax/training/config.py (base_config)."
        ) from None
