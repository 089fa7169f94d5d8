"""The models: one frozen `ModelConfig`, the shared `flax.linen` blocks, and the families built from them.

`ops` (pure array functions: RoPE, attention masks), `model` (`ModelConfig`, attention, MLP, norms,
`Block`, `TransformerLM`), `loss` (the chunked fused cross-entropy), `flops` (FLOP counts and MFU),
`family` (the `ModelFamily` interface every trainer, checkpoint and decoder goes through, its
registry, the decoding `Cache`), and the two families: `lm` (decoder-only) and `encdec`
(encoder-decoder); `preference` (the DPO and SimPO losses over pairs of rows). No mesh, data,
run directory or command is known here.

Layer 1: imports only `llm_jax.runtime`.
"""
