"""Other ecosystems' files: Hugging Face checkpoints in and out.

`hf_specs` (one `Spec` per architecture: its config.json mapping and the one tensor table used for
both import and export), `safetensors_io` (memory-mapped reading, each device's shard sliced out;
sharded writing), `hf` (import into a run directory, export of a run), `lora_export` (a LoRA run
merged into a plain run, or its adapters in PEFT's format).

Layer 6: imports everything below it (runtime, models, data, inference, training, evaluation).
"""
