#!/usr/bin/env bash
# The discriminator experiment: does a 1x1 conv reducing D's 64-channel 64x64 map, or a batch of 32 instead of 4, keep a
# conditional D from overpowering G? Same data, same images seen, same seeds; per arm only these change:
#   b4-unreduced       batch 4,  64 channels unreduced   (the failure practitioners report)
#   b4-reduced32       batch 4,  64 -> 32
#   b32-unreduced      batch 32, 64 channels unreduced
#   b32-reduced32      batch 32, 64 -> 32               (medgan's design)
#   b32-reduced16      batch 32, 64 -> 16
#   b4-unreduced-default  batch 4, unreduced, with the product's defaults (spectral norm, DiffAugment, R1)
# Every other setting is configs/train/ablation.yaml: D as tutorials write it (no spectral norm, augmentation or R1,
# non-saturating BCE, Adam 2e-4 / (0.5, 0.999)). The reported failure comes "within a few epochs" of a small set, so the
# data is a small class-balanced subset of the brain MRI Training set (PER_CLASS images per class, first by file name),
# and every arm runs to the same kimg (batch 4 takes 8x more G steps per kimg; the report lists them).
# All runs land in one MLflow experiment (medgan-ablation-<dataset>) so the UI compares them; each final generator is
# evaluated with `medgan evaluate`; scripts/ablation_report.py writes docs/ablation.md, docs/ablation.png and
# benchmarks/results/ablation-cpu.json.
#
# Usage: pipelines/ablation.sh [DATASET]      (no DATASET: build the brain MRI subset from ../shared/data)
#   env: KIMG (2), SEEDS ("0 1 2"), PER_CLASS (10), JOBS (2 runs at a time), BRAIN_MRI_DIR, MEDGAN_WORKDIR (default: the repo root)
# Cost on a 2-core CPU machine: 18 runs of 2 kimg, two at a time at one thread each (40 min measured), then one
# `medgan evaluate` per run (1-2 min each, 40 min measured while other work shared the machine).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=${MEDGAN_WORKDIR:-$REPO}
KIMG=${KIMG:-2}
SEEDS=${SEEDS:-"0 1 2"}
PER_CLASS=${PER_CLASS:-10}
JOBS=${JOBS:-2}
[ -n "${MEDGAN_SKIP_SETUP:-}" ] || bash "$REPO/pipelines/setup.sh"
MEDGAN=${MEDGAN:-"$REPO/.venv/bin/medgan"}
PY=${PY:-"$REPO/.venv/bin/python"}
mkdir -p "$WORK" && cd "$WORK"
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-"sqlite:///$WORK/mlflow.db"}
# Batch-4 steps are too small to share between two threads: one thread each is several times faster on 2 cores.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

if [ $# -ge 1 ]; then
  DATASET=$1
else
  SRC=${BRAIN_MRI_DIR:-"$REPO/../shared/data/labelled_2d/brain_tumor_mri/Training"}
  SUBSET="$WORK/datasets/brain_mri_${PER_CLASS}pc.src"
  DATASET="$WORK/datasets/brain_mri_${PER_CLASS}pc"
  if [ ! -f "$DATASET/dataset.json" ]; then
    for cls in "$SRC"/*/; do
      mkdir -p "$SUBSET/$(basename "$cls")"
      find "$cls" -maxdepth 1 -type f -name '*.jpg' | sort | sed -n "1,${PER_CLASS}p" | xargs -I{} cp {} "$SUBSET/$(basename "$cls")/"
    done
    "$MEDGAN" ingest "$SUBSET" --out "$DATASET" --config "$REPO/configs/ingest/brain_mri_2d.yaml"
  fi
fi
NAME=$(basename "$DATASET")
EXPERIMENT="medgan-ablation-$NAME"
common=(--data "$DATASET" --config "$REPO/configs/train/ablation.yaml" --out "$WORK/runs/ablation"
        --set "train.total_kimg=$KIMG" --set "track.experiment=$EXPERIMENT" --set track.register=false)
default=(--set model.spectral_norm=true --set train.augment=diffaug --set train.r1_gamma=0.1)

arms=("--set train.batch_size=4 --set model.d_reduce_channels=none"
      "--set train.batch_size=4 --set model.d_reduce_channels=32"
      "--set train.batch_size=32 --set model.d_reduce_channels=none"
      "--set train.batch_size=32 --set model.d_reduce_channels=32"
      "--set train.batch_size=32 --set model.d_reduce_channels=16"
      "--set train.batch_size=4 --set model.d_reduce_channels=none ${default[*]}")
runs=()
for seed in $SEEDS; do for arm in "${arms[@]}"; do runs+=("--set train.seed=$seed $arm"); done; done
# JOBS runs at a time (one thread each); the lanes start 30 s apart so the first creates the experiment alone.
lane() {
  for ((i = $1; i < ${#runs[@]}; i += JOBS)); do
    # shellcheck disable=SC2086  # each arm is a list of words
    "$MEDGAN" train "${common[@]}" ${runs[$i]}
  done
}
pids=()
for ((l = 0; l < JOBS; l++)); do (sleep $((30 * l)); lane "$l") & pids+=($!); done
for pid in "${pids[@]}"; do wait "$pid"; done

# Each arm's final generator through the same evaluation (FD, class fidelity, TSTR/TRTR), reports beside the runs.
for run in "$WORK"/runs/ablation/"$NAME"-ablation-*/; do
  out="$WORK/reports/ablation/$(basename "$run")"
  [ -f "$out/metrics.json" ] || "$MEDGAN" evaluate --model "$run" --data "$DATASET" --out "$out" \
    --config "$REPO/configs/eval/quick.yaml" --set eval.n_per_class=32 --set track.enabled=false \
    || echo "ablation: evaluation of $(basename "$run") failed; its quality columns stay empty"
done
"$PY" "$REPO/scripts/ablation_report.py" --experiment "$EXPERIMENT" --reports "$WORK/reports/ablation" \
  --out-md "$REPO/docs/ablation.md" --out-png "$REPO/docs/ablation.png" \
  --out-json "$REPO/benchmarks/results/ablation-cpu.json"
