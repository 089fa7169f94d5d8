"""Attention modules: causal self-attention (with the KV cache, local windows, QK-norm, soft-capping)
and the encoder-decoder's cross-attention.

The array maths is `llm_jax.models.ops.attend`; these modules own the projections, RoPE, the cache
and the per-layer choices (a local layer's window and RoPE base). Shapes: b = batch, t = query
length, s = key length, c = cache slots, e = embed, h = query heads, k = key/value heads,
g = h // k, d = head dim.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_jax.models import context_parallel
from llm_jax.models.config import ModelConfig
from llm_jax.models.layers import RMSNorm, dense
from llm_jax.models.ops import (
    _MASK_VALUE,
    _positions_mask,
    _same_segment,
    attend,
    rope,
    rope_frequencies,
    scores,
    within_window,
)

Array = jax.Array


def attend_recording(module: nn.Module, q: Array, k: Array, v: Array, mask: Array | None, cfg: ModelConfig, **kw):
    """`attend`; when the caller made the 'intermediates' collection mutable (llm_jax.attention does),
    its weights [b, h, t, s] float32 are also computed explicitly (the `dot_product` path never forms
    them) and recorded as `attention_weights`. Training and decoding never make it mutable.

    `kw`: attend's segment_ids / window; scale and soft-cap come from `cfg`."""
    scale = None if cfg.query_scale is None else cfg.query_scale**-0.5
    if module.is_mutable_collection("intermediates"):
        b, t, h, d = q.shape
        logits = scores(q.reshape(b, t, k.shape[2], -1, d), k, scale, cfg.attn_softcap)
        if mask is None:  # causal, within segments and the window
            idx = jnp.arange(t)
            seen = jnp.tril(jnp.ones((1, t, k.shape[1]), bool)) & within_window(idx, idx, kw.get("window"))
            if kw.get("segment_ids") is not None:
                seen = seen & _same_segment(kw["segment_ids"], kw["segment_ids"])
        else:
            seen = mask
        logits = jnp.where(seen[:, None, None], logits, _MASK_VALUE)
        module.sow("intermediates", "attention_weights", jax.nn.softmax(logits, -1).reshape(b, h, t, -1))
    return attend(q, k, v, mask, cfg.attention, scale=scale, softcap=cfg.attn_softcap, block=cfg.attention_block, **kw)


def _layer_rope(cfg: ModelConfig, local: bool | Array) -> Array:
    """The RoPE frequencies [d/2] of a layer that is `local` (a Python or a traced bool)."""
    if isinstance(local, bool) or not cfg.local_rope_theta:
        return rope_frequencies(cfg, local=bool(local) if isinstance(local, bool) else False)
    return jnp.where(local, rope_frequencies(cfg, local=True), rope_frequencies(cfg))


