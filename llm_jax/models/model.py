"""Decoder-only Transformer language model in `flax.linen`.

One frozen `ModelConfig` is the model's only input. Every parameter carries logical axis names
(`embed`, `heads`, `kv_heads`, `kv`, `mlp`, `vocab`, `norm`, `layers`) and the main activations are
constrained at block boundaries (`activation_batch`, `activation_length`, `activation_embed`, ...);
`llm_jax.runtime.sharding` maps those names to mesh axes, so this file never mentions a mesh.

Shapes in docstrings: b = batch, t = query length, s = key length, e = embed, h = query heads,
k = key/value heads, g = h // k (queries per kv head), d = head dim, v = vocab.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# Re-exported: the model's pieces are importable from this one module (`from llm_jax.models.model import ...`).
from llm_jax.models.attention import Attention, CrossAttention, Memory, attention_out  # noqa: F401
from llm_jax.models.config import RUNTIME_FIELDS, ModelConfig  # noqa: F401
from llm_jax.models.layers import Mlp, RMSNorm, make_norm, normal_init  # noqa: F401
from llm_jax.models.moe import STATS, MoeMlp
from llm_jax.models.ops import attend, rope, rope_frequencies, sinusoidal  # noqa: F401

Array = jax.Array


class Block(nn.Module):
    """Pre-norm Transformer block: x + attn(norm(x)), [x + cross_attn(norm(x), memory),] x + mlp(norm(x));
    with `post_norms` (Gemma 2/3) each sublayer's output is normed again before it is added.

    `cross`: a decoder block of the encoder-decoder. `fill` (decoding set-up): only store the
    source's cross-attention keys/values in the cache; x passes through unchanged. `layer`: this
    block's index (an int, or traced under scan_layers), which picks local or global attention and
    the dense or mixture-of-experts MLP (`cfg.is_moe`).
    """

    cfg: ModelConfig
    cross: bool = False

    @nn.compact
    def __call__(self, x, layer, positions, mask, segment_ids, memory, deterministic: bool, decode: bool, fill: bool):
        cfg = self.cfg
        drop = lambda y: nn.Dropout(cfg.dropout_rate)(y, deterministic=deterministic)  # noqa: E731
        post = lambda y, name: make_norm(cfg, name)(y) if cfg.post_norms else y  # noqa: E731
        if fill:
            CrossAttention(cfg, name="cross_attn")(make_norm(cfg, "ln_cross")(x), memory, decode)
            return x, None
        x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
        attn = Attention(cfg, name="attn")(
            make_norm(cfg, "ln_1")(x), positions, deterministic, decode, mask, segment_ids, layer
        )
        x = x + drop(post(attn, "ln_1_post"))
        if self.cross:
            x = x + drop(CrossAttention(cfg, name="cross_attn")(make_norm(cfg, "ln_cross")(x), memory, decode))
        mlp = MoeMlp(cfg, name="mlp") if cfg.is_moe(layer) else Mlp(cfg, name="mlp")
        x = x + drop(post(mlp(make_norm(cfg, "ln_2")(x)), "ln_2_post"))
        x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
        return x, None  # (carry, per-layer output) so the same block works under nn.scan


_REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def apply_layers(cfg: ModelConfig, name: str, num_layers: int, x: Array, *args, cross: bool = False) -> Array:
    """x through `num_layers` Blocks, called inside a compact method as block(x, layer, *args).

    With `scan_layers` one compiled block is applied num_layers times (params stacked on the
    'layers' axis, compile time flat with depth), named `name`, and each application gets its
    layer index as a traced int; otherwise `name_0`, `name_1`, ... get theirs as Python ints.
    With `remat` each block is rematerialized in the backward pass. The trailing Python values of
    `args` (deterministic, decode, fill) are static.
    """
    block = Block
    if cfg.remat != "none":
        # +3: self, x and layer (static too when it is an int: it picks the layer's attention kind)
        static = tuple(i + 3 for i, a in enumerate(args) if isinstance(a, bool))
        static = static if cfg.scan_layers else (2, *static)
        block = nn.remat(
            Block, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers, static_argnums=static
        )
    if cfg.scan_layers:
        stack = nn.scan(
            block,
            # recorded weights and MoE losses: [layers, ...]
            variable_axes={"params": 0, "cache": 0, "intermediates": 0, STATS: 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(0,) + (nn.broadcast,) * len(args),  # the layer index is scanned over
            length=num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(cfg, cross, name=name)
        return stack(x, jnp.arange(num_layers, dtype=jnp.int32), *args)[0]
    for i in range(num_layers):
        x, _ = block(cfg, cross, name=f"{name}_{i}")(x, i, *args)
    return x


def position_table(module: nn.Module, cfg: ModelConfig, name: str = "pos_embed") -> Array | None:
    """The learned position table [max_len, e] (a param of `module`), or None for rope / sinusoidal."""
    if cfg.positions != "learned":
        return None
    init = normal_init(cfg, ("length", "embed"), 0.5)
    return module.param(name, init, (cfg.max_len, cfg.embed_dim), cfg.weight_dtype)


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
        kernel_init=normal_init(cfg, ("embed", "vocab")),
        name="lm_head",
    )


def output_logits(cfg: ModelConfig, embed: nn.Embed, head: nn.Module | None, x: Array) -> Array:
    """Final hidden states [b, t, e] -> float32 logits [b, t, v], through the tied table or `head`
    (soft-capped with `final_softcap`)."""
    logits = embed.attend(x.astype(cfg.compute_dtype)) if head is None else head(x)
    logits = nn.with_logical_constraint(logits, ("activation_batch", "activation_length", "activation_vocab"))
    return softcap(logits.astype(jnp.float32), cfg.final_softcap)


def softcap(logits: Array, cap: float | None) -> Array:
    """cap * tanh(logits / cap): logits squashed into (-cap, cap); unchanged without a cap."""
    return logits if not cap else cap * jnp.tanh(logits / cap)


def embed_tokens(cfg: ModelConfig, embed: nn.Embed, tokens: Array) -> Array:
    """tokens [b, t] -> [b, t, e], times sqrt(embed_dim) in the compute dtype with `embed_scale` (Gemma)."""
    x = embed(tokens)
    return x * jnp.asarray(cfg.embed_dim**0.5, x.dtype) if cfg.embed_scale else x


def make_embed(cfg: ModelConfig, name: str = "embed") -> nn.Embed:
    return nn.Embed(
        cfg.vocab_size,
        cfg.embed_dim,
        embedding_init=normal_init(cfg, ("vocab", "embed")),
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
        x = add_positions(cfg, embed_tokens(cfg, embed, tokens), positions, position_table(self, cfg))
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


def count_params(params: Any) -> int:
    return int(sum(x.size for x in jax.tree.leaves(params)))
