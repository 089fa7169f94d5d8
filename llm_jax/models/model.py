"""Decoder-only Transformer language model in `flax.linen`.

One frozen `ModelConfig` is the model's only input. Every parameter carries logical axis names
(`embed`, `heads`, `kv_heads`, `kv`, `mlp`, `vocab`, `norm`, `layers`) and the main activations are
constrained at block boundaries (`activation_batch`, `activation_length`, `activation_embed`, ...);
`llm_jax.runtime.sharding` maps those names to mesh axes, so this file never mentions a mesh.

Shapes in docstrings: b = batch, t = query length, s = key length, e = embed, h = query heads,
k = key/value heads, g = h // k (queries per kv head), d = head dim, v = vocab.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_jax.models.ops import (  # noqa: F401 - attend, rope and rope_frequencies are part of this module's API
    _MASK_VALUE,
    _positions_mask,
    _same_segment,
    attend,
    rope,
    rope_frequencies,
    sinusoidal,
)
from llm_jax.runtime.errors import BadValue

Array = jax.Array

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _runtime(default):
    """A field that changes how the model computes, not its parameters: a resumed run may change it."""
    return dataclasses.field(default=default, metadata={"runtime": True})


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything that defines the network. Frozen: hashable, safe as a jit static argument.

    The run config's `config.model` section is made of exactly these fields (llm_jax/training/config.py builds
    it from them), and `ModelConfig(**config.model)` reads it back: a new field is one edit here.
    None means "unset" wherever a field has a derived default.
    """

    family: str = "lm"  # the model family (llm_jax/models/family.py): 'lm' = decoder-only, 'encdec' = encoder-decoder
    preset: str = _runtime("custom")  # informational: 'gpt2-small', 'llama-1b', 'hf:gpt2', ...
    vocab_size: int | None = None  # None: the tokenizer's; either way padded up to vocab_multiple
    vocab_multiple: int = 128  # so the vocabulary splits over tensor parallelism and matmul tiles
    num_layers: int = 4  # decoder blocks (the only stack of a decoder-only LM)
    num_encoder_layers: int | None = None  # encdec: encoder blocks; None: num_layers
    share_embeddings: bool = True  # encdec: source and target read one table (a joint vocabulary)
    num_heads: int = 4
    num_kv_heads: int | None = None  # None: multi-head; fewer than num_heads: grouped-query attention
    embed_dim: int = 128
    mlp_dim: int = 512
    head_dim: int | None = None  # None: embed_dim // num_heads
    max_len: int = 256  # size of the learned position table; the longest sequence the model accepts
    positions: str = "learned"  # 'learned' | 'rope' | 'sinusoidal' (the original Transformer's, no parameters)
    rope_theta: float = 10000.0
    # Hugging Face rope scaling: 'none' | 'linear' (frequencies / factor) | 'llama3' (Llama 3.1).
    rope_scaling: str = "none"
    rope_scaling_factor: float = 1.0
    rope_low_freq_factor: float = 1.0  # llama3 only
    rope_high_freq_factor: float = 4.0  # llama3 only
    rope_original_max_len: int = 8192  # llama3 only: the context length of pre-training
    norm: str = "layernorm"  # 'layernorm' | 'rmsnorm'
    norm_eps: float = 1e-5
    mlp_activation: str = "gelu"  # 'gelu' | 'swiglu'
    use_bias: bool = True
    attention_bias: bool | None = None  # q/k/v/out projection biases; None: use_bias
    mlp_bias: bool | None = None  # MLP biases; None: use_bias
    dropout_rate: float = _runtime(0.0)
    tie_embeddings: bool = True
    scan_layers: bool = False  # one compiled block applied num_layers times (params stacked on 'layers')
    remat: str = _runtime("none")  # 'none' | 'full' | 'dots'
    attention: str = _runtime("einsum")  # 'einsum' (reference) | 'dot_product' (jax.nn.dot_product_attention)
    loss_chunk: int = _runtime(0)  # >0: the training loss projects and soft-maxes this many positions at a time
    label_smoothing: float = _runtime(0.0)  # training loss only: this much target mass spread over the vocabulary
    dtype: str = _runtime("float32")  # compute dtype of activations and matmuls
    param_dtype: str = "float32"  # storage dtype of the (master) weights
    init_std: float = 0.02

    def __post_init__(self):
        def need(ok, msg):
            if not ok:
                raise BadValue(f"ModelConfig: {msg}")

        need(
            self.vocab_size is None or self.vocab_size > 0,
            f"vocab_size={self.vocab_size} must be positive (leave it unset for the tokenizer's vocabulary)",
        )
        need(self.vocab_multiple > 0, f"vocab_multiple={self.vocab_multiple} must be positive")
        need(self.num_layers > 0, f"num_layers={self.num_layers} must be positive")
        need(self.num_heads > 0, f"num_heads={self.num_heads} must be positive")
        need(
            self.head_dim is not None or self.embed_dim % self.num_heads == 0,
            f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}; "
            "change one of them or set head_dim",
        )
        need(
            self.num_heads % self.kv_heads == 0,
            f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.kv_heads}",
        )
        need(
            self.positions in ("learned", "rope", "sinusoidal"),
            f"positions={self.positions!r}: use 'learned', 'rope' or 'sinusoidal'",
        )
        need(self.num_encoder_layers is None or self.num_encoder_layers > 0, "num_encoder_layers must be positive")
        need(0.0 <= self.label_smoothing < 1.0, f"label_smoothing={self.label_smoothing} must be in [0, 1)")
        need(
            self.positions != "rope" or self.dim_per_head % 2 == 0,
            f"rope needs an even head_dim, got {self.dim_per_head}",
        )
        need(
            self.rope_scaling in ("none", "linear", "llama3"),
            f"rope_scaling={self.rope_scaling!r}: use 'none', 'linear' or 'llama3'",
        )
        need(self.rope_scaling_factor > 0, f"rope_scaling_factor={self.rope_scaling_factor} must be positive")
        need(
            self.rope_scaling != "llama3" or self.rope_high_freq_factor > self.rope_low_freq_factor,
            f"llama3 rope scaling needs rope_high_freq_factor={self.rope_high_freq_factor} > "
            f"rope_low_freq_factor={self.rope_low_freq_factor}",
        )
        need(self.norm in ("layernorm", "rmsnorm"), f"norm={self.norm!r}: use 'layernorm' or 'rmsnorm'")
        need(
            self.mlp_activation in ("gelu", "swiglu"), f"mlp_activation={self.mlp_activation!r}: use 'gelu' or 'swiglu'"
        )
        need(self.remat in ("none", "full", "dots"), f"remat={self.remat!r}: use 'none', 'full' or 'dots'")
        need(
            self.attention in ("einsum", "dot_product"), f"attention={self.attention!r}: use 'einsum' or 'dot_product'"
        )
        need(self.loss_chunk >= 0, f"loss_chunk={self.loss_chunk} must be 0 (off) or a positive chunk length")
        need(self.dtype in _DTYPES, f"dtype={self.dtype!r}: use one of {sorted(_DTYPES)}")
        need(self.param_dtype in _DTYPES, f"param_dtype={self.param_dtype!r}: use one of {sorted(_DTYPES)}")
        need(0.0 <= self.dropout_rate < 1.0, f"dropout_rate={self.dropout_rate} must be in [0, 1)")

    def resolved(self, tokenizer_vocab: int) -> ModelConfig:
        """This config with its final vocabulary: vocab_size (or the tokenizer's) padded to vocab_multiple."""
        vocab = self.vocab_size or tokenizer_vocab
        if vocab < tokenizer_vocab:
            raise BadValue(
                f"config.model.vocab_size={vocab} is smaller than the tokenizer's vocabulary ({tokenizer_vocab}); "
                "leave it unset (the tokenizer's) or set it to at least that"
            )
        return dataclasses.replace(self, vocab_size=-(-vocab // self.vocab_multiple) * self.vocab_multiple)

    @property
    def encoder_layers(self) -> int:
        return self.num_encoder_layers or self.num_layers

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def attention_use_bias(self) -> bool:
        return self.use_bias if self.attention_bias is None else self.attention_bias

    @property
    def mlp_use_bias(self) -> bool:
        return self.use_bias if self.mlp_bias is None else self.mlp_bias

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.embed_dim // self.num_heads

    @property
    def compute_dtype(self):
        return _DTYPES[self.dtype]

    @property
    def weight_dtype(self):
        return _DTYPES[self.param_dtype]


# ----------------------------------------------------------------------------------------------
# Building blocks


class _Logical(nn.LogicallyPartitioned):
    """LogicallyPartitioned that constrains only a value of its own rank. flax's DenseGeneral unboxes
    its kernel/bias once while still flattened (also in `apply`, for a shape check); under
    `jax.set_mesh` constraining that flat value with the full names would be an error."""

    def unbox(self, apply_constraint=True):
        return super().unbox(apply_constraint and jnp.ndim(self.value) == len(self.names))


def _logical(init, axes):
    return lambda *args: _Logical(init(*args), tuple(axes))


def _init(cfg: ModelConfig, axes: tuple[str, ...], scale: float = 1.0):
    return _logical(nn.initializers.normal(cfg.init_std * scale), axes)


def _zeros(axes):
    return _logical(nn.initializers.zeros_init(), axes)


def _dense(cfg, features, axes, name, in_axis=-1, scale=1.0, use_bias=None):
    """DenseGeneral with logical axes on the kernel; the bias takes the output axes' names."""
    num_out = len(features) if isinstance(features, tuple) else 1
    layer = nn.DenseGeneral(
        features=features,
        axis=in_axis,
        use_bias=cfg.use_bias if use_bias is None else use_bias,
        dtype=cfg.compute_dtype,
        param_dtype=cfg.weight_dtype,
        kernel_init=_init(cfg, axes, scale),
        bias_init=_zeros(axes[-num_out:]),
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


def make_norm(cfg: ModelConfig, name: str) -> nn.Module:
    # Norm statistics in float32 whatever the compute dtype: bf16 variance loses too many bits.
    scale_init = nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",))
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(
            epsilon=cfg.norm_eps,
            dtype=cfg.compute_dtype,
            param_dtype=cfg.weight_dtype,
            scale_init=scale_init,
            name=name,
        )
    return nn.LayerNorm(
        epsilon=cfg.norm_eps,
        dtype=cfg.compute_dtype,
        param_dtype=cfg.weight_dtype,
        use_bias=cfg.use_bias,
        scale_init=scale_init,
        bias_init=_zeros(("norm",)),
        name=name,
    )


def _attend(
    module: nn.Module, q: Array, k: Array, v: Array, mask: Array | None, impl: str, segment_ids: Array | None = None
) -> Array:
    """`attend`; when the caller made the 'intermediates' collection mutable (llm_jax.attention does),
    its weights [b, h, t, s] float32 are also computed explicitly (the `dot_product` path never forms
    them) and recorded as `attention_weights`. Training and decoding never make it mutable."""
    if module.is_mutable_collection("intermediates"):
        b, t, h, d = q.shape
        logits = jnp.einsum(
            "btkgd,bskd->bkgts", q.reshape(b, t, k.shape[2], -1, d), k, preferred_element_type=jnp.float32
        )
        seen = jnp.tril(jnp.ones((1, t, k.shape[1]), bool)) if mask is None else mask  # None: causal
        if mask is None and segment_ids is not None:
            seen = seen & _same_segment(segment_ids, segment_ids)
        logits = jnp.where(seen[:, None, None], logits / jnp.sqrt(jnp.float32(d)), _MASK_VALUE)
        module.sow("intermediates", "attention_weights", jax.nn.softmax(logits, -1).reshape(b, h, t, -1))
    return attend(q, k, v, mask, impl, segment_ids)


class Attention(nn.Module):
    """Self-attention, multi-head or grouped-query, with an optional KV cache.

    Without a cache it is plain causal, or follows an explicit `mask` [b, t, t] (True = may attend:
    the encoder's padding mask, packed sequences' segments). With `decode=True` the module keeps
    `cached_key`/`cached_value` [b, k, c, d], the position of every cached slot `cached_pos` [b, c]
    (negative = empty or padding) and a shared write index. Left-padded prompts give their pad
    tokens negative positions, so they are never attended.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(
        self,
        x: Array,
        positions: Array,
        deterministic: bool,
        decode: bool,
        mask: Array | None = None,
        segment_ids: Array | None = None,
    ) -> Array:
        """x: [b, t, e]; positions: [b, t] int (negative marks padding); mask: [b, t, t] bool or None
        (plain causal); segment_ids: [b, t] int or None (packed sequences, training only: causal
        attention stays within a segment). Returns [b, t, e]."""
        cfg = self.cfg
        h, k, d = cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
        bias = cfg.attention_use_bias
        q = _dense(cfg, (h, d), ("embed", "heads", "kv"), "query", use_bias=bias)(x)
        key = _dense(cfg, (k, d), ("embed", "kv_heads", "kv"), "key", use_bias=bias)(x)
        value = _dense(cfg, (k, d), ("embed", "kv_heads", "kv"), "value", use_bias=bias)(x)
        if cfg.positions == "rope":
            pos = jnp.maximum(positions, 0)
            inv_freq = rope_frequencies(cfg)
            q, key = rope(q, pos, inv_freq), rope(key, pos, inv_freq)
        q = nn.with_logical_constraint(q, ("activation_batch", "activation_length", "activation_heads", "kv"))

        if decode:
            key, value, mask = self._update_cache(key, value, positions)
        return _attention_out(cfg, _attend(self, q, key, value, mask, cfg.attention, segment_ids), bias)

    def _update_cache(self, key, value, positions):
        """Writes this call's keys/values at the cache index; returns all cached ones and the mask."""
        b, t, k, d = key.shape
        # Heads-major [b, k, c, d]: the attention dots batch over (b, k), so with this layout they
        # read the cache in place; [b, c, k, d] made XLA transpose (copy) the whole cache every step.
        axes = ("cache_batch", "cache_kv_heads", "cache_length", "kv")
        # The cache length c is the length of the `init` input: a generation sizes it to
        # prompt + new tokens rather than max_len, so a step attends over no slot it cannot use.
        ck = self.variable(
            "cache", "cached_key", nn.with_logical_partitioning(jnp.zeros, axes), (b, k, t, d), key.dtype
        )
        cv = self.variable(
            "cache", "cached_value", nn.with_logical_partitioning(jnp.zeros, axes), (b, k, t, d), value.dtype
        )
        cp = self.variable(
            "cache",
            "cached_pos",
            nn.with_logical_partitioning(lambda s: jnp.full(s, -1, jnp.int32), ("cache_batch", "cache_length")),
            (b, t),
        )
        idx = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
        if self.is_initializing():
            return key, value, _positions_mask(positions, positions)
        i = idx.value
        ck.value = jax.lax.dynamic_update_slice(nn.unbox(ck.value), key.swapaxes(1, 2), (0, 0, i, 0))
        cv.value = jax.lax.dynamic_update_slice(nn.unbox(cv.value), value.swapaxes(1, 2), (0, 0, i, 0))
        cp.value = jax.lax.dynamic_update_slice(nn.unbox(cp.value), positions.astype(jnp.int32), (0, i))
        idx.value = i + t
        # Returned as [b, c, k, d] views for `attend`; XLA folds the swap into the dots.
        keys, values = nn.unbox(ck.value).swapaxes(1, 2), nn.unbox(cv.value).swapaxes(1, 2)
        return keys, values, _positions_mask(positions, nn.unbox(cp.value))


def _attention_out(cfg: ModelConfig, out: Array, bias: bool) -> Array:
    """The output projection of attention: [b, t, h, d] -> [b, t, e]."""
    out = nn.with_logical_constraint(out, ("activation_batch", "activation_length", "activation_heads", "kv"))
    # Residual projections are scaled down with depth (GPT-2): keeps the residual stream's
    # variance from growing with the number of layers at init.
    out_scale = 1.0 / (2.0 * cfg.num_layers) ** 0.5
    return _dense(
        cfg, cfg.embed_dim, ("heads", "kv", "embed"), "out", in_axis=(-2, -1), scale=out_scale, use_bias=bias
    )(out)


class Memory(NamedTuple):
    """What a decoder block's cross-attention reads: the encoder's output and which keys it may see."""

    encoded: Array  # [b, s, e] encoder output
    mask: Array  # [b, t, s] bool: target position t may attend to source position s
    valid: Array  # [b, s] bool: real source tokens (kept in the decoding cache)


class CrossAttention(nn.Module):
    """Attention from decoder positions to the encoder's output (no positional rotation).

    With `decode=True` the keys and values of the source are computed once per sentence (when
    `memory` is given: cache set-up) and kept in the cache as `cross_key` / `cross_value`
    [b, k, s, d] with `source_valid` [b, s]; later steps (`memory` None) read them from there.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: Array, memory: Memory | None, decode: bool) -> Array:
        """x: [b, t, e] -> [b, t, e]."""
        cfg = self.cfg
        h, k, d = cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
        bias = cfg.attention_use_bias
        q = _dense(cfg, (h, d), ("embed", "heads", "kv"), "query", use_bias=bias)(x)
        q = nn.with_logical_constraint(q, ("activation_batch", "activation_length", "activation_heads", "kv"))
        key = value = mask = None
        if memory is not None:
            key = _dense(cfg, (k, d), ("embed", "kv_heads", "kv"), "key", use_bias=bias)(memory.encoded)
            value = _dense(cfg, (k, d), ("embed", "kv_heads", "kv"), "value", use_bias=bias)(memory.encoded)
            mask = memory.mask
        if decode:
            key, value, mask = self._cached(key, value, memory, x.shape[1])
        return _attention_out(cfg, _attend(self, q, key, value, mask, cfg.attention), bias)

    def _cached(self, key, value, memory, t: int):
        """Stores the source's keys/values (set-up call) or reads them (decoding steps)."""
        axes = ("cache_batch", "cache_kv_heads", "cache_length", "kv")
        shape = None if key is None else key.swapaxes(1, 2).shape  # [b, k, s, d]
        zeros = lambda dtype: nn.with_logical_partitioning(lambda: jnp.zeros(shape, dtype), axes)  # noqa: E731
        ck = self.variable("cache", "cross_key", zeros(getattr(key, "dtype", None)))
        cv = self.variable("cache", "cross_value", zeros(getattr(value, "dtype", None)))
        valid_shape = None if memory is None else memory.valid.shape
        cvalid = self.variable(
            "cache",
            "source_valid",
            nn.with_logical_partitioning(lambda: jnp.zeros(valid_shape, bool), ("cache_batch", "cache_length")),
        )
        if memory is not None:
            ck.value, cv.value, cvalid.value = key.swapaxes(1, 2), value.swapaxes(1, 2), memory.valid
        valid = nn.unbox(cvalid.value)
        mask = jnp.broadcast_to(valid[:, None, :], (valid.shape[0], t, valid.shape[1]))
        return nn.unbox(ck.value).swapaxes(1, 2), nn.unbox(cv.value).swapaxes(1, 2), mask


class Mlp(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x: [b, t, e] -> [b, t, e]."""
        cfg = self.cfg
        if cfg.mlp_activation == "swiglu":
            gate = _dense(cfg, cfg.mlp_dim, ("embed", "mlp"), "wi_0", use_bias=cfg.mlp_use_bias)(x)
            up = _dense(cfg, cfg.mlp_dim, ("embed", "mlp"), "wi_1", use_bias=cfg.mlp_use_bias)(x)
            hidden = nn.silu(gate) * up
        else:
            hidden = nn.gelu(
                _dense(cfg, cfg.mlp_dim, ("embed", "mlp"), "wi", use_bias=cfg.mlp_use_bias)(x), approximate=True
            )
        hidden = nn.with_logical_constraint(hidden, ("activation_batch", "activation_length", "activation_mlp"))
        out_scale = 1.0 / (2.0 * cfg.num_layers) ** 0.5
        return _dense(cfg, cfg.embed_dim, ("mlp", "embed"), "wo", scale=out_scale, use_bias=cfg.mlp_use_bias)(hidden)


class Block(nn.Module):
    """Pre-norm Transformer block: x + attn(norm(x)), [x + cross_attn(norm(x), memory),] x + mlp(norm(x)).

    `cross`: a decoder block of the encoder-decoder. `fill` (decoding set-up): only store the
    source's cross-attention keys/values in the cache; x passes through unchanged.
    """

    cfg: ModelConfig
    cross: bool = False

    @nn.compact
    def __call__(self, x, positions, mask, segment_ids, memory, deterministic: bool, decode: bool, fill: bool):
        cfg = self.cfg
        drop = lambda y: nn.Dropout(cfg.dropout_rate)(y, deterministic=deterministic)  # noqa: E731
        if fill:
            CrossAttention(cfg, name="cross_attn")(make_norm(cfg, "ln_cross")(x), memory, decode)
            return x, None
        x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
        attn = Attention(cfg, name="attn")(
            make_norm(cfg, "ln_1")(x), positions, deterministic, decode, mask, segment_ids
        )
        x = x + drop(attn)
        if self.cross:
            x = x + drop(CrossAttention(cfg, name="cross_attn")(make_norm(cfg, "ln_cross")(x), memory, decode))
        x = x + drop(Mlp(cfg, name="mlp")(make_norm(cfg, "ln_2")(x)))
        x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
        return x, None  # (carry, per-layer output) so the same block works under nn.scan


_REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def apply_layers(cfg: ModelConfig, name: str, num_layers: int, x: Array, *args, cross: bool = False) -> Array:
    """x through `num_layers` Blocks, called inside a compact method as block(x, *args).

    With `scan_layers` one compiled block is applied num_layers times (params stacked on the
    'layers' axis, compile time flat with depth), named `name`; otherwise `name_0`, `name_1`, ...
    With `remat` each block is rematerialized in the backward pass. The trailing Python values of
    `args` (deterministic, decode, fill) are static.
    """
    block = Block
    if cfg.remat != "none":
        static = tuple(i + 2 for i, a in enumerate(args) if isinstance(a, bool))  # +2: self and x
        block = nn.remat(
            Block, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers, static_argnums=static
        )
    if cfg.scan_layers:
        stack = nn.scan(
            block,
            variable_axes={"params": 0, "cache": 0, "intermediates": 0},  # recorded weights: [layers, ...]
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast,) * len(args),
            length=num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(cfg, cross, name=name)
        return stack(x, *args)[0]
    for i in range(num_layers):
        x, _ = block(cfg, cross, name=f"{name}_{i}")(x, *args)
    return x


def position_table(module: nn.Module, cfg: ModelConfig, name: str = "pos_embed") -> Array | None:
    """The learned position table [max_len, e] (a param of `module`), or None for rope / sinusoidal."""
    if cfg.positions != "learned":
        return None
    return module.param(name, _init(cfg, ("length", "embed"), 0.5), (cfg.max_len, cfg.embed_dim), cfg.weight_dtype)


def add_positions(cfg: ModelConfig, x: Array, positions: Array, table: Array | None) -> Array:
    """x [b, t, e] plus the absolute position embedding (the learned `table`, or sinusoidal); RoPE
    rotates queries and keys inside attention instead."""
    if cfg.positions == "learned":
        return x + jnp.take(nn.unbox(table), jnp.maximum(positions, 0), axis=0).astype(cfg.compute_dtype)
    if cfg.positions == "sinusoidal":
        return x + sinusoidal(positions, cfg.embed_dim).astype(cfg.compute_dtype)
    return x


def make_head(cfg: ModelConfig) -> nn.Module | None:
    """The untied output projection `lm_head` [e, v], or None when tied to the embedding."""
    if cfg.tie_embeddings:
        return None
    return nn.DenseGeneral(
        cfg.vocab_size,
        use_bias=False,
        dtype=cfg.compute_dtype,
        param_dtype=cfg.weight_dtype,
        kernel_init=_init(cfg, ("embed", "vocab")),
        name="lm_head",
    )


def output_logits(cfg: ModelConfig, embed: nn.Embed, head: nn.Module | None, x: Array) -> Array:
    """Final hidden states [b, t, e] -> float32 logits [b, t, v], through the tied table or `head`."""
    logits = embed.attend(x.astype(cfg.compute_dtype)) if head is None else head(x)
    logits = nn.with_logical_constraint(logits, ("activation_batch", "activation_length", "activation_vocab"))
    return logits.astype(jnp.float32)


def make_embed(cfg: ModelConfig, name: str = "embed") -> nn.Embed:
    return nn.Embed(
        cfg.vocab_size,
        cfg.embed_dim,
        embedding_init=_init(cfg, ("vocab", "embed")),
        dtype=cfg.compute_dtype,
        param_dtype=cfg.weight_dtype,
        name=name,
    )


class TransformerLM(nn.Module):
    """Decoder-only LM: tokens [b, t] -> logits [b, t, v] (float32)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(
        self,
        tokens: Array,
        positions: Array | None = None,
        deterministic: bool = True,
        decode: bool = False,
        return_hidden: bool = False,
        segment_ids: Array | None = None,
    ) -> Array:
        """tokens: [b, t] int; positions: [b, t] int, default 0..t-1 (-1 marks left padding).

        `segment_ids` [b, t] int (documents packed into one row, with `positions` restarting at each
        one): attention never crosses from one segment to another, so every document is computed
        as if it were alone. Training and evaluation only (not with decode).

        `return_hidden=True` returns the final normed hidden states [b, t, e] (compute dtype)
        instead of the logits, for a loss that applies the output projection itself
        (`llm_jax.models.loss.chunked_cross_entropy` with `output_kernel`).

        `decode=True` reads and appends to the KV cache (collection 'cache', made by `init` with
        decode=True on a [b, c] input: c cache slots, c <= max_len); otherwise attention is plain causal over `tokens`.
        """
        cfg = self.cfg
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        embed = make_embed(cfg)
        x = add_positions(cfg, embed(tokens), positions, position_table(self, cfg))
        x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
        args = (positions, None, segment_ids, None, deterministic, decode, False)
        x = apply_layers(cfg, "layers", cfg.num_layers, x, *args)
        x = make_norm(cfg, "ln_f")(x)
        if return_hidden:
            return nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
        return output_logits(cfg, embed, make_head(cfg), x)


def output_kernel(cfg: ModelConfig, params: Any) -> tuple[Array, bool]:
    """(the output projection's weight, vocab_first): the tied table [v, e] or lm_head's [e, v]."""
    if cfg.tie_embeddings:
        return params["embed"]["embedding"], True
    return params["lm_head"]["kernel"], False


# Fields a resumed run may change (see `_runtime`).
RUNTIME_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig) if f.metadata.get("runtime"))


def count_params(params: Any) -> int:
    return int(sum(x.size for x in jax.tree.leaves(params)))
