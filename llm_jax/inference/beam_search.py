"""Beam search over a model family's decoding step, jitted and batched.

Written once over the family interface (llm_jax/models/family.py): `init_cache` and `tokens_to_logits`,
the same step the samplers of `llm_jax.inference.decode` use. The first step (BOS) runs once per sentence,
so whatever the cache computes once (the encoder-decoder's cross-attention keys and values) is
computed for the sentence, then the cache is repeated for its beams; afterwards every step feeds
the `beam_size` alive hypotheses and keeps, among their 2 * beam_size best extensions, the best
`beam_size` that do not end in EOS (alive) and the best that do (finished, scored with the
GNMT length penalty ((5 + length) / 6) ** alpha). A row stops once no alive hypothesis can beat
its best finished one; the result is each row's best finished hypothesis (its best alive one if
none finished within `max_new_tokens`).

With beam_size=1 and length_penalty=0 this is exactly greedy decoding.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax
import jax
import jax.numpy as jnp

from llm_jax.models import family as family_lib
from llm_jax.runtime.errors import BadValue

_NEG = -1e9  # the score of an impossible hypothesis (finite: arithmetic on it stays finite)


class Beams(NamedTuple):
    """What `beam_search` returns."""

    tokens: jax.Array  # [b, max_new_tokens] int32, the best hypothesis of each row; pad_id after its EOS
    lengths: jax.Array  # [b] int32 tokens of it, EOS included
    scores: jax.Array  # [b] float32 its log-probability divided by the length penalty


class _State(NamedTuple):
    i: jax.Array  # tokens chosen so far (the next position to fill)
    alive: jax.Array  # [b, k, T] alive hypotheses
    alive_logp: jax.Array  # [b, k]
    finished: jax.Array  # [b, k, T]
    finished_score: jax.Array  # [b, k]
    logp_next: jax.Array  # [b, k, v] log-probabilities of each alive hypothesis' next token
    cache: family_lib.Cache  # batch b * k


def length_penalty(length, alpha):
    """GNMT's ((5 + length) / 6) ** alpha."""
    return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def _batch_axis(spec) -> int:
    """The axis named 'cache_batch' in a leaf's logical PartitionSpec, or -1."""
    names = tuple(spec) if spec is not None else ()
    return names.index("cache_batch") if "cache_batch" in names else -1


def _map_batch(cache: family_lib.Cache, fn) -> family_lib.Cache:
    """Applies fn(leaf, batch_axis) to every cache leaf that has a batch axis (and to next_pos)."""
    specs = flax.core.unfreeze(cache.specs)
    axes = jax.tree.map(_batch_axis, specs, is_leaf=lambda x: x is None or isinstance(x, tuple))
    layers = jax.tree.map(lambda x, ax: x if ax < 0 else fn(x, ax), cache.layers, axes)
    return cache.replace(layers=layers, next_pos=fn(cache.next_pos, 0))


def expand(cache: family_lib.Cache, k: int) -> family_lib.Cache:
    """Every row repeated k times (row r becomes rows r*k .. r*k + k - 1)."""
    return _map_batch(cache, lambda x, ax: jnp.repeat(x, k, axis=ax))


def gather(cache: family_lib.Cache, origin: jax.Array) -> family_lib.Cache:
    """Rows of a [b * k] cache chosen by `origin` [b, k] (each new beam's parent beam)."""
    b, k = origin.shape
    flat = (jnp.arange(b)[:, None] * k + origin).reshape(-1)
    return _map_batch(cache, lambda x, ax: jnp.take(x, flat, axis=ax))


def _take(x, idx):
    """x [b, k, ...], idx [b, n] -> [b, n, ...]."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def _select(s: _State, alpha, eos: int) -> tuple[_State, jax.Array]:
    """Extends every alive hypothesis by one token; returns the new state (cache not yet gathered)
    and each new alive beam's parent [b, k]."""
    b, k, v = s.logp_next.shape
    cand_logp, cand = jax.lax.top_k((s.alive_logp[..., None] + s.logp_next).reshape(b, k * v), 2 * k)
    parent, token = cand // v, (cand % v).astype(jnp.int32)
    seqs = _take(s.alive, parent).at[:, :, s.i].set(token)  # [b, 2k, T]
    ended = token == eos
    fin_score = jnp.where(ended, cand_logp / length_penalty(s.i + 1, alpha), _NEG)
    all_scores = jnp.concatenate([s.finished_score, fin_score], axis=1)
    fin_score, fin_idx = jax.lax.top_k(all_scores, k)
    finished = _take(jnp.concatenate([s.finished, seqs], axis=1), fin_idx)
    alive_logp, alive_idx = jax.lax.top_k(jnp.where(ended, _NEG, cand_logp), k)
    new = s._replace(
        i=s.i + 1, alive=_take(seqs, alive_idx), alive_logp=alive_logp, finished=finished, finished_score=fin_score
    )
    return new, _take(parent, alive_idx)


