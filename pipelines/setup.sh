#!/usr/bin/env bash
# Create ./.venv with everything medgan needs (about 2-4 minutes on a fresh machine, ~1.5 GB).
# torch is pinned first: on a CPU machine the pin resolves to the local CPU build, on a GPU machine to the CUDA build;
# an unpinned torch would pull gigabytes of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# pip warns about each package absent from this machine's local mirrors; that noise is filtered, real errors are not.
quiet() { "$@" 2> >(grep -v -e "is ignored: it is neither" -e "BuildBackendWarning" >&2); }
quiet .venv/bin/python -m pip install -q "torch==2.13.0"
quiet .venv/bin/python -m pip install -q -e ".[dev]"
