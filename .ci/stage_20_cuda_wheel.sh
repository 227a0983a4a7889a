#!/usr/bin/env bash
# CI stage: the CUDA wheel. `scripts/build_wheel.sh --torch 2.14.1` builds
# dist/sorsa_kernels-*+cu130torch2.14.1-*.whl in its own venv (torch 2.14.1 + the CUDA 13.0 compiler
# wheels); install it into a
# fresh venv and check that the extension loads with its CUDA kernels, holds sm_80 and sm_90 code
# (+ sm_90 PTX), and that a CUDA op on this GPU-less machine raises a clear error; then install it
# next to another torch (2.13.0, CPU) and check the mismatch is a warning plus a working fallback,
# never an undefined-symbol traceback. Our sources must compile without warnings.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
T0=$(date +%s)
# Three torch venvs live here at once (two CUDA builds of ~5.5 GB each, one CPU build): ~14 GB. The
# earlier stages' venvs are not used after stage_15, so free their space when the disk is short
# (a CI run once died here with ENOSPC), and say so plainly when even that is not enough.
free_gb() { df -Pk "${TMPDIR:-/tmp}" | awk 'NR==2 {print int($4 / 1048576)}'; }
NEED_GB=16
if [ "$(free_gb)" -lt $NEED_GB ]; then
  echo "== only $(free_gb) GB free in ${TMPDIR:-/tmp}: removing the finished stages' venvs"
  rm -rf "$ROOT/.ci-venv-second" "$ROOT/.ci-peft-suite"
fi
if [ "$(free_gb)" -lt $NEED_GB ]; then
  echo "FAIL: stage_20 needs ~$NEED_GB GB free in ${TMPDIR:-/tmp} for three torch venvs, $(free_gb) GB are"; exit 1
fi
W=$(mktemp -d "${TMPDIR:-/tmp}/sorsa-wheel-ci.XXXXXX")
trap 'wait; rm -rf "$W"' EXIT  # background pip installs finish before the folder goes
step() { echo "== [$(( $(date +%s) - T0 )) s] $*"; }

# Quiet pip: its output only on failure (the registry's find-links print harmless warnings).
pipq() { local log; log=$(mktemp); if ! "$@" -q > "$log" 2>&1; then cat "$log"; rm -f "$log"; return 1; fi; rm -f "$log"; }

# The venvs' torch installs are mostly disk I/O: the two check venvs fill while the wheel builds.
step "venvs in parallel: run (torch 2.14.1), old (torch 2.13.0); build_wheel.sh --torch 2.14.1 makes its own"
for v in run old; do python3 -m venv "$W/$v"; done
pipq "$W/run/bin/pip" install torch==2.14.1 & RUN_PID=$!
pipq "$W/old/bin/pip" install torch==2.13.0 & OLD_PID=$!
rm -f dist/sorsa_kernels-*.whl
WHEEL_VENV="$W/build" bash scripts/build_wheel.sh --torch 2.14.1
WHL=$(ls "$ROOT"/dist/sorsa_kernels-*+cu130torch2.14.1-cp3*-linux_x86_64.whl)
if grep -nE "csrc/[^ :]+:[0-9]+(:[0-9]+)?: warning" build/wheel-build.log; then
  echo "FAIL: compiler warnings in our sources (csrc/)"; exit 1
fi
grep -q "nvcc" build/wheel-build.log || { echo "FAIL: nvcc did not run"; exit 1; }

rm -rf "$W/build" &  # deleting a torch venv takes minutes on a busy disk: overlap it with the checks
wait $RUN_PID
step "fresh venv: pip install $(basename "$WHL") (dependencies resolved by pip: torch 2.14.1 from the registry)"
pipq "$W/run/bin/pip" install "$WHL"
# Run outside the repository so that the installed package is imported, not ./sorsa_kernels.
cd "$W"
"$W/run/bin/python" - <<'PY'
import glob, os, subprocess, warnings
warnings.simplefilter("error")  # any warning at import (a mismatch, a failed load) fails the stage
import torch
import sorsa_kernels as sk
from sorsa_kernels import _backend

info = sk.build_info()
print("build_info:", info)
assert info["torch"] == torch.__version__ == "2.14.1+cu130", info
assert info["cuda"] == "13.0" and info["cuda_archs"] == "8.0;9.0+PTX", info
assert info["version"].endswith("+cu130torch2.14.1"), info
ok, has_cuda, why = _backend.ext_status()
assert ok and has_cuda, f"extension not loaded with CUDA kernels: {why}"

