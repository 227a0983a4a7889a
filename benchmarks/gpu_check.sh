#!/usr/bin/env bash
# The one prepared GPU check (H200 machine: no network; torch/triton/pytest/pytest-xdist preinstalled).
# From the repo root:  bash benchmarks/gpu_check.sh        (results under $OUT, default ./gpu-results)
#   --dry-run   check the CPU-side parts (syntax, imports, test collection, bench cases) and exit
#   --help      this text
# Order, by value, each step under its own limit (sum 470 s, so one 600 s command holds it with room,
# and the device time left allows a rerun):
#   preflight (20 s) -> in parallel: build the C++/CUDA extension (120 s) and warm Triton's cache by
#   compiling every shipped sm_90 program ahead of time (aot_check, 120 s) -> `sorsa-kernels check`:
#   every fused op vs torch and float64, one subprocess per case (90 s) -> gpu-marked tests on 8
#   workers (100 s) -> `sorsa-kernels bench` incl. the Llama-2-7B init case (100 s) -> the A/B of the
#   design switches chosen by counting (40 s).
# A failed build skips only what needs the extension (rsvd's CUDA rows). Every step appends a JSON
# line to results.jsonl as it ends and the archive is re-packed, so a cut-off run still returns what
# it did. Exactly three files come back under $OUT: results.jsonl (one line per step), summary.txt
# (the short table printed last) and results.tar.gz (every log and JSON).
# GPU_CHECK_FAKE=1 rehearses on a machine without a GPU: the build and the cache warm-up run for real,
# the GPU steps are stand-ins that write their files; packing, order and limits are what is checked.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT="${OUT:-$ROOT/gpu-results}"
case "${1:-}" in
  --help|-h) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
esac
PY="${PYTHON:-python3}"
FAKE="${GPU_CHECK_FAKE:-0}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONDONTWRITEBYTECODE=1 TRITON_INTERPRET=0
export TRITON_CACHE_DIR="$ROOT/.gpu-cache/triton" TORCHINDUCTOR_CACHE_DIR="$ROOT/.gpu-cache/inductor"
export SORSA_KERNELS_REQUIRE_GPU=1 SORSA_KERNELS_CACHE_DIR="$ROOT/.gpu-cache/dispatch"
fail() { local code=$1; shift; echo "!!!!!!!! gpu_check.sh FAILED: $*" >&2; exit "$code"; }

if [ "${1:-}" = "--dry-run" ]; then
  bash -n "$0" || exit 1
  "$PY" -c "import sorsa_kernels, sorsa_kernels.bench, sorsa_kernels.cli, sorsa_kernels.check" || exit 1
  "$PY" -m pytest -q -m gpu --collect-only -p no:cacheprovider tests >/dev/null || exit 1
  "$PY" -m sorsa_kernels.cli bench --help >/dev/null || exit 1
  "$PY" -m sorsa_kernels.cli check --help >/dev/null || exit 1
  "$PY" -m sorsa_kernels.ops.linear.ab --help >/dev/null || exit 1
  "$PY" -c "import torch; from sorsa_kernels import bench; c = bench.cases(torch.device('cuda'), 'default', model='llama2-7b'); assert c[-1].params == {'model': 'llama2-7b'}, c[-1]" || exit 1
  echo "gpu_check.sh dry run OK (results would go to $OUT)"; exit 0
fi

START=$(date +%s)
LOGS="$ROOT/.gpu-cache/logs"  # packed into results.tar.gz: only the three result files sit under $OUT
# ---- preflight: a visible GPU, or a loud failure now (not "16 skipped, rc=0")
if [ "$FAKE" = "1" ]; then
  GPU="(rehearsal: no GPU, GPU steps faked)"
