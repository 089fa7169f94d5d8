"""Losses: `token_loss` (summed cross-entropy of full logits) and the memory-light
`chunked_cross_entropy`: the output projection and the softmax, chunk by chunk of the sequence.

The plain loss materializes float32 logits [b, t, v] (and their gradient, and on CPU a transposed
copy): at t = 2048, v = 32k that is 256 MiB per sequence. `chunked_cross_entropy` instead runs a
`lax.scan` over sequence chunks of `chunk` positions, and, because the loss is the last op of the
graph, computes the gradients in the same pass (as Liger's fused linear cross-entropy does): per
chunk, logits -> log-sum-exp -> loss, then dlogits = softmax - onehot -> d(hidden) and the running
d(kernel). Only [b, chunk, v] logits are ever alive; the backward pass is two multiplies by the
incoming cotangent, with no recomputation, so the FLOPs are those of the plain path.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from llm_jax.runtime.errors import BadValue


def token_loss(
    logits: jax.Array, targets: jax.Array, weights: jax.Array | None, label_smoothing: float = 0.0
) -> tuple[jax.Array, jax.Array]:
    """Summed cross-entropy and token count. logits [b, t, v] f32; targets [b, t]; weights [b, t] or None.

    `label_smoothing` e: the target distribution is (1 - e) on the target plus e spread uniformly
    over the vocabulary (Szegedy et al.; the original Transformer used 0.1).
    """
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    if label_smoothing:
        uniform = -jax.nn.log_softmax(logits, axis=-1).mean(axis=-1)  # cross-entropy against the uniform
        ce = (1.0 - label_smoothing) * ce + label_smoothing * uniform
    if weights is None:
        return ce.sum(), jnp.float32(ce.size)
    return (ce * weights).sum(), weights.sum()


def _chunks(x: jax.Array, chunk: int) -> jax.Array:
    """[b, t, ...] -> [t // chunk, b, chunk, ...] (scan axis first, batch sharding kept)."""
    b, t = x.shape[:2]
    return x.reshape(b, t // chunk, chunk, *x.shape[2:]).swapaxes(0, 1)


def _unchunk(x: jax.Array) -> jax.Array:
    n, b, c = x.shape[:3]
    return x.swapaxes(0, 1).reshape(b, n * c, *x.shape[3:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _xent(hidden, kernel, targets, weights, chunk, vocab_first, smoothing, cap):
    return _xent_fwd(hidden, kernel, targets, weights, chunk, vocab_first, smoothing, cap)[0]


def _xent_fwd(hidden, kernel, targets, weights, chunk, vocab_first, smoothing, cap):
    """hidden [b, t, e]; kernel [v, e] (vocab_first) or [e, v]; targets [b, t] int; weights [b, t] f32;
    smoothing: label smoothing, cap: the logits' soft-cap or 0 (Python floats)."""
    logits_eq = "bce,ve->bcv" if vocab_first else "bce,ev->bcv"
    f32 = jnp.float32

    def body(dkernel, xs):
        h, tgt, w = xs
        # float32 logits and softmax whatever the compute dtype (bf16 log-sum-exp loses the loss).
        logits = jnp.einsum(logits_eq, h, kernel, preferred_element_type=f32)
        if cap:  # logits = cap * tanh(z / cap); d logits / dz = 1 - tanh^2, applied to dlogits below
            squashed = jnp.tanh(logits / cap)
            logits = cap * squashed
        # One exp pass serves both the loss and its gradient: p = exp(logits - max), the loss is
        # max + log(sum p) - logit[target] (optax's formula), dlogits = p / sum p - onehot.
        top = jax.lax.stop_gradient(logits.max(-1, keepdims=True))
        p = jnp.exp(logits - top)
        total = p.sum(-1, keepdims=True)
        target_logit = jnp.take_along_axis(logits, tgt[..., None], axis=-1)
        is_target = jnp.arange(logits.shape[-1], dtype=tgt.dtype) == tgt[..., None]
        if smoothing:  # target distribution (1 - s) * onehot + s / v: loss lse - (1 - s) l_t - s mean(l)
            row = top + jnp.log(total) - (1.0 - smoothing) * target_logit - smoothing * logits.mean(-1, keepdims=True)
            dlogits = p / total - (1.0 - smoothing) * is_target - smoothing / logits.shape[-1]
        else:
            row, dlogits = top + jnp.log(total) - target_logit, p / total - is_target
        loss = (row[..., 0] * w).sum()
        if cap:
            dlogits = dlogits * (1.0 - squashed * squashed)
        dlogits = (dlogits * w[..., None]).astype(h.dtype)
        dh = jnp.einsum("bcv,ve->bce" if vocab_first else "bcv,ev->bce", dlogits, kernel, preferred_element_type=f32)
        # The kernel's gradient is accumulated as [e, v] whatever the kernel's layout: h^T @ dlogits
        # reads dlogits in place, while the [v, e] form makes XLA on CPU transpose every dlogits
        # chunk first (about 1.4x the time). A tied [v, e] table gets one transpose at the end.
        dkernel = dkernel + jnp.einsum("bce,bcv->ev", h, dlogits, preferred_element_type=f32)
        return dkernel, (loss, dh.astype(h.dtype))

    xs = (_chunks(hidden, chunk), _chunks(targets, chunk), _chunks(weights.astype(f32), chunk))
    e, v = hidden.shape[-1], kernel.shape[0 if vocab_first else 1]
    dkernel, (losses, dh) = jax.lax.scan(body, jnp.zeros((e, v), f32), xs)
    if vocab_first:
        dkernel = dkernel.T
    return losses.sum(), (_unchunk(dh), dkernel.astype(kernel.dtype))


def _xent_bwd(chunk, vocab_first, smoothing, cap, res, g):
    dh, dkernel = res
    # No cotangent for the integer targets, nor for the weights (data, not parameters).
    return (g * dh).astype(dh.dtype), (g * dkernel).astype(dkernel.dtype), None, None


_xent.defvjp(_xent_fwd, _xent_bwd)


def chunked_cross_entropy(
    hidden: jax.Array,
    kernel: jax.Array,
    targets: jax.Array,
    weights: jax.Array | None,
    chunk: int,
    vocab_first: bool,
    label_smoothing: float = 0.0,
    softcap: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Summed cross-entropy and token count, as `token_loss` of the projected logits.

    hidden: [b, t, e] final (normed) hidden states in the compute dtype; kernel: the output
    projection, [v, e] when `vocab_first` (tied embedding table) else [e, v]; targets [b, t] int;
    weights [b, t] or None. `chunk` must divide t. Gradients flow to `hidden` and `kernel`.
    `label_smoothing`: as in `token_loss`; `softcap`: the model's `final_softcap` (logits squashed
    to cap * tanh(logits / cap) before the softmax).
    """
    b, t = targets.shape
    if t % chunk:
        raise BadValue(f"loss chunk size {chunk} does not divide the sequence length {t}; pick a divisor of {t}")
    count = jnp.float32(b * t) if weights is None else weights.sum()
    w = jnp.ones((b, t), jnp.float32) if weights is None else weights.astype(jnp.float32)
    smoothing, cap = float(label_smoothing), float(softcap or 0.0)
    return _xent(hidden, kernel.astype(hidden.dtype), targets, w, chunk, vocab_first, smoothing, cap), count
