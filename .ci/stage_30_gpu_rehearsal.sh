#!/usr/bin/env bash
# Rehearsal of benchmarks/gpu_check.sh on the H200 image's stack (Python 3.12, torch 2.11.0+cu130,
# triton 3.6.0: the venv stage_15 built) without a GPU (GPU_CHECK_FAKE=1): the extension really
# builds against torch 2.11 and the Triton cache warm-up really compiles the sm_90 programs; the GPU
# steps are stand-ins. Checks what must hold on the day a GPU is lent: exactly three files come
# back, every step recorded in order, the whole run inside its limits (480 s), the build succeeds.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${AOT_T36_VENV:-$ROOT/.ci-venv-t36}
OUT=$(mktemp -d "${TMPDIR:-/tmp}/gpu-rehearsal.XXXXXX")
trap 'rm -rf "$OUT"; rm -f "$ROOT"/sorsa_kernels/_C*.so "$ROOT"/sorsa_kernels/_C_build.json; rm -rf "$ROOT/.gpu-cache"' EXIT
"$VENV/bin/python" -c "import sys, torch, triton; assert sys.version_info[:2] == (3, 12) and torch.__version__.startswith('2.11.0') and triton.__version__ == '3.6.0'"
# what the H200 image has besides torch (pytest, xdist) and what a build needs
"$VENV/bin/pip" install -q pytest pytest-xdist setuptools wheel ninja safetensors tqdm 2>&1 | grep -v "^WARNING: Location" || true
T0=$(date +%s)
set +e
GPU_CHECK_FAKE=1 OUT="$OUT/r" PYTHON="$VENV/bin/python" timeout 600 bash benchmarks/gpu_check.sh > "$OUT/run.log" 2>&1
RC=$?
set -e
WALL=$(( $(date +%s) - T0 ))
tail -25 "$OUT/run.log"
"$VENV/bin/python" - "$OUT/r" "$RC" "$WALL" <<'PY'
import json, os, sys, tarfile
out, rc, wall = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
files = sorted(os.listdir(out))
assert files == ["results.jsonl", "results.tar.gz", "summary.txt"], files
steps = [json.loads(line) for line in open(os.path.join(out, "results.jsonl"))]
names = [s["step"] for s in steps]
assert names[0] == "preflight" and sorted(names[1:3]) == ["build", "warm-up"] and names[3:] == ["check", "gpu-tests", "bench", "ab"], names
by = {s["step"]: s for s in steps}
assert by["build"]["rc"] == 0, f"the extension did not build against torch 2.11: {by['build']}"
assert by["warm-up"]["rc"] in (0, 124), by["warm-up"]  # 2 shared cores may not finish what 16 do
assert wall <= 480 and rc == 0, (wall, rc)
names_in = tarfile.open(os.path.join(out, "results.tar.gz")).getnames()
for f in ("build.txt", "warmup.txt", "check.txt", "check.json", "gpu-tests.txt", "bench.json", "ab.json", "device.txt"):
    assert f"logs/{f}" in names_in, (f, names_in)
print(f"rehearsal OK: {wall} s, steps {[(s['step'], s['rc'], s['seconds']) for s in steps]}")
PY
