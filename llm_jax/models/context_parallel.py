"""Context parallelism: causal self-attention with the sequence sharded over a mesh axis.

When the logical rules map `activation_length` to a mesh axis of size > 1 (`config.mesh.sequence`;
`sharding.LOGICAL_RULES` maps it to `sequence`), every activation is split along the sequence and
each device holds t / n consecutive positions of its rows. Everything but attention is per position
and GSPMD partitions it by itself; attention needs every earlier key, so it runs here, explicitly,
under `jax.shard_map`:

- each device all-gathers the keys and values (and the segment ids) of its rows over the sequence
  axis, then attends its own queries to the whole sequence;
- the causal, window and segment masks are built from global indices: the queries of the device at
  sequence index i are positions i * t/n .. (i+1) * t/n - 1 of the row. RoPE was already applied
  outside, with each token's own position, so no position is re-numbered here;
- with `attention='blockwise'` (and 'splash' / 'cudnn', whose kernels take no query offset) the
  local attention is `blockwise.attention` with that offset: the [b, h, t/n, t] scores are never
  formed, key blocks in the future of every local query (or before every window) are skipped.
  'einsum' and 'dot_product' attend through `ops.attend` with an explicit [b, t/n, t] mask.

Why all-gather rather than a ring of collective-permutes: with grouped-query attention the keys and
values are small (Llama-3-8B: 8 kv heads of 32 query heads, a quarter of the queries' bytes), one
all-gather of them per layer is one collective XLA schedules and overlaps by itself, and the
gathered [b, t, k, d] keys/values are what a ring would move anyway over n - 1 steps. A ring's gain
is memory (one block of keys/values at a time instead of the whole sequence's), which matters only
when the gathered keys/values rival the activations (very long contexts with many kv heads).

Shapes: b = batch, t = length (global), h = query heads, k = kv heads, d = head dim.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from llm_jax.models import blockwise
from llm_jax.models.ops import _same_segment, attend, within_window

Array = jax.Array

Q_AXES = ("activation_batch", "activation_length", "activation_heads", "kv")
KV_AXES = ("activation_batch", "activation_length", "activation_kv_heads", "kv")
# Attentions whose sharded form is blockwise.attention with a query offset (memory linear in t / n).
FLASH = ("blockwise", "splash", "cudnn")


def _axis_size(mesh, axes) -> int:
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return math.prod(mesh.shape[a] for a in names)


def sequence_axes(length: int):
    """The mesh axis (or axes) a sequence of `length` is sharded over now, or None: no mesh set
    (`jax.set_mesh`), `activation_length` not mapped, mapped to axes of size 1, or a length that
    does not divide over them (GSPMD then partitions the plain attention as it can)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    axes = nn.logical_to_mesh_axes(Q_AXES)[1]
    n = _axis_size(mesh, axes)
    return axes if n > 1 and length % n == 0 else None


def attend_sharded(
    q: Array,
    k: Array,
    v: Array,
    impl: str,
    segment_ids: Array | None = None,
    window: int | Array | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    block: int = 512,
) -> Array:
    """`ops.attend`'s causal case (mask None) with the sequence sharded: q [b, t, h, d], k, v
    [b, t, k, d], segment_ids [b, t] or None -> [b, t, h, d], sharded like q. Call under the mesh
    and rules (`sharding.use_mesh`) when `sequence_axes(t)` is not None. `block`: blockwise's
    query and key rows per block."""
    mesh = jax.sharding.get_abstract_mesh()
    q_spec, kv_spec = (P(*nn.logical_to_mesh_axes(a)) for a in (Q_AXES, KV_AXES))
    seq = q_spec[1]
    seg_spec = P(q_spec[0], seq)
    # A traced window (a scanned layer's kind) enters as an argument: shard_map takes no closed-over tracers.
    win = None if window is None else jnp.asarray(window, jnp.int32)

    def local(q, k, v, seg, win):
        t_local = q.shape[1]
        k_all = jax.lax.all_gather(k, seq, axis=1, tiled=True)  # [b, t, k, d]
        v_all = jax.lax.all_gather(v, seq, axis=1, tiled=True)
        offset = jax.lax.axis_index(seq) * t_local  # global position of this shard's first query
        seg_all = None if seg is None else jax.lax.all_gather(seg, seq, axis=1, tiled=True)
        if impl in FLASH:
            return blockwise.attention(
                q, k_all, v_all, seg, win, scale, softcap, block, block, q_offset=offset, kv_segment_ids=seg_all
            )
        q_idx = offset + jnp.arange(t_local)
        k_idx = jnp.arange(k_all.shape[1])
        mask = (k_idx[None, :] <= q_idx[:, None]) & within_window(q_idx, k_idx, win)  # [t/n, t]
        mask = jnp.broadcast_to(mask, (q.shape[0], *mask.shape))
        if seg is not None:
            mask = mask & _same_segment(seg, seg_all)
        return attend(q, k_all, v_all, mask, impl, scale=scale, softcap=softcap)

    in_specs = (q_spec, kv_spec, kv_spec, None if segment_ids is None else seg_spec, None if win is None else P())
    # blockwise's loops start from fresh (device-invariant) zeros that become per-device values, which
    # shard_map's varying-axes check refuses; nothing here is reduced across devices, so it is off there.
    fn = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=q_spec, check_vma=impl not in FLASH)
    return fn(q, k, v, segment_ids, win)
