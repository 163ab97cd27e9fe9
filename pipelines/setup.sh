#!/usr/bin/env bash
# Create ./.venv with everything medgan needs (about 2-4 minutes on a fresh machine, ~1.5 GB).
# torch is pinned first: on a CPU machine the pin resolves to the local CPU build, on a GPU machine to the CUDA build;
# an unpinned torch would pull gigabytes of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev]"