else
  GPU=$(timeout 20 "$PY" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" 2>&1)
  if [ $? -ne 0 ] || [ -z "$GPU" ]; then
    fail 2 "no visible CUDA GPU (torch.cuda.is_available() is False${GPU:+; python said: $(echo "$GPU" | tail -1)}); nvidia-smi -L: $(nvidia-smi -L 2>&1 | head -2)"
  fi
fi
rm -rf "$OUT" "$LOGS"
mkdir -p "$OUT" "$LOGS"
echo "== GPU: $GPU"

pack() {  # the archive holds everything so far: a run cut off later still returns it
  local tmp="$OUT/.results.$BASHPID.tmp"  # build and warm-up pack concurrently
  tar -czf "$tmp" -C "$(dirname "$LOGS")" logs 2>/dev/null && mv -f "$tmp" "$OUT/results.tar.gz"
}
record() {  # step rc seconds [note]: one JSON line per step, then re-pack
  printf '{"step": "%s", "rc": %s, "seconds": %s, "elapsed": %s, "note": "%s"}\n' "$1" "$2" "$3" \
    "$(( $(date +%s) - START ))" "${4:-}" >> "$OUT/results.jsonl"
  pack
}
step() {  # name limit_s logfile command...: run under a limit, log everything, record the result
  local name=$1 limit=$2 log=$3; shift 3
  local t0=$(date +%s) rc
  echo "== $name (limit ${limit}s)"
  if [ "$1" = fake ]; then "$@" > "$LOGS/$log" 2>&1; else timeout "$limit" "$@" > "$LOGS/$log" 2>&1; fi
  rc=$?
  record "$name" "$rc" "$(( $(date +%s) - t0 ))" "$([ $rc -eq 124 ] && echo "cut at the ${limit}s limit")"
  tail -3 "$LOGS/$log"
  return $rc
}
fake() {  # rehearsal stand-in for a GPU step: writes its files, takes a moment
  local what=$1; shift
  echo "FAKE $what: no GPU in a rehearsal"; sleep 1
  for f in "$@"; do echo '{"fake": true}' > "$f"; done
  return 0
}

{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1; echo;
  "$PY" -m sorsa_kernels.cli info 2>&1; } > "$LOGS/device.txt"
record preflight 0 "$(( $(date +%s) - START ))"

# ---- build (extension) and warm-up (Triton cache) side by side: 16 cores, independent work
NV=$("$PY" -c "import nvidia, os; p = os.path.join(nvidia.__path__[0], 'cu13'); print(p if os.path.isdir(p) else '')" 2>/dev/null)
if [ -n "$NV" ]; then  # torch's pip CUDA wheels carry the library headers; the linker needs libcudart.so
  mkdir -p "$ROOT/.gpu-cache/lib"
  [ -e "$NV/lib/libcudart.so.13" ] && ln -sf "$NV/lib/libcudart.so.13" "$ROOT/.gpu-cache/lib/libcudart.so"
  export CPATH="$NV/include${CPATH:+:$CPATH}" LIBRARY_PATH="$ROOT/.gpu-cache/lib:$NV/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
fi
JOBS=$(nproc 2>/dev/null || echo 4)
step build 120 build.txt env SORSA_KERNELS_FORCE_CUDA=1 MAX_JOBS=8 TORCH_CUDA_ARCH_LIST="9.0" \
  "$PY" setup.py build_ext --inplace --build-temp "$ROOT/.gpu-cache/build" &
BUILD_PID=$!
# (a rehearsal on a small CPU compiles a quick subset: the build must have the cores there)
step warm-up 120 warmup.txt "$PY" -m sorsa_kernels.aot_check --archs 90 --jobs "$(( JOBS > 8 ? JOBS - 8 : 1 ))" \
  $([ "$FAKE" = "1" ] && echo --quick) --json "$LOGS/aot-sm90.json"
wait $BUILD_PID
BUILD_RC=$?
EXT_OK=0
if [ $BUILD_RC -eq 0 ] && "$PY" -c "import sorsa_kernels._backend as b; ok, cuda, why = b.ext_status(); assert ok and cuda, why" \
     >> "$LOGS/build.txt" 2>&1; then
  EXT_OK=1
else
  echo "!! the extension did not build or load: its CUDA rows are skipped, the Triton steps run (log: logs/build.txt)"
fi

# ---- correctness of every fused op first: one subprocess per case, so a crash costs one row
if [ "$FAKE" = "1" ]; then
  step check 90 check.txt fake "sorsa-kernels check" "$LOGS/check.json"; CHECK_RC=$?
else
  step check 90 check.txt "$PY" -m sorsa_kernels.cli check --timeout 40 --json "$LOGS/check.json"; CHECK_RC=$?
fi

# ---- gpu-marked tests (a skip counts as a failure), 8 workers over the warm cache
XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 8" || echo "")
NO_EXT=$([ $EXT_OK -eq 1 ] && echo "" || echo "not rsvd_ext")  # without the extension: only its tests go
if [ "$FAKE" = "1" ]; then
  step gpu-tests 100 gpu-tests.txt fake "pytest -m gpu" "$LOGS/gpu-tests.xml"; TEST_RC=$?
else
  step gpu-tests 100 gpu-tests.txt "$PY" -m pytest -q $XDIST -m gpu ${NO_EXT:+-k "$NO_EXT"} -p no:cacheprovider \
    tests --junitxml="$LOGS/gpu-tests.xml"; TEST_RC=$?
fi

# ---- benchmarks (rows print as they complete; JSON updated per case)
if [ "$FAKE" = "1" ]; then
  step bench 100 bench.txt fake "sorsa-kernels bench" "$LOGS/bench.json"; BENCH_RC=$?
else
  step bench 100 bench.txt "$PY" -m sorsa_kernels.cli bench --no-progress --model llama2-7b --max-seconds 85 \
    --json "$LOGS/bench.json"; BENCH_RC=$?
fi

# ---- design switch A/B (informational: does not change the exit status)
if [ "$FAKE" = "1" ]; then
  step ab 40 ab.txt fake "ops.linear.ab" "$LOGS/ab.json"
else
  step ab 40 ab.txt "$PY" -m sorsa_kernels.ops.linear.ab --rounds 3 --json "$LOGS/ab.json"
fi

# ---- the short table, last
{
  echo "gpu_check.sh on $GPU, $(date -u), $(( $(date +%s) - START )) s"
  cat "$OUT/results.jsonl"
  echo; echo "-- check"; tail -12 "$LOGS/check.txt"
  echo; echo "-- gpu tests"; tail -1 "$LOGS/gpu-tests.txt"
  if [ "$FAKE" != "1" ]; then
    echo; echo "-- bench verdict"
    "$PY" - "$LOGS/bench.json" <<'PYEOF' 2>&1 || tail -20 "$LOGS/bench.txt"
import json, sys
from sorsa_kernels.bench import from_json, verdict_table
rs = from_json(json.load(open(sys.argv[1]))["results"])
print(verdict_table(rs))
for r in rs:
    if r.error:
        print(f"  {r.op} {r.case} {r.impl}: {r.error}")
PYEOF
  fi
  echo; echo "-- a/b"; tail -6 "$LOGS/ab.txt"
  echo "check rc=$CHECK_RC tests rc=$TEST_RC bench rc=$BENCH_RC extension=$([ $EXT_OK -eq 1 ] && echo ok || echo FAILED)"
} > "$OUT/summary.txt" 2>&1
pack
cat "$OUT/summary.txt"
exit $(( CHECK_RC != 0 || TEST_RC != 0 || BENCH_RC != 0 || EXT_OK != 1 ))
