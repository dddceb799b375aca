#!/usr/bin/env bash
# One prepared GPU check for a short slot on any CUDA machine: does it work, how fast, against what.
#
#   bash scripts/gpu_check.sh [OUT_DIR]             # on a CUDA machine (default OUT_DIR: gpu_check_out/<time>)
#   bash scripts/gpu_check.sh --dry-run [OUT_DIR]   # on CPU (CI): tiny sizes, Triton interpreted, CUDA steps skipped
#
# Needs a Python ($PYTHON, else python3 on PATH) that already has torch >= 2.6, triton, cmake, ninja, pybind11,
# pytest and hypothesis; installs nothing and never touches the network. Stages, each killed at its limit in
# benchmarks/gpu_sizes.py (8 minutes in all on an H100/H200-class GPU), each logged to OUT_DIR/<stage>.log:
#   env    GPU, driver, torch, triton, nvcc versions; what is missing        (scripts/gpu_env.py)
#   build  clipcid_fast._C against this torch, in place, for this GPU's arch (scripts/gpu_build.sh)
#   tests  pytest -m "(gpu or cuda_target or triton) and not slow", one case per test and kernel variant, in one
#          pytest process per core (benchmarks/gpu_tests.py; junit XML per shard). No CPU test stage: CI runs it
#   bench  the kernel benchmarks at GPU sizes -> OUT_DIR/results.csv and plots  (benchmarks/gpu_bench.py)
#   then one summary table; the exit status is non-zero if a stage, a test or a fused kernel failed
#   (benchmarks/gpu_summary.py). The dry run also counts the test stage's Triton compiles and prints each
#   stage's predicted wall time on a 16-core H100 machine, failing over 7 minutes (benchmarks/gpu_sizes.py).
#   How to run it and how to bring missing packages: benchmarks/README.md.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2
DRY=0
OUT=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h | --help) sed -n '2,19p' "$0"; exit 0 ;;
    -*) echo "gpu_check: unknown option $arg (use --dry-run or an OUT_DIR)" >&2; exit 2 ;;
    *) OUT=$arg ;;
  esac
done
PLAN=gpu
[ "$DRY" = 1 ] && PLAN=dry-run
OUT=${OUT:-$REPO/gpu_check_out/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
rm -f "$OUT"/stages.jsonl "$OUT"/junit_*.xml "$OUT"/bench_status.jsonl "$OUT"/results.csv "$OUT"/mm.json \
  "$OUT"/compiles.*.json "$OUT"/tests_gpu.*.log "$OUT"/prediction.json
START=$(date +%s)

PY=${PYTHON:-$(command -v python3 || command -v python)}
PY=$("$PY" -c 'import sys; print(sys.executable)') || { echo "gpu_check: no working Python ($PY)" >&2; exit 2; }
export REPO PY PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
# the Python's own bin (pip's cmake / ninja land there), the pip cmake / ninja packages, the CUDA toolkit
TOOLS=$(dirname "$PY")
for mod in "cmake:CMAKE_BIN_DIR" "ninja:BIN_DIR"; do
  dir=$("$PY" -c "import ${mod%%:*} as m; print(m.${mod##*:})" 2>/dev/null) && TOOLS="$TOOLS:$dir"
done
command -v nvcc >/dev/null || [ ! -d /usr/local/cuda/bin ] || TOOLS="$TOOLS:/usr/local/cuda/bin"
export PATH="$TOOLS:$PATH"
if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1 CLIPCID_CUDA_TARGETS_ON_CPU=1  # Triton on CPU tensors; CUDA-target tests on CPU
else
  unset TRITON_INTERPRET CLIPCID_CUDA_TARGETS_ON_CPU
fi

limit() { "$PY" -c "from benchmarks.gpu_sizes import plan; print(int(plan('$PLAN').stage_s['$1']))"; }

record() {  # record STAGE STATUS T0 RC DETAIL: one line of OUT_DIR/stages.jsonl for the summary
  local secs
  secs=$(awk -v a="$3" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  printf '{"stage": "%s", "status": "%s", "seconds": %s, "rc": %s, "detail": "%s"}\n' \
    "$1" "$2" "$secs" "$4" "${5//\"/\'}" >>"$OUT/stages.jsonl"
}

skip() {  # skip STAGE REASON: a stage that does not run here, in one line
  echo "== $1: skipped ($2)"
  record "$1" skipped "$(date +%s.%N)" 0 "$2"
}

stage() {  # stage NAME LIMIT_S DETAIL CMD...: CMD under the limit, output to the console and OUT_DIR/NAME.log
  local name=$1 lim=$2 detail=$3 t0 rc st
  shift 3
  t0=$(date +%s.%N)
  echo "== $name (limit $lim s): $*"
  timeout --kill-after=10 "$lim" "$@" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  case $rc in 0) st=ok ;; 124 | 137) st=timeout ;; *) st=failed ;; esac
  record "$name" "$st" "$t0" "$rc" "$detail"
  return "$rc"
}

