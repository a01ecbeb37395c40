#!/usr/bin/env bash
# One device call: the test suite in parallel workers (bounded), then the matmul and
# backward tile explorations.  Results under $OUT.
#   bash scripts/gpu_explore.sh [TEST_SECONDS] [MM_SECONDS] [BWD_SECONDS]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1 TRITON_CACHE_DIR="$PWD/.triton_cache"
{ date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } | tee "$OUT/env.txt"
if [ "${1:-300}" != 0 ]; then
  timeout -s INT "${1:-300}" python3 -m pytest -n 8 -q -p no:cacheprovider -rfE --durations=10 ${PYTEST_ARGS:-} \
    2>&1 | tee "$OUT/pytest.log" | tail -30
fi
if [ "${2:-120}" != 0 ]; then
  timeout "${2:-120}" python3 benchmarks/explore_matmul_configs.py 2>&1 | tee "$OUT/explore_matmul.md"
fi
if [ "${3:-170}" != 0 ]; then
  timeout "${3:-170}" python3 benchmarks/explore_bwd_configs.py 2>&1 | tee "$OUT/explore_bwd.md"
fi
