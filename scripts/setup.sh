#!/usr/bin/env bash
# Installs what sparsec needs into the current Python: torch first (the CPU build of 2.13.0 unless a
# torch >= 2.11 is already there, so pip never pulls a CUDA build by accident), then sparsec itself
# (editable) with its test and benchmark extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch, sys; v = tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]); sys.exit(v < (2, 11))" 2>/dev/null; then
    "$PY" -m pip install --quiet "torch==2.13.0"
fi
"$PY" -m pip install --quiet -e ".[test,bench]"
