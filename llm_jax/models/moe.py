"""Mixture of experts: the router, two dispatches of tokens to experts, the auxiliary losses, `MoeMlp`.

An MoE layer replaces the block's dense MLP (`Block` picks it with `cfg.is_moe(layer)`): a router
scores the E experts for every token, each token goes through its top k experts (gated MLPs whose
weights are stacked on a leading 'experts' axis), and their outputs are summed with the router's
weights (Mixtral, Qwen3-MoE, OLMoE; optional shared experts that every token uses, DeepSeek).

Shapes: T = tokens (batch x length flattened), D = embed, F = an expert's hidden size, E = experts,
k = experts per token, C = an expert's capacity (capacity dispatch).

Three dispatches compute the same function when nothing overflows:
- `dropless`: the T * k token copies sorted by expert and run through grouped matmuls
  (`jax.lax.ragged_dot` with each expert's group size): no token is ever dropped, no padding.
  The grouped matmul of GPUs and TPUs; XLA on CPU computes it densely (every row by every expert).
- `blocks`: dropless too, each expert's group padded to whole blocks, each block multiplied by its
  expert's gathered weights: the fast dropless dispatch on CPU.
- `capacity`: every expert takes at most C = ceil(capacity_factor * T * k / E) copies in token order
  (the overflow is dropped: those copies contribute 0, the residual carries the token), batched
  dense matmuls over a [E, C, D] buffer (Switch Transformer, GShard): static shapes, some waste.

The load-balancing loss and the router z-loss are sown into the 'moe_stats' collection (a no-op
unless the caller makes it mutable: only the training loss does, llm_jax/models/lm.py).
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_jax.models import expert_parallel
from llm_jax.models.config import ModelConfig
from llm_jax.models.layers import Mlp, dense, gate_activation, normal_init, out_scale

Array = jax.Array

STATS = "moe_stats"  # the collection the MoE layers sow their losses and load into


def route(logits: Array, k: int, score: str, norm_topk: bool) -> tuple[Array, Array, Array]:
    """Router logits [T, E] float32 -> (weights [T, k] float32, experts [T, k] int32, probs [T, E]).

    `score`: 'softmax' over the experts, or 'sigmoid' of each logit (DeepSeek-V3). The top k scores
    are the weights, renormalised to sum to 1 with `norm_topk`. `probs` are the scores as a
    distribution over experts (sigmoid scores divided by their sum), what the load-balancing loss reads.
    """
    logits = logits.astype(jnp.float32)
    scores = jax.nn.softmax(logits, axis=-1) if score == "softmax" else jax.nn.sigmoid(logits)
    weights, experts = jax.lax.top_k(scores, k)
    if norm_topk:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    probs = scores if score == "softmax" else scores / jnp.sum(scores, axis=-1, keepdims=True)
    return weights, experts.astype(jnp.int32), probs


def _expert_mlp(h_gate: Array, h_up: Array, activation: str) -> Array:
    return gate_activation(activation, h_gate) * h_up


def _combine(copies: Array, weights: Array, dtype) -> Array:
    """Expert outputs of the token copies [T, k, D] summed with the router weights [T, k] (float32) -> [T, D]."""
    return jnp.einsum("tkd,tk->td", copies.astype(jnp.float32), weights).astype(dtype)


def _sort_copies(experts: Array, num_experts: int) -> tuple[Array, Array]:
    """experts [T, k] -> (order [T*k]: the copies sorted by expert, stable, so copy order[i] is
    token order[i] // k; sizes [E] int32: each expert's number of copies)."""
    flat = experts.reshape(-1)
    return jnp.argsort(flat, stable=True), jnp.bincount(flat, length=num_experts).astype(jnp.int32)


def dropless(
    x: Array, weights: Array, experts: Array, wi_gate: Array, wi_up: Array, wo: Array, activation: str
) -> Array:
    """Every token through its k experts, nothing dropped: x [T, D] -> [T, D].

    weights [T, k] float32, experts [T, k] int32 (from `route`); wi_gate, wi_up [E, D, F], wo [E, F, D].
    The T * k copies are sorted by expert (stable: within an expert in token order), so each expert's
    copies are one contiguous group; `ragged_dot` multiplies group e by expert e's weights; the
    outputs are put back in (token, slot) order and summed with the weights.
    """
    t, k = experts.shape
    order, sizes = _sort_copies(experts, wi_gate.shape[0])
    xs = jnp.take(x, order // k, axis=0)  # [T*k, D], grouped by expert
    hidden = _expert_mlp(
        jax.lax.ragged_dot(xs, wi_gate.astype(x.dtype), sizes),
        jax.lax.ragged_dot(xs, wi_up.astype(x.dtype), sizes),
        activation,
    )  # [T*k, F]
    out = jax.lax.ragged_dot(hidden, wo.astype(x.dtype), sizes)  # [T*k, D]
    copies = jnp.zeros_like(out).at[order].set(out)  # back to (token, slot) order
    return _combine(copies.reshape(t, k, -1), weights, x.dtype)


@jax.custom_vjp
def _move_rows(v: Array, index: Array, back: Array) -> Array:
    """y[i] = v[index[i]] (0 where index[i] is out of range) for a one-to-one `index` whose inverse
    is `back` (v's row j went to y[back[j]], out of range if nowhere). Its gradient is the same kind
    of gather with `back`: no scatter, which XLA on CPU runs row by row."""
    return v.at[index].get(mode="fill", fill_value=0)


def _move_rows_fwd(v, index, back):
    return _move_rows(v, index, back), (index, back)


def _move_rows_bwd(res, g):
    index, back = res
    return g.at[back].get(mode="fill", fill_value=0), None, None


_move_rows.defvjp(_move_rows_fwd, _move_rows_bwd)


def blocks(
    x: Array, weights: Array, experts: Array, wi_gate: Array, wi_up: Array, wo: Array, activation: str,
    block: int = 64,
) -> Array:  # fmt: skip
    """`dropless` computed without `ragged_dot`: x [T, D] -> [T, D], the same function.

    Where `ragged_dot` is not a native grouped matmul (XLA on CPU multiplies every row by every
    expert under a mask: E times the work), each expert's sorted group is padded to a multiple of
    `block` rows and every block is multiplied by its own expert's weights, selected per block
    ([blocks, D, F]; MegaBlocks' block-sparse layout with the weights copied per block): at most
    E * block rows of padding, and nothing is dropped. Arguments as in `dropless`.
    """
    t, k = experts.shape
    n, num_experts, d = t * k, wi_gate.shape[0], x.shape[-1]
    order, sizes = _sort_copies(experts, num_experts)
    padded = -(-sizes // block) * block  # [E]
    start, pad_start = jnp.cumsum(sizes) - sizes, jnp.cumsum(padded) - padded
    sorted_experts = experts.reshape(-1)[order]  # [T*k]
    num_blocks = -(-n // block) + num_experts  # enough for any routing
    rows = num_blocks * block
    # copy c (= token c // k, slot c % k) <-> its row of the padded layout (rows of padding: none)
    row_of_sorted = pad_start[sorted_experts] + jnp.arange(n) - start[sorted_experts]
    row_of_copy = jnp.zeros(n, jnp.int32).at[order].set(row_of_sorted)
    copy_of_row = jnp.full(rows, n, jnp.int32).at[row_of_sorted].set(order)
    buffer = _move_rows(jnp.repeat(x, k, axis=0), copy_of_row, row_of_copy).reshape(num_blocks, block, d)
    # Each block's expert as a one-hot [blocks, E] (blocks past the last group hold zeros; clipped):
    # the weights per block by a matmul, whose gradient is a matmul too (a gather's is a scatter).
    owner = jnp.searchsorted(jnp.cumsum(padded), jnp.arange(num_blocks) * block, side="right")
    onehot = jax.nn.one_hot(jnp.minimum(owner, num_experts - 1), num_experts, dtype=x.dtype)

    def per_block(w):  # [E, ...] -> [blocks, ...] in the compute dtype
        return jnp.einsum("ne,e...->n...", onehot, w.astype(x.dtype))

    hidden = _expert_mlp(
        jnp.einsum("nbd,ndf->nbf", buffer, per_block(wi_gate)),
        jnp.einsum("nbd,ndf->nbf", buffer, per_block(wi_up)),
        activation,
    )  # [blocks, block, F]
    out = jnp.einsum("nbf,nfd->nbd", hidden, per_block(wo)).reshape(rows, d)
    copies = _move_rows(out, row_of_copy, copy_of_row)  # [T*k, D] in (token, slot) order
    return _combine(copies.reshape(t, k, -1), weights, x.dtype)


def capacity_of(tokens: int, k: int, num_experts: int, capacity_factor: float) -> int:
    """C = ceil(capacity_factor * T * k / E): how many token copies each expert takes."""
    return max(1, math.ceil(capacity_factor * tokens * k / num_experts))


def capacity(
    x: Array, weights: Array, experts: Array, wi_gate: Array, wi_up: Array, wo: Array, activation: str,
    capacity_factor: float,
) -> tuple[Array, Array]:  # fmt: skip
    """Every expert takes at most C copies (`capacity_of`): x [T, D] -> ([T, D], kept [T, k] bool).

    Copies claim their expert's slots in (token, slot) order, token 0's first choice first; a copy
    past its expert's C-th is dropped (kept False): it adds nothing, the residual carries the token.
    Arguments as in `dropless`. The experts run as batched matmuls over a [E, C, D] buffer.
    """
    t, k = experts.shape
    num_experts = wi_gate.shape[0]
    cap = capacity_of(t, k, num_experts, capacity_factor)
    flat = experts.reshape(-1)  # [T*k] in (token, slot) order
    onehot = jax.nn.one_hot(flat, num_experts, dtype=jnp.int32)  # [T*k, E]
    slot = jnp.sum((jnp.cumsum(onehot, axis=0) - 1) * onehot, axis=-1)  # [T*k]: the copy's place in its expert
    kept = slot < cap
    slot = jnp.where(kept, slot, cap)  # out of range: dropped by the scatter, zero from the gather
    xs = jnp.repeat(x, k, axis=0)  # [T*k, D]
    buffer = jnp.zeros((num_experts, cap, x.shape[-1]), x.dtype).at[flat, slot].set(xs, mode="drop")
    hidden = _expert_mlp(
        jnp.einsum("ecd,edf->ecf", buffer, wi_gate.astype(x.dtype)),
        jnp.einsum("ecd,edf->ecf", buffer, wi_up.astype(x.dtype)),
        activation,
    )  # [E, C, F]
    out = jnp.einsum("ecf,efd->ecd", hidden, wo.astype(x.dtype))  # [E, C, D]
    copies = out.at[flat, slot].get(mode="fill", fill_value=0)  # [T*k, D]
    return _combine(copies.reshape(t, k, -1), weights, x.dtype), kept.reshape(t, k)


def aux_losses(probs: Array, experts: Array, logits: Array) -> dict[str, Array]:
    """The router's auxiliary losses and load, from probs [T, E], experts [T, k], logits [T, E].

    - aux_loss = E * sum_e f_e * P_e (Switch Transformer; Mixtral): f_e the fraction of the T * k
      copies routed to expert e, P_e the mean router probability of e. 1 when balanced (uniform
      routing and probabilities), up to E when one expert takes everything; differentiable through
      P only. (transformers' `load_balancing_loss_func` sums over the k slots: k times this.)
    - router_z_loss = mean_t logsumexp(logits_t)^2 (ST-MoE): keeps the router's logits small.
    - load = f [E]: the per-expert histogram that is logged.
    """
    num_experts = probs.shape[-1]
    load = jnp.mean(jax.nn.one_hot(experts.reshape(-1), num_experts, dtype=jnp.float32), axis=0)  # [E]
    mean_probs = jnp.mean(probs.astype(jnp.float32), axis=0)  # [E]
    z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)  # [T]
    return {
        "aux_loss": num_experts * jnp.sum(jax.lax.stop_gradient(load) * mean_probs),
        "router_z_loss": jnp.mean(z * z),
        "load": load,
    }


class MoeMlp(nn.Module):
    """The mixture-of-experts MLP: x [b, t, e] -> [b, t, e].

    Params: router/kernel [embed, experts]; wi_gate, wi_up [experts, embed, mlp]; wo [experts, mlp,
    embed]; with shared experts, `shared` (a dense `Mlp` of their summed hidden size).
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.cfg
        b, t, d = x.shape
        e, f = cfg.num_experts, cfg.expert_dim
        tokens = x.reshape(b * t, d)
        logits = dense(cfg, e, ("embed", "experts"), "router", use_bias=False)(tokens).astype(jnp.float32)
        weights, experts, probs = route(logits, cfg.experts_per_token, cfg.router_score, cfg.norm_topk)

        def param(name, shape, axes, scale=1.0):
            return nn.unbox(self.param(name, normal_init(cfg, axes, scale), shape, cfg.weight_dtype))

        wi_gate = param("wi_gate", (e, d, f), ("experts", "embed", "mlp"))
        wi_up = param("wi_up", (e, d, f), ("experts", "embed", "mlp"))
        wo = param("wo", (e, f, d), ("experts", "mlp", "embed"), out_scale(cfg))
        x_c = tokens.astype(cfg.compute_dtype)
        if cfg.moe_dispatch == "capacity":
            y, _ = capacity(x_c, weights, experts, wi_gate, wi_up, wo, cfg.mlp_activation, cfg.capacity_factor)
        elif expert_parallel.applies(mesh := expert_parallel.context_mesh(), b * t):  # dropless or blocks, over devices
            y = expert_parallel.dropless(x_c, weights, experts, wi_gate, wi_up, wo, cfg.mlp_activation, mesh)
        elif cfg.moe_dispatch == "blocks":
            y = blocks(x_c, weights, experts, wi_gate, wi_up, wo, cfg.mlp_activation)
        else:
            y = dropless(x_c, weights, experts, wi_gate, wi_up, wo, cfg.mlp_activation)
        for name, value in aux_losses(probs, experts, logits).items():
            self.sow(STATS, name, value)
        y = y.reshape(b, t, d)
        if cfg.num_shared_experts:
            y = y + Mlp(dataclasses.replace(cfg, mlp_dim=cfg.shared_dim), name="shared")(x)
        return y


def collect(stats) -> dict[str, Array]:
    """The 'moe_stats' collection of a forward pass -> the means over MoE layers: aux_loss and
    router_z_loss (scalars), load [E] (the fraction of token copies each expert got)."""
    leaves = jax.tree_util.tree_flatten_with_path(stats)[0]
    by_name: dict[str, list] = {}
    for path, value in leaves:
        name = next(p.key for p in reversed(path) if isinstance(p, jax.tree_util.DictKey))
        by_name.setdefault(name, []).append(value)
    out = {k: jnp.mean(jnp.stack([jnp.mean(v) for v in by_name[k]])) for k in ("aux_loss", "router_z_loss")}
    out["load"] = jnp.mean(jnp.concatenate([v.reshape(-1, v.shape[-1]) for v in by_name["load"]]), axis=0)
    return out
