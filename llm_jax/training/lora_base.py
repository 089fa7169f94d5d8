"""The frozen base of a LoRA run: checked against the run, read from its own run directory, stored
as `config.lora.base_dtype` says.

A LoRA run (`config.lora.rank` > 0) names its base by `config.lora.base`, a run directory of
llm_jax.main or `llm_jax.convert from_hf`; its checkpoints hold the adapters and their optimizer
state only, and record which checkpoint of the base they were trained on (`BASE_STEP`), so a
resumed run, `generate`, `merge` and `to_hf` read that very step again. The base must compute the
run's model without adapters (the same `config.model`) and have the same tokenizer.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from llm_jax.models import family as family_lib
from llm_jax.models import lora, quant
from llm_jax.models.config import RUNTIME_FIELDS, ModelConfig
from llm_jax.runtime import sharding
from llm_jax.runtime.errors import BadValue, NotFound
from llm_jax.training import checkpoint as ckpt_lib
from llm_jax.training import config as config_lib

BASE_STEP = "lora_base_step"  # the checkpoint data key: the base's step the adapters were trained on


def base_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The base run's config, after checking that it can be this run's base: a run directory, not a
    LoRA run itself, the same model (runtime fields such as dtype or remat may differ)."""
    base = config.lora.base
    if not os.path.isfile(os.path.join(base, "config.json")):
        raise NotFound(
            f"config.lora.base={base!r} is not a run directory (no config.json); give a directory written by "
            "llm_jax.main or `llm_jax.convert from_hf`"
        )
    saved = config_lib.load_run_config(base)
    if saved.lora.rank:
        raise BadValue(
            f"config.lora.base={base!r} is itself a LoRA run (rank {saved.lora.rank}); merge it into a plain run "
            f"first: python -m llm_jax.convert merge --workdir {base} --out_workdir MERGED"
        )
    ours, theirs = config.model.to_dict(), saved.model.to_dict()
    diffs = [
        f"model.{k} is {theirs.get(k)!r} there but {v!r} here"
        for k, v in sorted(ours.items())
        if k not in RUNTIME_FIELDS and k != "preset" and json.dumps(theirs.get(k)) != json.dumps(v)
    ]
    if diffs:
        raise BadValue(
            f"config.lora.base={base!r} is another model than this run's: " + "; ".join(diffs[:4]) + ". Build "
            "the LoRA run's config from the base (configs/lora.py:BASE does)"
        )
    return saved


def trainable_and_frozen(params, cfg: ModelConfig):
    """(trainable, frozen) of a model's parameters: (adapters, base) for a LoRA model, else (all, {})."""
    return lora.split(params) if cfg.lora_rank else (params, {})


def init_frozen(model: nn.Module, dtype: str, seq_len: int = 1) -> Callable[[jax.Array], Any]:
    """rng -> the frozen part of a fresh model's parameters (boxed), floats stored as `dtype`
    ('bfloat16': a LoRA base kept in half the bytes; integer kernels come from the model itself,
    `weight_quant`); {} without LoRA."""

    def init(rng):
        _, frozen = trainable_and_frozen(family_lib.init_params(model, rng, seq_len), model.cfg)
        if dtype != "bfloat16":
            return frozen
        return jax.tree.map(lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x, frozen)

    return init


def abstract_frozen(model: nn.Module, dtype: str, mesh, rules) -> Any:
    """The frozen base's ShapeDtypeStructs, carrying their shardings on `mesh`."""
    boxed = jax.eval_shape(init_frozen(model, dtype), jax.random.key(0))
    return ckpt_lib.abstract_like(nn.meta.unbox(boxed), sharding.boxed_shardings(boxed, mesh, rules))


def float_model(cfg: ModelConfig) -> nn.Module:
    """The base model: `cfg` without adapters or quantization (what the base run saved)."""
    return family_lib.build(lora.without_adapters(cfg))


def load(config, cfg: ModelConfig, mesh, rules, frozen: Any, step: int | None = None, tokenizer_id=None):
    """(base step, frozen params) of `config.lora.base`: checkpoint `step` (None: its latest) read
    onto `mesh`, then cast to bfloat16 or quantized to int8 / int4 as `config.lora.base_dtype` says,
    laid out as `frozen` (the abstract frozen tree of `state.build`, with its shardings)."""
    base_config(config)
    boxed = family_lib.abstract_params(float_model(cfg))
    abstract = ckpt_lib.abstract_like(nn.meta.unbox(boxed), sharding.boxed_shardings(boxed, mesh, rules))
    step, params, data = ckpt_lib.restore_params(config.lora.base, abstract, step)
    saved_tok = data.get("tokenizer")
    if tokenizer_id and saved_tok and saved_tok != tokenizer_id:
        raise BadValue(
            f"config.lora.base={config.lora.base!r} was trained with tokenizer {saved_tok}, this run's is "
            f"{tokenizer_id}; use the base's tokenizer (config.data.tokenizer_path={config.lora.base}/tokenizer/...)"
        )
    kind = config.lora.base_dtype
    out_sh = jax.tree.map(lambda x: x.sharding, frozen)
    if kind in quant.QMAX:
        fn = lambda p: quant.quantize(p, frozen, kind)  # noqa: E731
    else:
        dtype = jnp.bfloat16 if kind == "bfloat16" else None
        fn = lambda p: jax.tree.map(lambda x: x.astype(dtype or x.dtype), p)  # noqa: E731
    with mesh:
        return step, jax.jit(fn, out_shardings=out_sh)(params)
