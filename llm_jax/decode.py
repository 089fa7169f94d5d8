"""Autoregressive generation over the KV cache: one prefill, then one token per step inside a
compiled `lax.while_loop`. Greedy, temperature, top-k and top-p sampling.

Prompts of different lengths are left-padded to a common length; pad positions get position -1,
which the attention mask ignores, so each row generates exactly what it would alone.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax.model import TransformerLM


def sample_logits(logits: jax.Array, rng: jax.Array, temperature: float, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """logits [b, v] -> token ids [b]. temperature 0 is greedy; top_k 0 and top_p 1 switch those off."""
    if temperature <= 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    neg = jnp.finfo(jnp.float32).min
    if top_k > 0:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # Keep the smallest set whose mass reaches top_p: a token stays if the mass before it < top_p.
        keep_sorted = (cum - jax.nn.softmax(sorted_logits, axis=-1)) < top_p
        cutoff = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, neg, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> (tokens [b, P] left-padded, positions [b, P] with -1 on padding)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    positions = np.full((len(prompts), width), -1, np.int32)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p):] = p
        positions[i, width - len(p):] = np.arange(len(p))
    return tokens, positions


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature", "top_k", "top_p", "eos_id"))
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
    eos_id: Optional[int] = None,
) -> jax.Array:
    """Continues left-padded prompts. tokens, positions: [b, P]. Returns new tokens [b, max_new_tokens];
    after a row emits `eos_id` the rest of that row is `eos_id`."""
    b, p = tokens.shape
    if p + max_new_tokens > model.cfg.max_len:
        raise ValueError(
            f"prompt length {p} + max_new_tokens {max_new_tokens} exceeds the model's max_len {model.cfg.max_len}"
        )
    cache = model.init(jax.random.key(0), jnp.zeros((b, model.cfg.max_len), jnp.int32), decode=True)["cache"]
    logits, mut = model.apply({"params": params, "cache": cache}, tokens, positions, decode=True, mutable=["cache"])
    next_pos = positions[:, -1] + 1  # [b]
    first = sample_logits(logits[:, -1], jax.random.fold_in(rng, 0), temperature, top_k, top_p)
    out = jnp.zeros((b, max_new_tokens), jnp.int32).at[:, 0].set(first)
    done = jnp.zeros((b,), bool) if eos_id is None else first == eos_id

    def cond(carry):
        i, _, _, done = carry[0], carry[1], carry[2], carry[3]
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, cache, out, done = carry
        last = out[:, i - 1]
        pos = (next_pos + i - 1)[:, None]
        logits, mut = model.apply({"params": params, "cache": cache}, last[:, None], pos, decode=True, mutable=["cache"])
        tok = sample_logits(logits[:, -1], jax.random.fold_in(rng, i), temperature, top_k, top_p)
        if eos_id is not None:
            tok = jnp.where(done, eos_id, tok)
            done = done | (tok == eos_id)
        return i + 1, mut["cache"], out.at[:, i].set(tok), done

    _, _, out, done = jax.lax.while_loop(cond, body, (jnp.int32(1), mut["cache"], out, done))
    if eos_id is not None:
        # Rows stopped early by the while_loop exit keep zeros after EOS: make them EOS.
        seen = jnp.cumsum(out == eos_id, axis=1) > 0
        out = jnp.where(seen, eos_id, out)
    return out


def complete(model, params, tokenizer, prompts: Sequence[str], max_new_tokens: int, seed: int = 0,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0) -> list[str]:
    """Text in, text out: encodes, generates (stopping at EOS) and decodes each prompt's continuation."""
    encoded = [tokenizer.encode(p) or [tokenizer.eos_id or 0] for p in prompts]
    max_new_tokens = min(max_new_tokens, model.cfg.max_len - max(len(e) for e in encoded))
    if max_new_tokens <= 0:
        raise ValueError(f"prompts are as long as the model's context ({model.cfg.max_len} tokens); shorten them")
    tokens, positions = left_pad(encoded)
    new = generate(model, params, jnp.asarray(tokens), jnp.asarray(positions), jax.random.key(seed),
                   max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=int(top_k),
                   top_p=float(top_p), eos_id=tokenizer.eos_id)
    results = []
    for row in np.asarray(jax.device_get(new)):
        ids = list(row)
        if tokenizer.eos_id is not None and tokenizer.eos_id in ids:
            ids = ids[: ids.index(tokenizer.eos_id)]
        results.append(tokenizer.decode(ids))
    return results
