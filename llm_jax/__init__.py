"""llm_jax: sharded Transformer language models in JAX/Flax.

Importing it changes nothing in the process. The command lines (`python -m llm_jax.<name>`) set the
C library to keep freed memory on a CPU host; a notebook or script does it with
`llm_jax.runtime.hostmem.keep_freed_memory()`, called before numpy and JAX are imported
(llm_jax/runtime/hostmem.py).
"""

__version__ = "0.1.0"
