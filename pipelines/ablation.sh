#!/usr/bin/env bash
# The discriminator-design experiment: same data, budget and seeds; only batch size and D's 1x1 channel reduction change.
#   a) batch 4,  64 channels unreduced   (the failure practitioners report: D loss -> 1e-4, D accuracy -> 100%)
#   b) batch 32, 64 channels unreduced
#   c) batch 32, 64 -> 32 reduction      (medgan's default)
#   d) batch 32, 64 -> 16 reduction      (a stronger squeeze)
# All runs land in one MLflow experiment (medgan-ablation-<dataset>): compare them in the UI.
# Usage: pipelines/ablation.sh DATASET [KIMG]. Cost: 4 x KIMG of training (6 kimg: ~4 x 3-7 min on 2 CPU cores) plus
# ~1 min of quick evaluation per run; then a Markdown table of D health and quality per run.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
DATASET=${1:?usage: pipelines/ablation.sh DATASET [KIMG]}
KIMG=${2:-20}
MEDGAN=${MEDGAN:-"$REPO/.venv/bin/medgan"}
NAME=$(basename "$DATASET")
RECIPE=${RECIPE:-"$REPO/configs/train/ablation.yaml"}
common=(--data "$DATASET" --config "$RECIPE" --set "train.total_kimg=$KIMG" --set "track.experiment=medgan-ablation-$NAME"
        --set track.register=false --set train.seed=0)
"$MEDGAN" train "${common[@]}" --set train.batch_size=4  --set model.d_reduce_channels=none
"$MEDGAN" train "${common[@]}" --set train.batch_size=32 --set model.d_reduce_channels=none
"$MEDGAN" train "${common[@]}" --set train.batch_size=32 --set model.d_reduce_channels=32
"$MEDGAN" train "${common[@]}" --set train.batch_size=32 --set model.d_reduce_channels=16

# Quality of each arm's final generator, then one table (D loss/accuracy, alarms, FD, fidelity, TSTR/TRTR, copies).
for run in $(ls -d runs/"$NAME"-ablation-*/); do
  "$MEDGAN" evaluate --model "$run" --data "$DATASET" --out "reports/ablation/$(basename "$run")" \
    --config "$REPO/configs/eval/quick.yaml" --set eval.n_per_class=100 --set track.enabled=false || true
done
"$REPO/.venv/bin/python" "$REPO/scripts/ablation_report.py" --experiment "medgan-ablation-$NAME" --reports reports/ablation
