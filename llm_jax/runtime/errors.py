"""The errors a user can fix from the message alone.

Every check at the edge (config keys and values, flags, the mesh, paths, data, a workdir holding
another run or in use, a checkpoint that does not fit, a run that diverged) raises a subclass of
`UserError` whose message names the bad value and the fix. The command lines print such an error
as one line, `<tool>: error: <message>`, without a traceback (`llm_jax/cli.py`); any other
exception is a bug and keeps its traceback.

Each class also derives from the built-in type the check raised before it existed (ValueError,
FileNotFoundError, ...), so code that catches those keeps working. Raise these at the place that
knows what went wrong; never catch a broad built-in type to re-raise it as one, which would give a
genuine bug a clean one-line disguise.
"""


class UserError(Exception):
    """Base of the expected, explained failures (see the module docstring)."""


class BadValue(UserError, ValueError):
    """A value the user gave that cannot work: a config key or value, a flag, the mesh, the data, the model."""


class NotFound(UserError, FileNotFoundError):
    """A path the user named (or a run needs) that is not there."""


class AlreadyExists(UserError, FileExistsError):
    """A path that must not exist yet (e.g. checkpoints in the workdir an import writes)."""


class FileError(UserError, OSError):
    """A path that is there but cannot be used: unreadable data, a workdir that cannot be written."""


class Unavailable(UserError, RuntimeError):
    """Something the run needs that exists but cannot be used now: a dataset not prepared, no readable checkpoint."""


class WorkdirBusy(UserError, RuntimeError):
    """Another run holds the workdir's lock (llm_jax/training/workdir.py)."""


class Diverged(UserError, FloatingPointError):
    """The training loss became non-finite or spiked; nothing after the last good checkpoint was saved."""
