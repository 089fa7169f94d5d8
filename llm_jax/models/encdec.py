"""The encoder-decoder family (`ModelConfig.family == 'encdec'`): the original Transformer for
translation and other sequence-to-sequence tasks, built from the shared blocks of `model.py`.

`EncoderDecoder` = a bidirectional encoder over the source (padding never attended), and a decoder
whose blocks add cross-attention to the encoder's output between causal self-attention and the
MLP. Pre-norm, the same logical axis names as the LM (so every mesh shape works), the same speed
switches (scan_layers, remat, bfloat16, `dot_product` attention). One embedding table serves
source, target and the output projection when `share_embeddings` and `tie_embeddings` are set
(a joint vocabulary).

Sequences may be packed: several pairs per row, told apart by segment ids (1, 2, ... per pair;
0 = padding) with positions restarting in each pair; attention never crosses a pair (encoder,
decoder and cross-attention masks come from the segments). Batches (llm_jax/data/parallel.py) hold
`source`, `source_positions`, `source_segments` [b, s] and the decoder's `inputs` (BOS + target),
`targets` (target + EOS), `positions`, `segments`, `weights` [b, t].

Decoding: `init_cache` encodes the source once and stores every decoder layer's cross-attention
keys/values in the cache, so a decoding step runs only the decoder over its new token.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llm_jax.models import family as family_lib
from llm_jax.models import flops
from llm_jax.models.lm import token_loss_sum
from llm_jax.models.model import (
    Memory,
    ModelConfig,
    add_positions,
    apply_layers,
    embed_tokens,
    make_embed,
    make_head,
    make_norm,
    output_logits,
    position_table,
)

Array = jax.Array


def segments_of(positions: Array) -> Array:
    """Segments of an unpacked row: 1 on real tokens (position >= 0), 0 on padding."""
    return (positions >= 0).astype(jnp.int32)


def default_positions(tokens: Array) -> Array:
    """0..t-1 on every row."""
    return jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)


def same_segment(q_seg: Array, k_seg: Array) -> Array:
    """[b, t] and [b, s] segment ids -> [b, t, s]: the key is real and in the query's segment."""
    return (q_seg[:, :, None] == k_seg[:, None, :]) & (k_seg[:, None, :] > 0)


class EncoderDecoder(nn.Module):
    """(source [b, s], target inputs [b, t]) -> logits [b, t, v] float32."""

    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        self.embed = make_embed(cfg)  # the target's (and, shared, the source's) table
        if not cfg.share_embeddings:
            self.source_embed = make_embed(cfg, "source_embed")
        self.pos_embed = position_table(self, cfg)
        self.source_pos_embed = position_table(self, cfg, "source_pos_embed")
        self.dropout = nn.Dropout(cfg.dropout_rate)
        self.encoder = Stack(cfg, cfg.encoder_layers, cross=False)
        self.encoder_norm = make_norm(cfg, "encoder_norm")
        self.decoder = Stack(cfg, cfg.num_layers, cross=True)
        self.decoder_norm = make_norm(cfg, "decoder_norm")
        self.lm_head = make_head(cfg)

    def __call__(
        self, source, tokens, source_positions=None, positions=None, source_segments=None, segments=None,
        deterministic: bool = True, decode: bool = False, return_hidden: bool = False,
    ):  # fmt: skip
        """Teacher-forced decoding of `tokens` given `source` (both [b, *] int; positions default
        0..n-1, segments default 1 where the position is >= 0). `return_hidden`: the final normed
        decoder states [b, t, e] instead of logits (for the chunked loss)."""
        source_positions = default_positions(source) if source_positions is None else source_positions
        positions = default_positions(tokens) if positions is None else positions
        source_segments = segments_of(source_positions) if source_segments is None else source_segments
        segments = segments_of(positions) if segments is None else segments
        encoded = self.encode(source, source_positions, source_segments, deterministic)
        memory = Memory(encoded, same_segment(segments, source_segments), source_segments > 0)
        # Decoder self-attention: causal within a segment (pairs are contiguous in a packed row).
        hidden = self.decode(tokens, positions, None if decode else segments, memory, deterministic, decode)
        return hidden if return_hidden else output_logits(self.cfg, self.embed, self.lm_head, hidden)

    def encode(self, source, source_positions, source_segments, deterministic: bool = True) -> Array:
        """source [b, s] -> encoded [b, s, e]: bidirectional, each token seeing its own segment."""
        embed = self.embed if self.cfg.share_embeddings else self.source_embed
        x = embed_tokens(self.cfg, embed, source)
        x = self.dropout(add_positions(self.cfg, x, source_positions, self.source_pos_embed), deterministic)
        mask = same_segment(source_segments, source_segments)
        x = self.encoder(x, source_positions, mask, None, None, deterministic, False, False)
        return self.encoder_norm(x)

    def decode(self, tokens, positions, segments, memory, deterministic: bool = True, decode: bool = False) -> Array:
        """Decoder over `tokens` [b, t] -> final normed hidden states [b, t, e], causal within
        `segments` [b, t]. In decode mode `segments` is None (the cache masks) and `memory` None
        after the cache set-up."""
        x = embed_tokens(self.cfg, self.embed, tokens)
        x = self.dropout(add_positions(self.cfg, x, positions, self.pos_embed), deterministic)
        x = self.decoder(x, positions, None, segments, memory, deterministic, decode, False)
        return self.decoder_norm(x)

    def decode_logits(self, tokens, positions) -> Array:
        """One cached decoding call: logits [b, v] float32 of the last position."""
        hidden = self.decode(tokens, positions, None, None, True, True)
        return output_logits(self.cfg, self.embed, self.lm_head, hidden[:, -1:])[:, 0]

    def fill_cross_cache(self, encoded, source_valid) -> None:
        """Stores every decoder layer's cross-attention keys/values of `encoded` [b, s, e] in the cache."""
        memory = Memory(encoded, None, source_valid)
        self.decoder(encoded[:, :1], None, None, None, memory, True, True, True)


