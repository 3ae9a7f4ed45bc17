#!/usr/bin/env bash
# Build, test and benchmark lily_ext's CUDA kernels on a machine with a GPU and its
# own torch (no network needed). About 5 minutes on an H200; every stage has a time
# cap and the whole run stays under GPU_CHECK_BUDGET_S (default 540 s).
#
#   bash scripts/gpu_check.sh
#
# Logs go to $OUT (if set) or ./gpu_check_out: env.txt, build.log, ptxas.md,
# tests.log, ort_cuda_tests.log, bench_ort_cuda.log, bench_ops.log, bench_cuda.log,
# bench_cuda.json, summary.md. The ONNX Runtime CUDA EP stages need onnxruntime-gpu
# and pytest (their tests skip, saying why, otherwise).
# The summary (stages, test counts, ptxas table, benchmark tables) is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT_DIR="${OUT:-$ROOT/gpu_check_out}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-16}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
BUDGET="${GPU_CHECK_BUDGET_S:-540}"
T0=$(date +%s)

STAGES=()
# stage NAME CAP_SECONDS LOG CMD...: runs CMD with min(CAP, time left) seconds, output to LOG.
stage() {
  local name=$1 cap=$2 log=$3
  shift 3
  local left=$((BUDGET - ($(date +%s) - T0) - 5))
  local limit=$((cap < left ? cap : left))
  if ((limit < 10)); then
    STAGES+=("| $name | skipped (out of time) | 0 |")
    echo "== $name: skipped, out of time"
    return 1
  fi
  echo "== $name (limit ${limit}s)"
  local start=$(date +%s)
  timeout --signal=INT --kill-after=10 "$limit" "$@" >"$log" 2>&1
  local rc=$?
  local took=$(($(date +%s) - start))
  local status="ok"
  ((rc == 124 || rc == 137 || rc == 130)) && status="TIMED OUT"
  ((rc != 0 && rc != 124 && rc != 137 && rc != 130)) && status="FAILED (rc $rc)"
  STAGES+=("| $name | $status | $took |")
  echo "   $status in ${took}s -> $log"
  tail -n 3 "$log" | sed 's/^/   | /'
  return $rc
}

{
  echo "date: $(date -u +%FT%TZ)"
  echo "host: $(hostname)"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  command -v nvcc >/dev/null && nvcc --version | tail -n 2
  "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| torch CUDA", torch.version.cuda)
print("cuda available", torch.cuda.is_available(), "|", torch.cuda.get_device_name() if torch.cuda.is_available() else "-")
try:
    import pytest
    print("pytest", pytest.__version__)
except ImportError:
    print("pytest missing: tests run with scripts/mini_pytest.py")
from torch.utils.cpp_extension import is_ninja_available
print("ninja", "available" if is_ninja_available() else "missing: serial build (slower)")
EOF
  echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
} >"$OUT_DIR/env.txt" 2>&1
cat "$OUT_DIR/env.txt"

# 1. build (in place; a fresh build directory so every kernel's ptxas report is in the log)
rm -rf "$ROOT/build/temp."*
BUILD_OK=0
stage build 300 "$OUT_DIR/build.log" "$PY" setup.py build_ext --inplace && BUILD_OK=1
"$PY" scripts/ptxas_report.py "$OUT_DIR/build.log" >"$OUT_DIR/ptxas.md" 2>&1
"$PY" -m lily_ext >"$OUT_DIR/build_info.json" 2>&1

