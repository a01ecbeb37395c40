#!/usr/bin/env bash
# One device call: GPU-marked tests (and the rest of the suite on the GPU), the
# contract checks next to stock PyTorch, and the side-by-side benchmark.
# Results go under $OUT (default ./gpu-out); the short table prints last.
#   bash scripts/gpu_run.sh [--explore] [--no-tests] [--no-verify] [--no-bench] [--demo]
#                           [--properties] [--hash] [--sanitizer] [--host-probe]
#   (PYTEST_ARGS=... narrows the tests; pytest-xdist, where installed, runs them in 8 workers;
#    BENCH_PASSES=fwd,ops,model,... picks the bench passes; PROPERTY_N the sweep's configurations;
#    PYTEST_TIMEOUT=S stops the tests after S seconds, 0 = never)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR="$PWD/.triton_cache"
EXPLORE=0; TESTS=1; VERIFY=1; BENCH=1; DEMO=0; PROPS=0; HASH=0; SANITIZE=0; HOSTPROBE=0
for a in "$@"; do
  case "$a" in --explore) EXPLORE=1 ;; --no-tests) TESTS=0 ;; --no-verify) VERIFY=0 ;; --no-bench) BENCH=0 ;;
    --demo) DEMO=1 ;; --properties) PROPS=1 ;; --hash) HASH=1 ;; --sanitizer) SANITIZE=1 ;; --host-probe) HOSTPROBE=1 ;; esac
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
  timeout "${PYTEST_TIMEOUT:-0}" python3 -m pytest -q -p no:cacheprovider -rfE --durations=15 $XDIST ${PYTEST_ARGS:-} \
    2>&1 | tee "$OUT/pytest.log" | tail -40
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
xrc=0
if [ "$PROPS" = 1 ]; then
  python3 scripts/property_sweep.py --n "${PROPERTY_N:-1000}" --out "$OUT/properties.json" 2>"$OUT/properties.log" \
    | tee -a "$OUT/run.log" || xrc=1
fi
if [ "$HASH" = 1 ]; then
  python3 scripts/cross_process_hash.py --n 20 2>&1 | tee -a "$OUT/run.log" | tail -5 || xrc=1
fi
if [ "$SANITIZE" = 1 ]; then
  for tool in memcheck racecheck; do
    echo "compute-sanitizer --tool $tool:" | tee -a "$OUT/run.log"
    timeout "${SANITIZER_TIMEOUT:-0}" compute-sanitizer --tool "$tool" python3 scripts/sanitize_calls.py 2>&1 \
      | tail -4 | tee -a "$OUT/run.log"
  done
fi
if [ "$HOSTPROBE" = 1 ]; then   # host time per eager call, and where it goes (cProfile)
  python3 benchmarks/probe_host_python.py --gpu 2>&1 | tee "$OUT/host_probe.md" | tee -a "$OUT/run.log"
  for c in "attn fwd" "attn fwd+bwd" "kvcache decode"; do
    python3 benchmarks/probe_host_python.py --gpu --reps 200 --profile "$c" > "$OUT/host_profile_$(echo "$c" | tr ' +' '__').txt" 2>&1
    python3 benchmarks/probe_host_python.py --gpu --reps 50 --trace "$c" > "$OUT/host_trace_$(echo "$c" | tr ' +' '__').txt" 2>&1
  done
fi
if [ "$BENCH" = 1 ]; then
  python3 -m bitstable bench --out "$OUT" ${BENCH_PASSES:+--passes "$BENCH_PASSES"} 2>&1 | tee -a "$OUT/run.log" \
    | grep -v '^\['
fi
if [ "$DEMO" = 1 ]; then
  python3 -m bitstable demo --json "$OUT/demo.json" ${DEMO_ARGS:-} 2>&1 | tr '\r' '\n' | grep -v "^  .*\[" | tee "$OUT/demo.log"
fi
echo "pytest rc=$rc verify rc=$vrc properties/hash rc=$xrc"
[ "$rc" = 0 ] && [ "$vrc" = 0 ] && [ "$xrc" = 0 ]