def _layer_window(cfg: ModelConfig, local: bool | Array) -> int | Array | None:
    """A local layer's window (None for a global layer; traced when `local` is)."""
    if isinstance(local, bool):
        return cfg.sliding_window if local else None
    return jnp.where(local, cfg.sliding_window, jnp.iinfo(jnp.int32).max // 2)


class Attention(nn.Module):
    """Self-attention, multi-head or grouped-query, with an optional KV cache.

    Without a cache it is plain causal, or follows an explicit `mask` [b, t, t] (True = may attend:
    the encoder's padding mask, packed sequences' segments). A local layer (`cfg.is_local(layer)`)
    sees only the last `sliding_window` positions. With `decode=True` the module keeps
    `cached_key`/`cached_value` [b, k, c, d], the position of every cached slot `cached_pos` [b, c]
    (negative = empty or padding) and a shared write index. Left-padded prompts give their pad
    tokens negative positions, so they are never attended.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(
        self,
        x: Array,
        positions: Array,
        deterministic: bool,
        decode: bool,
        mask: Array | None = None,
        segment_ids: Array | None = None,
        layer: int | Array = 0,
    ) -> Array:
        """x: [b, t, e]; positions: [b, t] int (negative marks padding); mask: [b, t, t] bool or None
        (plain causal); segment_ids: [b, t] int or None (packed sequences, training only: causal
        attention stays within a segment); layer: this block's index (traced under scan_layers).
        Returns [b, t, e]."""
        cfg = self.cfg
        h, k, d = cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
        bias = cfg.attention_use_bias
        q = dense(cfg, (h, d), ("embed", "heads", "kv"), "query", use_bias=bias)(x)
        key = dense(cfg, (k, d), ("embed", "kv_heads", "kv"), "key", use_bias=bias)(x)
        value = dense(cfg, (k, d), ("embed", "kv_heads", "kv"), "value", use_bias=bias)(x)
        if cfg.qk_norm:  # per head, before the rotation (Qwen3, Gemma 3)
            q, key = RMSNorm(cfg, name="query_norm")(q), RMSNorm(cfg, name="key_norm")(key)
        local = cfg.is_local(layer)
        if cfg.positions == "rope":
            pos = jnp.maximum(positions, 0)
            inv_freq = _layer_rope(cfg, local)
            q, key = rope(q, pos, inv_freq), rope(key, pos, inv_freq)
        q = nn.with_logical_constraint(q, ("activation_batch", "activation_length", "activation_heads", "kv"))

        window = _layer_window(cfg, local)
        if decode:
            key, value, mask = self._update_cache(key, value, positions, window)
        elif mask is not None and window is not None:
            mask = mask & within_window(positions, positions, window)
        kw = {"segment_ids": segment_ids, "window": window if mask is None else None}
        if (
            mask is None
            and not self.is_mutable_collection("intermediates")
            and context_parallel.sequence_axes(q.shape[1])
        ):
            # The sequence is sharded over a mesh axis: keys/values are gathered across it.
            scale = None if cfg.query_scale is None else cfg.query_scale**-0.5
            out = context_parallel.attend_sharded(
                q, key, value, cfg.attention, scale=scale, softcap=cfg.attn_softcap, block=cfg.attention_block, **kw
            )
            return attention_out(cfg, out)
        return attention_out(cfg, attend_recording(self, q, key, value, mask, cfg, **kw))

    def _update_cache(self, key, value, positions, window):
        """Writes this call's keys/values at the cache index; returns all cached ones and the mask."""
        b, t, k, d = key.shape
        # Heads-major [b, k, c, d]: the attention dots batch over (b, k), so with this layout they
        # read the cache in place; [b, c, k, d] made XLA transpose (copy) the whole cache every step.
        axes = ("cache_batch", "cache_kv_heads", "cache_length", "kv")
        # The cache length c is the length of the `init` input: a generation sizes it to
        # prompt + new tokens rather than max_len, so a step attends over no slot it cannot use.
        ck = self.variable(
            "cache", "cached_key", nn.with_logical_partitioning(jnp.zeros, axes), (b, k, t, d), key.dtype
        )
        cv = self.variable(
            "cache", "cached_value", nn.with_logical_partitioning(jnp.zeros, axes), (b, k, t, d), value.dtype
        )
        cp = self.variable(
            "cache",
            "cached_pos",
            nn.with_logical_partitioning(lambda s: jnp.full(s, -1, jnp.int32), ("cache_batch", "cache_length")),
            (b, t),
        )
        idx = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
        if self.is_initializing():
            return key, value, _positions_mask(positions, positions, window)
        i = idx.value
        ck.value = jax.lax.dynamic_update_slice(nn.unbox(ck.value), key.swapaxes(1, 2), (0, 0, i, 0))
        cv.value = jax.lax.dynamic_update_slice(nn.unbox(cv.value), value.swapaxes(1, 2), (0, 0, i, 0))
        cp.value = jax.lax.dynamic_update_slice(nn.unbox(cp.value), positions.astype(jnp.int32), (0, i))
        idx.value = i + t
        # Returned as [b, c, k, d] views for `attend`; XLA folds the swap into the dots.
        keys, values = nn.unbox(ck.value).swapaxes(1, 2), nn.unbox(cv.value).swapaxes(1, 2)
        return keys, values, _positions_mask(positions, nn.unbox(cp.value), window)


def attention_out(cfg: ModelConfig, out: Array) -> Array:
    """The output projection of attention: [b, t, h, d] -> [b, t, e]."""
    out = nn.with_logical_constraint(out, ("activation_batch", "activation_length", "activation_heads", "kv"))
    # Residual projections are scaled down with depth (GPT-2): keeps the residual stream's
    # variance from growing with the number of layers at init.
    out_scale = 1.0 / (2.0 * cfg.num_layers) ** 0.5
    return dense(
        cfg,
        cfg.embed_dim,
        ("heads", "kv", "embed"),
        "out",
        in_axis=(-2, -1),
        scale=out_scale,
        use_bias=cfg.attention_out_use_bias,
    )(out)


class Memory(NamedTuple):
    """What a decoder block's cross-attention reads: the encoder's output and which keys it may see."""

    encoded: Array  # [b, s, e] encoder output
    mask: Array  # [b, t, s] bool: target position t may attend to source position s
    valid: Array  # [b, s] bool: real source tokens (kept in the decoding cache)


class CrossAttention(nn.Module):
    """Attention from decoder positions to the encoder's output (no positional rotation).

    With `decode=True` the keys and values of the source are computed once per sentence (when
    `memory` is given: cache set-up) and kept in the cache as `cross_key` / `cross_value`
    [b, k, s, d] with `source_valid` [b, s]; later steps (`memory` None) read them from there.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: Array, memory: Memory | None, decode: bool) -> Array:
        """x: [b, t, e] -> [b, t, e]."""
        cfg = self.cfg
        h, k, d = cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
        bias = cfg.attention_use_bias
        q = dense(cfg, (h, d), ("embed", "heads", "kv"), "query", use_bias=bias)(x)
        q = nn.with_logical_constraint(q, ("activation_batch", "activation_length", "activation_heads", "kv"))
        key = value = mask = None
        if memory is not None:
            key = dense(cfg, (k, d), ("embed", "kv_heads", "kv"), "key", use_bias=bias)(memory.encoded)
            value = dense(cfg, (k, d), ("embed", "kv_heads", "kv"), "value", use_bias=bias)(memory.encoded)
            mask = memory.mask
        if decode:
            key, value, mask = self._cached(key, value, memory, x.shape[1])
        return attention_out(cfg, attend_recording(self, q, key, value, mask, cfg))

    def _cached(self, key, value, memory, t: int):
        """Stores the source's keys/values (set-up call) or reads them (decoding steps)."""
        axes = ("cache_batch", "cache_kv_heads", "cache_length", "kv")
        shape = None if key is None else key.swapaxes(1, 2).shape  # [b, k, s, d]
        zeros = lambda dtype: nn.with_logical_partitioning(lambda: jnp.zeros(shape, dtype), axes)  # noqa: E731
        ck = self.variable("cache", "cross_key", zeros(getattr(key, "dtype", None)))
        cv = self.variable("cache", "cross_value", zeros(getattr(value, "dtype", None)))
        valid_shape = None if memory is None else memory.valid.shape
        cvalid = self.variable(
            "cache",
            "source_valid",
            nn.with_logical_partitioning(lambda: jnp.zeros(valid_shape, bool), ("cache_batch", "cache_length")),
        )
        if memory is not None:
            ck.value, cv.value, cvalid.value = key.swapaxes(1, 2), value.swapaxes(1, 2), memory.valid
        valid = nn.unbox(cvalid.value)
        mask = jnp.broadcast_to(valid[:, None, :], (valid.shape[0], t, valid.shape[1]))
        return nn.unbox(ck.value).swapaxes(1, 2), nn.unbox(cv.value).swapaxes(1, 2), mask
