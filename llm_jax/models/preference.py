"""Preference tuning: the DPO and SimPO losses over pairs of rows, as pure functions, and the
training objective that the step (llm_jax/training/state.py) differentiates in place of the
family's loss when `config.train.objective` is 'dpo' or 'simpo'.

A batch (llm_jax/data/preference.py) holds pairs of rows, chosen at row 2i and rejected at 2i + 1,
with `weights` [b, t] that are 1 on the response tokens only. A row's log-probability under a
policy is the sum of its weighted tokens' log-probabilities (`row_logps`).

- DPO (Rafailov et al. 2023): with pi / ref a row's log-probability under the policy / the frozen
  reference, the rewards are r = beta * (pi - ref) and the loss -log sigmoid(r_chosen - r_rejected).
  The reference is the LoRA run's base with the adapters off (`reference_params`: every `lora_b`
  zero, so the combined model computes the base exactly), computed without gradient or dropout.
- SimPO (Meng et al. 2024): no reference; the rewards are the length-normalised log-probabilities
  r = beta * pi / |response| and the loss -log sigmoid(r_chosen - r_rejected - gamma), gamma the
  target reward margin.

Metrics (means over pairs): rewards/chosen, rewards/rejected, rewards/margin (chosen - rejected)
and rewards/accuracy (the share of pairs whose chosen reward is the larger).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from llm_jax.models import lora
from llm_jax.models.model import output_kernel, softcap

OBJECTIVES = ("lm", "dpo", "simpo")  # 'lm': the family's own loss (next-token cross-entropy)
DEFAULT_BETA = {"dpo": 0.1, "simpo": 2.0}  # the papers' usual values
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy")


# ----------------------------------------------------------------------------------------------
# Pure losses over per-row log-probabilities


def row_logps(token_logps: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(summed log-probability [b], weighted token count [b]) of each row: token_logps, weights [b, t]."""
    return (token_logps * weights).sum(-1), weights.sum(-1)


