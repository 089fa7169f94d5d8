"""Test set-up: force the CPU backend with 8 emulated devices before jax is imported anywhere.

Skips are loud: a test that needs `../shared/data` fails (naming the path and the fix) when it is
missing, and with LLM_JAX_NO_SKIPS=1 (CI's Python 3.11 pass) any skipped test fails the session.
"""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

# Prepared data (llm_jax/data/prepare.py) goes to a fresh cache per test session, never ~/.cache; the
# trainer subprocesses of the tests inherit it, and so do pytest-xdist's workers (`-n 2`: the
# controller loads this file first, so its directories are set when the workers start).
import tempfile  # noqa: E402

if "PYTEST_XDIST_WORKER" not in os.environ or "LLM_JAX_TEST_JIT_CACHE" not in os.environ:
    os.environ["LLM_JAX_CACHE"] = tempfile.mkdtemp(prefix="llm_jax_test_cache_")
    # One persistent compilation cache per session, for this process and the trainer subprocesses
    # (tests/runlib.py): a program compiled by one test (a tiny model's step, say) loads from disk in
    # the next one instead of compiling again.
    os.environ["LLM_JAX_TEST_JIT_CACHE"] = tempfile.mkdtemp(prefix="llm_jax_test_jit_cache_")
JIT_CACHE = os.environ["LLM_JAX_TEST_JIT_CACHE"]

from llm_jax.runtime import hostmem  # noqa: E402 - first: host memory settings before numpy and JAX start threads

hostmem.keep_freed_memory()  # as the command lines do (llm_jax/cli.py); `import llm_jax` alone does not

# isort: split
import jax  # noqa: E402

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_compilation_cache_dir", JIT_CACHE)
# Programs that compile in well under a second recompile faster than a cache entry is written.
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # -1: any size (0 lets JAX pick)

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.environ.get("LLM_JAX_DATA", os.path.join(REPO, "..", "shared", "data"))


@pytest.fixture(scope="session")
def compile_cache():
    """The session's persistent compilation cache directory (for subprocesses that should share it)."""
    return JIT_CACHE


@pytest.fixture(scope="session")
def shakespeare_path():
    path = os.path.join(SHARED_DATA, "tinyshakespeare", "input.txt")
    if not os.path.exists(path):
        pytest.fail(
            f"Tiny Shakespeare not found at {path}: set LLM_JAX_DATA to the folder holding "
            "tinyshakespeare/input.txt, or deselect these tests with -m 'not shared_data'",
            pytrace=False,
        )
    return path


def pytest_sessionfinish(session, exitstatus):
    """LLM_JAX_NO_SKIPS=1: a skipped test fails the session (CI, where every extra is installed)."""
    if os.environ.get("LLM_JAX_NO_SKIPS") != "1":
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if skipped:
        reporter.ensure_newline()
        for report in skipped:
            reporter.write_line(f"LLM_JAX_NO_SKIPS=1 but skipped: {report.nodeid}: {report.longrepr[-1]}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
