#!/usr/bin/env bash
# One device call: GPU-marked tests (and the rest of the suite on the GPU), the
# contract checks next to stock PyTorch, and the side-by-side benchmark.
# Results go under $OUT (default ./gpu-out); the short table prints last.
#   bash scripts/gpu_run.sh [--explore] [--no-tests] [--no-verify] [--no-bench] [--demo]
#   (PYTEST_ARGS=... narrows the tests; pytest-xdist, where installed, runs them in 8 workers)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR="$PWD/.triton_cache"
EXPLORE=0; TESTS=1; VERIFY=1; BENCH=1; DEMO=0
for a in "$@"; do
  case "$a" in --explore) EXPLORE=1 ;; --no-tests) TESTS=0 ;; --no-verify) VERIFY=0 ;; --no-bench) BENCH=0 ;; --demo) DEMO=1 ;; esac
done
{
  date -u +"date: %Y-%m-%d %H:%M:%S UTC"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
  git rev-parse --short HEAD 2>/dev/null || true
} | tee "$OUT/env.txt"
rc=0
if [ "$TESTS" = 1 ]; then
  XDIST=""; python3 -c "import xdist" 2>/dev/null && XDIST="-n 8"
  python3 -m pytest -q -p no:cacheprovider -rfE $XDIST ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/pytest.log" | tail -25
  rc=${PIPESTATUS[0]}
fi
vrc=0
if [ "$VERIFY" = 1 ]; then
  python3 -m bitstable verify --json "$OUT/verify.json" 2>&1 | tee "$OUT/run.log"
  vrc=${PIPESTATUS[0]}
fi
if [ "$EXPLORE" = 1 ]; then
  python3 benchmarks/explore_fwd_configs.py 2>&1 | tee -a "$OUT/run.log" | tail -40
fi
if [ "$BENCH" = 1 ]; then
  python3 -m bitstable bench --out "$OUT" 2>&1 | tee -a "$OUT/run.log" | grep -v '^\['
fi
if [ "$DEMO" = 1 ]; then
  python3 -m bitstable demo --json "$OUT/demo.json" ${DEMO_ARGS:-} 2>&1 | tr '\r' '\n' | grep -v "^  .*\[" | tee "$OUT/demo.log"
fi
echo "pytest rc=$rc verify rc=$vrc"
[ "$rc" = 0 ] && [ "$vrc" = 0 ]