def as_pairs(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-row values [2p] -> (chosen [p], rejected [p]): rows 2i and 2i + 1."""
    pairs = x.reshape(-1, 2)
    return pairs[:, 0], pairs[:, 1]


def dpo_loss(pi_c, pi_r, ref_c, ref_r, beta: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(losses, chosen rewards, rejected rewards), each [p]: r = beta * (pi - ref),
    loss = -log sigmoid(r_c - r_r); pi_* / ref_* [p] the rows' summed log-probabilities."""
    rc, rr = beta * (pi_c - ref_c), beta * (pi_r - ref_r)
    return -jax.nn.log_sigmoid(rc - rr), rc, rr


def simpo_loss(pi_c, pi_r, len_c, len_r, beta: float, gamma: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(losses, chosen rewards, rejected rewards), each [p]: r = beta * pi / len (length-normalised,
    no reference), loss = -log sigmoid(r_c - r_r - gamma); len_* [p] the responses' token counts."""
    rc, rr = beta * pi_c / jnp.maximum(len_c, 1.0), beta * pi_r / jnp.maximum(len_r, 1.0)
    return -jax.nn.log_sigmoid(rc - rr - gamma), rc, rr


def pair_metrics(rc: jax.Array, rr: jax.Array) -> dict[str, jax.Array]:
    """The pairs' mean rewards, margin and accuracy (float32 scalars), keyed as METRICS."""
    return dict(zip(METRICS, (rc.mean(), rr.mean(), (rc - rr).mean(), (rc > rr).astype(jnp.float32).mean())))


# ----------------------------------------------------------------------------------------------
# Log-probabilities under a model, the reference


def _picked(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log softmax(logits)[targets]: logits [b, t, v] float32, targets [b, t] -> [b, t]."""
    chosen = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return chosen - jax.nn.logsumexp(logits, axis=-1)


def token_logps(model, params, batch: dict, rng=None, train: bool = False) -> jax.Array:
    """log p(targets [b, t] | inputs [b, t]) [b, t] float32 under a decoder-only model; dropout
    (the model's and LoRA's) only when `train` and given `rng`. With `loss_chunk` (dividing t) the
    output projection runs chunk by chunk of positions, each recomputed in the backward pass, so
    the [b, t, v] logits never exist at once (as the chunked cross-entropy avoids them)."""
    cfg = model.cfg
    kw = dict(deterministic=not train or cfg.dropout_rate == 0.0, rngs={} if rng is None else {"dropout": rng})
    targets, t = batch["targets"], batch["targets"].shape[1]
    chunk = min(cfg.loss_chunk, t)
    if not chunk or t % chunk:
        return _picked(model.apply({"params": params}, batch["inputs"], **kw), targets)
    hidden = model.apply({"params": params}, batch["inputs"], return_hidden=True, **kw)  # [b, t, e]
    kernel, vocab_first = output_kernel(cfg, params)
    head = (kernel.T if vocab_first else kernel).astype(cfg.compute_dtype)  # [e, v]

    @jax.checkpoint
    def body(_, xs):
        h, tgt = xs  # [b, c, e], [b, c]
        logits = softcap(jnp.dot(h.astype(cfg.compute_dtype), head).astype(jnp.float32), cfg.final_softcap)
        return None, _picked(logits, tgt)

    b = hidden.shape[0]
    xs = (hidden.reshape(b, t // chunk, chunk, -1).swapaxes(0, 1), targets.reshape(b, t // chunk, chunk).swapaxes(0, 1))
    _, out = jax.lax.scan(body, None, xs)  # [t / c, b, c]
    return out.swapaxes(0, 1).reshape(b, t)


def reference_params(params: dict) -> dict:
    """The reference policy of a LoRA model's parameters: the same tree with every `lora_b` zero,
    so the model computes its frozen base exactly (`lora.zeros_like_b`)."""
    adapters, base = lora.split(params)
    if not adapters:
        raise ValueError("DPO's reference is the base with the adapters off, but these parameters have no adapters")
    return lora.combine(base, lora.zeros_like_b(adapters))


# ----------------------------------------------------------------------------------------------
# The objective the training and evaluation steps call


@dataclasses.dataclass(frozen=True)
class Objective:
    """A preference objective: 'dpo' (beta) or 'simpo' (beta, gamma). Batches hold pairs of rows."""

    kind: str
    beta: float
    gamma: float = 0.0

    rows_per_example = 2  # a pair's two rows stay together when the step splits a batch into micro-batches

    def pair_losses(self, model, params, batch: dict, rng=None, train: bool = False):
        """(losses, chosen rewards, rejected rewards) [p] of the batch's p pairs under `params` (the
        model's whole tree; DPO's reference is computed from it, without gradient)."""
        pi, count = row_logps(token_logps(model, params, batch, rng, train), batch["weights"])
        (pi_c, pi_r), (len_c, len_r) = as_pairs(pi), as_pairs(count)
        if self.kind == "simpo":
            return simpo_loss(pi_c, pi_r, len_c, len_r, self.beta, self.gamma)
        ref = row_logps(token_logps(model, reference_params(params), batch), batch["weights"])[0]
        ref_c, ref_r = as_pairs(jax.lax.stop_gradient(ref))
        return dpo_loss(pi_c, pi_r, ref_c, ref_r, self.beta)

    def train_loss(self, model, trainable, frozen, batch: dict, rng):
        """The step's objective: (summed loss, (summed loss, pairs, metrics)) with the model on
        `lora.combine(frozen, trainable)`, as `ModelFamily.train_loss` returns it."""
        losses, rc, rr = self.pair_losses(model, lora.combine(frozen, trainable), batch, rng, train=True)
        total = losses.sum()
        return total, (total, jnp.float32(losses.shape[0]), pair_metrics(rc, rr))

    def eval_sums(self, model, params, batch: dict) -> dict[str, jax.Array]:
        """Sums over the batch's pairs ('loss_sum', each metric) and their 'count' (means over
        batches are then exact), without dropout."""
        losses, rc, rr = self.pair_losses(model, params, batch)
        n = jnp.float32(losses.shape[0])
        return {"loss_sum": losses.sum(), "count": n, **{k: v * n for k, v in pair_metrics(rc, rr).items()}}
