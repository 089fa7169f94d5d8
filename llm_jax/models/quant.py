"""Weight-only quantization of the dense kernels: float [*in, *out] -> integers with one float32
scale per output channel (`layers.Dense` with `ModelConfig.weight_quant` 'int8' / 'int4').

Symmetric, round to nearest: scale = max|W| over the input axes / qmax (127 or 7), q = round(W /
scale). The scale keeps the input axes as 1s, so it shards like the kernel's output axes. The
layers that take it are the `Dense` ones (attention q/k/v/out, the MLP, an MoE router); the
embedding, a separate `lm_head` and the experts' stacked weights stay float.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

QMAX = {"int8": 127, "int4": 7}
DTYPES = {"int8": jnp.int8, "int4": jnp.int4}


def quantize_kernel(kernel: jax.Array, scale_shape: tuple[int, ...], kind: str) -> tuple[jax.Array, jax.Array]:
    """(q, scale) of one kernel [*lead, *in, *out]; `scale_shape` is the kernel's with the input axes
    as 1 (those are the axes reduced)."""
    axes = tuple(i for i, (k, s) in enumerate(zip(kernel.shape, scale_shape, strict=True)) if s == 1 and k != 1)
    w = kernel.astype(jnp.float32)
    scale = jnp.max(jnp.abs(w), axis=axes, keepdims=True) / QMAX[kind]
    scale = jnp.where(scale == 0, 1.0, scale)
    q = jnp.clip(jnp.round(w / scale), -QMAX[kind], QMAX[kind]).astype(DTYPES[kind])
    return q, scale.astype(jnp.float32)


def quantize(params: dict, abstract: dict, kind: str) -> dict:
    """A float tree -> the tree of the same model with `weight_quant=kind` (whose abstract tree,
    `jax.eval_shape` of its init, says which kernels have a `kernel_scale` and its shape)."""
    out = {}
    for key, value in params.items():
        spec = abstract.get(key)
        if isinstance(value, dict) and isinstance(spec, dict) and "kernel_scale" in spec:
            q, scale = quantize_kernel(value["kernel"], spec["kernel_scale"].shape, kind)
            out[key] = {**value, "kernel": q, "kernel_scale": scale}
        elif isinstance(value, dict) and isinstance(spec, dict):
            out[key] = quantize(value, spec, kind)
        else:
            out[key] = value
    return out


def dequantize(params: dict) -> dict:
    """The float32 kernels back (q * scale) wherever a `kernel_scale` is; for merging adapters."""
    out = {}
    for key, value in params.items():
        if isinstance(value, dict) and "kernel_scale" in value:
            rest = {k: v for k, v in value.items() if k != "kernel_scale"}
            out[key] = {**rest, "kernel": value["kernel"].astype(jnp.float32) * value["kernel_scale"]}
        elif isinstance(value, dict):
            out[key] = dequantize(value)
        else:
            out[key] = value
    return out


def weight_bytes(params) -> int:
    """Bytes of a tree's leaves at their dtypes' widths (int4 counted as half a byte, as TPUs and
    GPUs store it packed; XLA on CPU keeps a byte each)."""
    total = 0
    for x in jax.tree.leaves(params):
        bits = 4 if x.dtype == jnp.int4 else x.dtype.itemsize * 8
        total += x.size * bits // 8
    return total
