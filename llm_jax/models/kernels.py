"""Fused attention kernels where the hardware has them, behind `ModelConfig.attention`:

- 'splash': TPU splash attention (Pallas, `jax.experimental.pallas.ops.tpu.splash_attention`, in
  JAX 0.10 and 0.12): causal or local (sliding-window) masks with block sparsity, packed segments,
  grouped-query heads, soft-capped logits. Run per device under `jax.shard_map` (a Pallas call is
  not partitioned by the compiler): batch and heads split as the logical rules split the
  activations; the sequence is whole on each device.
- 'cudnn': cuDNN flash attention on NVIDIA GPUs (`jax.nn.dot_product_attention(...,
  implementation='cudnn')`): causal, a static sliding window, grouped-query heads; packed segments
  as a [b, 1, t, t] boolean mask (quadratic, but bits); no soft-capping (refused by ModelConfig).

Neither runs on a CPU: `check_platform` (called by `training.state.build` with the mesh's devices)
refuses them in one line naming 'blockwise', the pure-JAX path with the same memory behaviour.
Training only; decoding with a KV cache keeps the reference path. Shapes as in `ops.attend`:
q [b, t, h, d], k, v [b, t, k, d], segment_ids [b, t].
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from llm_jax.runtime.errors import BadValue

Array = jax.Array

# The platform each kernel needs (jax.Device.platform).
PLATFORMS = {"splash": "tpu", "cudnn": "gpu"}


def check_platform(attention: str, platform: str) -> None:
    """One line when `attention` names a kernel the devices (of `platform`) do not have."""
    need = PLATFORMS.get(attention)
    if need and platform != need:
        raise BadValue(
            f"config.model.attention={attention!r} is a {need.upper()} kernel but the devices are {platform}; "
            "use attention='blockwise' (the same memory-efficient attention in pure JAX) on this machine"
        )


def _static_window(impl: str, window) -> int | None:
    if window is None or isinstance(window, int):
        return window
    raise BadValue(
        f"config.model.attention={impl!r} needs each layer's window at trace time, but mixed local/global "
        "layers under scan_layers=True trace it: set scan_layers=False, or use attention='blockwise'"
    )


def cudnn(q: Array, k: Array, v: Array, segment_ids=None, window=None, scale=None) -> Array:
    """Causal attention by cuDNN's fused kernel: [b, t, h, d] -> [b, t, h, d]."""
    window = _static_window("cudnn", window)
    mask = None if segment_ids is None else (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    local = None if window is None else (window - 1, 0)  # (left, right) keys besides the query's own
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask, is_causal=True, scale=scale, local_window_size=local, implementation="cudnn"
    )


def splash(q: Array, k: Array, v: Array, segment_ids=None, window=None, scale=None, softcap=None, block=512):
    """Causal (or local) attention by the TPU splash kernel: [b, t, h, d] -> [b, t, h, d].

    Query scale is folded into q (the kernel has none); `block` sets every block size of the kernel
    (forward, dq and dkv passes), clipped to the length."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    window = _static_window("splash", window)
    b, t, h, d = q.shape
    q = q * jnp.asarray(d**-0.5 if scale is None else scale, q.dtype)
    bs = min(block, t)
    sizes = sk.BlockSizes(
        block_q=bs, block_kv=bs, block_kv_compute=bs, block_q_dkv=bs, block_kv_dkv=bs,
        block_kv_dkv_compute=bs, block_q_dq=bs, block_kv_dq=bs,
    )  # fmt: skip

    def per_device(q, k, v, seg):
        heads = q.shape[2]
        one = sm.CausalMask((t, t)) if window is None else sm.LocalMask((t, t), (window - 1, 0), 0)
        kernel = sk.make_splash_mha(
            sm.MultiHeadMask([one] * heads), block_sizes=sizes, attn_logits_soft_cap=softcap,
            head_shards=1, q_seq_shards=1,
        )  # fmt: skip
        heads_first = lambda x: x.swapaxes(1, 2)  # noqa: E731  [b, t, h, d] -> [b, h, t, d]
        if seg is None:
            out = jax.vmap(kernel)(heads_first(q), heads_first(k), heads_first(v))
        else:
            ids = sk.SegmentIds(q=seg, kv=seg)
            out = jax.vmap(lambda q, k, v, ids: kernel(q, k, v, segment_ids=ids))(
                heads_first(q), heads_first(k), heads_first(v), ids
            )
        return out.swapaxes(1, 2)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return per_device(q, k, v, segment_ids)
    # One at a time: heads and kv heads both map to 'tensor', which a single spec uses only once.
    batch, heads = nn.logical_to_mesh_axes(("activation_batch", "activation_heads"))
    (kv_heads,) = nn.logical_to_mesh_axes(("activation_kv_heads",))
    qs, ks = P(batch, None, heads, None), P(batch, None, kv_heads, None)
    args, specs = (q, k, v), (qs, ks, ks)
    if segment_ids is not None:
        args, specs = args + (segment_ids,), specs + (P(batch, None),)
    fn = jax.shard_map(
        lambda *a: per_device(*a) if len(a) == 4 else per_device(*a, None),
        mesh=mesh, in_specs=specs, out_specs=qs, check_vma=False,
    )  # fmt: skip
    return fn(*args)
