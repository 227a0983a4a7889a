#!/usr/bin/env bash
# The one prepared GPU check (H200 machine: no network; torch/triton/pytest preinstalled).
# From the repo root:  bash benchmarks/gpu_check.sh        (results under $OUT, default ./gpu-results)
#   --dry-run   check the CPU-side parts (syntax, imports, test collection, bench cases) and exit
#   --help      this text
# Steps (timeouts sum to 570 s; about 5-6 min by estimate on an H200):
#   preflight (GPU visible? 30 s) -> build the C++/CUDA extension with torch's nvidia/cu13 headers (150 s)
#   -> gpu-marked tests, required to run (SORSA_KERNELS_REQUIRE_GPU=1; 120 s)
#   -> `sorsa-kernels bench` default cases + the Llama-2-7B init case, each result written to the JSON
#      as it completes (180 s) -> the A/B of the design switches chosen by counting (TMA_FLATTEN,
#      OVERLAP, ONE_PASS_DY; 90 s) -> the verdict table printed last.
# Never runs interpreter tests (the H200 image's numpy breaks triton 3.6's interpreter). Fails loudly
# and exits non-zero within seconds without a GPU or when the build fails. Writes at most 9 files
# under $OUT (device.txt build.txt gpu-tests.txt gpu-tests.xml bench.json bench.txt bench.png
# ab.txt ab.json).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT="${OUT:-$ROOT/gpu-results}"
case "${1:-}" in
  --help|-h) sed -n '2,15p' "$0"; exit 0 ;;
esac
PY="${PYTHON:-python3}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONDONTWRITEBYTECODE=1 TRITON_INTERPRET=0
export TRITON_CACHE_DIR="$ROOT/.gpu-cache/triton" TORCHINDUCTOR_CACHE_DIR="$ROOT/.gpu-cache/inductor"
export SORSA_KERNELS_REQUIRE_GPU=1
fail() { local code=$1; shift; echo "!!!!!!!! gpu_check.sh FAILED: $*" >&2; exit "$code"; }

if [ "${1:-}" = "--dry-run" ]; then
  bash -n "$0" || exit 1
  "$PY" -c "import sorsa_kernels, sorsa_kernels.bench, sorsa_kernels.cli" || exit 1
  "$PY" -m pytest -q -m gpu --collect-only -p no:cacheprovider tests >/dev/null || exit 1
  "$PY" -m sorsa_kernels.cli bench --help >/dev/null || exit 1
  "$PY" -m sorsa_kernels.bench.ab --help >/dev/null || exit 1
  "$PY" -c "import torch; from sorsa_kernels import bench; c = bench.cases(torch.device('cuda'), 'default', model='llama2-7b'); assert c[-1].params == {'model': 'llama2-7b'}, c[-1]" || exit 1
  echo "gpu_check.sh dry run OK (results would go to $OUT)"; exit 0
fi

START=$(date +%s)
# ---- preflight: a visible GPU, or a loud failure now (not "16 skipped, rc=0")
GPU=$(timeout 30 "$PY" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" 2>&1)
if [ $? -ne 0 ] || [ -z "$GPU" ]; then
  fail 2 "no visible CUDA GPU (torch.cuda.is_available() is False${GPU:+; python said: $(echo "$GPU" | tail -1)}); nvidia-smi -L: $(nvidia-smi -L 2>&1 | head -2)"
fi
mkdir -p "$OUT" "$ROOT/.gpu-cache"
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1; echo;
  "$PY" -m sorsa_kernels.cli info 2>&1; } > "$OUT/device.txt"
echo "== GPU: $GPU"

# ---- build: torch's pip CUDA wheels (nvidia/cu13) carry the cuBLAS/cuSPARSE/cuSOLVER headers the
# system toolkit may lack, and the linker needs a plain libcudart.so name (the wheel ships .so.13)
NV=$("$PY" -c "import nvidia, os; p = os.path.join(nvidia.__path__[0], 'cu13'); print(p if os.path.isdir(p) else '')" 2>/dev/null)
if [ -n "$NV" ]; then
  mkdir -p "$ROOT/.gpu-cache/lib"
  [ -e "$NV/lib/libcudart.so.13" ] && ln -sf "$NV/lib/libcudart.so.13" "$ROOT/.gpu-cache/lib/libcudart.so"
  export CPATH="$NV/include${CPATH:+:$CPATH}" LIBRARY_PATH="$ROOT/.gpu-cache/lib:$NV/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
fi
echo "== building the C++/CUDA extension in place (MAX_JOBS=16, sm_90)"
SORSA_KERNELS_CUDA=1 SORSA_KERNELS_FORCE_CUDA=1 MAX_JOBS=16 TORCH_CUDA_ARCH_LIST="9.0" timeout 150 \
  "$PY" setup.py build_ext --inplace --build-temp "$ROOT/.gpu-cache/build" > "$OUT/build.txt" 2>&1
BUILD_RC=$?
echo "build rc=$BUILD_RC" >> "$OUT/build.txt"
if [ $BUILD_RC -ne 0 ]; then
  tail -25 "$OUT/build.txt"
  fail 3 "building the extension failed (rc=$BUILD_RC; log: $OUT/build.txt)"
fi
"$PY" -c "import sorsa_kernels._backend as b; ok, cuda, why = b.ext_status(); assert ok and cuda, why" \
  || fail 3 "the extension built but does not load with CUDA kernels (see $OUT/build.txt)"

echo "== gpu tests (required to run: a skip counts as a failure)"
timeout 120 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests --junitxml="$OUT/gpu-tests.xml" 2>&1 \
  | tee "$OUT/gpu-tests.txt" | tail -25
TEST_RC=${PIPESTATUS[0]}

echo "== benchmarks (rows print as they complete; JSON updated per case)"
timeout 180 "$PY" -m sorsa_kernels.cli bench --no-progress --model llama2-7b --max-seconds 160 \
  --json "$OUT/bench.json" > "$OUT/bench.txt" 2>&1
BENCH_RC=$?

echo "== design switch A/B (informational: does not change the exit status)"
timeout 90 "$PY" -m sorsa_kernels.bench.ab --rounds 5 --json "$OUT/ab.json" > "$OUT/ab.txt" 2>&1
AB_RC=$?

echo
echo "== summary ($(($(date +%s) - START)) s; full results in $OUT)"
echo "GPU: $GPU"
tail -1 "$OUT/gpu-tests.txt"
"$PY" - "$OUT/bench.json" <<'PYEOF' || tail -30 "$OUT/bench.txt"
import json, sys
from sorsa_kernels.bench import from_json, verdict_table
d = json.load(open(sys.argv[1]))
rs = from_json(d["results"])
print(verdict_table(rs))
bad = [r for r in rs if r.error]
for r in bad:
    print(f"  {r.op} {r.case} {r.impl}: {r.error}")
PYEOF
tail -6 "$OUT/ab.txt"
echo "tests rc=$TEST_RC bench rc=$BENCH_RC a/b rc=$AB_RC"
exit $(( TEST_RC != 0 || BENCH_RC != 0 ))
