"""Autoregressive generation over a model family's decoding step, of any length.

Everything here is written over the family interface (llm_jax/models/family.py): `init_cache` and the
step `tokens_to_logits(tokens, cache) -> (logits, cache)`. One prefill of the prompts, then one
token per step inside a compiled `lax.while_loop`: greedy, temperature, top-k and top-p (nucleus)
sampling, stop tokens; `complete` is the text-in/text-out adapter that the trainer's samples and
the generate CLI use.

Context: a model is never fed a position at or past `context`, the longest context it was trained
at (the run's `data.seq_len`; for an imported checkpoint its pre-training context). While prompt
plus generation fit, every new token costs one cached step. Past that, the window slides: each new
token is predicted from the most recent `context` tokens, re-prefilled at positions 0..context-1
into a fresh cache, exactly what a model without a cache that crops its input to the last
`context` tokens computes (nanoGPT's `generate`), so the 400th token is as good as the 40th.

Prompts of different lengths are left-padded to a common length P; a row with n pads starts at
position -n, and negative positions are never attended, so each row generates what it would alone.
The cache is sharded like the activations that fill it (batch over data x fsdp, kv heads over
tensor) on the params' mesh (`complete` finds it) or the `mesh` argument of `generate`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from llm_jax.models import family as family_lib
from llm_jax.runtime.errors import BadValue


class Generation(NamedTuple):
    """What `generate` returns."""

    tokens: jax.Array  # [b, max_new_tokens] int32; after a row's stop token, pad_id
    lengths: jax.Array  # [b] int32: new tokens of each row, its stop token included


def sample_logits(logits: jax.Array, rng: jax.Array, temperature, top_k=0, top_p=1.0) -> jax.Array:
    """logits [b, v] -> token ids [b] int32.

    Temperature 0 is greedy (argmax). Otherwise the logits are divided by the temperature, cut to
    the `top_k` largest (0 = off) and then to the smallest set whose probability reaches `top_p`
    (1.0 = off), and one token is drawn per row. The three settings may be Python numbers or traced
    scalars (one compiled loop serves every setting); a Python temperature of 0 skips the sampling
    code altogether.
    """
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if isinstance(temperature, int | float) and temperature <= 0.0:
        return greedy
    temperature = jnp.asarray(temperature, jnp.float32)
    logits = logits.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)
    v = logits.shape[-1]
    sorted_logits = -jnp.sort(-logits, axis=-1)  # [b, v], descending
    # top-k: nothing below the k-th largest logit.
    k = jnp.clip(jnp.asarray(top_k, jnp.int32), 0, v)
    kth = jnp.where(k > 0, sorted_logits[:, jnp.maximum(k - 1, 0)], -jnp.inf)[:, None]  # [b, 1]
    # top-p over what top-k left: a token stays if the mass ranked above it is still below top_p,
    # so the most likely token always stays and the kept set is the smallest reaching top_p.
    probs = jax.nn.softmax(jnp.where(sorted_logits >= kth, sorted_logits, -jnp.inf), axis=-1)
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
    cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    cutoff = jnp.where(jnp.asarray(top_p) < 1.0, cutoff, -jnp.inf)
    logits = jnp.where(logits >= jnp.maximum(kth, cutoff), logits, jnp.finfo(jnp.float32).min)
    sampled = jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)
    return jnp.where(temperature > 0.0, sampled, greedy)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> (tokens [b, P] left-padded, start [b]: -(pads in the row), the first position)."""
    if not len(prompts) or any(len(p) == 0 for p in prompts):
        raise BadValue("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p) :] = p
    return tokens, np.asarray([len(p) - width for p in prompts], np.int32)


def params_mesh(params) -> Mesh | None:
    """The mesh the params are sharded over (NamedSharding), or None (e.g. numpy or one device)."""
    for leaf in jax.tree.leaves(params):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding):
            return sharding.mesh
    return None


