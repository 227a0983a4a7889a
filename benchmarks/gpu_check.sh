#!/usr/bin/env bash
# The one prepared GPU check (H200 machine: no network, torch/triton/pytest preinstalled).
# From the repo root:  bash benchmarks/gpu_check.sh        (results under $OUT, default ./gpu-results)
#   --dry-run   check the CPU-side parts (syntax, imports, test collection) and exit
#   --help      this text
# Steps: device info -> build the C++/CUDA extension in place if csrc/ has sources -> `gpu`-marked
# tests -> GPU benchmarks (JSON + table) -> a short table printed last. Budget: < 5 minutes.
# Writes only under the repo (ignored .gpu-cache/) and $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT="${OUT:-$ROOT/gpu-results}"
case "${1:-}" in
  --help|-h) sed -n '2,8p' "$0"; exit 0 ;;
esac
PY="${PYTHON:-python3}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONDONTWRITEBYTECODE=1 TRITON_INTERPRET=0
export TRITON_CACHE_DIR="$ROOT/.gpu-cache/triton" TORCHINDUCTOR_CACHE_DIR="$ROOT/.gpu-cache/inductor"

if [ "${1:-}" = "--dry-run" ]; then
  bash -n "$0" || exit 1
  "$PY" -c "import sorsa_kernels, sorsa_kernels.bench, sorsa_kernels.cli" || exit 1
  "$PY" -m pytest -q -m gpu --collect-only -p no:cacheprovider tests >/dev/null || exit 1
  "$PY" -m sorsa_kernels.cli bench --help >/dev/null || exit 1
  echo "gpu_check.sh dry run OK (results would go to $OUT)"; exit 0
fi

mkdir -p "$OUT" "$ROOT/.gpu-cache"
START=$(date +%s)
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; } > "$OUT/device.txt" 2>&1
"$PY" -m sorsa_kernels.cli info | tee "$OUT/info.txt"

echo "== building the C++/CUDA extension in place for this machine's torch (MAX_JOBS=16)"
SORSA_KERNELS_CUDA=1 MAX_JOBS=16 TORCH_CUDA_ARCH_LIST="9.0" timeout 240 "$PY" setup.py build_ext --inplace \
  --build-temp "$ROOT/.gpu-cache/build" > "$OUT/build.txt" 2>&1
echo "build rc=$?" | tee -a "$OUT/build.txt"

echo "== gpu tests"
timeout 150 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests --junitxml="$OUT/gpu-tests.xml" 2>&1 | tee "$OUT/gpu-tests.txt" | tail -25
TEST_RC=${PIPESTATUS[0]}

echo "== benchmarks"
timeout 240 "$PY" -m sorsa_kernels.cli bench --json "$OUT/bench.json" > "$OUT/bench.txt" 2>&1
BENCH_RC=$?

echo
echo "== summary ($(($(date +%s) - START)) s; full results in $OUT)"
head -3 "$OUT/device.txt"
tail -1 "$OUT/gpu-tests.txt"
"$PY" - "$OUT/bench.json" <<'PYEOF' || tail -30 "$OUT/bench.txt"
import json, sys
from sorsa_kernels.bench import Result, summary_table
d = json.load(open(sys.argv[1]))
print(summary_table([Result(**r) for r in d["results"]]))
PYEOF
echo "tests rc=$TEST_RC bench rc=$BENCH_RC"
exit $(( TEST_RC != 0 || BENCH_RC != 0 ))
