#!/usr/bin/env bash
# Quick start, step 1: set up, then run the demo (the bundled tiny video DiT compiled with sparsec).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m sparsec.cli demo "$@"
