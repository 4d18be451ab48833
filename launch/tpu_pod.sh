#!/usr/bin/env bash
# Run the same command on every worker of a Cloud TPU pod slice. JAX discovers the pod topology
# itself (jax.distributed.initialize() without arguments); each host feeds its own slice of the data.
#
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a bash launch/tpu_pod.sh configs/qwen2vl_7b_mbeir.yaml data.root=gs://...
#
# First time on a fresh pod, install with:  SETUP=1 TPU_NAME=... ZONE=... bash launch/tpu_pod.sh
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
REPO_DIR="${REPO_DIR:-~/elva_jax}"
if [ "${SETUP:-0}" = 1 ]; then
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command \
    "cd $REPO_DIR && pip install -e '.[tpu]'"
  exit 0
fi
cfg="$1"; shift
args=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command \
  "cd $REPO_DIR && ELVA_DISTRIBUTED=1 python -m elva_jax.train --config $cfg$args"
