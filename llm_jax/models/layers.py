"""The parameterised pieces every block is made of: dense layers with logical axes, norms, the MLP.

Every parameter carries logical axis names (`embed`, `heads`, `kv_heads`, `kv`, `mlp`, `vocab`,
`norm`); `llm_jax.runtime.sharding` maps them to mesh axes. Shapes: b = batch, t = length,
e = embed, m = mlp.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_jax.models.config import ModelConfig

Array = jax.Array


class _Logical(nn.LogicallyPartitioned):
    """LogicallyPartitioned that constrains only a value of its own rank. flax's DenseGeneral unboxes
    its kernel/bias once while still flattened (also in `apply`, for a shape check); under
    `jax.set_mesh` constraining that flat value with the full names would be an error."""

    def unbox(self, apply_constraint=True):
        return super().unbox(apply_constraint and jnp.ndim(self.value) == len(self.names))


def logical(init, axes):
    return lambda *args: _Logical(init(*args), tuple(axes))


def normal_init(cfg: ModelConfig, axes: tuple[str, ...], scale: float = 1.0):
    return logical(nn.initializers.normal(cfg.init_std * scale), axes)


def zeros(axes):
    return logical(nn.initializers.zeros_init(), axes)


def dense(cfg, features, axes, name, in_axis=-1, scale=1.0, use_bias=None):
    """DenseGeneral with logical axes on the kernel; the bias takes the output axes' names."""
    num_out = len(features) if isinstance(features, tuple) else 1
    layer = nn.DenseGeneral(
        features=features,
        axis=in_axis,
        use_bias=cfg.use_bias if use_bias is None else use_bias,
        dtype=cfg.compute_dtype,
        param_dtype=cfg.weight_dtype,
        kernel_init=normal_init(cfg, axes, scale),
        bias_init=zeros(axes[-num_out:]),
        name=name,
    )
    num_in = 1 if isinstance(in_axis, int) else len(in_axis)

    def apply(x: Array) -> Array:
        # Batch and length merged into one row axis: XLA on CPU runs the 2-d matmuls, and their
        # weight gradients (one contracted axis instead of two), about 10% faster. Same params.
        lead = x.shape[:-num_in]
        y = layer(x.reshape(-1, *x.shape[-num_in:]))
        return y.reshape(*lead, *y.shape[1:])

    return apply


class RMSNorm(nn.Module):
    """x / rms(x) * scale over the last axis, or * (1 + scale) with `norm_plus_one` (Gemma, whose
    scale starts at 0). Statistics and scaling in float32 whatever the compute dtype."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x: [..., n] -> [..., n] in the compute dtype; the scale is a [n] parameter."""
        cfg = self.cfg
        init = nn.initializers.zeros_init() if cfg.norm_plus_one else nn.initializers.ones_init()
        scale = self.param("scale", logical(init, ("norm",)), (x.shape[-1],), cfg.weight_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + cfg.norm_eps)
        scale = nn.unbox(scale).astype(jnp.float32)
        return (y * (1.0 + scale if cfg.norm_plus_one else scale)).astype(cfg.compute_dtype)


def make_norm(cfg: ModelConfig, name: str) -> nn.Module:
    # Norm statistics in float32 whatever the compute dtype: bf16 variance loses too many bits.
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg, name=name)
    return nn.LayerNorm(
        epsilon=cfg.norm_eps,
        dtype=cfg.compute_dtype,
        param_dtype=cfg.weight_dtype,
        use_bias=cfg.use_bias,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
        bias_init=zeros(("norm",)),
        name=name,
    )


def gate_activation(activation: str, gate: Array) -> Array:
    """A gated MLP's activation (`mlp_activation`) of its gate branch: silu (SwiGLU) or tanh-GELU (GeGLU)."""
    return nn.silu(gate) if activation == "swiglu" else nn.gelu(gate, approximate=True)


def out_scale(cfg: ModelConfig) -> float:
    """Init scale of a residual branch's output projection: 1 / sqrt(2 * num_layers) (GPT-2)."""
    return 1.0 / (2.0 * cfg.num_layers) ** 0.5


class Mlp(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x: [b, t, e] -> [b, t, e]."""
        cfg = self.cfg
        if cfg.mlp_activation in ("swiglu", "geglu"):  # gated: act(x W0) * (x W1)
            gate = dense(cfg, cfg.mlp_dim, ("embed", "mlp"), "wi_0", use_bias=cfg.mlp_use_bias)(x)
            up = dense(cfg, cfg.mlp_dim, ("embed", "mlp"), "wi_1", use_bias=cfg.mlp_use_bias)(x)
            hidden = gate_activation(cfg.mlp_activation, gate) * up
        else:
            hidden = nn.gelu(
                dense(cfg, cfg.mlp_dim, ("embed", "mlp"), "wi", use_bias=cfg.mlp_use_bias)(x), approximate=True
            )
        hidden = nn.with_logical_constraint(hidden, ("activation_batch", "activation_length", "activation_mlp"))
        return dense(cfg, cfg.embed_dim, ("mlp", "embed"), "wo", scale=out_scale(cfg), use_bias=cfg.mlp_use_bias)(
            hidden
        )
