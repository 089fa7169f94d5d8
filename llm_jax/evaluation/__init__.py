"""Evaluation of a model by the measures papers quote: lm-evaluation-harness tasks, perplexity and
bits per byte over a corpus, and both during training.

`scoring` (batched, bucketed, sharded log-likelihoods of continuations over a family's `score`),
`corpus` (text files to documents) and `perplexity` (sliding-window token perplexity, bits per
byte), `harness` (`LlmJaxLM`, the lm-eval model class; lm-eval is imported only there and in
`periodic`), `report` (tables, JSON, metrics lines), `periodic` (lm-eval tasks as a periodic action
of the training loop).

Layer 5: imports runtime, models, data, inference and training (a run's params come from
`load_run` or from the trainer's state); only interop, tools and the command modules sit above.
"""
