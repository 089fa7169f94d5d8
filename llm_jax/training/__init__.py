"""Training runs: the run config, the state and its jitted step, the loop, and the run directory.

`config` (every run-config key, checks, `finalize`, `model_config`), `optim` (the optax chain),
the train state and step, the loop of periodic actions, `checkpoint` (orbax: async saves, restore
onto any mesh), `workdir` (the run directory's life cycle and its one-writer lock), `metrics`
(metrics.jsonl, TensorBoard), `summary` (the model summary at start-up), `saved_run` (`load_run`:
the one reader of a finished run, for every command that uses one).

Layer 4: imports the runtime, models, data and inference layers.
"""
