"""Test set-up: force the CPU backend with 8 emulated devices before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

# Prepared data (llm_jax/prepare.py) goes to a fresh cache per test session, never ~/.cache; the
# trainer subprocesses of the tests inherit it.
import tempfile  # noqa: E402

os.environ["LLM_JAX_CACHE"] = tempfile.mkdtemp(prefix="llm_jax_test_cache_")

import jax  # noqa: E402

jax.config.update("jax_platforms", "cpu")

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.environ.get("LLM_JAX_DATA", os.path.join(REPO, "..", "shared", "data"))


@pytest.fixture(scope="session")
def shakespeare_path():
    path = os.path.join(SHARED_DATA, "tinyshakespeare", "input.txt")
    if not os.path.exists(path):
        pytest.skip(f"Tiny Shakespeare not found at {path} (set LLM_JAX_DATA)")
    return path
