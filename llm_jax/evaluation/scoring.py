"""Log-likelihoods of continuations, batched by length and sharded over a run's mesh.

An evaluation request is (context tokens, continuation tokens): the summed log-probability of the
continuation given the context, and whether greedy decoding would have produced it. Requests are
sorted by length (longest first) and cut into batches of `batch_size` rows; each batch is padded
on the right to a bucket length (a power of two or the midpoint of two, at most the model's
`max_length`) and its continuations to a bucket width, so a whole evaluation compiles a handful of programs. Right
padding never changes what a real position sees (attention is causal), so a padded row scores as
it would alone.

Requests that read the same input and differ only in their last target (the answers " A" ... " D"
after one question) share one forward: its last position is read once per answer (lm-eval's `hf`
backend does the same with its logits cache).

A request longer than `max_length + 1` tokens keeps its last ones, as lm-eval's `hf` backend
does: the input is `(context + continuation)[-(max_length + 1):][:-1]`, and a continuation longer
than that input is scored on its last `max_length` tokens.

Multi-host: every process passes the same requests; each places its own shards of a batch and
reads the replicated results.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from llm_jax.models import family as family_lib
from llm_jax.runtime import sharding
from llm_jax.runtime.errors import BadValue

MIN_BUCKET = 16  # shortest padded length: shorter buckets save little and cost a compile each
MAX_ALTERNATIVES = 16  # last tokens read after one shared forward (more make another job)


@dataclasses.dataclass(frozen=True)
class Row:
    """One request as the model reads it: `tokens` (the input, at most max_length) and `targets`,
    the tokens its last len(targets) positions should predict."""

    tokens: tuple[int, ...]
    targets: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Scorer:
    """A model and its params on `mesh` (sharded by `rules`), scored `batch_size` rows at a time
    (rounded up to a multiple of the mesh's data x fsdp x expert size) over at most `max_length` positions."""

    model: Any
    params: Any
    mesh: Mesh
    rules: Any
    max_length: int
    batch_size: int = 16

    def __post_init__(self):
        family = family_lib.of(self.model)
        if type(family).score is family_lib.ModelFamily.score:
            raise BadValue(
                f"evaluation scores next tokens, which model family {family.name!r} does not (it has no `score`); "
                "evaluate a decoder-only run (config.model.family='lm')"
            )

    @property
    def rows_per_batch(self) -> int:
        dp = sharding.data_parallel_size(self.mesh)
        return -(-max(1, self.batch_size) // dp) * dp


def to_row(context: Sequence[int], continuation: Sequence[int], max_length: int) -> Row:
    """(context, continuation) -> the Row the model reads, left-truncated to `max_length` inputs."""
    if not continuation:
        raise BadValue("a loglikelihood request needs a non-empty continuation")
    whole = (list(context) + list(continuation))[-(max_length + 1) :]
    if len(whole) < 2:
        raise BadValue("a loglikelihood request needs at least one token of context (lm-eval adds a prefix token)")
    n = min(len(continuation), len(whole) - 1)
    return Row(tuple(whole[:-1]), tuple(whole[-n:]))


def bucket(n: int, cap: int, least: int = 1) -> int:
    """The padded size of `n`: the next of least, then powers of two and their midpoints (16, 24, 32,
    48, 64, 96, ...: at most a third of a batch is padding, and a few compiles), at most `cap`."""
    size = max(least, 1)
    while size < n:
        half = 1 << (size.bit_length() - 1)  # the power of two at or below `size`
        size = half * 3 // 2 if size == half and half >= 4 else 2 * half
    return min(cap, size)


@functools.lru_cache(maxsize=64)
def _score_fn(model, mesh: Mesh):
    """The jitted score of a batch: results replicated, so every process can read them."""
    rep = NamedSharding(mesh, P())

    def fn(params, tokens, index, targets):
        return family_lib.of(model).score(model, params, tokens, index, targets)

    return jax.jit(fn, out_shardings=(rep, rep))


def _global(array: np.ndarray, mesh: Mesh) -> jax.Array:
    """A host array every process holds in full -> a global array sharded by rows (each process
    places only its own shards)."""
    spec = sharding.rows_sharding(mesh)  # bucket widths need not divide over a sequence axis
    return jax.make_array_from_callback(array.shape, spec, lambda idx: array[idx])


@dataclasses.dataclass(frozen=True)
class _Job:
    """Rows that read the same input and differ only in their last target (multiple-choice answers of
    one token after one context: lm-eval's `hf` backend shares their forward too, its logits cache).
    One forward reads the shared targets once and the last position once per alternative."""

    tokens: tuple[int, ...]
    shared: tuple[int, ...]  # the targets before the last, common to every row of the job
    last: tuple[int, ...]  # each row's last target
    rows: tuple[int, ...]  # the rows (indices into score_rows' list), aligned with `last`

    @property
    def width(self) -> int:
        return len(self.shared) + len(self.last)


def _jobs(rows: Sequence[Row], most: int = MAX_ALTERNATIVES) -> list[_Job]:
    """Rows grouped into jobs (at most `most` alternatives each), in first-appearance order."""
    groups: dict[tuple, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault((row.tokens, row.targets[:-1]), []).append(i)
    jobs = []
    for (tokens, shared), ids in groups.items():
        for k in range(0, len(ids), most):
            part = tuple(ids[k : k + most])
            jobs.append(_Job(tokens, shared, tuple(rows[i].targets[-1] for i in part), part))
    return jobs


def _pack(jobs: Sequence[_Job], n_rows: int, length: int, width: int) -> tuple[np.ndarray, ...]:
    """Jobs -> tokens [n_rows, length], index and targets [n_rows, width] int32. A job's columns are
    the last of `width`: its shared targets' positions, then its last position once per alternative;
    missing rows and columns read position 0 (and are never read back)."""
    tokens = np.zeros((n_rows, length), np.int32)
    index = np.zeros((n_rows, width), np.int32)
    targets = np.zeros((n_rows, width), np.int32)
    for i, job in enumerate(jobs):
        t, s = len(job.tokens), len(job.shared)
        tokens[i, :t] = job.tokens
        index[i, width - job.width :] = [*range(t - 1 - s, t - 1), *[t - 1] * len(job.last)]
        targets[i, width - job.width :] = [*job.shared, *job.last]
    return tokens, index, targets


def score_rows(scorer: Scorer, rows: Sequence[Row]) -> list[tuple[float, bool]]:
    """(summed log-probability of each row's targets, all of them greedy), in the order given."""
    jobs = _jobs(rows)
    jobs.sort(key=lambda j: (-len(j.tokens), -j.width))
    b = scorer.rows_per_batch
    fn = _score_fn(scorer.model, scorer.mesh)
    pending = []
    with sharding.use_mesh(scorer.mesh, scorer.rules):
        for start in range(0, len(jobs), b):
            chunk = jobs[start : start + b]
            length = bucket(max(len(j.tokens) for j in chunk), scorer.max_length, MIN_BUCKET)
            width = bucket(max(j.width for j in chunk), length + MAX_ALTERNATIVES)
            arrays = _pack(chunk, b, length, width)
            out = fn(scorer.params, *(_global(a, scorer.mesh) for a in arrays))
            pending.append((chunk, width, out))  # dispatched: the host packs the next batch meanwhile
    results: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
    for chunk, width, (logp, greedy) in pending:
        logp, greedy = (np.asarray(x.addressable_data(0)) for x in (logp, greedy))
        for j, job in enumerate(chunk):
            first, s = width - job.width, len(job.shared)
            base = float(logp[j, first : first + s].astype(np.float64).sum())
            base_greedy = bool(greedy[j, first : first + s].all())
            for a, i in enumerate(job.rows):
                col = first + s + a
                results[i] = (base + float(logp[j, col]), base_greedy and bool(greedy[j, col]))
    return results


def loglikelihoods(scorer: Scorer, requests: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[tuple[float, bool]]:
    """(log p(continuation | context), greedy) of each (context tokens, continuation tokens)."""
    return score_rows(scorer, [to_row(c, x, scorer.max_length) for c, x in requests])
