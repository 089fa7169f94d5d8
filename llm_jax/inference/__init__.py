"""Inference over a model family: what turns parameters into text.

`decode` (sampling and greedy decoding over a family's `tokens_to_logits` step, KV cache, sliding
window past the trained context, `complete`), `beam_search` (batched beam search over the same
step), `translate` (sentences in, translations out, BLEU; the encoder-decoder's decoding
evaluation). They take a model and its parameters, never a run directory.

Layer 3: imports `llm_jax.runtime`, `llm_jax.models` and `llm_jax.data`.
"""
