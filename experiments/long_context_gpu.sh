#!/usr/bin/env bash
# Issue 25 on one NVIDIA GPU (H100 / H200): cuDNN flash attention (config.model.attention='cudnn',
# llm_jax/models/kernels.py) against the reference ('einsum') and the pure-JAX blockwise path.
# Not yet run: no GPU was lent to the session that wrote it.
#
# 1. Here, once (a machine with PyPI): bash experiments/h200_llama1b.sh prepare   # -> experiments/.h200_deps/
# 2. On the GPU machine, from the repo root, with experiments/.h200_deps carried along:
#        bash experiments/long_context_gpu.sh        # writes $OUT (or .)/long_context_gpu_*.{log,json,png}
#    Knobs: SEQS="8192 16384 32768" (Llama-1B step lengths), STEPS=5, LENGTHS (long_context.py's
#    lengths), ATTENTIONS="einsum blockwise cudnn".
# What it does: (a) cuDNN vs einsum vs blockwise on bf16 q/k/v: values and gradients agree (causal,
# packed segments, a sliding window, grouped-query heads; bf16 tolerance); (b) the small-model curve
# of experiments/long_context.py in bf16 with cuDNN added; (c) llm_jax.bench of the Llama-1B preset,
# batch 1 per step, at each length and attention (JSON per run: tokens/s, MFU, peak memory).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD:$PWD/experiments/.h200_deps${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
OUT_DIR="${OUT:-.}"
"$PY" -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
nvidia-smi --query-gpu=name,memory.total --format=csv || true

echo "=== (a) cuDNN attention equals the reference (bf16)"
"$PY" - <<'PY' | tee "$OUT_DIR/long_context_gpu_check.log"
import json
import jax, jax.numpy as jnp
from llm_jax.models import blockwise, kernels, ops

r = jax.random.split(jax.random.key(0), 5)
b, t, h, kv, d = 2, 2048, 8, 2, 128
q = jax.random.normal(r[0], (b, t, h, d), jnp.bfloat16)
k = jax.random.normal(r[1], (b, t, kv, d), jnp.bfloat16)
v = jax.random.normal(r[2], (b, t, kv, d), jnp.bfloat16)
ct = jax.random.normal(r[3], (b, t, h, d), jnp.bfloat16)
seg = jnp.cumsum(jax.random.bernoulli(r[4], 0.002, (b, t)), axis=1)
for name, kw in {"causal": {}, "segments": {"segment_ids": seg}, "window": {"window": 256}}.items():
    paths = {
        "einsum": lambda q, k, v: ops._causal_attention(q, k, v, kw.get("segment_ids"), kw.get("window")),
        "blockwise": lambda q, k, v: blockwise.attention(q, k, v, kw.get("segment_ids"), kw.get("window")),
        "cudnn": lambda q, k, v: kernels.cudnn(q, k, v, kw.get("segment_ids"), kw.get("window")),
    }
    got = {p: jax.jit(lambda q, k, v, f=f: jax.vjp(f, q, k, v)[1](ct) + (f(q, k, v),))(q, k, v) for p, f in paths.items()}
    err = {p: max(float(jnp.abs(a.astype(jnp.float32) - e.astype(jnp.float32)).max()) for a, e in zip(got[p], got["einsum"])) for p in ("blockwise", "cudnn")}
    print(json.dumps({"case": name, "max_abs_err_vs_einsum": err}))
    assert all(e < 0.1 for e in err.values()), err
PY

echo "=== (b) memory and tokens/s against length (small model, bf16)"
# shellcheck disable=SC2086
"$PY" experiments/long_context.py --dtype bfloat16 --attentions "$(echo ${ATTENTIONS:-einsum blockwise cudnn} | tr ' ' ,)" \
  --lengths "${LENGTHS:-1024,2048,4096,8192,16384,32768,65536}" --run_budget_gib 100 --run_max_len 1000000 --repeats 5 \
  --out "$OUT_DIR/long_context_gpu.png" | tee "$OUT_DIR/long_context_gpu_curve.log"

echo "=== (c) Llama-1B training step at long context"
for SEQ in ${SEQS:-8192 16384 32768}; do
  for A in ${ATTENTIONS:-einsum blockwise cudnn}; do
    echo "--- llama 1b, 1 x $SEQ, attention=$A"
    "$PY" -m llm_jax.bench --config configs/llama.py:1b --steps "${STEPS:-5}" --warmup 2 \
      --config.train.batch_size=1 --config.data.seq_len="$SEQ" --config.model.max_len="$SEQ" \
      --config.model.attention="$A" --config.model.remat=dots --config.model.loss_chunk=1024 \
      --config.mesh.data=1 --config.mesh.fsdp=1 --config.mesh.tensor=1 \
      > "$OUT_DIR/long_context_gpu_${A}_${SEQ}.log" 2>&1 || echo "attention=$A at $SEQ failed (see the log; OOM is a result)"
    tail -n 1 "$OUT_DIR/long_context_gpu_${A}_${SEQ}.log" | tee "$OUT_DIR/long_context_gpu_${A}_${SEQ}.json"
  done
done
