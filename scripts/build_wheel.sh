#!/usr/bin/env bash
# Build the binary wheel: dist/sorsa_kernels-<version>+cu<cuda>torch<torch>-cp3XX-cp3XX-<platform>.whl,
# holding the C++ extension with its CUDA kernels for TORCH_CUDA_ARCH_LIST (default "8.0;9.0+PTX").
# Run from the repository root in an environment whose python has a CUDA build of torch, nvcc,
# setuptools, wheel and ninja:  bash scripts/build_wheel.sh   (PYTHON=/path/to/python to pick one).
# The wheel works with exactly the torch it was built against (sorsa_kernels.build_info() records
# it; another torch gets a warning at import and the package runs without the extension).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
T0=$(date +%s)
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