def crop(tokens, start, context: int):
    """Left-padded prompts cut to their last `context` tokens (the model never sees more)."""
    p = tokens.shape[1]
    if p <= context:
        return tokens, start
    lengths = np.minimum(np.asarray(start) + p, context)
    return tokens[:, p - context :], (lengths - context).astype(np.int32)


def generate(
    model,
    params,
    tokens,
    start,
    rng: jax.Array,
    *,
    max_new_tokens: int,
    context: int | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_ids: Sequence[int] = (),
    pad_id: int = 0,
    mesh: Mesh | None = None,
    **inputs,
) -> Generation:
    """Continues left-padded prompts (tokens [b, P] and start [b], from `left_pad`).

    `inputs`: what the family's `init_cache` needs besides the prompt (the encoder-decoder's
    `source` [b, s]; the prompt is then the decoder's, e.g. BOS).

    `context`: the longest context the model was trained at (default `model.cfg.max_len`); longer
    prompts keep their last `context` tokens and generation slides its window past it. A row stops
    after it emits any id in `stop_ids` (its later slots hold `pad_id`); the loop ends when every
    row has stopped or after `max_new_tokens`. The token of step i is drawn with `fold_in(rng, i)`:
    the same rng, prompts and settings give the same tokens. `mesh` (with `nn.logical_axis_rules`
    in force) is where the cache is sharded; None leaves it to the context.

    Compiled once per (model, batch, P, max_new_tokens, context, greedy or not, stop_ids, pad_id,
    mesh): the sampling settings are traced, so changing them does not recompile.
    """
    if temperature < 0 or top_k < 0 or not 0.0 < top_p <= 1.0:
        raise BadValue(f"need temperature >= 0, top_k >= 0 and 0 < top_p <= 1; got {temperature}, {top_k}, {top_p}")
    if max_new_tokens < 1:
        raise BadValue(f"max_new_tokens={max_new_tokens} must be at least 1")
    context = model.cfg.max_len if context is None else int(context)
    if not 0 < context <= model.cfg.max_len:
        raise BadValue(f"context={context} must be in [1, the model's max_len={model.cfg.max_len}]")
    tokens, start = crop(np.asarray(tokens), np.asarray(start), context)
    return _generate(
        model, params, jnp.asarray(tokens), jnp.asarray(start), rng,
        jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p), inputs,
        max_new_tokens=int(max_new_tokens), context=context, greedy=temperature == 0,
        stop_ids=tuple(int(s) for s in stop_ids), pad_id=int(pad_id), mesh=mesh,
    )  # fmt: skip


class _Loop(NamedTuple):
    """The carry of the decoding loops."""

    i: jax.Array  # index of the next new token to emit
    buf: jax.Array  # [b, P + max_new_tokens] prompts then new tokens
    done: jax.Array  # [b] bool: the row emitted a stop token
    lengths: jax.Array  # [b] int32: new tokens emitted, stop token included


