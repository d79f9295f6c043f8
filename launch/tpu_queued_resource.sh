#!/usr/bin/env bash
# Cloud TPU through a queued resource (spot or reserved capacity): request the slice,
# wait until it is ACTIVE, then install and train on every worker as in tpu_vm.sh.
#   QR_NAME=mtm-qr TPU_NAME=mtm ZONE=us-central2-b ACCELERATOR=v4-32 \
#     WORKDIR=gs://bucket/run1 launch/tpu_queued_resource.sh [--spot] [--dry-run] [--config.k=v ...]
set -euo pipefail
here="$(dirname "$0")"
source "$here/common.sh"
QR_NAME="${QR_NAME:?set QR_NAME}"
TPU_NAME="${TPU_NAME:?set TPU_NAME}"
ZONE="${ZONE:?set ZONE}"
ACCELERATOR="${ACCELERATOR:-v4-8}"
RUNTIME="${RUNTIME:-tpu-ubuntu2204-base}"
extra=()
if [[ "${1:-}" == "--spot" ]]; then extra+=(--spot); shift; fi

run gcloud compute tpus queued-resources create "$QR_NAME" --zone="$ZONE" \
  --node-id="$TPU_NAME" --accelerator-type="$ACCELERATOR" --runtime-version="$RUNTIME" \
  "${extra[@]}"
until ((DRY_RUN)) || [[ "$(gcloud compute tpus queued-resources describe "$QR_NAME" --zone="$ZONE" \
           --format='value(state.state)')" == "ACTIVE" ]]; do
  echo "waiting for queued resource $QR_NAME ..."; sleep 60
done
# The node now exists, so tpu_vm.sh skips creation and goes straight to training.
dry=()
if ((DRY_RUN)); then dry=(--dry-run); fi
TPU_NAME="$TPU_NAME" ZONE="$ZONE" exec "$here/tpu_vm.sh" ${dry[@]+"${dry[@]}"} "$@"
