#!/usr/bin/env bash
# One call on a lent GPU (the device tool's `run`, timeout_s 590), sized for a 15-minute lease (at most 9.5 min):
#   bash bench/gpu_session.sh
# Installs sparsec over the machine's own torch and Triton (no network there: no dependencies are
# fetched; the image has them all), checks the compiled CUDA kernels against float64 references
# (bench/cuda_check.py; the tests run the same kernels through Triton's interpreter), then runs each benchmark at a lease-sized grid. Every step has its own time limit, so
# one slow step does not cost the others. Results land in bench/results/ and, with a log, in $OUT
# (what the device tool brings back); commit the JSON files from there.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/sparsec_gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
LOG="$OUT/gpu_session.log"
exec > >(tee -a "$LOG") 2>&1
# The whole script stays under DEADLINE seconds (the device call's limit is 590): a step gets its
# own limit or what is left, and is skipped when under 20 s is left.
DEADLINE=${SPARSEC_SESSION_SECONDS:-570}
step() {  # step TITLE SECONDS COMMAND...
    local title=$1 seconds=$2 left=$((DEADLINE - SECONDS - 5))
    shift 2
    if [ "$left" -lt 20 ]; then echo; echo "== skipped (${left}s left): $title"; return; fi
    if [ "$left" -lt "$seconds" ]; then seconds=$left; fi
    echo; echo "== $(date -u +%T) $title (limit ${seconds}s)"
    timeout "$seconds" "$@"
    echo "== exit $?"
}

if ! python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA device: this script is for the lent GPU (see bench/README.md)"; exit 2
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
install() {  # editable into the machine's python; if its environment refuses, a copy on PYTHONPATH
    python3 -m pip install --quiet --no-deps --no-build-isolation -e . && return 0
    echo "editable install failed: installing a copy under /tmp/sparsec_site"
    python3 -m pip install --quiet --no-deps --no-build-isolation --target /tmp/sparsec_site . || return 1
    export PYTHONPATH=/tmp/sparsec_site${PYTHONPATH:+:$PYTHONPATH}
}
install || exit 3
python3 -c "import sparsec, torch._dynamo as d; print('sparsec from', sparsec.__file__, '| backend registered:', 'sparsec' in d.list_backends())" || exit 3
before=$(mktemp); ls bench/results > "$before"

step "compiled CUDA kernels vs float64 references" 120 \
    python3 bench/cuda_check.py
step "attention: S=8192, D=128, every family at 10% and 50%, vs SDPA and FlexAttention" 180 \
    python3 bench/attention.py --device cuda --lengths 8192 --head-dims 128 --densities 0.1 0.5
step "linear: BSR 64x64 / N:M / 2:4 vs dense" 70 \
    python3 bench/linear.py --device cuda --shapes 4096x4096 4096x11008 --tokens 2048 8192 --densities 0.3 0.5 0.7
# (attention only: the linear grid's Triton compiles would not fit the step; bench/linear.py above times those layers)
step "cost model: quick GPU grid, fit, Spearman and regret" 90 \
    python3 bench/cost_model.py --device cuda --quick --no-save --no-linear
step "tune: 2 layers x 24 heads at S=16K (extrapolated to 30 layers)" 60 \
    python3 bench/tune.py --device cuda --layers 2 --heads 24 --seq 16384 --no-progress
step "end to end: positional DiT, 8K tokens, 2 blocks: tune, eager / Inductor / sparsec (whatever time is left)" 150 \
    python3 bench/end_to_end.py --device cuda --frames 8 --depth 2 --no-progress
step "attention backward: S 8192, D 128, bf16, window / blocks at 10%, vs SDPA and FlexAttention (rows saved as they run)" 90 \
    python3 bench/attention_backward.py --device cuda --lengths 8192 --densities 0.1 --families window block_sparse

for f in $(ls bench/results | grep -vxF -f "$before"); do cp "bench/results/$f" "$OUT/"; done
echo; echo "== new results:"; ls -la "$OUT"
