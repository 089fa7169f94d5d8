"""Expert parallelism: the dropless MoE dispatch with experts sharded over the `expert` mesh axis.

`dropless(x, weights, experts, wi_gate, wi_up, wo, activation, mesh)` computes exactly what
`moe.dropless` computes (same arguments, global shapes), inside `jax.shard_map`:

- tokens [T, D] are split over the batch axes (data, fsdp, expert): each device routes its own
  t = T / (data * fsdp * expert) tokens; the experts' weights [E, D, F] are split over `expert` along
  E (each device holds El = E / ep experts) and over `tensor` along F (Megatron: the hidden size),
  and gathered over `fsdp` on entry (ZeRO-3, as every other layer does);
- each device sorts its t * k token copies by expert (so by the device that holds it) and sends
  them with one all-to-all over `expert`; the receiver runs its El experts as grouped matmuls
  (`jax.lax.ragged_dot`) and sends the outputs back with a second all-to-all; the copies are put
  back in (token, slot) order and summed with the router weights; a psum over `tensor` adds the
  hidden-size shards.

The exchange buffers are fixed-size [ep, t * min(k, El), D] per device, large enough for any routing
(a token's k experts are distinct, so at most min(k, El) of its copies go to one device), so nothing
is ever dropped and shapes stay static: up to ep times the bytes of a ragged exchange
(`jax.lax.ragged_all_to_all`, which XLA's CPU backend lacks), the price of being exact on every
backend. Outside a mesh with expert > 1, `applies` is False and `moe.dropless` runs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from llm_jax.models.layers import gate_activation

Array = jax.Array

EXPERT = "expert"
TENSOR = "tensor"
TOKEN_AXES = ("data", "fsdp", "expert")  # the mesh axes the tokens are split over (sharding.BATCH_AXES)


def context_mesh():
    """The mesh the model is traced under (`jax.set_mesh`, sharding.use_mesh), or None."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh is None or mesh.empty else mesh


def applies(mesh, tokens: int) -> bool:
    """Whether to dispatch expert-parallel: a mesh with expert > 1 whose token axes split `tokens`
    (a decoding step of fewer tokens than devices falls back to `moe.dropless`, sharded by XLA)."""
    if mesh is None or mesh.shape.get(EXPERT, 1) <= 1:
        return False
    split = 1
    for axis in TOKEN_AXES:
        split *= mesh.shape.get(axis, 1)
    return tokens % split == 0


def dropless(
    x: Array, weights: Array, experts: Array, wi_gate: Array, wi_up: Array, wo: Array, activation: str, mesh
) -> Array:
    """`moe.dropless` with experts sharded over the mesh's `expert` axis: x [T, D] -> [T, D].

    weights [T, k] float32, experts [T, k] int32; wi_gate, wi_up [E, D, F], wo [E, F, D]; E must be a
    multiple of the mesh's expert size, F of its tensor size, T of data * fsdp * expert.
    """
    token_axes = tuple(a for a in TOKEN_AXES if a in mesh.shape)
    tensor = TENSOR if TENSOR in mesh.shape else None
    tok = P(token_axes, None)
    local = functools.partial(_local, activation=activation, ep=mesh.shape[EXPERT], tensor=tensor)
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(tok, tok, tok, P(EXPERT, None, tensor), P(EXPERT, None, tensor), P(EXPERT, tensor, None)),
        out_specs=tok,
    )(x, weights, experts, wi_gate, wi_up, wo)


def _local(x, weights, experts, wi_gate, wi_up, wo, *, activation: str, ep: int, tensor: str | None):
    """One device's part: x [t, D], weights / experts [t, k]; wi_* [El, D, Fl], wo [El, Fl, D]."""
    t, k = experts.shape
    el = wi_gate.shape[0]
    copies = t * k
    flat = experts.reshape(-1)  # [t*k], copy i is token i // k
    order = jnp.argsort(flat, stable=True)  # grouped by expert, hence by the device holding it
    counts = jnp.bincount(flat, length=ep * el).astype(jnp.int32).reshape(ep, el)  # copies per (device, expert)
    per_device = jnp.sum(counts, axis=1)  # [ep]
    dest = jnp.take(flat, order) // el  # [t*k] the device each sorted copy goes to
    pos = jnp.arange(copies) - (jnp.cumsum(per_device) - per_device)[dest]  # its row in that device's buffer
    rows = t * min(k, el)  # the most copies one device can get from another (distinct experts per token)
    send = jnp.zeros((ep, rows, x.shape[-1]), x.dtype).at[dest, pos].set(jnp.take(x, order // k, axis=0))
    recv = jax.lax.all_to_all(send, EXPERT, 0, 0)  # [ep, rows, D]: recv[s] = what device s sent here
    recv_counts = jax.lax.all_to_all(counts, EXPERT, 0, 0)  # [ep, El]: recv[s] rows per local expert
    out = _run_experts(recv, recv_counts, wi_gate, wi_up, wo, activation)  # [ep, rows, D]
    back = jax.lax.all_to_all(out, EXPERT, 0, 0)  # back[s] = outputs of the copies sent to s
    mine = jnp.zeros((copies, x.shape[-1]), x.dtype).at[order].set(back[dest, pos])  # (token, slot) order
    y = jnp.einsum("tkd,tk->td", mine.reshape(t, k, -1).astype(jnp.float32), weights)
    if tensor is not None:
        y = jax.lax.psum(y, tensor)  # each device's hidden-size shard contributed a partial sum
    return y.astype(x.dtype)


def _run_experts(recv: Array, recv_counts: Array, wi_gate, wi_up, wo, activation: str) -> Array:
    """The local experts over the received rows: recv [ep, m, D] (recv[s]'s first sum(recv_counts[s])
    rows are grouped by local expert, the rest padding) -> outputs [ep, m, D] in the same places
    (padding rows 0)."""
    ep, m, d = recv.shape
    bounds = jnp.cumsum(recv_counts, axis=1)  # [ep, El]
    # Each row's local expert (El for padding), then all rows grouped by expert for ragged_dot.
    expert_of = jax.vmap(lambda b: jnp.searchsorted(b, jnp.arange(m), side="right"))(bounds).reshape(-1)
    order = jnp.argsort(expert_of, stable=True)
    sizes = jnp.sum(recv_counts, axis=0)  # [El]; rows past their sum (the padding) come out as 0
    rows = jnp.take(recv.reshape(ep * m, d), order, axis=0)
    hidden = gate_activation(activation, jax.lax.ragged_dot(rows, wi_gate.astype(rows.dtype), sizes))
    hidden = hidden * jax.lax.ragged_dot(rows, wi_up.astype(rows.dtype), sizes)
    out = jax.lax.ragged_dot(hidden, wo.astype(rows.dtype), sizes)  # [ep*m, D]
    return jnp.zeros_like(out).at[order].set(out).reshape(ep, m, d)
