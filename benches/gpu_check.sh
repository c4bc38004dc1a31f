#!/usr/bin/env bash
# The prepared GPU run (one `run` call on a lent machine, about 5 minutes): build pykd with CUDA,
# run the CUDA tests, run compute-sanitizer once on a subset, then print the benchmark table last.
# From the repository root: bash benches/gpu_check.sh   (logs go to $OUT when set)
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
out=${OUT:-/tmp/pykd-gpu}
mkdir -p "$out"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
echo "== build (CUDA)"
start=$(date +%s)
python3 -m pip install --no-build-isolation --no-deps -q . >"$out/build.log" 2>&1 \
  || { tail -40 "$out/build.log"; exit 1; }
echo "built in $(( $(date +%s) - start )) s"
python3 -c "import pykd; info = pykd.build_info(); print(info); assert info['cuda'], info"

# Tests run from outside the checkout so the installed package (with _C) is the one imported.
echo "== CUDA tests"
(cd /tmp && timeout 300 python3 -m pytest "$repo/tests/ops" -q -m cuda -p no:cacheprovider \
  >"$out/tests.log" 2>&1; echo "pytest exit $?"; grep -E "passed|failed|Error" "$out/tests.log" | tail -15)

echo "== compute-sanitizer memcheck (subset)"
(cd /tmp && timeout 180 compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest \
  "$repo/tests/ops/test_distill_loss_cuda.py" -q -p no:cacheprovider \
  -k "llm_vocabulary or unaligned or value_errors or scale_grad" >"$out/sanitizer.log" 2>&1; \
  echo "compute-sanitizer exit $?"; tail -5 "$out/sanitizer.log")

echo "== benchmark"
timeout 240 python3 benches/gpu_bench.py | tee "$out/bench.md"
