"""llm_jax: sharded Transformer language models in JAX/Flax."""

from llm_jax.runtime import hostmem
from llm_jax.runtime.errors import BadValue

__version__ = "0.1.0"

# On a CPU host, before numpy or JAX start threads: keep freed step memory for reuse (hostmem.py).
try:
    hostmem.keep_freed_memory()
except BadValue:  # importing still works; the command lines stop on it with one line (cli.py)
    pass
