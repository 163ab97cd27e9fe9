#!/usr/bin/env bash
# Multi-GPU training with DDP: one process per GPU through torchrun (NCCL on GPUs, gloo on CPU).
# Only rank 0 logs to MLflow and writes checkpoints; each rank samples a disjoint part of every batch.
# Usage: pipelines/ddp.sh DATASET [NPROC] [extra medgan train options]
# Cost: the single-GPU recipe's time divided by ~NPROC. Multi-node: the same command on every node with
#   --nnodes N --node_rank R --rdzv_backend c10d --rdzv_endpoint HOST:PORT, and a shared `mlflow server`.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
DATASET=${1:?usage: pipelines/ddp.sh DATASET [NPROC] [medgan train options]}
NPROC=${2:-$("$REPO/.venv/bin/python" -c "import torch; print(max(1, torch.cuda.device_count()))")}
shift $(( $# >= 2 ? 2 : 1 ))
RECIPE=${RECIPE:-"$REPO/configs/train/gpu.yaml"}
"$REPO/.venv/bin/torchrun" --standalone --nproc_per_node "$NPROC" -m medgan train --data "$DATASET" --config "$RECIPE" "$@"