# 1. environment
ENV_OK=1
stage env "$(limit env)" "versions in env.json" "$PY" scripts/gpu_env.py --out "$OUT" $([ "$DRY" = 1 ] && echo --dry-run) || ENV_OK=0

# 2. build clipcid_fast._C against this torch, in place
ARCH=$("$PY" -c "import json; print((json.load(open('$OUT/env.json')).get('arch') or '').replace('.', ''))" 2>/dev/null)
if [ "$ENV_OK" = 0 ]; then
  skip build "the environment lacks something the check needs (see env.log)"
elif [ "$DRY" = 1 ]; then
  stage build "$(limit build)" "configure only (dry run)" bash scripts/gpu_build.sh "$OUT/build_dry" "80;90" --configure-only
else
  stage build "$(limit build)" "sm $ARCH, $(nproc) jobs, build/gpu_check" bash scripts/gpu_build.sh "$REPO/build/gpu_check" "$ARCH"
fi

# 3. tests: the budgeted gpu / cuda_target / triton cases, one pytest process per core (the dry run: the same
# cases on CPU tensors, counting each one's Triton compiles for the prediction)
TESTS=(-q -rs -p no:cacheprovider python_tests -m "(gpu or cuda_target or triton) and not slow")
if [ "$ENV_OK" = 0 ]; then
  skip tests_gpu "environment"
elif [ "$DRY" = 1 ]; then
  stage tests_gpu "$(limit tests_gpu)" "budgeted cases on CPU, compiles counted (dry run)" \
    "$PY" benchmarks/gpu_tests.py --out "$OUT" --count-compiles -- "${TESTS[@]}"
else
  stage tests_gpu "$(limit tests_gpu)" "budgeted cases on CUDA, $(nproc) cores" \
    "$PY" benchmarks/gpu_tests.py --out "$OUT" -- "${TESTS[@]}"
fi

# 4. kernel benchmarks (each section stops itself at its share of the limit, which also covers grace and plots)
if [ "$ENV_OK" = 0 ]; then
  skip bench "environment"
else
  stage bench "$(limit bench)" "plan $PLAN, rows in results.csv" \
    "$PY" benchmarks/gpu_bench.py --plan "$PLAN" --out "$OUT"
fi

# 5. the dry run: each stage's predicted wall time on the GPU machine, from what it counted and measured
if [ "$DRY" = 1 ] && [ "$ENV_OK" = 1 ]; then
  stage predict 60 "predicted GPU wall time <= 7 minutes" "$PY" benchmarks/gpu_sizes.py "$OUT"
fi

# 6. the summary table and the verdict
"$PY" benchmarks/gpu_summary.py "$OUT" | tee "$OUT/summary.txt"
rc=${PIPESTATUS[0]}
echo "gpu_check: $(($(date +%s) - START)) s in all (plan $PLAN, limit $("$PY" -c 'from benchmarks.gpu_sizes import TOTAL_S; print(TOTAL_S)') s on a GPU); outputs in $OUT"
exit "$rc"