def beam_search(
    model, params, batch: int, *, beam_size: int, max_new_tokens: int, bos_id: int, eos_id: int,
    length_penalty: float = 0.6, pad_id: int = 0, mesh=None, **inputs,
) -> Beams:  # fmt: skip
    """The best hypothesis of each of `batch` rows, started from BOS. `inputs`: what the family's
    `init_cache` needs (the encoder-decoder's `source` [b, s]). Compiled once per (model, batch,
    input shapes, beam_size, max_new_tokens, ids, mesh); `length_penalty` is traced."""
    if beam_size < 1 or max_new_tokens < 1:
        raise BadValue(f"beam_size={beam_size} and max_new_tokens={max_new_tokens} must be at least 1")
    return _beam_search(
        model, params, jnp.float32(length_penalty), inputs, batch=batch, k=beam_size, steps=max_new_tokens,
        bos=bos_id, eos=eos_id, pad=pad_id, mesh=mesh,
    )  # fmt: skip


@functools.partial(jax.jit, static_argnames=("model", "batch", "k", "steps", "bos", "eos", "pad", "mesh"))
def _beam_search(model, params, alpha, inputs, *, batch, k, steps, bos, eos, pad, mesh) -> Beams:
    family = family_lib.of(model)
    step = family.tokens_to_logits(model, params)
    start = jnp.zeros((batch,), jnp.int32)
    # BOS and steps - 1 chosen tokens are fed; one more slot for the last (unused) feed of the loop.
    cache = family.init_cache(model, params, batch, steps + 1, start, mesh=mesh, **inputs)
    logits, cache = step(jnp.full((batch, 1), bos, jnp.int32), cache)  # once per sentence
    logp = jax.nn.log_softmax(logits)
    first = jnp.full((batch, k), _NEG).at[:, 0].set(0.0)  # one live hypothesis: its copies are impossible
    s = _State(
        i=jnp.int32(0), alive=jnp.full((batch, k, steps), pad, jnp.int32), alive_logp=first,
        finished=jnp.full((batch, k, steps), pad, jnp.int32), finished_score=jnp.full((batch, k), _NEG),
        logp_next=jnp.broadcast_to(logp[:, None], (batch, k, logp.shape[-1])), cache=expand(cache, k),
    )  # fmt: skip

    def running(s: _State):
        # No alive hypothesis can beat a row's best finished one: its log-probability only falls,
        # and the length penalty is largest at the last step.
        best_possible = s.alive_logp[:, 0] / length_penalty(steps, alpha)
        return (s.i < steps) & ~jnp.all(best_possible < s.finished_score[:, 0])

    def body(s: _State) -> _State:
        s, parent = _select(s, alpha, eos)
        cache = gather(s.cache, parent)
        tokens = jax.lax.dynamic_slice_in_dim(s.alive, s.i - 1, 1, axis=2).reshape(batch * k, 1)
        logits, cache = step(tokens, cache)  # (the last one is never used)
        return s._replace(logp_next=jax.nn.log_softmax(logits).reshape(batch, k, -1), cache=cache)

    s = jax.lax.while_loop(running, body, s)
    any_finished = s.finished_score[:, 0] > _NEG / 2
    alive_score = s.alive_logp[:, 0] / length_penalty(s.i, alpha)
    tokens = jnp.where(any_finished[:, None], s.finished[:, 0], s.alive[:, 0])
    is_eos = tokens == eos
    lengths = jnp.where(jnp.any(is_eos, axis=1), jnp.argmax(is_eos, axis=1) + 1, s.i).astype(jnp.int32)
    tokens = jnp.where(jnp.arange(steps)[None] < lengths[:, None], tokens, pad)
    return Beams(tokens, lengths, jnp.where(any_finished, s.finished_score[:, 0], alive_score))
