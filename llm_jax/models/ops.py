"""Pure array functions the models are built from: RoPE, sinusoidal positions, and scaled
dot-product attention (explicit masks, the causal case in query blocks, packed segments).

No parameters and no flax here: `llm_jax/models/model.py` wraps them in modules. Shapes: b = batch,
t = query length, s = key length, h = query heads, k = key/value heads, d = head dim.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array

# A large finite negative instead of -inf: a query row that sees no key (a left-padding position)
# then gets a uniform softmax rather than NaN, and its output is ignored anyway.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def rope_frequencies(cfg: Any) -> Array:
    """RoPE inverse frequencies [d/2] float32, scaled as Hugging Face's `rope_scaling` says."""
    d = cfg.dim_per_head
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    if cfg.rope_scaling == "linear":
        inv_freq = inv_freq / cfg.rope_scaling_factor
    elif cfg.rope_scaling == "llama3":
        # Llama 3.1: wavelengths longer than the pre-training context / low_freq_factor are slowed
        # by `factor`, those shorter than context / high_freq_factor kept, a linear blend between
        # (transformers' _compute_llama3_parameters, same float32 order of operations).
        f, lo, hi, ctx = (
            cfg.rope_scaling_factor,
            cfg.rope_low_freq_factor,
            cfg.rope_high_freq_factor,
            cfg.rope_original_max_len,
        )
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > ctx / lo, inv_freq / f, inv_freq)
        smooth = (ctx / wavelen - lo) / (hi - lo)
        medium = ~(wavelen < ctx / hi) & ~(wavelen > ctx / lo)
        inv_freq = jnp.where(medium, (1 - smooth) * scaled / f + smooth * scaled, scaled)
    return inv_freq


def rope(x: Array, positions: Array, inv_freq: Array) -> Array:
    """Rotary position embedding (Llama / GPT-NeoX "half" layout).

    x: [b, t, heads, d]; positions: [b, t] int; inv_freq: [d/2] from `rope_frequencies`.
    Returns x rotated, same shape and dtype.
    """
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [b, t, d/2]
    sin = jnp.sin(angles)[:, :, None, :]
    cos = jnp.cos(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def attend(q: Array, k: Array, v: Array, mask: Array | None, impl: str, segment_ids: Array | None = None) -> Array:
    """Scaled dot-product attention with grouped-query support.

    q: [b, t, h, d]; k, v: [b, s, k, d] with h a multiple of k; mask: [b, t, s] bool (True = may
    attend) or None for plain causal (t == s), then within segments if `segment_ids` [b, t] int is
    given (packed documents: a query sees only earlier keys of its own document). Returns [b, t, h, d].
    """
    b, t, h, d = q.shape
    kv = k.shape[2]
    if impl == "dot_product":
        # On GPU this dispatches to cuDNN flash attention when shapes and dtypes allow.
        if mask is None:
            same = None if segment_ids is None else _same_segment(segment_ids, segment_ids)[:, None]
            return jax.nn.dot_product_attention(q, k, v, mask=same, is_causal=True)
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, :, :])
    if mask is None:
        return _causal_attention(q, k, v, segment_ids)
    qg = q.reshape(b, t, kv, h // kv, d)
    # Logits and softmax in float32 whatever the compute dtype (bf16 softmax is not stable).
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    logits = logits * (1.0 / jnp.sqrt(jnp.float32(d)))
    logits = jnp.where(mask[:, None, None, :, :], logits, _MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, d)


def _causal_blocks(t: int) -> int:
    """Query blocks for causal attention over t positions: blocks of >= 128 rows, at most 8."""
    n = 1
    while n < 8 and t % (2 * n) == 0 and t // (2 * n) >= 128:
        n *= 2
    return n


def _same_segment(q_seg: Array, k_seg: Array) -> Array:
    """[b, t] query and [b, s] key segment ids -> [b, t, s] bool: same document."""
    return q_seg[:, :, None] == k_seg[:, None, :]


def _causal_attention(q: Array, k: Array, v: Array, segment_ids: Array | None = None) -> Array:
    """Causal self-attention (t == s), the einsum path's training case; within segments if
    `segment_ids` [b, t] is given (every query sees at least itself, so no row is empty).

    Queries go in blocks; block i attends to keys [0, end of block i) only, so the fully masked
    upper-right blocks are never computed (at 2 blocks, 25% fewer attention FLOPs and softmax
    elements). Masked logits contribute exact zeros, so this equals the full masked softmax.
    Multi-head attention uses 4-d [b, h, t, s] scores: the 5-d grouped form below costs XLA on CPU
    extra broadcast/reduce passes in the backward pass (about 2x the time of this core).
    """
    b, t, h, d = q.shape
    kv = k.shape[2]
    g = h // kv
    n = _causal_blocks(t)
    tb = t // n
    scale = 1.0 / jnp.sqrt(jnp.float32(d))
    outs = []
    for i in range(n):
        lo, hi = i * tb, (i + 1) * tb
        qi, ki, vi = q[:, lo:hi], k[:, :hi], v[:, :hi]
        visible = jnp.arange(lo, hi)[:, None] >= jnp.arange(hi)[None, :]  # [tb, hi], constant
        if segment_ids is not None:  # [b, 1, tb, hi]: broadcasts over heads (and groups below)
            visible = (visible & _same_segment(segment_ids[:, lo:hi], segment_ids[:, :hi]))[:, None]
        if g == 1:
            logits = jnp.einsum("bthd,bshd->bhts", qi, ki, preferred_element_type=jnp.float32) * scale
            logits = jnp.where(visible, logits, _MASK_VALUE)
            probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
            outs.append(jnp.einsum("bhts,bshd->bthd", probs, vi))
        else:
            qg = qi.reshape(b, tb, kv, g, d)
            logits = jnp.einsum("btkgd,bskd->bkgts", qg, ki, preferred_element_type=jnp.float32) * scale
            logits = jnp.where(visible if segment_ids is None else visible[:, :, None], logits, _MASK_VALUE)
            probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
            outs.append(jnp.einsum("bkgts,bskd->btkgd", probs, vi).reshape(b, tb, h, d))
    return outs[0] if n == 1 else jnp.concatenate(outs, axis=1)


def _positions_mask(q_pos: Array, k_pos: Array) -> Array:
    """[b, t] query positions, [b, s] key positions -> [b, t, s]: key is real and not in the future."""
    return (k_pos[:, None, :] >= 0) & (k_pos[:, None, :] <= q_pos[:, :, None])


def sinusoidal(positions: Array, dim: int) -> Array:
    """The original Transformer's position encoding: positions [b, t] -> [b, t, dim] float32."""
    inv = 1.0 / (10000.0 ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    angles = jnp.maximum(positions, 0).astype(jnp.float32)[..., None] * inv
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
