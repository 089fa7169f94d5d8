"""Learning-rate schedules and the optax chain: clip -> AdamW (decay masked) -> schedule."""

from __future__ import annotations

import jax
import optax

from llm_jax.runtime.errors import BadValue

# Parameter names that never get weight decay: norms, biases, embeddings and position tables.
_NO_DECAY = ("scale", "bias", "embedding", "pos_embed")


def _path_names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def decay_mask(params):
    """True for the matrices that get weight decay. Works on boxed (LogicallyPartitioned) trees too."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not any(name in _NO_DECAY for name in _path_names(path)), params
    )


def make_schedule(cfg) -> optax.Schedule:
    """Linear warmup to `lr`, then cosine decay to `lr * min_lr_ratio` at `total_steps` (or constant)."""
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=cfg.lr,
            warmup_steps=cfg.warmup_steps,
            decay_steps=max(cfg.decay_steps, cfg.warmup_steps + 1),
            end_value=cfg.lr * cfg.min_lr_ratio,
        )
    if cfg.schedule == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps), optax.constant_schedule(cfg.lr)],
            [cfg.warmup_steps],
        )
    raise BadValue(f"config.optim.schedule={cfg.schedule!r}: use 'cosine' or 'constant'")


def make_optimizer(cfg) -> optax.GradientTransformation:
    """The optax chain from `config.optim`. Gradient accumulation happens in the train step."""
    parts = []
    if cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip))
    parts.append(
        optax.adamw(
            learning_rate=make_schedule(cfg),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=decay_mask,
        )
    )
    return optax.chain(*parts)
