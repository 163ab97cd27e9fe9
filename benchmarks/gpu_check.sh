#!/usr/bin/env bash
# Every CUDA path of medgan in one command (<= 9 minutes on one GPU, no network); see benchmarks/README.md.
#   bash benchmarks/gpu_check.sh                        # the GPU machine
#   bash benchmarks/gpu_check.sh --device cpu --quick   # CPU-sized, the same stages
# PYTHON picks the interpreter (default: .venv/bin/python when present, else python3); the machine's own torch is used,
# and the few packages medgan needs beyond it are listed in benchmarks/gpu_requirements.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" benchmarks/gpu_check.py "$@"
