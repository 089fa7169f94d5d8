"""The decoder-only language-model family (`ModelConfig.family == 'lm'`): `TransformerLM` trained on
next-token prediction, decoded over its KV cache.

Batches (llm_jax/data/lm_data.py) hold `inputs` and `targets` [b, t] int32 and optionally `weights` [b, t]
(prompt-completion fine-tuning learns the completions only) and, for packed documents
(`config.data.packing='documents'`), `segment_ids` and `positions` [b, t] int32.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_jax.models import family as family_lib
from llm_jax.models import loss as loss_lib
from llm_jax.models import moe
from llm_jax.models.model import TransformerLM, output_kernel, softcap


def token_loss_sum(model, params, batch, rng, train: bool, *inputs, **kwargs):
    """(summed cross-entropy of `batch['targets']`, token count) of `model.apply(params, *inputs, **kwargs)`.

    Weighted by `batch['weights']` if present; label smoothing and dropout when `train`. With
    `loss_chunk` the model returns its final hidden states and the fused chunked loss applies the
    output projection itself (never the full [b, t, v] float32 logits).
    """
    total, count, _ = token_loss_and_stats(model, params, batch, rng, train, *inputs, **kwargs)
    return total, count


def token_loss_and_stats(model, params, batch, rng, train: bool, *inputs, **kwargs):
    """`token_loss_sum` plus the MoE layers' 'moe_stats' collection (`moe.collect`; {} when
    `train` is False or the model has no experts)."""
    cfg = model.cfg
    rngs = {} if rng is None else {"dropout": rng}
    deterministic = not train or cfg.dropout_rate == 0.0
    smoothing = cfg.label_smoothing if train else 0.0
    mutable = [moe.STATS] if train and cfg.num_experts else False
    common = dict(deterministic=deterministic, rngs=rngs, mutable=mutable, **kwargs)
    out = model.apply({"params": params}, *inputs, return_hidden=bool(cfg.loss_chunk), **common)
    out, stats = out if mutable else (out, None)
    stats = moe.collect(stats[moe.STATS]) if stats else {}
    with jax.named_scope("loss"):  # names the loss's ops in profiles (experiments/profile_step.py)
        if cfg.loss_chunk:
            kernel, vocab_first = output_kernel(cfg, params)
            total, count = loss_lib.chunked_cross_entropy(
                out, kernel, batch["targets"], batch.get("weights"), min(cfg.loss_chunk, out.shape[1]), vocab_first,
                smoothing, cfg.final_softcap,
            )  # fmt: skip
        else:
            total, count = loss_lib.token_loss(out, batch["targets"], batch.get("weights"), smoothing)
    return total, count, stats


class DecoderOnly(family_lib.ModelFamily):
    name = "lm"
    cache_fill = {"cached_pos": -1}  # -1: an empty slot, never attended

    def make_model(self, cfg) -> TransformerLM:
        return TransformerLM(cfg)

    def init_inputs(self, cfg, batch: int, length: int) -> dict:
        return {"tokens": jnp.zeros((batch, length), jnp.int32)}

    def loss_sum(self, model, params, batch, rng, train):
        """(summed cross-entropy of `targets` given `inputs`, token count); weighted if the batch has
        weights; with label smoothing and dropout when training. Packed documents (`segment_ids`,
        `positions` [b, t]) attend within their own."""
        packed = {"positions": batch.get("positions"), "segment_ids": batch.get("segment_ids")}
        return token_loss_sum(model, params, batch, rng, train, batch["inputs"], **packed)

    def train_loss(self, model, params, batch, rng):
        """The cross-entropy plus, with experts, the weighted load-balancing and router z-losses per
        token (the metrics `aux_loss`, `router_z_loss` and the per-expert `expert_load`)."""
        packed = {"positions": batch.get("positions"), "segment_ids": batch.get("segment_ids")}
        total, count, stats = token_loss_and_stats(model, params, batch, rng, True, batch["inputs"], **packed)
        if not stats:
            return total, (total, count, {})
        cfg = model.cfg
        penalty = cfg.aux_loss_weight * stats["aux_loss"] + cfg.router_z_weight * stats["router_z_loss"]
        metrics = {"aux_loss": stats["aux_loss"], "router_z_loss": stats["router_z_loss"], "expert_load": stats["load"]}
        return total + count * penalty, (total, count, metrics)

    def init_cache(self, model, params, batch, length, start, mesh=None, **inputs) -> family_lib.Cache:
        """An empty KV cache of `length` slots: every layer's cached_key/cached_value [b, k, length, d],
        cached_pos [b, length] (-1: empty) and write index (with scan_layers, a leading layer axis)."""
        layers, specs = family_lib.empty_cache(model, {"tokens": jnp.zeros((batch, length), jnp.int32)}, mesh)
        return family_lib.Cache(layers=layers, next_pos=jnp.asarray(start, jnp.int32), specs=specs, mesh=mesh)

    def tokens_to_logits(self, model, params):
        """(tokens [b, t], cache) -> (logits [b, v] float32 of the last position, cache).

        Positions are the cache's `next_pos` onwards. Only the last position goes through the output
        projection, in the compute dtype like the model's own head: a prefill never computes
        [b, t, v] logits. The head is [e, v], a tied embedding transposed once here (outside the
        decoding loop): every step then multiplies by a row-major matrix (on CPU ~25% faster).
        """
        kernel, vocab_first = output_kernel(model.cfg, params)
        dtype = model.cfg.compute_dtype
        head = (kernel.T if vocab_first else kernel).astype(dtype)

        def step(tokens: jax.Array, cache: family_lib.Cache):
            positions = cache.next_pos[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)
            hidden, mut = model.apply(
                {"params": params, "cache": cache.layers},
                tokens,
                positions,
                decode=True,
                return_hidden=True,
                mutable=["cache"],
            )
            logits = jnp.dot(hidden[:, -1].astype(dtype), head).astype(jnp.float32)
            logits = nn.with_logical_constraint(logits, ("activation_batch", "activation_vocab"), mesh=cache.mesh)
            new = cache.replace(layers=cache.constrain(mut["cache"]), next_pos=cache.next_pos + tokens.shape[1])
            return logits, new

        return step

    def score(self, model, params, tokens, index, targets):
        """(log p(targets) [b, c] float32, greedy [b, c] bool) read at positions `index` [b, c] of
        `tokens` [b, t] (see `ModelFamily.score`).

        Only the c read positions go through the output projection (an evaluation request's
        continuation is a few tokens of a long context: [b, c, v] logits, never [b, t, v]); the
        projection runs in the compute dtype as in the model's own head, then the final soft-cap.
        """
        cfg = model.cfg
        hidden = model.apply({"params": params}, tokens, return_hidden=True)  # [b, t, e]
        picked = jnp.take_along_axis(hidden, index[:, :, None], axis=1)  # [b, c, e]
        kernel, vocab_first = output_kernel(cfg, params)
        head = (kernel.T if vocab_first else kernel).astype(cfg.compute_dtype)  # [e, v]
        logits = softcap(jnp.dot(picked.astype(cfg.compute_dtype), head).astype(jnp.float32), cfg.final_softcap)
        logits = nn.with_logical_constraint(logits, ("activation_batch", "activation_length", "activation_vocab"))
        logp = jax.nn.log_softmax(logits, axis=-1)  # [b, c, v]
        chosen = jnp.take_along_axis(logp, targets[:, :, None], axis=-1)[..., 0]
        return chosen, jnp.argmax(logits, axis=-1) == targets


FAMILY = family_lib.register(DecoderOnly())
