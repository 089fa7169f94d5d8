"""The parameterised pieces every block is made of: dense layers with logical axes, norms, the MLP.

Every parameter carries logical axis names (`embed`, `heads`, `kv_heads`, `kv`, `mlp`, `vocab`,
`norm`); `llm_jax.runtime.sharding` maps them to mesh axes. Shapes: b = batch, t = length,
e = embed, m = mlp.
"""

from __future__ import annotations

import math
import re

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


QUANT_DTYPES = {"int8": jnp.int8, "int4": jnp.int4}  # `ModelConfig.weight_quant`: the stored kernel's type


def lora_targeted(targets: tuple[str, ...], name: str, path: str) -> bool:
    """Whether a dense layer gets LoRA adapters: a target equal to its name (`query`, `wo`, ...) or a
    regular expression matching its whole parameter path (`decoder/layers_0/attn/query`)."""
    return any(t == name or re.fullmatch(t, path) for t in targets)


class Dense(nn.Module):
    """y = x W (+ b): x [r, *in] -> y [r, *out], W [*in, *out] with logical `axes` (in's then out's).

    Options of post-training, each off unless the config asks:
    - `weight_quant` 'int8' / 'int4': W is stored as integers with a float32 scale per output channel
      (`kernel_scale` [1.., *out], the in-axes kept as 1s, sharded like the output axes); the
      product is taken with the integers cast to the compute dtype and scaled after the matmul.
      `llm_jax/models/quant.py` makes these parameters from float ones.
    - LoRA (`lora_rank` > 0 and this layer among `lora_targets`): y += (alpha / rank) * drop(x) A B
      with A [*in, rank] (uniform in +-1/sqrt(fan_in), PEFT's init) and B [rank, *out] (zeros), so a
      new adapter leaves the layer as it was. A and B take the kernel's logical axes, rank unsplit.
      Dropout on the adapter's input applies when a 'dropout' rng is given (training).
    """

    cfg: ModelConfig
    features: tuple[int, ...]
    axes: tuple[str, ...]
    num_in: int = 1
    scale: float = 1.0
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg, num_in = self.cfg, self.num_in
        in_shape, out_shape = x.shape[-num_in:], self.features
        in_axes, out_axes = self.axes[:num_in], self.axes[num_in:]
        dims = (tuple(range(x.ndim - num_in, x.ndim)), tuple(range(num_in)))
        x = x.astype(cfg.compute_dtype)
        if cfg.weight_quant == "none":
            kernel = self.param(
                "kernel", normal_init(cfg, self.axes, self.scale), in_shape + out_shape, cfg.weight_dtype
            )
            y = jax.lax.dot_general(x, kernel.astype(cfg.compute_dtype), (dims, ((), ())))
        else:
            qdtype = QUANT_DTYPES[cfg.weight_quant]
            kernel = self.param(
                "kernel", logical(nn.initializers.zeros_init(), self.axes), in_shape + out_shape, qdtype
            )
            scale_axes = (None,) * num_in + out_axes
            scale_shape = (1,) * num_in + out_shape
            w_scale = self.param("kernel_scale", logical(nn.initializers.ones_init(), scale_axes), scale_shape)
            y = jax.lax.dot_general(x, kernel.astype(cfg.compute_dtype), (dims, ((), ())))
            y = y * w_scale.reshape(out_shape).astype(cfg.compute_dtype)
        if self.use_bias:
            bias = self.param("bias", zeros(out_axes), out_shape, cfg.weight_dtype)
            y = y + bias.astype(cfg.compute_dtype)
        path = "/".join(str(p) for p in self.scope.path)
        if cfg.lora_rank and lora_targeted(cfg.lora_target_list, self.name, path):
            y = y + self._lora(x, in_shape, dims, in_axes, out_axes)
        return y

    def _lora(self, x: Array, in_shape, dims, in_axes, out_axes) -> Array:
        cfg, rank = self.cfg, self.cfg.lora_rank
        bound = 1.0 / math.prod(in_shape) ** 0.5

        def a_init(key, shape, dtype):
            return jax.random.uniform(key, shape, dtype, -bound, bound)

        a = self.param("lora_a", logical(a_init, in_axes + (None,)), in_shape + (rank,), cfg.weight_dtype)
        b = self.param("lora_b", zeros((None,) + out_axes), (rank,) + self.features, cfg.weight_dtype)
        if cfg.lora_dropout and self.has_rng("dropout"):
            x = nn.Dropout(cfg.lora_dropout)(x, deterministic=False)
        h = jax.lax.dot_general(x, a.astype(cfg.compute_dtype), (dims, ((), ())))  # [r, rank]
        y = jax.lax.dot_general(h, b.astype(cfg.compute_dtype), (((h.ndim - 1,), (0,)), ((), ())))
        return y * (cfg.lora_alpha / rank)


def dense(cfg, features, axes, name, in_axis=-1, scale=1.0, use_bias=None):
    """A `Dense` layer over the last axis (or the last `len(in_axis)` axes) of its input; the bias
    takes the output axes' names. `in_axis`: -1 or (-2, -1) (the trailing axes)."""
    features = features if isinstance(features, tuple) else (features,)
    num_in = 1 if isinstance(in_axis, int) else len(in_axis)
    layer = Dense(cfg, features, tuple(axes), num_in, scale, cfg.use_bias if use_bias is None else use_bias, name=name)

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
