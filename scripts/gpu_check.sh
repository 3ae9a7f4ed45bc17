#!/usr/bin/env bash
# Builds, sanitizes, tests and benchmarks lily_ext's CUDA kernels on a GPU machine that has its own
# torch and no network, within GPU_CHECK_BUDGET_S (default 480 s); every stage has a time cap.
#
#   bash scripts/gpu_check.sh --prepare .gpu_check   # here (network): ONNX Runtime headers + manifest
#   bash scripts/gpu_check.sh                        # there: device run with carry [".gpu_check"]
#   bash scripts/gpu_check.sh --dry-run              # any CPU machine (CI): the same stages, CUDA parts skipping
#
# Options:
#   --prepare DIR      collect into DIR (inside the repo, git-ignored: .gpu_check) what the GPU run needs
#                      that the project does not track: the ONNX Runtime C/C++ headers, a manifest
#                      (versions, sha256), and with
#     --with-ort-gpu   the onnxruntime-gpu wheel (requirements.txt's pin, CPython 3.12 manylinux
#                      x86_64, ~244 MiB) split into parts of <= 56 MiB (--part-mib N) in .gpu_parts/
#     --wheel SPEC     another small wheel the GPU machine lacks (NAME==VERSION; repeatable)
#   --dir DIR          the prepared folder (default .gpu_check, or $GPU_CHECK_DIR)
#   --dry-run          same stages on a machine without a GPU: no compile when lily_ext is built,
#                      the sanitizer cases on the CPU, CUDA tests skipping, benchmarks' argument parsing
#
# On the GPU machine the run never installs requirements.txt, never calls apt or a package index:
# ONNXRUNTIME_INCLUDE_DIR comes from DIR/onnxruntime-include, LILY_EXT_ORT_FETCH=0.
#
# onnxruntime-gpu in parts (one call carries at most 64 MiB): with the machine kept warm (each call
# within its idle time of the last), calls 1..k-1 each carry one part, e.g.
#   carry [".gpu_parts/onnxruntime_gpu-...whl.part1of5"], command: ls -l .gpu_parts
# and the last call carries [".gpu_check", ".gpu_parts/...part5of5"] and runs this script: the
# ort_gpu stage reassembles the parts, checks the sha256 and installs the wheel with
# `pip install --no-deps --no-index --target .gpu_parts/site`. --prepare prints the exact calls.
#
# Stages (cap in seconds): env 60 (prints the environment; fails fast: nvcc's CUDA major vs torch's,
# missing headers, no pytest, no GPU), build 240, memcheck 90 and racecheck 75 (compute-sanitizer on
# scripts/gpu_sanitize.py's cases; skipped, saying why, where the runtime refuses it), tests 150,
# bench_ops 45, bench_cuda 120, then the optional ONNX Runtime CUDA EP stages: ort_gpu 60,
# ort_cuda_tests 90, bench_ort_cuda 40; the summary last.
#
# Logs go to $GPU_CHECK_WORK (default ./gpu_check_out). When $OUT is set (the device run), at most
# 8 files are copied there: summary.md, logs.tar.gz (every log), ptxas.md, build_info.json,
# tests.log, bench_cuda.json. Exit status: 0 when no stage failed or ran out of time.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD

usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

DRY=0
MODE=run
PREP_DIR="${GPU_CHECK_DIR:-.gpu_check}"
PREP_ARGS=()
while (($#)); do
  case $1 in
    --dry-run) DRY=1 ;;
    --prepare)
      MODE=prepare
      PREP_DIR=${2:?--prepare needs a folder}
      shift
      ;;
    --dir)
      PREP_DIR=${2:?--dir needs a folder}
      shift
      ;;
    --with-ort-gpu) PREP_ARGS+=("$1") ;;
    --wheel | --part-mib | --ort-gpu-version | --parts-dir)
      PREP_ARGS+=("$1" "${2:?$1 needs a value}")
      shift
      ;;
    -h | --help)
      usage
      exit 0
      ;;
    *)
      echo "gpu_check.sh: unknown option $1 (see --help)" >&2
      exit 2
      ;;
  esac
  shift
done

if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
elif command -v python3 >/dev/null; then
  PY=python3
else
  PY=python
fi

if [ "$MODE" = prepare ]; then
  exec "$PY" scripts/gpu_check_tools.py prepare "$PREP_DIR" ${PREP_ARGS[@]+"${PREP_ARGS[@]}"}
fi