@functools.partial(
    jax.jit, static_argnames=("model", "max_new_tokens", "context", "greedy", "stop_ids", "pad_id", "mesh")
)
def _generate(
    model, params, tokens, start, rng, temperature, top_k, top_p, inputs, *, max_new_tokens, context, greedy,
    stop_ids, pad_id, mesh,
) -> Generation:  # fmt: skip
    family = family_lib.of(model)
    step = family.tokens_to_logits(model, params)
    b, p = tokens.shape
    sample = functools.partial(sample_logits, temperature=0.0 if greedy else temperature, top_k=top_k, top_p=top_p)
    stops = jnp.asarray(stop_ids, jnp.int32)

    def emit(loop: _Loop, logits) -> _Loop:
        """Draws token `i` of every row from `logits` [b, v] (pad_id for finished rows)."""
        tok = jnp.where(loop.done, pad_id, sample(logits, jax.random.fold_in(rng, loop.i)))
        buf = jax.lax.dynamic_update_slice(loop.buf, tok[:, None], (0, p + loop.i))
        lengths = loop.lengths + (~loop.done).astype(jnp.int32)
        done = loop.done | (jnp.isin(tok, stops) if stop_ids else False)
        return _Loop(loop.i + 1, buf, done, lengths)

    def running(loop: _Loop):
        return (loop.i < max_new_tokens) & ~jnp.all(loop.done)

    # Cached phase: the prompt and the first new tokens, while they fit in `context` positions.
    slots = min(context, p + max_new_tokens - 1)  # the last new token is never fed back
    cache = family.init_cache(model, params, b, slots, start, mesh=mesh, **inputs)
    logits, cache = step(tokens, cache)
    buf = jnp.concatenate([tokens, jnp.full((b, max_new_tokens), pad_id, jnp.int32)], axis=1)
    zeros = jnp.zeros((b,), jnp.int32)
    loop = emit(_Loop(jnp.int32(0), buf, jnp.zeros((b,), bool), zeros), logits)

    def cached(carry):
        loop, cache = carry
        logits, cache = step(jax.lax.dynamic_slice(loop.buf, (0, p + loop.i - 1), (b, 1)), cache)
        return emit(loop, logits), cache

    fits = lambda carry: running(carry[0]) & (p + carry[0].i - 1 < slots)  # slot of the token fed is free
    loop, _ = jax.lax.while_loop(fits, cached, (loop, cache))

    # Sliding phase: each token from the last `context` ones, re-prefilled at positions 0..context-1
    # (a row still shorter than that keeps its padding, at negative positions).
    def sliding(loop: _Loop) -> _Loop:
        window = jax.lax.dynamic_slice(loop.buf, (0, p + loop.i - context), (b, context))
        length = p + loop.i + start  # [b] real tokens of each row so far
        fresh = family.init_cache(model, params, b, context, jnp.minimum(0, length - context), mesh=mesh, **inputs)
        logits, _ = step(window, fresh)
        return emit(loop, logits)

    if p + max_new_tokens - 1 > context:
        loop = jax.lax.while_loop(running, sliding, loop)
    return Generation(loop.buf[:, p:], loop.lengths)


def complete(
    model,
    params,
    tokenizer,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    max_new_tokens: int,
    seed: int = 0,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_ids: Sequence[int] | None = None,
    context: int | None = None,
) -> list[str]:
    """Text in, text out: each prompt's continuation, cut before its stop token.

    `prompts`: texts, encoded by `tokenizer.encode_prompt` (an HF tokenizer puts its BOS in front,
    as transformers does), or token id lists taken as they are (a rendered chat). `stop_ids` None
    means the tokenizer's (its EOS; every end-of-sequence id an HF checkpoint names). An empty
    prompt starts from EOS, the document separator of training. `context`: see `generate` (a run's
    comes from `load_run`). With sharded params, call inside `nn.logical_axis_rules(rules)` (and
    the mesh context): the cache is sharded on the params' mesh.
    """
    # Any object with encode / decode / eos_id will do (llm_jax/data/tokenizer.py's add the rest).
    if stop_ids is None:
        stop_ids = getattr(tokenizer, "stop_ids", None) or ([] if tokenizer.eos_id is None else [tokenizer.eos_id])
    stop_ids = tuple(sorted({int(s) for s in stop_ids}))
    encode = getattr(tokenizer, "encode_prompt", tokenizer.encode)
    encoded = [(encode(p) if isinstance(p, str) else list(p)) or [tokenizer.eos_id or 0] for p in prompts]
    tokens, start = left_pad(encoded)
    new = generate(
        model, params, tokens, start, jax.random.key(seed), max_new_tokens=int(max_new_tokens), context=context,
        temperature=float(temperature), top_k=int(top_k), top_p=float(top_p), stop_ids=stop_ids,
        mesh=params_mesh(params),
    )  # fmt: skip
    rows, lengths = jax.device_get((new.tokens, new.lengths))
    texts = []
    for row, n in zip(np.asarray(rows), np.asarray(lengths)):
        ids = [int(t) for t in row[:n]]
        if ids and ids[-1] in stop_ids:
            ids = ids[:-1]
        texts.append(tokenizer.decode(ids))
    return texts
