"""Data: text sources in, token batches out, as a pure function of (seed, step).

`progress` (ETA lines for long preprocessing), `tokenizer` (byte, char, SentencePiece and HF
tokenizers behind one interface), `sources` (text files, JSON lines, tfds: identity and planned
pieces), `prepare` (sharded memory-mapped token files, made in parallel and cached), `lm_data`
(windows, packing and batches of the decoder-only family; prompt-completion JSONL; `load_data`),
`parallel` (aligned sentence pairs for translation, packed with segment ids), `preference` (chosen /
rejected pairs for DPO and SimPO, two rows each, weights on the responses).

Layer 2: imports `llm_jax.runtime` (never models, training or commands).
"""
