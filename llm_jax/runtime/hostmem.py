"""Host memory for the CPU backend: keep freed buffers in the process for the next step to reuse.

XLA on CPU allocates each step's temporaries (343 MB for configs/bench_cpu.py: the activations,
1.35 GB for configs/multi30k_ende.py) with the C library's malloc from its worker threads and
frees them when the step ends. glibc serves blocks that large with a fresh `mmap` (a worker
thread's own arena cannot hold them) and returns them with `munmap`, so every step page-faults
its whole working set in again: bench_cpu made 90,000 minor faults per step (its temporaries are
84,000 pages) and spent a quarter of its CPU time in the kernel. Three glibc malloc settings keep
that memory in the process instead:

    M_ARENA_MAX 1          every thread allocates from the main arena, which grows with brk,
    M_MMAP_MAX 0           never with a private mmap,
    M_TRIM_THRESHOLD -1    and keeps what is freed rather than returning it (mallopt(3))

Measured on the 2-core CPU machine (experiments/README.md; `experiments/ab_bench.py`, 3 alternating
rounds): the bench_cpu step 1.26x faster, GPT-2 small 1.15x, the translation step 1.41x, faults
per step from 90,000 / 437,000 / 348,000 to about none; the default run (configs/default.py)
156 -> 106 s wall. Results are bit-identical (where memory comes from changes no arithmetic).
The heap reaches its steady size within the first 1 - 3 steps (which fault as before: the order
in which threads free varies); after that a step faults in no page. The costs: the process keeps
the peak of its heap (bench_cpu's resident size 0.9 - 1.5 GB over runs, against 1.0 GB without),
and all threads share one arena, which makes XLA's compilation about 15% slower (bench_cpu's step:
2.2 -> 2.6 s; the one arena is what costs it, and it is also what removes the faults).

Threads pick their arena at their first allocation, and an arena made before these settings
stays in use (glibc may hand it to later threads): applied after numpy or JAX started threads,
the translation step still faulted 57,000 pages a step. So it must run before numpy and JAX are
imported. Every command line (`python -m llm_jax.<name>`) does it first thing: its module's first
import is llm_jax/cli.py, which applies it. `import llm_jax` does not: a library must not change
the malloc of the program that imports it. A notebook or script asks for it explicitly, first:

    from llm_jax.runtime import hostmem
    hostmem.keep_freed_memory()  # before importing numpy, JAX or the rest of llm_jax

It is applied only where the CPU is JAX's platform: `JAX_PLATFORMS` starts with `cpu`, or it is
unset and the host shows no GPU or TPU device (unmeasured there, and one shared arena could slow
a threaded input pipeline). `LLM_JAX_KEEP_FREED_MEMORY=0` turns it off, `=1` forces it.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys

from llm_jax.runtime.errors import BadValue

ENV = "LLM_JAX_KEEP_FREED_MEMORY"
# mallopt parameters from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))  # -1: never trim (mallopt(3))
ACCELERATOR_DEVICES = ("/dev/nvidia[0-9]*", "/dev/accel[0-9]*", "/dev/vfio/[0-9]*", "/dev/kfd")

_applied: bool | None = None


def cpu_is_the_platform(environ=os.environ, devices=ACCELERATOR_DEVICES) -> bool:
    """Whether JAX will compute on the CPU: JAX_PLATFORMS says so, or no accelerator is present."""
    platforms = environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not any(glob.glob(pattern) for pattern in devices)


def wanted(environ=os.environ) -> bool:
    """The decision of the module docstring, with LLM_JAX_KEEP_FREED_MEMORY first."""
    value = environ.get(ENV, "").strip().lower()
    if value in ("0", "false", "no"):
        return False
    if value in ("1", "true", "yes"):
        return True
    if value:
        raise BadValue(f"{ENV}={environ[ENV]!r}: use 1 (keep freed memory) or 0 (the C library's default)")
    return cpu_is_the_platform(environ)


def keep_freed_memory() -> bool:
    """Applies the settings of the module docstring once, where wanted; True when they are in force.

    Call it before importing numpy or JAX (see the module docstring); the command lines do
    (llm_jax/cli.py). Not glibc (macOS, musl): nothing to do, False. A bad LLM_JAX_KEEP_FREED_MEMORY
    raises BadValue on the first call only (the command lines check it again, llm_jax/cli.py).
    """
    global _applied
    if _applied is None:
        _applied = False
        if sys.platform.startswith("linux") and wanted():
            libc = ctypes.CDLL(None)  # the C library Python runs on (find_library would spawn ldconfig)
            if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt"):
                _applied = all(libc.mallopt(param, value) == 1 for param, value in SETTINGS)
    return _applied


def in_force() -> bool:
    """Whether keep_freed_memory() has applied the settings in this process (never applies them: by
    the time a report asks, numpy and JAX have started their threads)."""
    return bool(_applied)
