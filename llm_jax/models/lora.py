"""LoRA adapters as trees: which leaves are adapters, splitting a model's parameters into the
trainable adapters and the frozen base, putting them back together, and merging.

A LoRA model (`ModelConfig.lora_rank` > 0) has the base model's parameter tree plus `lora_a`
[*in, r] and `lora_b` [r, *out] beside each targeted `kernel` [*in, *out] (`layers.Dense`; with
scanned layers every leaf has a leading layer axis [L, ...]). Training differentiates the adapters
only (`split`): the base gets no gradient and no optimizer state, and a checkpoint holds the
adapters. `combine` is the inverse of `split` (no arrays are copied); `merge` folds the adapters
into the kernels, W + (alpha / r) A B, giving the base model's tree with the adapted function;
`merged` does it for a whole LoRA model (its config and params, a QLoRA base dequantized first), the
step under `convert merge` and the merged `convert to_hf` (llm_jax/interop/lora_export.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from llm_jax.models import quant
from llm_jax.models.config import ModelConfig

ADAPTERS = ("lora_a", "lora_b")


def _is_dict(x) -> bool:
    return isinstance(x, dict) or hasattr(x, "items") and not hasattr(x, "shape")


def split(params: dict) -> tuple[dict, dict]:
    """(adapters, base): the `lora_a` / `lora_b` leaves and everything else, as two nested dicts of
    the same layout (modules without adapters are absent from the first)."""
    adapters, base = {}, {}
    for key, value in params.items():
        if _is_dict(value):
            a, b = split(value)
            if a:
                adapters[key] = a
            if b:
                base[key] = b
        elif key in ADAPTERS:
            adapters[key] = value
        else:
            base[key] = value
    return adapters, base


def combine(base: dict, adapters: dict) -> dict:
    """The model's whole tree from `split`'s two halves (the same arrays, nothing copied)."""
    out = dict(base)
    for key, value in adapters.items():
        out[key] = combine(base.get(key, {}), value) if _is_dict(value) else value
    return out


def count(adapters: dict) -> int:
    return sum(x.size for x in jax.tree.leaves(adapters))


def zeros_like_b(adapters: dict) -> dict:
    """The adapters with every B zero: the combined model then computes the base exactly (the
    reference policy of preference tuning on a LoRA run)."""

    def zero(path, x):
        return jnp.zeros_like(x) if path[-1].key == "lora_b" else x

    return jax.tree_util.tree_map_with_path(zero, adapters)


def delta(a: jax.Array, b: jax.Array, kernel_shape: tuple[int, ...], scale: float) -> jax.Array:
    """scale * A B in the kernel's shape: a [*lead, *in, r], b [*lead, r, *out] -> [*lead, *in, *out],
    `lead` being the stacked-layers axis when there is one (decided by the kernel's shape)."""
    for n_lead in (0, 1):
        lead = a.shape[:n_lead]
        if b.shape[:n_lead] == lead and a.shape[:-1] + b.shape[n_lead + 1 :] == tuple(kernel_shape):
            in_size, out_size = a.shape[n_lead:-1], b.shape[n_lead + 1 :]
            a2 = a.reshape(*lead, -1, a.shape[-1]).astype(jnp.float32)
            b2 = b.reshape(*lead, b.shape[n_lead], -1).astype(jnp.float32)
            return (scale * jnp.matmul(a2, b2)).reshape(*lead, *in_size, *out_size)
    raise ValueError(f"lora_a {a.shape} and lora_b {b.shape} do not make a kernel of shape {kernel_shape}")


def merge(params: dict, alpha: float, rank: int) -> dict:
    """A LoRA model's tree -> the base model's tree computing the same function: each adapted float
    kernel becomes W + (alpha / rank) A B (in float32, cast back to the kernel's dtype); the
    adapters are dropped. Quantized kernels (int8 / int4) cannot take the sum: `quant.dequantize`
    them first."""
    out = {}
    for key, value in params.items():
        if key in ADAPTERS:
            continue
        if _is_dict(value) and "lora_a" in value:
            kernel = value["kernel"]
            if not jnp.issubdtype(kernel.dtype, jnp.floating):
                raise ValueError(f"merge: kernel of {key} is {kernel.dtype}; dequantize the base first")
            d = delta(value["lora_a"], value["lora_b"], kernel.shape, alpha / rank)
            merged = {k: v for k, v in value.items() if k not in ADAPTERS}
            merged["kernel"] = (kernel.astype(jnp.float32) + d).astype(kernel.dtype)
            out[key] = merged
        elif _is_dict(value):
            out[key] = merge(value, alpha, rank)
        else:
            out[key] = value
    return out


def adapter_names(adapters: dict) -> list[str]:
    """The '/'-joined paths of the adapted layers (the modules holding lora_a / lora_b)."""
    names = []

    def walk(tree: Any, prefix: str):
        for key, value in tree.items():
            if key == "lora_a":
                names.append(prefix)
            elif _is_dict(value):
                walk(value, f"{prefix}/{key}" if prefix else key)

    walk(adapters, "")
    return sorted(names)


def without_adapters(cfg: ModelConfig) -> ModelConfig:
    """The base model of a LoRA model: no adapters (every LoRA field at its default), float kernels:
    the model its base run saved."""
    fields = dataclasses.fields(ModelConfig)
    defaults = {f.name: f.default for f in fields if f.metadata.get("section") == "lora"}
    return dataclasses.replace(cfg, weight_quant="none", **defaults)


def merged(cfg: ModelConfig, params: dict) -> tuple[ModelConfig, dict]:
    """(the base model's ModelConfig, its params) computing what the LoRA model `cfg` computes with
    `params` (adapters and frozen base together). A quantized base (QLoRA's int8 / int4 kernels) is
    dequantized first: the adapters are merged onto the dequantized weights they were trained with.
    Every float leaf is stored as the model's `param_dtype` before the sum (a bfloat16 base too), so
    the merged kernels are W + (alpha / r) A B at that precision."""
    if not cfg.lora_rank:
        raise ValueError("merged: the model has no LoRA adapters (lora_rank=0)")
    plain = without_adapters(cfg)
    dtype = jnp.dtype(plain.weight_dtype)
    tree = quant.dequantize(params) if cfg.weight_quant != "none" else params
    tree = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)
    return plain, merge(tree, cfg.lora_alpha, cfg.lora_rank)
