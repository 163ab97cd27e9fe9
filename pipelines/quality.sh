#!/usr/bin/env bash
# Quality per CPU-minute: the brain MRI recipe of an earlier revision ("before") against this checkout's ("after"), at
# the same wall-clock budget on the same data, both trained and evaluated by this checkout's code.
#   data     the brain MRI Training set, ingested with configs/ingest/brain_mri_2d.yaml (4,586 train images)
#   before   configs/train/cpu_brain.yaml as it was at BASELINE_REV (the networks' code is the same)
#   after    configs/train/cpu_brain.yaml of this checkout, or as it was at AFTER_REV (9819ce8: the batch-8 candidate
#            that docs/results.md reports)
#   budget   MINUTES of training per run (train.max_minutes): the two arms of a seed run side by side, one thread
#            each, so they share the machine equally (two one-thread runs do ~1.3x the images of one two-thread run)
#   eval     `medgan evaluate` on each final generator (eval defaults: 200 images per class, 3 classifier seeds), and
#            again on a `medgan export --min-class-confidence P` of it (TSTR with and without the filter)
# benchmarks/quality.py then writes benchmarks/results/quality-cpu.json and the table in docs/results.md reads it.
#
# Usage: pipelines/quality.sh            (docs/results.md: AFTER_REV=9819ce8 bash pipelines/quality.sh)
#   env: MINUTES (45), SEEDS ("0"), BASELINE_REV (d2a1d5e), AFTER_REV (""), CONFIDENCE (0.9), N_PER_CLASS (200),
#        BRAIN_MRI_DIR, MEDGAN_WORKDIR (the repo), DATASET (an ingested dataset instead of the brain MRI set),
#        FILTERED (1; 0 skips the filtered export and its evaluation),
#        EVAL_ARGS (extra `medgan evaluate` options), BEFORE_SET / AFTER_SET (extra `--set key=value` overrides of one
#        arm, space-separated; e.g. BEFORE_SET=train.precision=bf16 trains the before arm as `precision: auto` did on
#        a bf16-capable CPU before fp32 became the CPU default),
#        SCREENS (a folder of short screening runs, runs/<name>/ and reports/<name>/, recorded beside the comparison)
# Cost on a 2-core CPU machine: MINUTES per seed for the training, then ~25 min of evaluation per seed (measured while
# the test suite shared the machine).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=${MEDGAN_WORKDIR:-$REPO}
MINUTES=${MINUTES:-45}
SEEDS=${SEEDS:-"0"}
BASELINE_REV=${BASELINE_REV:-d2a1d5e}
AFTER_REV=${AFTER_REV:-}
CONFIDENCE=${CONFIDENCE:-0.9}
N_PER_CLASS=${N_PER_CLASS:-200}
FILTERED=${FILTERED:-1}
read -r -a EVAL_ARGS <<< "${EVAL_ARGS:-}"
read -r -a BEFORE_SET <<< "${BEFORE_SET:-}"
read -r -a AFTER_SET <<< "${AFTER_SET:-}"
[ -n "${MEDGAN_SKIP_SETUP:-}" ] || bash "$REPO/pipelines/setup.sh"
PY=${PY:-"$REPO/.venv/bin/python"}
mkdir -p "$WORK" && cd "$WORK"
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-"sqlite:///$WORK/mlflow.db"}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

SRC=${BRAIN_MRI_DIR:-"$REPO/../shared/data/labelled_2d/brain_tumor_mri/Training"}
DATASET=${DATASET:-"$WORK/datasets/brain_mri"}
[ -f "$DATASET/dataset.json" ] ||
  "$PY" -m medgan ingest "$SRC" --out "$DATASET" --config "$REPO/configs/ingest/brain_mri_2d.yaml"

mkdir -p "$WORK/quality"
git -C "$REPO" show "$BASELINE_REV:configs/train/cpu_brain.yaml" > "$WORK/quality/before.yaml"
if [ -n "$AFTER_REV" ]; then
  git -C "$REPO" show "$AFTER_REV:configs/train/cpu_brain.yaml" > "$WORK/quality/after.yaml"
else
  cp "$REPO/configs/train/cpu_brain.yaml" "$WORK/quality/after.yaml"
fi
medgan() { "$PY" -m medgan "$@"; }

run() {  # ARM SEED: one training run, its evaluation, and the filtered export's evaluation
  local arm=$1 seed=$2 out="$WORK/quality/$1-s$2" sets=() kv
  local -n overrides="${arm^^}_SET"  # BEFORE_SET or AFTER_SET
  for kv in "${overrides[@]}"; do sets+=(--set "$kv"); done
  if [ ! -f "$out/checkpoint" ]; then
    rm -rf "$out/runs"  # an interrupted run starts over: its budget is wall-clock time
    medgan train --data "$DATASET" --out "$out/runs" --config "$WORK/quality/$arm.yaml" \
      --set train.total_kimg=10000 --set "train.max_minutes=$MINUTES" --set "train.seed=$seed" \
      --set train.progress=false --set "track.experiment=medgan-quality-brain_mri" --set track.register=false "${sets[@]}"
    ls "$out"/runs/*/ckpt-*.pt | sort | tail -n 1 > "$out/checkpoint"  # one run folder: its last checkpoint
  fi
  local ckpt
  ckpt=$(cat "$out/checkpoint")
  [ -f "$out/eval/metrics.json" ] || medgan evaluate --model "$ckpt" --data "$DATASET" --out "$out/eval" \
    --n-per-class "$N_PER_CLASS" "${EVAL_ARGS[@]}"
  [ "$FILTERED" = 1 ] || return 0
  [ -f "$out/filtered/dataset.json" ] || medgan export --model "$ckpt" --out "$out/filtered" --format npy \
    --n-per-class "$N_PER_CLASS" --min-class-confidence "$CONFIDENCE" --data "$DATASET" \
    --set export.max_draws_per_class=20000
  [ -f "$out/eval-filtered/metrics.json" ] ||
    medgan evaluate --model "$out/filtered" --data "$DATASET" --out "$out/eval-filtered" "${EVAL_ARGS[@]}"
}

# The two arms of a seed side by side; stopping the script stops both.
trap 'kill $(jobs -p) 2> /dev/null || true' EXIT
for seed in $SEEDS; do
  run before "$seed" & a=$!
  run after "$seed" & b=$!
  rc=0
  wait "$a" || rc=1
  wait "$b" || rc=1
  [ "$rc" = 0 ] || { echo "quality: a run of seed $seed failed (see above)"; exit 1; }
done
"$PY" "$REPO/benchmarks/quality.py" --work "$WORK/quality" --minutes "$MINUTES" --baseline-rev "$BASELINE_REV" \
  --confidence "$CONFIDENCE" --before-set "${BEFORE_SET[*]}" --after-set "${AFTER_SET[*]}" --cues "$DATASET" ${SCREENS:+--screens "$SCREENS"} \
  --out-json "${OUT_JSON:-$REPO/benchmarks/results/quality-cpu.json}"