so = glob.glob(os.path.join(os.path.dirname(sk.__file__), "_C.*.so"))
assert len(so) == 1, so
import triton
cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
elf = subprocess.run([cuobjdump, "--list-elf", so[0]], capture_output=True, text=True, check=True).stdout
ptx = subprocess.run([cuobjdump, "--list-ptx", so[0]], capture_output=True, text=True, check=True).stdout
print(elf + ptx, end="")
assert ".sm_80.cubin" in elf and ".sm_90.cubin" in elf, "missing sm_80/sm_90 code"
assert ".sm_90.ptx" in ptx, "missing sm_90 PTX (for GPUs newer than Hopper)"

# the extension's CPU kernels run from the wheel
W = torch.randn(2, 60, 40, dtype=torch.float64)
U, S, Vh = sk.rsvd(W, 4, backend="ext", seed=0)
S_ref = torch.linalg.svdvals(W)[:, :4]
assert ((S.double() - S_ref).abs() / S_ref).max() < 1e-6, (S, S_ref)

# CUDA ops without a GPU: clear errors, no crash. Our CUDA kernels (dispatched explicitly) refuse
# non-CUDA tensors; asking for a CUDA tensor here fails in torch with its no-driver message.
assert not torch.cuda.is_available()
cuda_key = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
R = torch.eye(4, dtype=torch.float64).unsqueeze(0)
for name, args in [("jacobi_svd", (R, 10)), ("cholesky_upper_", (R.clone(),)), ("philox_normal_", (torch.empty(5), 3))]:
    try:
        getattr(torch.ops.sorsa_kernels, name).default.redispatch(cuda_key, *args)
    except RuntimeError as e:
        assert "must be a CUDA tensor for this op, got device cpu" in str(e), str(e)
        print(f"CUDA {name} on a CPU tensor -> RuntimeError: {str(e).splitlines()[0]}")
    else:
        raise AssertionError(f"CUDA {name} accepted a CPU tensor")
try:
    sk.rsvd(torch.randn(8, 8, device="cuda"), 2)
except RuntimeError as e:
    assert "NVIDIA driver" in str(e), str(e)
    print("rsvd on device='cuda' -> RuntimeError:", str(e).splitlines()[0])
else:
    raise AssertionError("a CUDA tensor was created without a GPU")
print("wheel OK")
PY

wait $OLD_PID
rm -rf "$W/run" &
step "torch 2.13.0 (CPU build) venv + the same wheel: mismatch is a warning and a fallback"
pipq "$W/old/bin/pip" install "$WHL"   # torch>=2.4 is satisfied by 2.13.0: pip keeps it
"$W/old/bin/python" -c "import torch; assert torch.__version__ == '2.13.0+cpu', torch.__version__"
"$W/old/bin/python" - > "$W/old.log" 2>&1 <<'PY' || { cat "$W/old.log"; echo "FAIL: mismatch check"; exit 1; }
import glob, os, warnings
import torch
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import sorsa_kernels as sk
    from sorsa_kernels import _backend
msgs = [str(w.message) for w in caught if type(w.message).__name__ == "ExtensionMismatchWarning"]
assert len(msgs) == 1, [str(w.message) for w in caught]
print("warning:", msgs[0])
assert "2.14.1+cu130" in msgs[0] and torch.__version__ in msgs[0] and "pip install" in msgs[0], msgs[0]
ok, _, why = _backend.ext_status()
assert not ok and why == msgs[0], why
W = torch.randn(40, 30, dtype=torch.float64)
U, S, Vh = sk.rsvd(W, 3, seed=0)            # auto: the torch path
assert ((S - torch.linalg.svdvals(W)[:3]).abs() / S).max() < 1e-6
try:
    sk.rsvd(W, 3, backend="ext")
except RuntimeError as e:
    assert "2.14.1+cu130" in str(e), str(e)
else:
    raise AssertionError("backend='ext' ran with a mismatched extension")
# What the check prevents: loading this wheel's extension into this torch fails.
so = glob.glob(os.path.join(os.path.dirname(sk.__file__), "_C.*.so"))[0]
try:
    torch.ops.load_library(so)
    print("(loading it anyway happened to succeed)")
except OSError as e:
    print("loading it anyway ->", type(e).__name__, str(e).splitlines()[0][:200])
print("mismatch OK")
PY
cat "$W/old.log"
if grep -qE "Traceback|undefined symbol" <(grep -v "^loading it anyway" "$W/old.log"); then
  echo "FAIL: traceback / undefined symbol at import"; exit 1
fi
step "CUDA wheel stage OK: $(basename "$WHL") ($(du -k "$WHL" | cut -f1) KiB)"
