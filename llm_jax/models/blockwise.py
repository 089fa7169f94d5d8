"""Blockwise (flash-style) causal self-attention in pure JAX: memory linear in the sequence length,
forward and backward.

The scores are never materialised as a whole: queries go in blocks of `block_q` rows, each visits
the key blocks it can see and keeps an online softmax (running max `m`, running sum `total`, running
output), so a step holds one [b, k, g, block_q, block_k] tile at a time. The backward pass is a
custom VJP that recomputes each tile from q, k, v and the saved log-sum-exp (FlashAttention-2), so
the residuals are the output and one float per query and head: linear too.

Tiles that no query of the block can see are skipped, not masked: the loops over key blocks (and,
backwards, over query blocks) run only over the causal band, narrowed further by a sliding window
(also when the window is a traced value, as under `scan_layers`). Packed segments, grouped-query
attention, a query scale and soft-capped scores (Gemma 2) are masks and factors inside a tile.

The queries may be a slice of the sequence (context parallelism, `context_parallel.py`: a device's
t_q local queries start at global position `q_offset` and attend all t_k keys): causality, windows,
the skipped tiles and segments then all go by global index.

Training only: decoding with a KV cache keeps the reference path of `llm_jax.models.ops.attend`.
Shapes: b = batch, t = length (t_q queries, t_k keys; t_q = t_k = t without an offset), h = query
heads, k = key/value heads, g = h // k, d = head dim, n = number of query blocks, q / s = rows of a
query / key block.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array

# The score of a masked position, here and in the reference (llm_jax/models/ops.py). Finite, so a
# tile in which a row sees nothing keeps finite running statistics.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def attention(
    q: Array,
    k: Array,
    v: Array,
    segment_ids: Array | None = None,
    window: int | Array | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    block_q: int = 512,
    block_k: int = 512,
    q_offset: int | Array = 0,
    kv_segment_ids: Array | None = None,
) -> Array:
    """Causal self-attention, equal to `ops.attend(q, k, v, None, 'einsum', ...)` (q_offset 0).

    q: [b, t_q, h, d]; k, v: [b, t_k, k, d] (h a multiple of k); q_offset: int or traced int, the
    global position of the first query (keys start at 0; 0 and t_q = t_k: self-attention);
    segment_ids: [b, t_q] int or None (packed documents: a query sees only earlier keys of its own
    document), kv_segment_ids: the keys' [b, t_k] (default: segment_ids, when t_q = t_k); window:
    int, traced int or None (a key is seen if it is among the last `window` positions); scale: the
    logits' factor (default 1/sqrt(d)); softcap: logits -> cap * tanh(logits / cap).
    Returns [b, t_q, h, d] in q's dtype.

    Lengths that are not a multiple of the blocks are padded at the end: the padded keys lie after
    every real query, so causality hides them, and the padded queries are cut off.
    """
    b, tq, h, d = q.shape
    tk = k.shape[1]
    bq, bk = min(block_q, tq), min(block_k, tk)
    if segment_ids is not None and kv_segment_ids is None:
        kv_segment_ids = segment_ids
    pad_q, pad_k = -tq % bq, -tk % bk
    if pad_q:
        q = jnp.pad(q, ((0, 0), (0, pad_q), (0, 0), (0, 0)))
        segment_ids = None if segment_ids is None else jnp.pad(segment_ids, ((0, 0), (0, pad_q)))
    if pad_k:
        k, v = (jnp.pad(x, ((0, 0), (0, pad_k), (0, 0), (0, 0))) for x in (k, v))
        kv_segment_ids = None if kv_segment_ids is None else jnp.pad(kv_segment_ids, ((0, 0), (0, pad_k)))
    segs = None if segment_ids is None else (segment_ids, kv_segment_ids)
    scale = float(d**-0.5 if scale is None else scale)
    window = None if window is None else jnp.asarray(window, jnp.int32)
    out = _flash(q, k, v, segs, window, jnp.asarray(q_offset, jnp.int32), scale, softcap, bq, bk)
    return out[:, :tq] if pad_q else out


def _visible(q0: Array, k0: Array, bq: int, bk: int, seg_q, seg_k, window) -> Array:
    """Which keys of the tile starting at query q0, key k0 each query sees: [b or 1, 1, 1, q, s]."""
    q_idx = q0 + jnp.arange(bq)
    k_idx = k0 + jnp.arange(bk)
    seen = q_idx[:, None] >= k_idx[None, :]
    if window is not None:
        seen = seen & (k_idx[None, :] > q_idx[:, None] - window)
    seen = seen[None]
    if seg_q is not None:
        seen = seen & (seg_q[:, :, None] == seg_k[:, None, :])
    return seen[:, None, None]


def _logits(qi: Array, kj: Array, scale: float, softcap: float | None) -> Array:
    """qi: [b, q, k, g, d], kj: [b, s, k, d] -> float32 logits [b, k, g, q, s], scaled and capped."""
    s = jnp.einsum("bqkgd,bskd->bkgqs", qi, kj, preferred_element_type=jnp.float32) * jnp.float32(scale)
    return softcap * jnp.tanh(s / softcap) if softcap else s


def _key_range(i: Array, off: Array, bq: int, bk: int, nk: int, window) -> tuple[Array, Array]:
    """Key blocks [lo, hi) that query block i (global rows from off + i * bq) sees: none above the
    diagonal, none before the window, none past the nk key blocks."""
    hi = jnp.minimum(nk, (off + (i + 1) * bq - 1) // bk + 1)
    lo = 0 if window is None else jnp.maximum(0, (off + i * bq - window + 1) // bk)
    return jnp.asarray(lo, jnp.int32), jnp.asarray(hi, jnp.int32)


def _query_range(j: Array, off: Array, bq: int, bk: int, n: int, window) -> tuple[Array, Array]:
    """Query blocks [lo, hi) that see key block j: none before it, none past its window (the n query
    blocks' rows are global positions off + local row)."""
    lo = jnp.maximum(0, (j * bk - off) // bq)
    hi = n if window is None else jnp.minimum(n, ((j + 1) * bk - 1 + window - 1 - off) // bq + 1)
    return jnp.asarray(lo, jnp.int32), jnp.asarray(hi, jnp.int32)


def _seg(segs, side, start, size):
    """The segment ids of queries (side 0) or keys (side 1) [start, start + size), or None."""
    return None if segs is None else jax.lax.dynamic_slice_in_dim(segs[side], start, size, 1)


def _forward(q, k, v, segs, window, off, scale, softcap, bq, bk):
    """Online softmax over the visible key blocks of each query block.

    Returns the output [b, t_q, h, d] and the log-sum-exp of every row [n, b, k, g, q] float32."""
    b, t, h, d = q.shape
    kv = k.shape[2]
    g, n, nk = h // kv, t // bq, k.shape[1] // bk
    q_blocks = q.reshape(b, n, bq, kv, g, d).swapaxes(0, 1)  # [n, b, q, k, g, d]

    def one_query_block(i, qi):
        seg_q = _seg(segs, 0, i * bq, bq)

        def visit(j, carry):
            m, total, acc = carry  # [b, k, g, q], [b, k, g, q], [b, k, g, q, d]
            kj = jax.lax.dynamic_slice_in_dim(k, j * bk, bk, 1)
            vj = jax.lax.dynamic_slice_in_dim(v, j * bk, bk, 1)
            seen = _visible(off + i * bq, j * bk, bq, bk, seg_q, _seg(segs, 1, j * bk, bk), window)
            s = jnp.where(seen, _logits(qi, kj, scale, softcap), _MASK_VALUE)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.where(seen, jnp.exp(s - m_new[..., None]), 0.0)
            corr = jnp.exp(m - m_new)
            pv = jnp.einsum("bkgqs,bskd->bkgqd", p.astype(v.dtype), vj, preferred_element_type=jnp.float32)
            return m_new, total * corr + p.sum(-1), acc * corr[..., None] + pv

        init = (
            jnp.full((b, kv, g, bq), _MASK_VALUE, jnp.float32),
            jnp.zeros((b, kv, g, bq), jnp.float32),
            jnp.zeros((b, kv, g, bq, d), jnp.float32),
        )
        lo, hi = _key_range(i, off, bq, bk, nk, window)
        m, total, acc = jax.lax.fori_loop(lo, hi, visit, init)
        # A padded query row may see no key: output 0 there, not 0 / 0 (its log-sum-exp is -inf).
        out = (acc / jnp.where(total > 0, total, 1.0)[..., None]).transpose(0, 3, 1, 2, 4)  # [b, q, k, g, d]
        return i + 1, (out.astype(q.dtype), m + jnp.log(total))

    _, (out, lse) = jax.lax.scan(one_query_block, jnp.int32(0), q_blocks)
    return out.swapaxes(0, 1).reshape(b, t, h, d), lse


def _backward(q, k, v, segs, window, off, out, lse, dout, scale, softcap, bq, bk):
    """Gradients of q, k, v: for each key block, the query blocks that see it, each tile recomputed
    from the saved log-sum-exp. dq [n, b, q, k, g, d] float32 is accumulated in place."""
    b, t, h, d = q.shape
    kv = k.shape[2]
    g, n = h // kv, t // bq
    q5 = q.reshape(b, t, kv, g, d)
    do5 = dout.reshape(b, t, kv, g, d)
    # D_i = sum_d dO * O: the softmax backward's row term, [b, k, g, t] float32.
    delta = jnp.einsum("btkgd,btkgd->bkgt", do5.astype(jnp.float32), out.reshape(b, t, kv, g, d).astype(jnp.float32))
    nk = k.shape[1] // bk
    k_blocks = k.reshape(b, nk, bk, kv, d).swapaxes(0, 1)  # [t_k/s, b, s, k, d]
    v_blocks = v.reshape(b, nk, bk, kv, d).swapaxes(0, 1)

    def one_key_block(carry, kvj):
        j, dq = carry
        kj, vj = kvj
        seg_k = _seg(segs, 1, j * bk, bk)

        def visit(i, acc):
            dq, dk, dv = acc
            qi = jax.lax.dynamic_slice_in_dim(q5, i * bq, bq, 1)
            doi = jax.lax.dynamic_slice_in_dim(do5, i * bq, bq, 1)
            lse_i = jax.lax.dynamic_index_in_dim(lse, i, 0, keepdims=False)
            delta_i = jax.lax.dynamic_slice_in_dim(delta, i * bq, bq, 3)
            seen = _visible(off + i * bq, j * bk, bq, bk, _seg(segs, 0, i * bq, bq), seg_k, window)
            c = _logits(qi, kj, scale, softcap)
            p = jnp.where(seen, jnp.exp(c - lse_i[..., None]), 0.0)  # [b, k, g, q, s]
            dv = dv + jnp.einsum("bkgqs,bqkgd->bskd", p.astype(dout.dtype), doi, preferred_element_type=jnp.float32)
            dp = jnp.einsum("bqkgd,bskd->bkgqs", doi, vj, preferred_element_type=jnp.float32)
            ds = p * (dp - delta_i[..., None])
            if softcap:  # d/dx cap * tanh(x / cap) = 1 - tanh^2
                ds = ds * (1.0 - jnp.square(c / softcap))
            ds = ds * jnp.float32(scale)
            dq_i = jnp.einsum("bkgqs,bskd->bqkgd", ds.astype(k.dtype), kj, preferred_element_type=jnp.float32)
            dq = jax.lax.dynamic_update_index_in_dim(dq, dq[i] + dq_i, i, 0)
            dk = dk + jnp.einsum("bkgqs,bqkgd->bskd", ds.astype(q.dtype), qi, preferred_element_type=jnp.float32)
            return dq, dk, dv

        zeros = jnp.zeros((b, bk, kv, d), jnp.float32)
        lo, hi = _query_range(j, off, bq, bk, n, window)
        dq, dk, dv = jax.lax.fori_loop(lo, hi, visit, (dq, zeros, zeros))
        return (j + 1, dq), (dk.astype(k.dtype), dv.astype(v.dtype))

    dq0 = jnp.zeros((n, b, bq, kv, g, d), jnp.float32)
    (_, dq), (dk, dv) = jax.lax.scan(one_key_block, (jnp.int32(0), dq0), (k_blocks, v_blocks))
    dq = dq.swapaxes(0, 1).reshape(b, t, h, d).astype(q.dtype)
    return dq, dk.swapaxes(0, 1).reshape(k.shape), dv.swapaxes(0, 1).reshape(v.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _flash(q, k, v, segs, window, off, scale, softcap, bq, bk):
    """q: [b, t_q, h, d], k, v: [b, t_k, k, d], t_q a multiple of bq, t_k of bk; segs: (query
    [b, t_q], key [b, t_k] segment ids) or None; off: int32, the first query's global position
    -> [b, t_q, h, d]."""
    return _forward(q, k, v, segs, window, off, scale, softcap, bq, bk)[0]


def _flash_fwd(q, k, v, segs, window, off, scale, softcap, bq, bk):
    out, lse = _forward(q, k, v, segs, window, off, scale, softcap, bq, bk)
    return out, (q, k, v, segs, window, off, out, lse)


def _flash_bwd(scale, softcap, bq, bk, residuals, dout):
    q, k, v, segs, window, off, out, lse = residuals
    dq, dk, dv = _backward(q, k, v, segs, window, off, out, lse, dout, scale, softcap, bq, bk)
    # Segment ids, the window and the offset are integers: no gradient.
    return dq, dk, dv, None if segs is None else (None, None), None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
