#!/usr/bin/env bash
# The prepared GPU run: one `run` call on a lent machine, under 8 minutes however it goes (the
# stages share PYKD_GPU_BUDGET_S, default 460 s). Each stage is bounded and prints how it ended:
#   build      pykd with CUDA forced on (AUTO would quietly build for the CPU without nvcc)
#   smoke      a CUDA build; one V=128256 bf16 forward+backward against float64; one error path
#              that must raise, not crash. The run stops here if it fails.
#   tests      the CUDA tests, launch plans first
#   sanitizer  compute-sanitizer memcheck on every launch plan, racecheck and synccheck on the
#              cluster ones
#   bench      the benchmark table, each row printed as it is measured (PYKD_BENCH_COMPILE=1 adds
#              torch.compile's rows, which cost a minute or more of compiling)
# From the repository root: bash benches/gpu_check.sh   (logs go to $OUT when set)
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
out=${OUT:-/tmp/pykd-gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYKD_CUDA=ON TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
budget=${PYKD_GPU_BUDGET_S:-460}
t0=$(date +%s)

# stage NAME CAP KEEP CMD...: runs CMD for at most CAP seconds, less the KEEP seconds promised to
# the stages after it, never past the budget; prints how it ended and returns CMD's status. With
# log=FILE in front, CMD's output goes to FILE.
stage() {
  local name=$1 cap=$2 keep=$3 limit start rc took
  shift 3
  limit=$((budget - ($(date +%s) - t0) - keep))
  ((limit > cap)) && limit=$cap
  if ((limit < 10)); then
    echo "== $name: SKIPPED (out of time)"
    return 99
  fi
  echo "== $name (at most $limit s)"
  start=$(date +%s)
  if [ -n "${log:-}" ]; then
    timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
  else
    timeout --kill-after=10 "$limit" "$@"
  fi
  rc=$?
  took=$(($(date +%s) - start))
  case $rc in
    0) echo "== $name: ok ($took s)" ;;
    124 | 137) echo "== $name: TIMED OUT ($took s)" ;;
    139) echo "== $name: SEGFAULT ($took s)" ;;
    *) echo "== $name: FAILED, exit $rc ($took s)" ;;
  esac
  return $rc
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if ! command -v nvcc >/dev/null 2>&1; then
  for dir in ${CUDA_HOME:-} /usr/local/cuda; do
    if [ -x "$dir/bin/nvcc" ]; then export PATH="$dir/bin:$PATH" && break; fi
  done
fi
command -v nvcc >/dev/null 2>&1 || { echo "no nvcc on this machine: no CUDA build possible"; exit 1; }
echo "nvcc: $(nvcc --version | tail -1); torch: $(python3 -c 'import torch; print(torch.__version__)')"

# Python runs from $out, never from the checkout, whose pykd/ source folder has no _C.
log=$out/build.log stage build 300 120 python3 -m pip install --no-build-isolation --no-deps -q . \
  || { tail -40 "$out/build.log"; exit 1; }
cd "$out" || exit 1
stage smoke 60 100 python3 "$repo/benches/gpu_smoke.py" smoke || exit 1

# Launch plans first; then every other op test file's CUDA cases.
per_test=()
if python3 -c "import pytest_timeout" 2>/dev/null; then per_test=(--timeout=60); fi
mapfile -t others < <(ls "$repo"/tests/ops/test_*.py | grep -v /test_distill_loss_cuda.py)
log=$out/tests.log stage tests 150 80 python3 -m pytest "$repo/tests/ops/test_distill_loss_cuda.py" \
  "${others[@]}" -m cuda -q -p no:cacheprovider --tb=short --maxfail=50 "${per_test[@]}"
grep -E "^(FAILED|ERROR)" "$out/tests.log" | head -20
tail -1 "$out/tests.log"

sanitizer=$(command -v compute-sanitizer || true)
if [ -z "$sanitizer" ]; then
  echo "== sanitizer: SKIPPED (no compute-sanitizer)"
else
  # No caching allocator: every tensor is its own allocation, so an overrun past a tensor's end
  # is caught instead of landing in the rest of a cached segment.
  export PYTORCH_NO_CUDA_MEMORY_CACHING=1
  sanitize() {
    local tool=$1 what=$2
    "$sanitizer" --tool "$tool" --error-exitcode 9 --print-limit 20 --report-api-errors no \
      python3 "$repo/benches/gpu_smoke.py" "$what" >"$out/sanitizer-$tool.log" 2>&1
    local rc=$?
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|Error|Hazard" "$out/sanitizer-$tool.log" | head -8
    return $rc
  }
  export -f sanitize
  export sanitizer repo out
  stage "memcheck (every plan)" 60 70 bash -c "sanitize memcheck plans"
  stage "racecheck (cluster plans)" 40 45 bash -c "sanitize racecheck cluster"
  stage "synccheck (cluster plans)" 40 40 bash -c "sanitize synccheck cluster"
  unset PYTORCH_NO_CUDA_MEMORY_CACHING
fi

stage bench 240 0 bash -c "python3 '$repo/benches/gpu_bench.py' | tee '$out/bench.md'"
echo "total $(($(date +%s) - t0)) s"