# 2. tests
TEST_SUMMARY="not run"
if ((BUILD_OK)); then
  if "$PY" -c "import pytest" 2>/dev/null; then
    stage tests 200 "$OUT_DIR/tests.log" "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_ops_cuda.py
  else
    stage tests 200 "$OUT_DIR/tests.log" "$PY" scripts/mini_pytest.py tests/test_ops_cuda.py
  fi
  TEST_SUMMARY=$(grep -E "(passed|failed|skipped|error)" "$OUT_DIR/tests.log" | tail -n 1)
  grep -E "^(FAILED|ERROR)" "$OUT_DIR/tests.log" | head -n 30 >"$OUT_DIR/tests_failed.txt"

  # ONNX Runtime CUDA EP: lily.RoutedMix through liblily_ort.so, then its latency (IO binding)
  ORT_TEST_SUMMARY="not run (needs pytest)"
  if "$PY" -c "import pytest" 2>/dev/null; then
    stage ort_cuda_tests 120 "$OUT_DIR/ort_cuda_tests.log" "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_ort_cuda.py
    ORT_TEST_SUMMARY=$(grep -E "(passed|failed|skipped|error)" "$OUT_DIR/ort_cuda_tests.log" | tail -n 1)
    grep -E "^(FAILED|ERROR)" "$OUT_DIR/ort_cuda_tests.log" | head -n 30 >>"$OUT_DIR/tests_failed.txt"
  fi
  stage bench_ort_cuda 40 "$OUT_DIR/bench_ort_cuda.log" "$PY" benchmarks/bench_ort_op.py --provider cuda --quick

  # 3. benchmarks
  stage bench_ops 60 "$OUT_DIR/bench_ops.log" "$PY" benchmarks/bench_ops.py --device cuda --quick
  stage bench_cuda 170 "$OUT_DIR/bench_cuda.log" "$PY" benchmarks/bench_cuda.py --budget 0.2 --json "$OUT_DIR/bench_cuda.json"
fi

# 4. summary (printed last)
{
  echo "# lily_ext GPU check ($(($(date +%s) - T0)) s)"
  echo
  head -n 4 "$OUT_DIR/env.txt"
  echo
  echo "| stage | status | seconds |"
  echo "|---|---|---:|"
  printf '%s\n' "${STAGES[@]}"
  echo
  echo "tests: $TEST_SUMMARY"
  echo "ONNX Runtime CUDA EP tests: ${ORT_TEST_SUMMARY:-not run}"
  if [ -s "$OUT_DIR/tests_failed.txt" ]; then
    echo
    cat "$OUT_DIR/tests_failed.txt"
  fi
  echo
  echo "## ptxas (registers / shared memory / spills per kernel)"
  echo
  # float and bfloat16 instances (all four dtypes, with spill columns, are in ptxas.md)
  grep -E "^\|(---| kernel \|| [a-z_]+_kernel<(float|bf16))" "$OUT_DIR/ptxas.md" | head -n 50
  tail -n 1 "$OUT_DIR/ptxas.md"
  if [ -s "$OUT_DIR/bench_ort_cuda.log" ]; then
    echo
    echo "## bench_ort_op.py --provider cuda --quick"
    echo
    grep -E "^(\||onnxruntime|skipped)" "$OUT_DIR/bench_ort_cuda.log" || tail -n 5 "$OUT_DIR/bench_ort_cuda.log"
  fi
  if [ -s "$OUT_DIR/bench_ops.log" ]; then
    echo
    echo "## bench_ops.py --device cuda --quick"
    echo
    grep -E "^\|" "$OUT_DIR/bench_ops.log" || tail -n 5 "$OUT_DIR/bench_ops.log"
  fi
  if [ -s "$OUT_DIR/bench_cuda.log" ]; then
    echo
    echo "## bench_cuda.py"
    echo
    if grep -q "^torch " "$OUT_DIR/bench_cuda.log"; then
      sed -n '/^torch /,$p' "$OUT_DIR/bench_cuda.log"
    else  # stopped early: the rows measured so far
      grep -E "^  (routed mix|Lily linear)" "$OUT_DIR/bench_cuda.log" || tail -n 5 "$OUT_DIR/bench_cuda.log"
    fi
  fi
} >"$OUT_DIR/summary.md"
echo
cat "$OUT_DIR/summary.md"