case $PREP_DIR in
  /*) ;;
  *) PREP_DIR="$ROOT/$PREP_DIR" ;;
esac
PARTS_DIR="${GPU_CHECK_PARTS_DIR:-$(dirname "$PREP_DIR")/.gpu_parts}"
ORT_SITE="$PARTS_DIR/site"
WORK="${GPU_CHECK_WORK:-$ROOT/gpu_check_out}"
mkdir -p "$WORK"
rm -f "$WORK"/*.log "$WORK"/*.md "$WORK"/*.json "$WORK"/*.txt
OUT_DIR="${OUT:-}"

export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-$(nproc 2>/dev/null || echo 4)}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export LILY_EXT_ORT_FETCH=0 # no network there; the headers come from the prepared folder
if [ -z "${ONNXRUNTIME_INCLUDE_DIR:-}" ] && [ -f "$PREP_DIR/onnxruntime-include/onnxruntime_c_api.h" ]; then
  export ONNXRUNTIME_INCLUDE_DIR="$PREP_DIR/onnxruntime-include"
fi
BUDGET="${GPU_CHECK_BUDGET_S:-480}"
T0=$(date +%s)

ROWS=()
FAILED=0
STAGE_NOTE=""
# stage NAME CAP LOG CMD...: runs CMD with min(CAP, time left) seconds (exported to it as
# GPU_CHECK_STAGE_LIMIT_S), output to LOG. Exit 77 from CMD means skipped (its last "skipped:" line
# says why). STAGE_NOTE, when set, is added to the status.
stage() {
  local name=$1 cap=$2 log=$3
  shift 3
  local left=$((BUDGET - ($(date +%s) - T0) - 5))
  local limit=$((cap < left ? cap : left))
  if ((limit < 10)); then
    skip_stage "$name" "out of time (budget ${BUDGET}s)"
    return 1
  fi
  echo "== $name (limit ${limit}s)"
  local start rc took status
  start=$(date +%s)
  GPU_CHECK_STAGE_LIMIT_S=$limit timeout --signal=INT --kill-after=10 "$limit" "$@" >"$log" 2>&1
  rc=$?
  took=$(($(date +%s) - start))
  case $rc in
    0) status="ok" ;;
    77) status="skipped: $(grep -E '^skipped: ' "$log" | tail -n 1 | cut -c 10- | cut -c 1-300)" ;;
    124 | 137 | 130) status="TIMED OUT" ;;
    *) status="FAILED (rc $rc)" ;;
  esac
  case $status in TIMED* | FAILED*) FAILED=1 ;; esac
  [ -n "$STAGE_NOTE" ] && status="$status ($STAGE_NOTE)"
  STAGE_NOTE=""
  ROWS+=("| $name | $status | $took | $limit |")
  echo "   $status in ${took}s -> $log"
  tail -n 3 "$log" | sed 's/^/   | /'
  write_summary
  ((rc == 0 || rc == 77))
}

# skip_stage NAME REASON
skip_stage() {
  ROWS+=("| $1 | skipped: $2 | 0 | - |")
  echo "== $1: skipped: $2"
  write_summary
}

test_line() { # the pytest closing line of a log, or "not run"
  [ -s "$1" ] && grep -E "(passed|failed|skipped|error|no tests ran)" "$1" | tail -n 1 || echo "not run"
}

write_summary() {
  {
    echo "# lily_ext GPU check$( ((DRY)) && echo " (dry run)") ($(($(date +%s) - T0)) s of ${BUDGET} s)"
    echo
    grep -E "^(python|torch|nvcc|nvidia-smi|onnxruntime|ONNX Runtime headers)" "$WORK/env.log" 2>/dev/null
    echo
    echo "| stage | status | seconds | cap |"
    echo "|---|---|---:|---:|"
    printf '%s\n' "${ROWS[@]}"
    if grep -q "^FAIL: " "$WORK/env.log" 2>/dev/null; then
      echo
      grep "^FAIL: " "$WORK/env.log"
    fi
    echo
    echo "tests: $(test_line "$WORK/tests.log")"
    echo "ONNX Runtime CUDA EP tests: $(test_line "$WORK/ort_cuda_tests.log")"
    for tool in memcheck racecheck; do
      [ -s "$WORK/$tool.log" ] && echo "$tool: $(grep -E "^($tool: |skipped: |gpu_sanitize: [0-9]+ of)" "$WORK/$tool.log" | tail -n 2 | paste -sd ';' -)"
    done
    if [ -s "$WORK/tests_failed.txt" ]; then
      echo
      cat "$WORK/tests_failed.txt"
    fi
    for tool in memcheck racecheck; do
      if [ -s "$WORK/$tool.log" ] && grep -qE "^=+ (Invalid|Error|.*hazard)" "$WORK/$tool.log"; then
        echo
        echo "## $tool reports (first 40 lines)"
        echo
        grep -E "^=+ " "$WORK/$tool.log" | head -n 40
      fi
    done
    if [ -s "$WORK/ptxas.md" ] && grep -q "_kernel" "$WORK/ptxas.md"; then
      echo
      echo "## ptxas (registers / shared memory / spills per kernel)"
      echo
      # float and bfloat16 instances (all four dtypes, with spill columns, are in ptxas.md)
      grep -E "^\|(---| kernel \|| [a-z_]+_kernel<(float|bf16))" "$WORK/ptxas.md" | head -n 50
      tail -n 1 "$WORK/ptxas.md"
    fi
    if [ -s "$WORK/bench_ops.log" ] && grep -q "^|" "$WORK/bench_ops.log"; then
      echo
      echo "## bench_ops.py --device cuda --quick"
      echo
      grep -E "^\|" "$WORK/bench_ops.log"
    fi
    if [ -s "$WORK/bench_cuda.log" ] && ((!DRY)); then
      echo
      echo "## bench_cuda.py"
      echo
      if grep -q "^torch " "$WORK/bench_cuda.log"; then
        sed -n '/^torch /,$p' "$WORK/bench_cuda.log"
      else # stopped early: the rows measured so far
        grep -E "^  (routed mix|Lily linear)" "$WORK/bench_cuda.log" || tail -n 5 "$WORK/bench_cuda.log"
      fi
    fi
    if [ -s "$WORK/bench_ort_cuda.log" ]; then
      echo
      echo "## bench_ort_op.py --provider cuda --quick"
      echo
      grep -E "^(\||onnxruntime|skipped)" "$WORK/bench_ort_cuda.log" || tail -n 5 "$WORK/bench_ort_cuda.log"
    fi
  } >"$WORK/summary.md"
  [ -n "$OUT_DIR" ] && mkdir -p "$OUT_DIR" && cp "$WORK/summary.md" "$OUT_DIR/summary.md"
}

# collect: at most 8 files into $OUT (what the device sends back)
collect() {
  [ -n "$OUT_DIR" ] || return 0
  mkdir -p "$OUT_DIR"
  (cd "$WORK" && shopt -s nullglob && tar -czf "$OUT_DIR/logs.tar.gz" ./*.log ./*.md ./*.json ./*.txt)
  local f
  for f in summary.md ptxas.md build_info.json tests.log bench_cuda.json; do
    [ -s "$WORK/$f" ] && cp "$WORK/$f" "$OUT_DIR/$f"
  done
  return 0
}

finish() {
  write_summary
  collect
  echo
  cat "$WORK/summary.md"
  exit "$FAILED"
}

ALL_STAGES=(env build memcheck racecheck tests bench_ops bench_cuda ort_gpu ort_cuda_tests bench_ort_cuda)
skip_rest() { # skip_rest FROM_STAGE REASON: every stage from FROM_STAGE on is skipped
  local from=$1 reason=$2 on=0 s
  for s in "${ALL_STAGES[@]}"; do
    [ "$s" = "$from" ] && on=1
    ((on)) && skip_stage "$s" "$reason"
  done
}

# 0. environment: fails fast
if ((!DRY)) && [ -d "$PREP_DIR/wheels" ]; then
  "$PY" scripts/gpu_check_tools.py install-wheels --dir "$PREP_DIR" --target "$WORK/site" >"$WORK/wheels.log" 2>&1 &&
    export PYTHONPATH="$WORK/site:$PYTHONPATH"
fi
ENV_ARGS=(--dir "$PREP_DIR")
((DRY)) && ENV_ARGS+=(--dry-run)
if ! stage env 60 "$WORK/env.log" "$PY" scripts/gpu_check_tools.py env "${ENV_ARGS[@]}"; then
  cat "$WORK/env.log"
  skip_rest build "the env stage failed"
  FAILED=1
  finish
fi
cat "$WORK/env.log"

# 1. build, in place, with a fresh build directory so every kernel's ptxas report is in the log
BUILD_OK=0
if ((DRY)) && "$PY" -c "import lily_ext, torch; torch.ops.lily.routed_mix" 2>/dev/null; then
  # lily_ext is built (CI installed it): evaluate setup.py's build plan without compiling
  STAGE_NOTE="dry run: lily_ext already built, setup.py evaluated, not compiled"
  stage build 240 "$WORK/build.log" "$PY" setup.py --name && BUILD_OK=1
else
  # a GPU run starts from a fresh build directory so every kernel's ptxas report is in the log;
  # a dry run builds incrementally
  ((DRY)) || rm -rf "$ROOT/build/temp."*
  stage build 240 "$WORK/build.log" "$PY" setup.py build_ext --inplace && BUILD_OK=1
fi
"$PY" scripts/ptxas_report.py "$WORK/build.log" >"$WORK/ptxas.md" 2>&1
"$PY" -m lily_ext >"$WORK/build_info.json" 2>&1
if ((BUILD_OK && !DRY)) && ! "$PY" -c "import json,sys; sys.exit(not json.load(open(sys.argv[1]))['cuda_kernels'])" "$WORK/build_info.json" 2>/dev/null; then
  echo "build: lily_ext has no CUDA kernels (see build_info.json)" | tee -a "$WORK/build.log"
  ROWS+=("| build_info | FAILED: built without CUDA kernels | 0 | - |")
  BUILD_OK=0
  FAILED=1
fi
if ((!BUILD_OK)); then
  skip_rest memcheck "the build failed"
  finish
fi

# 2. compute-sanitizer: memcheck, then racecheck, on a targeted subset (scripts/gpu_sanitize.py)
if ((DRY)); then
  STAGE_NOTE="dry run: the cases on the CPU, no sanitizer"
  stage memcheck 90 "$WORK/memcheck.log" "$PY" scripts/gpu_sanitize.py cases --device cpu
  STAGE_NOTE="dry run"
  stage racecheck 75 "$WORK/racecheck.log" "$PY" scripts/gpu_sanitize.py check --tool racecheck \
    --probe-file "$WORK/sanitizer_probe.txt"
else
  stage memcheck 90 "$WORK/memcheck.log" "$PY" scripts/gpu_sanitize.py check --tool memcheck \
    --probe-file "$WORK/sanitizer_probe.txt"
  stage racecheck 75 "$WORK/racecheck.log" "$PY" scripts/gpu_sanitize.py check --tool racecheck \
    --probe-file "$WORK/sanitizer_probe.txt"
fi

# 3. tests (CUDA tests skip, saying why, without a GPU)
PYTEST=("$PY" -m pytest -q -rs -p no:cacheprovider --maxfail=20 --durations=15)
stage tests 150 "$WORK/tests.log" "${PYTEST[@]}" tests/test_ops_cuda.py
grep -E "^(FAILED|ERROR)" "$WORK/tests.log" | head -n 30 >"$WORK/tests_failed.txt"

# 4. benchmarks (the dry run checks they import and take their arguments)
if ((DRY)); then
  STAGE_NOTE="dry run: --help"
  stage bench_ops 45 "$WORK/bench_ops.log" "$PY" benchmarks/bench_ops.py --help
  STAGE_NOTE="dry run: the GPU run's arguments, stops at 'no CUDA device'"
  # shellcheck disable=SC2016 # expanded by the inner bash
  stage bench_cuda 120 "$WORK/bench_cuda.log" bash -c \
    'out=$("$@" 2>&1); rc=$?; echo "$out"; [ $rc -eq 2 ] && [[ $out == *"no CUDA device"* ]]' _ \
    "$PY" benchmarks/bench_cuda.py --budget 0.1 --json "$WORK/bench_cuda.json"
else
  stage bench_ops 45 "$WORK/bench_ops.log" "$PY" benchmarks/bench_ops.py --device cuda --quick
  stage bench_cuda 120 "$WORK/bench_cuda.log" "$PY" benchmarks/bench_cuda.py --budget 0.1 --json "$WORK/bench_cuda.json"
fi

# 5. ONNX Runtime CUDA EP (optional, last): onnxruntime-gpu from its parts, then the EP tests and latency
ORT_ARGS=(--dir "$PREP_DIR" --parts-dir "$PARTS_DIR" --target "$ORT_SITE")
((DRY)) && ORT_ARGS+=(--verify-only) && STAGE_NOTE="dry run: parts checked, not installed"
stage ort_gpu 60 "$WORK/ort_gpu.log" "$PY" scripts/gpu_check_tools.py ort-gpu "${ORT_ARGS[@]}"
ORT_ENV=()
if ((!DRY)) && [ -f "$ORT_SITE/.lily_gpu_check_installed" ]; then
  # onnxruntime-gpu ahead of the machine's CPU-only onnxruntime; the CUDA libraries of torch's
  # nvidia wheels (cuDNN, cuBLAS, ...) where the CUDA EP looks for them
  NVIDIA_LIBS=$("$PY" -c "import glob, os, nvidia; print(':'.join(sorted({os.path.dirname(p) for d in nvidia.__path__ for p in glob.glob(os.path.join(d, '*', 'lib', '*.so*'))})))" 2>/dev/null)
  ORT_ENV=(env "PYTHONPATH=$ORT_SITE:$PYTHONPATH" "LD_LIBRARY_PATH=${NVIDIA_LIBS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}")
fi
stage ort_cuda_tests 90 "$WORK/ort_cuda_tests.log" ${ORT_ENV[@]+"${ORT_ENV[@]}"} "${PYTEST[@]}" tests/test_ort_cuda.py
grep -E "^(FAILED|ERROR)" "$WORK/ort_cuda_tests.log" | head -n 30 >>"$WORK/tests_failed.txt"
stage bench_ort_cuda 40 "$WORK/bench_ort_cuda.log" ${ORT_ENV[@]+"${ORT_ENV[@]}"} "$PY" benchmarks/bench_ort_op.py --provider cuda --quick

# 6. summary (printed last)
finish
