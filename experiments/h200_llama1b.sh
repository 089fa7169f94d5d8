#!/usr/bin/env bash
# Issue 5 on one NVIDIA H200: bf16 training-step MFU of the ~1.2B-parameter Llama preset
# (configs/llama.py:1b: 16 layers, width 2048, 32 heads / 8 kv heads, SwiGLU 8192, vocab 32000),
# context 2048, nn.scan + dots remat, cuDNN attention (jax.nn.dot_product_attention), float32
# master weights, AdamW. Target: MFU >= 55% (against the 989 TFLOP/s dense bf16 table peak).
#
# 1. Here (a machine with PyPI), once: bundle the pure-Python packages the GPU image lacks
#    (ml_collections and PyYAML for its Python 3.12; git-ignored):
#        bash experiments/h200_llama1b.sh prepare          # -> experiments/.h200_deps/
# 2. On the GPU machine, from the repo root, with experiments/.h200_deps carried along:
#        bash experiments/h200_llama1b.sh                  # writes $OUT (or .) /h200_llama1b_*.json
#    Knobs: BATCHES="8 16" (global batch per run), STEPS=10, REMAT=dots, LOSS_CHUNK=512, SEQ=2048,
#    EXTRA="--config.K=V ..." (more overrides; tests/test_experiments.py runs a tiny model on CPU).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "prepare" ]]; then
  rm -rf experiments/.h200_deps && mkdir -p experiments/.h200_deps
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d experiments/.h200_deps/wheels ml_collections pyyaml
  for w in experiments/.h200_deps/wheels/*.whl; do python3 -m zipfile -e "$w" experiments/.h200_deps/; done
  rm -rf experiments/.h200_deps/wheels
  echo "prepared experiments/.h200_deps: $(ls experiments/.h200_deps | tr '\n' ' ')"
  exit 0
fi

PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD:$PWD/experiments/.h200_deps${PYTHONPATH:+:$PYTHONPATH}"
# XLA's GPU flags stay at their defaults; only the allocator may take 95% of the 141 GB.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
OUT_DIR="${OUT:-.}"
"$PY" -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true

for B in ${BATCHES:-8 16}; do
  echo "=== llama 1b, batch $B x ${SEQ:-2048}, remat ${REMAT:-dots}, loss_chunk ${LOSS_CHUNK:-512}"
  # shellcheck disable=SC2086  # EXTRA is a list of words
  "$PY" -m llm_jax.bench --config configs/llama.py:1b --steps "${STEPS:-10}" --warmup 2 \
    --config.train.batch_size="$B" --config.data.seq_len="${SEQ:-2048}" \
    --config.model.remat="${REMAT:-dots}" --config.model.loss_chunk="${LOSS_CHUNK:-512}" \
    --config.mesh.data=1 --config.mesh.fsdp=-1 --config.mesh.tensor=1 ${EXTRA:-} \
    | tee "$OUT_DIR/h200_llama1b_b${B}.log"
  tail -n 1 "$OUT_DIR/h200_llama1b_b${B}.log" > "$OUT_DIR/h200_llama1b_b${B}.json"
done
