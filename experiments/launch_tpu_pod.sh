#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice: one process per TPU VM worker, the SAME command on every
# worker (JAX's multi-controller runtime; `--auto_distributed` finds the other workers from the
# TPU metadata, so no coordinator address, process count or id is given).
#
#   bash experiments/launch_tpu_pod.sh setup    # once: clone + install on every worker
#   bash experiments/launch_tpu_pod.sh train    # start (or resume) training on every worker
#   bash experiments/launch_tpu_pod.sh args     # print the training command's arguments (tests read these)
#
# Model and mesh: GPT-2 medium (configs/gpt2.py:medium, 350M parameters, bf16, scanned layers,
# dots remat, context 1024) on a v5p-32 slice = 16 chips (JAX devices) on 4 workers, FSDP over all
# 16 (`mesh.fsdp=-1`, `mesh.data=1`): parameters and optimizer state are split 16 ways, the
# global batch of 256 sequences gives each chip 16. On a slice of N chips keep batch_size a
# multiple of N; a model that fits on one chip can trade FSDP for data parallelism
# (`mesh.data=-1 --config.mesh.fsdp=1`); see README "How sharding is chosen".
#
# What you must change (environment variables or the defaults below):
#   TPU_NAME, ZONE, PROJECT  your TPU VM slice (created with `gcloud compute tpus tpu-vm create
#                            $TPU_NAME --zone=$ZONE --accelerator-type=v5p-32 --version=v2-alpha-tpuv5`)
#   REPO_URL                 where the workers clone llm_jax from
#   RUNS                     a directory EVERY worker sees at the same path (gcsfuse bucket mount
#                            or Filestore NFS): checkpoints must be written by all workers into one place
#   DATA_DIR                 a tfds data_dir with the dataset prepared as array_record (on a machine
#                            with network access: `tfds build c4 --config=en --file_format=array_record
#                            --data_dir=$DATA_DIR`); the workers read it offline
# Preemption (spot / maintenance): SIGTERM makes every worker save the same step and exit 0;
# `train` again resumes from it.
set -euo pipefail

TPU_NAME="${TPU_NAME:-my-v5p-32}"
ZONE="${ZONE:-us-east5-a}"
PROJECT="${PROJECT:-my-gcp-project}"
REPO_URL="${REPO_URL:-https://github.com/YOUR_ORG/llm_jax.git}"
RUNS="${RUNS:-/mnt/shared/runs}"
DATA_DIR="${DATA_DIR:-/mnt/shared/tensorflow_datasets}"
DEVICES=16  # v5p-32: 16 chips; the mesh and batch below are checked against this (tests/test_launch_recipes.py)

TRAIN_ARGS=(
  --config=configs/gpt2.py:medium
  --workdir="$RUNS/gpt2_medium_c4"
  --config.mesh.data=1 --config.mesh.fsdp=-1 --config.mesh.tensor=1
  --config.train.batch_size=256
  --config.data.source=tfds --config.data.tfds_name=c4/en --config.data.tfds_data_dir="$DATA_DIR"
  # The trainer reads the tfds split into memory: cap it until the data-at-scale prepare step lands.
  --config.data.max_docs=2000000
  --auto_distributed
)

on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" --worker=all --command="$1"
}

case "${1:-}" in
  args)
    printf '%s\n' "${TRAIN_ARGS[@]}"
    ;;
  devices)
    echo "$DEVICES"
    ;;
  setup)
    on_all_workers "set -e; [ -d llm_jax ] || git clone --depth=1 '$REPO_URL' llm_jax; cd llm_jax && \
      python3 -m pip install -q -e . && python3 -m pip install -q 'jax[tpu]>=0.10,<0.13'"
    ;;
  train)
    # One command line for all workers; nohup so an ssh drop does not stop training. Each
    # worker logs to its own file; process 0 prints the summary, losses and samples.
    on_all_workers "cd llm_jax && nohup python3 -m llm_jax.main ${TRAIN_ARGS[*]@Q} > train_\$(hostname).log 2>&1 &"
    echo "started on every worker of $TPU_NAME; follow with: gcloud compute tpus tpu-vm ssh $TPU_NAME \
--zone=$ZONE --worker=0 --command='tail -f llm_jax/train_*.log'"
    ;;
  *)
    echo "usage: bash $0 setup|train|args|devices" >&2
    exit 2
    ;;
esac
