#!/usr/bin/env bash
# AOT compile of every launcher's programs (runtime specialisation, sm_80 + sm_90) under the
# installed Triton and under triton 3.6.0 (what torch 2.11 pins, the H200 image's stack), so
# version skew is caught on the CPU. Writes aot-<version>.json / .md under $AOT_OUT (default
# ./aot-results). No C++ build is needed: the package is put on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${AOT_OUT:-$ROOT/aot-results}
VENV=${AOT_T36_VENV:-$ROOT/.ci-venv-t36}
JOBS=${AOT_JOBS:-2}
mkdir -p "$OUT"
export TRITON_INTERPRET=0

RC=0
run_check() {  # $1 python, $2 label; a failure is remembered, the other version still runs
  local t0=$(date +%s) rc=0
  PYTHONPATH="$ROOT" "$1" -m sorsa_kernels.kernels.aot_check --jobs "$JOBS" \
    --json "$OUT/aot-$2.json" --markdown "$OUT/aot-$2.md" > "$OUT/aot-$2.log" 2>&1 || rc=$?
  grep -v '^ok  ' "$OUT/aot-$2.log" | grep -v 'UserWarning\|grads = \[' || true
  echo "== aot_check ($2) rc=$rc in $(( $(date +%s) - t0 )) s"
  [ $rc -eq 0 ] || RC=1
}

# 1. the Triton CI installs (the dev/CI venv)
PY=${AOT_PYTHON:-$ROOT/.venv/bin/python}
run_check "$PY" "triton$("$PY" -c 'import triton; print(triton.__version__)')"

# 2. triton 3.6.0 through torch 2.11.0 (cp311 wheels exist; the venv is reused when present)
if ! "$VENV/bin/python" -c "import triton, torch, numpy; assert triton.__version__ == '3.6.0'" 2>/dev/null; then
  t0=$(date +%s)
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.11.0 "numpy<2.4"
  echo "== triton 3.6 venv built in $(( $(date +%s) - t0 )) s"
fi
run_check "$VENV/bin/python" "triton3.6.0"
# one table, both versions side by side (BENCHMARKS.md "AOT evidence" is made from it)
PYTHONPATH="$ROOT" "$PY" -m sorsa_kernels.kernels.aot_check --table "$OUT"/aot-triton*.json > "$OUT/aot.md" || RC=1
echo "== AOT table: $OUT/aot.md"
exit $RC
