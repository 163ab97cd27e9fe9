#!/usr/bin/env bash
# The 4-class brain MRI set (../shared/data/labelled_2d/brain_tumor_mri/Training, 5,708 JPEG slices in class folders:
# glioma, meningioma, notumor, pituitary) through ingest -> train -> evaluate -> export.
# Cost: ingest ~20 s; training with configs/train/gpu.yaml is not yet timed on a GPU (none was available); on CPU the
# recipe (configs/train/cpu_brain.yaml: narrower nets) trains for 45 minutes; evaluate ~2 min on CPU once the
# domain network is cached (~5 min to train it the first time).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=${MEDGAN_WORKDIR:-$REPO}
DATA=${BRAIN_MRI_DIR:-"$REPO/../shared/data/labelled_2d/brain_tumor_mri/Training"}
[ -n "${MEDGAN_SKIP_SETUP:-}" ] || bash "$REPO/pipelines/setup.sh"
MEDGAN=${MEDGAN:-"$REPO/.venv/bin/medgan"}
PY="$REPO/.venv/bin/python"
mkdir -p "$WORK" && cd "$WORK"
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-"sqlite:///$WORK/mlflow.db"}

# Class sub-folders -> labels; near-duplicate images are grouped so no group spans two splits.
"$MEDGAN" ingest "$DATA" --out datasets/brain_mri --overwrite --config "$REPO/configs/ingest/brain_mri_2d.yaml"
"$MEDGAN" info datasets/brain_mri

if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  RECIPE="$REPO/configs/train/gpu.yaml"
else
  RECIPE="$REPO/configs/train/cpu_brain.yaml"
fi
"$MEDGAN" train --data datasets/brain_mri --config "$RECIPE" "$@"
"$MEDGAN" evaluate --model models:/medgan-brain_mri@candidate --data datasets/brain_mri --promote \
  || echo "brain_mri: candidate not promoted (see the gate lines above)"
"$MEDGAN" export --model models:/medgan-brain_mri@candidate --n-per-class 500 --format png --out synthetic/brain_mri --force
