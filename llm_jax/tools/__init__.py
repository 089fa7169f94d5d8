"""Instruments and planning: libraries of the tool commands.

`bench` (the trainer's step timed on random tokens), `bench_decode` (decoding timed), `aot` and
`hlo` (the train step compiled ahead of time for TPU topologies; collectives read from the
optimized HLO), `plot` (training curves from metrics.jsonl), `attention_maps` (attention weights
per layer and head, drawn), `hooks` / `interpret` / `interpret_run` (capture and intervene on named
activations; logit lens, attributions, activation patching, head ablation; their JSON and
figures). matplotlib is imported only to draw.

Layer 7: imports every library layer; only the top-level command modules import it.
"""
