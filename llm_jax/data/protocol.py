"""What every data source offers the trainer, and which rows of a global batch each process reads.

A data source (`LMData`, `PromptCompletionData` in llm_jax/data/lm_data.py, `ParallelData` in
llm_jax/data/parallel.py) is whatever `load_data` returns: its tokenizer, a check of the run's
sequence length, the training batch of a step and a fixed set of evaluation batches, each batch a
dict of numpy arrays [rows, seq_len]. Batches are pure functions of (seed, step), so every process
can compute the global batch's row choice and build only its own rows: `rows_of` is the one rule
for which rows those are.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from llm_jax.data import tokenizer as tok_lib


def rows_of(batch, process_index: int, process_count: int):
    """This process's contiguous block of a global batch: rows [i * n/p, (i + 1) * n/p) of an array
    [n, ...], or of every array in a dict of them (all [n, ...]).

    The blocks of processes 0, 1, ... concatenated are the global batch, which is what
    `sharding.host_to_global` assembles. `n` must divide by `p` (the trainer checks batch sizes).
    """
    if isinstance(batch, dict):
        return {k: rows_of(v, process_index, process_count) for k, v in batch.items()}
    rows = len(batch) // process_count
    return batch[process_index * rows : (process_index + 1) * rows]


@runtime_checkable
class DataSource(Protocol):
    """The interface of every data source (see the module docstring)."""

    tokenizer: tok_lib.Tokenizer

    def check(self, seq_len: int) -> None:
        """Raises BadValue, naming the fix, if the data cannot feed windows of `seq_len` tokens."""
        ...

    def train_batch(
        self, step: int, global_batch: int, seq_len: int, seed: int, process_index: int = 0, process_count: int = 1
    ) -> dict[str, np.ndarray]:
        """`rows_of` the global training batch of `step`: arrays [global_batch / process_count, seq_len]."""
        ...

    def eval_batches(
        self, num_batches: int, global_batch: int, seq_len: int, seed: int, process_index: int = 0,
        process_count: int = 1,
    ) -> list[dict[str, np.ndarray]]:  # fmt: skip
        """`rows_of` each of a fixed set of evaluation batches (the same every evaluation, so evals compare)."""
        ...
