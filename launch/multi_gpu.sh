#!/usr/bin/env bash
# One host, several GPUs: one process sees every local GPU; nothing to start up.
# Needs the CUDA build in .venv: make install && .venv/bin/uv pip install --python
# .venv/bin/python -c constraints.txt -e ".[cuda]"
#   WORKDIR=/tmp/run1 launch/multi_gpu.sh [--dry-run] [--config.num_train_steps=1000 ...]
# Several hosts without SLURM: run it on every host with the same coordinator:
#   MTM_COORDINATOR_ADDRESS=host0:8476 MTM_NUM_PROCESSES=2 MTM_PROCESS_ID=0 (1 on host1) \
#     WORKDIR=/shared/run1 launch/multi_gpu.sh
# multitask_moe.parallel.initialize() reads the MTM_* variables.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/common.sh
command=("${PYTHON:-.venv/bin/python}" -m multitask_moe.train --config="$CONFIG" \
  --workdir="$WORKDIR" "$@")
# exec: the trainer replaces this shell, so a SIGTERM sent to the script reaches it.
if ((DRY_RUN)); then run "${command[@]}"; else exec "${command[@]}"; fi
