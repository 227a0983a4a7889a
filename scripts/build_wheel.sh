#!/usr/bin/env bash
# Build the binary wheel: dist/sorsa_kernels-<version>+cu<cuda>torch<torch>-cp3XX-cp3XX-<platform>.whl,
# holding the C++ extension with its CUDA kernels for TORCH_CUDA_ARCH_LIST (default "8.0;9.0+PTX").
# The wheel works with exactly the torch it was built against (sorsa_kernels.build_info() records
# it; another torch gets a warning at import naming the wheel to install, and runs without the extension).
#
#   bash scripts/build_wheel.sh --torch 2.15.0   # a fresh venv (build/wheel-venv-2.15.0) with torch 2.15.0
#                                                # and the CUDA compiler wheels of torch's CUDA (13.2)
#   bash scripts/build_wheel.sh                  # the current environment: PYTHON=/path/to/python (default
#                                                # python) with a CUDA build of torch, nvcc, setuptools, wheel, ninja
#
# Wheels are made for the torch releases in sorsa_kernels/_build_info.py WHEEL_TORCH (2.11.0 and 2.14.1:
# CUDA 13.0; 2.15.0: CUDA 13.2). With --torch the compiler is nvidia-cuda-nvcc (+ nvvm, crt) from PyPI at
# torch's CUDA major.minor, so nvcc always matches the torch; the venv is reused when present.

# (Where a machine-wide pip constraint caps torch, prefix PIP_CONFIG_FILE=/dev/null.)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
T0=$(date +%s)
TORCH_VER=""
die() { echo "build_wheel.sh: $1" >&2; exit "${2:-1}"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --torch) [ $# -ge 2 ] && [ -n "$2" ] || die "--torch needs a version, e.g. --torch 2.15.0" 2
             TORCH_VER="$2"; shift 2 ;;
    --torch=*) TORCH_VER="${1#--torch=}"; shift ;;
    -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (expected --torch VERSION; --help)" 2 ;;
  esac
done

if [ -n "$TORCH_VER" ]; then
  KNOWN=$(sed -n 's/^WHEEL_TORCH = {\(.*\)}.*/\1/p' sorsa_kernels/_build_info.py)
  PRETTY=$(echo "$KNOWN" | sed 's/"\([0-9.]*\)": "\([0-9.]*\)"/\1 (CUDA \2)/g')
  echo "$KNOWN" | grep -q "\"$TORCH_VER\"" || die "--torch $TORCH_VER is not a supported torch (wheels are built for: $PRETTY)" 2
  VENV=${WHEEL_VENV:-$ROOT/build/wheel-venv-$TORCH_VER}
  PY="$VENV/bin/python"
  if ! "$PY" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VER')" 2>/dev/null; then
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    echo "== venv $VENV: torch==$TORCH_VER setuptools wheel ninja numpy"
    "$VENV/bin/pip" install -q "torch==$TORCH_VER" setuptools wheel ninja numpy 2>&1 | grep -v "^WARNING: Location" || true
  fi
  CU=$("$PY" -c "import torch; assert torch.version.cuda, 'torch ' + torch.__version__ + ' is not a CUDA build'; print(torch.version.cuda)")
  NVDIR=$("$PY" -c "import nvidia, os; print(os.path.join(nvidia.__path__[0], 'cu' + '$CU'.split('.')[0]))")
  if ! "$NVDIR/bin/nvcc" --version 2>/dev/null | grep -q "release $CU,"; then
    echo "== CUDA $CU compiler wheels (nvidia-cuda-nvcc, nvvm, crt from one release)"
    "$VENV/bin/pip" install -q "nvidia-cuda-nvcc==$CU.*" 2>&1 | grep -v "^WARNING: Location" || true
    NVCC_V=$("$PY" -c "from importlib.metadata import version; print(version('nvidia-cuda-nvcc'))")
    "$VENV/bin/pip" install -q "nvidia-cuda-nvcc==$NVCC_V" "nvidia-nvvm==$NVCC_V" "nvidia-cuda-crt==$NVCC_V" 2>&1 \
      | grep -v "^WARNING: Location" || true
  fi
  # CUDA's own headers include CCCL's (<nv/target>); torch 2.15 brings nvidia-cuda-cccl, 2.11/2.14 do not
  if [ ! -e "$NVDIR/include/nv/target" ]; then
    echo "== CCCL headers (nvidia-cuda-cccl $CU)"
    "$VENV/bin/pip" install -q "nvidia-cuda-cccl==$CU.*" 2>&1 | grep -v "^WARNING: Location" || true
  fi
  "$NVDIR/bin/nvcc" --version | grep -q "release $CU," || { echo "build_wheel.sh: no nvcc $CU in $NVDIR/bin"; exit 1; }
  [ -e "$NVDIR/include/nv/target" ] || { echo "build_wheel.sh: no CCCL headers (nv/target) in $NVDIR/include"; exit 1; }
  export CUDA_HOME="$NVDIR" PATH="$NVDIR/bin:$PATH"
else
  PY="${PYTHON:-python}"
fi
TAG=$("$PY" -c "import torch; assert torch.version.cuda, 'torch ' + torch.__version__ + ' is not a CUDA build'; print(torch.__version__)")
echo "== building the sorsa-kernels wheel against torch $TAG"
mkdir -p dist
OUTDIR=$(mktemp -d)
trap 'rm -rf "$OUTDIR"' EXIT
# FORCE_CUDA: fail rather than ship a CPU-only wheel; LOCAL_VERSION=auto: +cu<ver>torch<ver> tag.
# The compiler output goes to build/wheel-build.log (CI checks it for warnings in csrc/).
mkdir -p build
SORSA_KERNELS_FORCE_CUDA=1 SORSA_KERNELS_LOCAL_VERSION=auto \
  "$PY" -m pip wheel -v --no-build-isolation --no-deps --wheel-dir "$OUTDIR" . > build/wheel-build.log 2>&1 \
  || { tail -60 build/wheel-build.log; echo "wheel build failed (full log: build/wheel-build.log)"; exit 1; }
grep -E "^sorsa-kernels: " build/wheel-build.log || true
WHL=$(ls "$OUTDIR"/sorsa_kernels-*.whl)
mv -f "$WHL" dist/
WHL="dist/$(basename "$WHL")"
echo "== $WHL: $(du -k "$WHL" | cut -f1) KiB, built in $(( $(date +%s) - T0 )) s"
