#!/usr/bin/env bash
# AOT compile of every launcher's programs (runtime specialisation, sm_80 + sm_90) under each Triton
# we support: 3.8.0 (torch 2.14.1) and 3.9.0 (torch 2.15.0), one in the Quick start's venv and the other
# in the venv stage_10 built, and 3.6.0 (torch 2.11.0's, the H200 image's stack), so version skew is
# caught on the CPU. Gates: no
# spills, shared memory, wgmma/TMA where expected, explicit FP fusion, no warning while compiling
# (aot_check's docstring). Writes aot-<version>.json / .md / .log and one table, aot.md, with a column
# per version, under $AOT_OUT (default ./aot-results). The package is put on PYTHONPATH (no build).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${AOT_OUT:-$ROOT/aot-results}
JOBS=${AOT_JOBS:-2}
mkdir -p "$OUT"
rm -f "$OUT"/aot-triton*.json
export TRITON_INTERPRET=0
unset TRITON_DEFAULT_FP_FUSION  # the gate must see a launch that leaves FP fusion to Triton's default

RC=0
run_check() {  # $1 python, $2 the tritons it may hold; a failure is remembered, the other versions still run
  local t0=$(date +%s) rc=0 ver
  ver=$("$1" -c 'import triton; print(triton.__version__)')
  [[ " $2 " == *" $ver "* ]] || { echo "FAIL: $1 has triton $ver, expected one of: $2"; RC=1; return; }
  PYTHONPATH="$ROOT" "$1" -m sorsa_kernels.aot_check --jobs "$JOBS" \
    --json "$OUT/aot-triton$ver.json" --markdown "$OUT/aot-triton$ver.md" > "$OUT/aot-triton$ver.log" 2>&1 || rc=$?
  grep -v '^ok  ' "$OUT/aot-triton$ver.log" | grep -v 'UserWarning\|grads = \[' || true
  echo "== aot_check (triton $ver) rc=$rc in $(( $(date +%s) - t0 )) s"
  [ $rc -eq 0 ] || RC=1
}

# 1., 2. triton 3.8.0 and 3.9.0: the Quick start's venv and stage_10's, in either order
run_check "${AOT_PYTHON:-$ROOT/.venv/bin/python}" "3.8.0 3.9.0"
run_check "${SECOND_VENV:-$ROOT/.ci-venv-second}/bin/python" "3.8.0 3.9.0"
# 3. triton 3.6.0 through torch 2.11.0 on Python 3.12: the H200 image's stack (the venv is reused
#    when present; the pyenv 3.12 interpreter is called by path, its shim does not work here)
VENV=${AOT_T36_VENV:-$ROOT/.ci-venv-t36}
PY312=${PY312:-$(pyenv root 2>/dev/null)/versions/3.12.1/bin/python}
[ -x "$PY312" ] || PY312=python3.12
if ! "$VENV/bin/python" -c "import sys, triton, torch, numpy; assert triton.__version__ == '3.6.0' and sys.version_info[:2] == (3, 12)" 2>/dev/null; then
  t0=$(date +%s)
  rm -rf "$VENV"
  "$PY312" -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.11.0 "numpy<2.4" 2>&1 | grep -v "^WARNING: Location" || true
  echo "== triton 3.6 venv built in $(( $(date +%s) - t0 )) s"
fi
run_check "$VENV/bin/python" "3.6.0"
# one table, a column per version (BENCHMARKS.md "AOT evidence" is made from it)
PYTHONPATH="$ROOT" "${AOT_PYTHON:-$ROOT/.venv/bin/python}" -m sorsa_kernels.aot_check \
  --table "$OUT"/aot-triton*.json > "$OUT/aot.md" || RC=1
for v in 3.6.0 3.8.0 3.9.0; do
  [ -e "$OUT/aot-triton$v.json" ] || { echo "FAIL: no AOT report for triton $v"; RC=1; }
done
head -1 "$OUT/aot.md"
echo "== AOT table: $OUT/aot.md"
exit $RC
