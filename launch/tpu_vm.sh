#!/usr/bin/env bash
# Cloud TPU VM (single host or pod slice): create it, ship this checkout, train on all
# workers.
#   TPU_NAME=mtm ZONE=us-central2-b ACCELERATOR=v4-32 WORKDIR=gs://bucket/run1 \
#     launch/tpu_vm.sh [--dry-run] [--config.num_train_steps=1000 ...]
# Every worker runs the same command; multitask_moe.parallel.initialize() detects the
# TPU slice (jax.distributed.initialize() with no arguments); process 0 writes the logs.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/common.sh
TPU_NAME="${TPU_NAME:?set TPU_NAME}"
ZONE="${ZONE:?set ZONE}"
ACCELERATOR="${ACCELERATOR:-v4-8}"
RUNTIME="${RUNTIME:-tpu-ubuntu2204-base}"
tpu=(gcloud compute tpus tpu-vm)

# (--dry-run prints the creation, which runs only when the TPU does not exist yet.)
if ((DRY_RUN)) || ! "${tpu[@]}" describe "$TPU_NAME" --zone="$ZONE" >/dev/null 2>&1; then
  run "${tpu[@]}" create "$TPU_NAME" --zone="$ZONE" --accelerator-type="$ACCELERATOR" \
    --version="$RUNTIME"
fi
# The committed tree at HEAD, so every worker runs exactly the same code.
run git archive --format=tar.gz -o /tmp/multitask_moe.tar.gz HEAD
run "${tpu[@]}" scp /tmp/multitask_moe.tar.gz "$TPU_NAME":~ --zone="$ZONE" --worker=all
# TPU VM images ship an older Python than the package needs (>= 3.11): uv fetches one.
run "${tpu[@]}" ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="
  set -e; mkdir -p multitask_moe && tar -xzf multitask_moe.tar.gz -C multitask_moe
  cd multitask_moe && python3 -m pip install -q --user uv==0.13.9
  ~/.local/bin/uv venv -q --python 3.11 .venv
  ~/.local/bin/uv pip install -q --python .venv/bin/python -c constraints.txt -e '.[tpu]'
  source .venv/bin/activate && $(train_command "$@")"
