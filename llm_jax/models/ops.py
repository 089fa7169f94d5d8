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

from llm_jax.models import blockwise, kernels

Array = jax.Array

# A large finite negative instead of -inf: a query row that sees no key (a left-padding position)
# then gets a uniform softmax rather than NaN, and its output is ignored anyway.
_MASK_VALUE = blockwise._MASK_VALUE  # one value for every attention path


def rope_frequencies(cfg: Any, local: bool = False) -> Array:
    """RoPE inverse frequencies [d/2] float32, scaled as Hugging Face's `rope_scaling` says.

    `local`: for a local (sliding-window) layer. With `cfg.local_rope_theta` set those use their
    own base and no scaling (Gemma 3: 10k locally, 1M and the scaling globally).
    """
    d = cfg.dim_per_head
    exponents = jnp.arange(0, d, 2, dtype=jnp.float32) / d
    if local and cfg.local_rope_theta:
        return 1.0 / (cfg.local_rope_theta**exponents)
    inv_freq = 1.0 / (cfg.rope_theta**exponents)
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


def scores(q: Array, k: Array, scale: float | None = None, softcap: float | None = None) -> Array:
    """Attention logits, float32 whatever the compute dtype (a bf16 softmax is not stable).

    q: [b, t, k, g, d] (queries grouped by their kv head); k: [b, s, k, d] -> [b, k, g, t, s],
    scaled by `scale` (default 1/sqrt(d)) and, with `softcap`, squashed to cap * tanh(x / cap).
    """
    logits = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    logits = logits * jnp.float32(q.shape[-1] ** -0.5 if scale is None else scale)
    if softcap:
        logits = softcap * jnp.tanh(logits / softcap)
    return logits


def within_window(q_pos: Array, k_pos: Array, window: int | Array | None) -> Array | bool:
    """[..., t] query and [..., s] key positions -> [..., t, s]: the key is among the last `window`
    positions up to the query (Hugging Face's `kv_idx > q_idx - sliding_window`); True without a window."""
    if window is None:
        return True
    return k_pos[..., None, :] > q_pos[..., :, None] - window


def attend(
    q: Array,
    k: Array,
    v: Array,
    mask: Array | None,
    impl: str,
    segment_ids: Array | None = None,
    window: int | Array | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    block: int = 512,
) -> Array:
    """Scaled dot-product attention with grouped-query support.

    q: [b, t, h, d]; k, v: [b, s, k, d] with h a multiple of k; mask: [b, t, s] bool (True = may
    attend) or None for plain causal (t == s), then within segments if `segment_ids` [b, t] int is
    given (packed documents: a query sees only earlier keys of its own document), and within the
    last `window` positions if given (a local layer; an explicit mask already holds its window).
    `scale` / `softcap`: as in `scores`. Returns [b, t, h, d].

    `impl`: 'einsum' (the reference), 'dot_product' (jax.nn.dot_product_attention), 'blockwise'
    (`blockwise.attention`, memory linear in t, blocks of `block`), 'splash' / 'cudnn' (the fused
    kernels of `kernels.py`). The last three serve the causal training case (mask None); with an
    explicit mask (decoding with a KV cache, the encoder) they take the einsum path.
    """
    b, t, h, d = q.shape
    kv = k.shape[2]
    if mask is None and impl == "blockwise":
        return blockwise.attention(q, k, v, segment_ids, window, scale, softcap, block, block)
    if mask is None and impl == "splash":
        return kernels.splash(q, k, v, segment_ids, window, scale, softcap, block)
    if mask is None and impl == "cudnn":
        return kernels.cudnn(q, k, v, segment_ids, window, scale)
    if impl == "dot_product" and not softcap:  # jax's fused attention has no soft-capping
        # On GPU this dispatches to cuDNN flash attention when shapes and dtypes allow.
        if mask is None:
            same = None if segment_ids is None else _same_segment(segment_ids, segment_ids)
            if window is not None:
                idx = jnp.arange(t)
                near = within_window(idx, idx, window)[None]
                same = near if same is None else same & near
            same = None if same is None else same[:, None]
            return jax.nn.dot_product_attention(q, k, v, mask=same, is_causal=True, scale=scale)
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, :, :], scale=scale)
    if mask is None:
        return _causal_attention(q, k, v, segment_ids, window, scale, softcap)
    logits = scores(q.reshape(b, t, kv, h // kv, d), k, scale, softcap)
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


def _causal_attention(
    q: Array,
    k: Array,
    v: Array,
    segment_ids: Array | None = None,
    window: int | Array | None = None,
    scale: float | None = None,
    softcap: float | None = None,
) -> Array:
    """Causal self-attention (t == s), the einsum path's training case; within segments if
    `segment_ids` [b, t] is given and within the last `window` positions if given (every query sees
    at least itself, so no row is empty).

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
    scale = jnp.float32(d**-0.5 if scale is None else scale)
    outs = []
    for i in range(n):
        lo, hi = i * tb, (i + 1) * tb
        qi, ki, vi = q[:, lo:hi], k[:, :hi], v[:, :hi]
        q_idx, k_idx = jnp.arange(lo, hi), jnp.arange(hi)
        visible = (q_idx[:, None] >= k_idx[None, :]) & within_window(q_idx, k_idx, window)  # [tb, hi]
        if segment_ids is not None:  # [b, 1, tb, hi]: broadcasts over heads (and groups below)
            visible = (visible & _same_segment(segment_ids[:, lo:hi], segment_ids[:, :hi]))[:, None]
        if g == 1:
            logits = jnp.einsum("bthd,bshd->bhts", qi, ki, preferred_element_type=jnp.float32) * scale
            if softcap:
                logits = softcap * jnp.tanh(logits / softcap)
            logits = jnp.where(visible, logits, _MASK_VALUE)
            probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
            outs.append(jnp.einsum("bhts,bshd->bthd", probs, vi))
        else:
            logits = scores(qi.reshape(b, tb, kv, g, d), ki, scale, softcap)
            logits = jnp.where(visible if segment_ids is None else visible[:, :, None], logits, _MASK_VALUE)
            probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
            outs.append(jnp.einsum("bkgts,bskd->btkgd", probs, vi).reshape(b, tb, h, d))
    return outs[0] if n == 1 else jnp.concatenate(outs, axis=1)


def _positions_mask(q_pos: Array, k_pos: Array, window: int | Array | None = None) -> Array:
    """[b, t] query positions, [b, s] key positions -> [b, t, s]: key is real, not in the future and
    (with a `window`) among the last `window` positions."""
    causal = (k_pos[:, None, :] >= 0) & (k_pos[:, None, :] <= q_pos[:, :, None])
    return causal & within_window(q_pos, k_pos, window)


def sinusoidal(positions: Array, dim: int) -> Array:
    """The original Transformer's position encoding: positions [b, t] -> [b, t, dim] float32."""
    inv = 1.0 / (10000.0 ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    angles = jnp.maximum(positions, 0).astype(jnp.float32)[..., None] * inv
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