class Stack(nn.Module):
    """`num_layers` shared Blocks (llm_jax.models.model.apply_layers), as a module of its own."""

    cfg: ModelConfig
    num_layers: int
    cross: bool

    @nn.compact
    def __call__(self, x, positions, mask, segment_ids, memory, deterministic: bool, decode: bool, fill: bool):
        args = (positions, mask, segment_ids, memory, deterministic, decode, fill)
        return apply_layers(self.cfg, "layers", self.num_layers, x, *args, cross=self.cross)


class EncoderDecoderFamily(family_lib.ModelFamily):
    name = "encdec"
    cache_fill = {"cached_pos": -1}  # -1: an empty slot, never attended

    def make_model(self, cfg) -> EncoderDecoder:
        return EncoderDecoder(cfg)

    def init_inputs(self, cfg, batch: int, length: int) -> dict:
        zeros = jnp.zeros((batch, length), jnp.int32)
        return {"source": zeros, "tokens": zeros}

    def batch_spec(self, cfg, batch: int, length: int, *, weights: bool = True, packed: bool = True) -> dict:
        """Parallel text's batch (llm_jax/data/parallel.py), whatever the flags: its pairs are always
        packed and weighted. `source`, `source_positions`, `source_segments`, `inputs`, `targets`,
        `positions`, `segments` [batch, length] int32 and `weights` [batch, length] float32."""
        keys = dict.fromkeys(("source", "source_positions", "source_segments", "inputs", "targets"), jnp.int32)
        keys.update(positions=jnp.int32, segments=jnp.int32, weights=jnp.float32)
        return {k: jax.ShapeDtypeStruct((batch, length), dt) for k, dt in keys.items()}

    def random_batch(self, cfg, batch: int, length: int, seed: int, **options) -> dict[str, np.ndarray]:
        """Unpacked random pairs of `length` source and target tokens (ids from 4: past the specials)."""
        rng = np.random.default_rng(seed)
        tokens = rng.integers(4, cfg.vocab_size, (batch, length + 1), dtype=np.int32)
        source = rng.integers(4, cfg.vocab_size, (batch, length), dtype=np.int32)
        spec = self.batch_spec(cfg, batch, length, **options)
        return family_lib.filled(spec, {"source": source, "inputs": tokens[:, :-1], "targets": tokens[:, 1:]})

    def loss_sum(self, model, params, batch, rng, train):
        """(summed cross-entropy of `targets`, token count), weighted; label smoothing when training."""
        inputs = (batch["source"], batch["inputs"], batch["source_positions"], batch["positions"])
        segments = {"source_segments": batch["source_segments"], "segments": batch["segments"]}
        return token_loss_sum(model, params, batch, rng, train, *inputs, **segments)

    def flops_per_token(self, cfg, seq_len: int) -> float:
        return flops.encoder_decoder_flops_per_token(cfg, seq_len)

    def init_cache(self, model, params, batch, length, start, mesh=None, source=None, **inputs):
        """Encodes `source` [b, s] (0 = padding, at the end of a row) once, and returns a cache of
        `length` decoder slots holding every layer's cross-attention keys/values of it."""
        if source is None:
            raise ValueError("the encoder-decoder decodes given a source: pass source=[b, s] token ids")
        source = jnp.asarray(source, jnp.int32)
        valid = source != 0
        positions = jnp.where(valid, default_positions(source), -1)
        layers, specs = family_lib.empty_cache(
            model, {"source": source, "tokens": jnp.zeros((batch, length), jnp.int32)}, mesh
        )
        encoded = model.apply({"params": params}, source, positions, valid.astype(jnp.int32), method="encode")
        _, mut = model.apply(
            {"params": params, "cache": layers}, encoded, valid, method="fill_cross_cache", mutable=["cache"]
        )
        cache = family_lib.Cache(layers=None, next_pos=jnp.asarray(start, jnp.int32), specs=specs, mesh=mesh)
        return cache.replace(layers=cache.constrain(mut["cache"]))

    def tokens_to_logits(self, model, params):
        """(tokens [b, t], cache) -> (logits [b, v] float32 of the last position, cache)."""

        def step(tokens, cache):
            positions = cache.next_pos[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)
            logits, mut = model.apply(
                {"params": params, "cache": cache.layers}, tokens, positions, method="decode_logits", mutable=["cache"]
            )
            logits = nn.with_logical_constraint(logits, ("activation_batch", "activation_vocab"), mesh=cache.mesh)
            return logits, cache.replace(
                layers=cache.constrain(mut["cache"]), next_pos=cache.next_pos + tokens.shape[1]
            )

        return step


FAMILY = family_lib.register(EncoderDecoderFamily())
