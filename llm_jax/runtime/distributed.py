"""Multi-process start-up and preemption notices.

`initialize` starts JAX's own multi-controller runtime (`jax.distributed`): from explicit flags
(coordinator address, process count, process id), or, with none given, by JAX's cluster
auto-detection where the environment says this is one process of a SLURM / Open MPI job or a
multi-host Cloud TPU slice. A plain single-process run initializes nothing.

`Preemption` tells the training loop when to save and stop. A single process catches SIGTERM
itself. Under `jax.distributed`, JAX's preemption service catches it on any process and the
processes agree on one step to stop at (`multihost_utils.reached_preemption_sync_point`), so all
of them save the same step.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import jax

from llm_jax.runtime.errors import BadValue, UserError


def cluster_env_present() -> bool:
    """True where the environment describes a multi-process job that JAX can detect by itself."""
    env = os.environ
    if int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")) or 1) > 1 and "SLURM_JOB_ID" in env:
        return True
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return True
    if env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return True
    hosts = env.get("TPU_WORKER_HOSTNAMES", "") or env.get("TPU_PROCESS_ADDRESSES", "")
    if len([h for h in hosts.split(",") if h.strip()]) > 1:
        return True
    try:  # JAX's own Cloud TPU detectors (a GCE TPU VM learns its slice from the metadata server)
        from jax._src import clusters

        return any(c.is_env_present() for c in clusters.ClusterEnv._cluster_types if "Tpu" in c.__name__)
    except (ImportError, AttributeError):  # private API that moved; the env checks above cover the usual cases
        return False


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    auto: bool = True,
) -> bool:
    """Starts jax.distributed if asked to (flags) or if a cluster is detected; True if started.

    Call before anything touches a JAX backend.
    """
    explicit = bool(coordinator_address) or num_processes is not None or process_id is not None
    if explicit:
        missing = [
            name
            for name, v in (
                ("--coordinator_address", coordinator_address),
                ("--num_processes", num_processes),
                ("--process_id", process_id),
            )
            if v in (None, "")
        ]
        if missing and not cluster_env_present():
            raise BadValue(
                f"multi-process run: also give {', '.join(missing)} (all three of --coordinator_address=HOST:PORT, "
                "--num_processes=N, --process_id=I), or run under SLURM / a TPU slice, where they are detected"
            )
        if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
            raise BadValue(f"--process_id={process_id} must be in [0, --num_processes={num_processes})")
    elif not (auto and cluster_env_present()):
        return False
    if num_processes not in (None, 1) or not explicit:
        try:  # CPU collectives across processes (harmless on GPU/TPU, which bring their own)
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        except (AttributeError, ValueError):  # an option a future JAX may drop (gloo is its default)
            pass
    jax.distributed.initialize(coordinator_address or None, num_processes, process_id)
    return True


def all_processes(ok: bool) -> bool:
    """True if `ok` on every process (a collective: every process must call it)."""
    if jax.process_count() == 1:
        return ok
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


_MESSAGE_BYTES = 2048  # the most of one process's error message the others receive


def all_texts(text: str) -> list[str]:
    """Every process's `text` (up to _MESSAGE_BYTES of UTF-8 each), by process index (a collective)."""
    if jax.process_count() == 1:
        return [text]
    import numpy as np
    from jax.experimental import multihost_utils

    raw = text.encode()[:_MESSAGE_BYTES]
    buf = np.zeros(_MESSAGE_BYTES + 2, np.uint8)  # two bytes of length, then the text
    buf[:2] = divmod(len(raw), 256)
    buf[2 : 2 + len(raw)] = np.frombuffer(raw, np.uint8)
    got = np.asarray(multihost_utils.process_allgather(buf)).reshape(jax.process_count(), -1)
    return [bytes(row[2 : 2 + int(row[0]) * 256 + int(row[1])]).decode(errors="replace") for row in got]


def differing(text: str) -> tuple[list[str], int | None]:
    """(every process's `text`, the first process whose text differs from process 0's, or None): a
    collective, so every process can raise the same message about a host that differs."""
    texts = all_texts(text)
    return texts, next((i for i, t in enumerate(texts) if t != texts[0]), None)


def agree(error: UserError | None) -> None:
    """Raises on every process if `error` is set on any (a collective: every process calls it).

    Where one process alone meets a bad value (a file that differs on its host, a checkpoint that
    does not fit its model), the others would go on into the next collective and wait there for
    ever. Here all of them stop with the same line: the first failing process's message, naming
    it, as the same `UserError` subclass."""
    kind = "" if error is None else f"{type(error).__module__}:{type(error).__qualname__}"
    texts = all_texts("" if error is None else f"{kind}\n{error}")
    failed = [i for i, t in enumerate(texts) if t]
    if not failed:
        return
    if len(texts) == 1:
        raise error
    kind, _, message = texts[failed[0]].partition("\n")
    raise _error_class(kind)(f"process {failed[0]} of {len(texts)}: {message}") from error


def _error_class(kind: str) -> type[UserError]:
    """The UserError subclass named `module:qualname` where this process has that module loaded
    (it runs the same code as the one that raised it), else UserError."""
    module, _, name = kind.partition(":")
    cls = getattr(sys.modules.get(module), name, None)
    return cls if isinstance(cls, type) and issubclass(cls, UserError) else UserError


def agreed(fn, *args, **kwargs):
    """`fn(*args, **kwargs)` on every process, its `UserError` raised on all of them (`agree`)."""
    try:
        out = fn(*args, **kwargs)
    except UserError as e:
        agree(e)
        raise  # not reached: agree raises
    agree(None)
    return out


class Preemption:
    """`reached(step)` is True once a preemption notice (SIGTERM) arrived; all processes agree."""

    def __init__(self):
        # Under jax.distributed, JAX's preemption service owns SIGTERM (its handler is installed by
        # `jax.distributed.initialize`); installing ours would take the notice away from it.
        self._sync = jax.distributed.is_initialized()
        self._flag = threading.Event()
        self._previous = None
        if not self._sync and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self._flag.set()

    def reached(self, step: int) -> bool:
        if self._sync:
            from jax.experimental import multihost_utils

            try:
                return multihost_utils.reached_preemption_sync_point(int(step))
            except RuntimeError:  # the preemption service is disabled (jax_enable_preemption_service)
                self._sync = False
        return self._flag.is_set()

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
