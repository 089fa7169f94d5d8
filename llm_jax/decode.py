"""Autoregressive generation over the KV cache: one prefill of the prompts, then one token per step
inside a single compiled `lax.while_loop`. Greedy, temperature, top-k and top-p (nucleus) sampling,
stop tokens, and the text-in/text-out `complete` that the trainer's samples and the generate CLI use.

Prompts of different lengths are left-padded to a common length P; pad slots get position -1, which
the attention mask ignores, so each row generates exactly what it would alone. The cache holds
P + max_new_tokens - 1 slots (not max_len), and is constrained to the logical axes `cache_batch`,
`cache_length`, `cache_kv_heads`: under `nn.logical_axis_rules` it is sharded like the activations
that fill it (batch over data x fsdp, kv heads over tensor) on the mesh of the params (`complete`
finds it) or the `mesh` argument of `generate`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from llm_jax.model import TransformerLM, output_kernel


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
    if isinstance(temperature, (int, float)) and temperature <= 0.0:
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
    """Token lists -> (tokens [b, P] left-padded, positions [b, P] with -1 on padding)."""
    if not len(prompts) or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    positions = np.full((len(prompts), width), -1, np.int32)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p) :] = p
        positions[i, width - len(p) :] = np.arange(len(p))
    return tokens, positions


def init_cache(model: TransformerLM, batch: int, length: int, mesh: Mesh | None = None) -> tuple[Any, Any]:
    """(cache, logical specs): an empty KV cache of `length` slots for `batch` rows.

    Every layer holds cached_key/cached_value [batch, k, length, d] (zeros), cached_pos
    [batch, length] (-1: empty) and a write index (0); with scan_layers all get a leading layer axis.
    Built from shapes only (no model computation); constrained to its logical sharding on `mesh`
    (None: the context mesh of `jax.set_mesh`, if any).
    """
    tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    # Shapes only, so no sharding constraints while tracing `init` (flax's DenseGeneral applies its
    # kernel's logical constraint to the flattened kernel, which fails under `jax.set_mesh`).
    with nn.logical_axis_rules(()):
        boxed = jax.eval_shape(lambda t: model.init(jax.random.key(0), t, decode=True)["cache"], tokens)
    specs = nn.get_partition_spec(boxed)
    is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)  # noqa: E731
    abstract = jax.tree.map(lambda x: x.value if is_box(x) else x, boxed, is_leaf=is_box)

    def empty(path, x):
        fill = -1 if path[-1].key == "cached_pos" else 0
        return jnp.full(x.shape, fill, x.dtype)

    cache = jax.tree_util.tree_map_with_path(empty, abstract)
    return nn.with_logical_constraint(cache, specs, mesh=mesh), specs


def _apply_cached(model, params, head, cache, specs, mesh, tokens, positions):
    """One cached forward: tokens, positions [b, t] -> (logits of the last position [b, v] f32, new cache).

    Only the last position goes through the output projection `head` [e, v] (`_output_head`), in
    the compute dtype like the model's own head: a prefill never computes [b, P, v] logits.
    """
    hidden, mut = model.apply(
        {"params": params, "cache": cache}, tokens, positions, decode=True, return_hidden=True, mutable=["cache"]
    )
    dtype = model.cfg.compute_dtype
    logits = jnp.dot(hidden[:, -1].astype(dtype), head.astype(dtype)).astype(jnp.float32)
    logits = nn.with_logical_constraint(logits, ("activation_batch", "activation_vocab"), mesh=mesh)
    return logits, nn.with_logical_constraint(mut["cache"], specs, mesh=mesh)


def _output_head(model, params):
    """The output projection as [e, v]: a tied embedding [v, e] is transposed once, before the
    loop, so every step multiplies by a row-major matrix (on CPU ~25% faster than by its transpose)."""
    kernel, vocab_first = output_kernel(model.cfg, params)
    return kernel.T if vocab_first else kernel


def params_mesh(params) -> Mesh | None:
    """The mesh the params are sharded over (NamedSharding), or None (e.g. numpy or one device)."""
    for leaf in jax.tree.leaves(params):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding):
            return sharding.mesh
    return None


def generate(
    model: TransformerLM,
    params,
    tokens: jax.Array,
    positions: jax.Array,
    rng: jax.Array,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_ids: Sequence[int] = (),
    pad_id: int = 0,
    mesh: Mesh | None = None,
) -> Generation:
    """Continues left-padded prompts (tokens, positions [b, P], from `left_pad`).

    A row stops after it emits any id in `stop_ids` (its later slots hold `pad_id`); the loop ends
    when every row has stopped or after `max_new_tokens`. The token of step i is drawn with
    `fold_in(rng, i)`: the same rng, prompts and settings give the same tokens. `mesh` (with
    `nn.logical_axis_rules` in force) is where the KV cache is sharded; None leaves it to the context.

    Compiled once per (model, batch, P, max_new_tokens, greedy or not, stop_ids, pad_id, mesh):
    the sampling settings are traced, so changing them does not recompile.
    """
    if temperature < 0 or top_k < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"need temperature >= 0, top_k >= 0 and 0 < top_p <= 1; got {temperature}, {top_k}, {top_p}")
    return _generate(
        model,
        params,
        tokens,
        positions,
        rng,
        jnp.float32(temperature),
        jnp.int32(top_k),
        jnp.float32(top_p),
        max_new_tokens=int(max_new_tokens),
        greedy=temperature == 0,
        stop_ids=tuple(int(s) for s in stop_ids),
        pad_id=int(pad_id),
        mesh=mesh,
    )


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "greedy", "stop_ids", "pad_id", "mesh"))
def _generate(
    model, params, tokens, positions, rng, temperature, top_k, top_p, *, max_new_tokens, greedy, stop_ids, pad_id, mesh
) -> Generation:
    b, p = tokens.shape
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1")
    # The last new token is never fed back, so the cache needs P + max_new_tokens - 1 slots.
    length = p + max_new_tokens - 1
    if length > model.cfg.max_len:
        raise ValueError(
            f"prompt length {p} + max_new_tokens {max_new_tokens} - 1 exceeds the model's max_len "
            f"{model.cfg.max_len}; shorten the prompt or ask for fewer new tokens"
        )
    sample = functools.partial(sample_logits, temperature=0.0 if greedy else temperature, top_k=top_k, top_p=top_p)
    stops = jnp.asarray(stop_ids, jnp.int32)

    def is_stop(tok):
        return jnp.isin(tok, stops) if stop_ids else jnp.zeros(tok.shape, bool)

    cache, specs = init_cache(model, b, length, mesh)
    head = _output_head(model, params)
    logits, cache = _apply_cached(model, params, head, cache, specs, mesh, tokens, positions)
    first = sample(logits, jax.random.fold_in(rng, 0))
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
    next_pos = positions[:, -1] + 1  # [b] position of the first new token
    carry = (jnp.int32(1), cache, out, first, is_stop(first), jnp.ones((b,), jnp.int32))

    def cond(carry):
        i, _, _, _, done, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, cache, out, last, done, lengths = carry
        pos = next_pos + i - 1  # position of `last`, the token fed in this step
        logits, cache = _apply_cached(model, params, head, cache, specs, mesh, last[:, None], pos[:, None])
        tok = jnp.where(done, pad_id, sample(logits, jax.random.fold_in(rng, i)))
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | is_stop(tok)
        out = jax.lax.dynamic_update_slice(out, tok[:, None], (0, i))
        return i + 1, cache, out, tok, done, lengths

    _, _, out, _, _, lengths = jax.lax.while_loop(cond, body, carry)
    return Generation(out, lengths)


def complete(
    model: TransformerLM,
    params,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    seed: int = 0,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_ids: Sequence[int] | None = None,
) -> list[str]:
    """Text in, text out: each prompt's continuation, cut before its stop token.

    `stop_ids` None means the tokenizer's EOS (if it has one). An empty prompt starts from EOS, the
    document separator of training. `max_new_tokens` is lowered to what the context leaves; a
    prompt that leaves no room is an error. With sharded params, call inside
    `nn.logical_axis_rules(rules)` (and the mesh context): the cache is sharded on the params' mesh.
    """
    if stop_ids is None:
        stop_ids = () if tokenizer.eos_id is None else (tokenizer.eos_id,)
    stop_ids = tuple(sorted({int(s) for s in stop_ids}))
    encoded = [tokenizer.encode(p) or [tokenizer.eos_id or 0] for p in prompts]
    longest = max(len(e) for e in encoded)
    max_new_tokens = min(max_new_tokens, model.cfg.max_len + 1 - longest)
    if max_new_tokens <= 0:
        raise ValueError(
            f"a prompt is {longest} tokens, which fills the model's context of {model.cfg.max_len} tokens; shorten it"
        )
    tokens, positions = left_pad(encoded)
    new = generate(
        model,
        params,
        jnp.asarray(tokens),
        jnp.asarray(positions),
        jax.random.key(seed),
        max_new_tokens=int(max_new_tokens),
        temperature=float(temperature),
        top_k=int(top_k),
        top_p=float(top_p),
        stop_ids=stop_ids,
        mesh=params_mesh(params),
    )
    rows, lengths = jax.device_get((new.tokens, new.lengths))
    texts = []
    for row, n in zip(np.asarray(rows), np.asarray(lengths)):
        ids = [int(t) for t in row[:n]]
        if ids and ids[-1] in stop_ids:
            ids = ids[:-1]
        texts.append(tokenizer.decode(ids))
    return texts
