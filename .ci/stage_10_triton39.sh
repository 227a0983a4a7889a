#!/usr/bin/env bash
# The newest stack a user gets from PyPI today: torch 2.15.0 (its CUDA 13.2 build, which pins
# triton 3.9.0; it runs on the CPU). This machine's pip is capped at torch 2.14.1 by a machine-wide
# constraint file, so this one venv reads no pip config (PIP_CONFIG_FILE=/dev/null: PyPI only).
# The package is installed the README's way with the CPU extension (the CUDA kernels for torch 2.15
# come from `scripts/build_wheel.sh --torch 2.15.0`) and the whole suite runs: every kernel under
# Triton 3.9's interpreter, the AOT quick check under 3.9, Triton's deprecation warnings as errors
# (pyproject's filterwarnings). The venv is reused when it already holds this stack.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${T39_VENV:-$ROOT/.ci-venv-t39}
TORCH=2.15.0
TRITON=3.9.0
T0=$(date +%s)
pipq() { local log; log=$(mktemp); if ! "$@" -q > "$log" 2>&1; then cat "$log"; rm -f "$log"; return 1; fi; rm -f "$log"; }

if ! "$VENV/bin/python" -c "import torch, triton; assert torch.__version__.split('+')[0] == '$TORCH' and triton.__version__ == '$TRITON'" 2>/dev/null; then
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  PIP_CONFIG_FILE=/dev/null pipq "$VENV/bin/pip" install "torch==$TORCH" "triton==$TRITON" numpy setuptools wheel ninja
  echo "== torch $TORCH venv built in $(( $(date +%s) - T0 )) s"
fi
"$VENV/bin/python" -c "import torch, triton, sys; print('== stack: torch', torch.__version__, 'triton', triton.__version__, 'python', sys.version.split()[0])"
PIP_CONFIG_FILE=/dev/null SORSA_KERNELS_SKIP_CUDA=1 pipq "$VENV/bin/pip" install --no-build-isolation ".[test]"
echo "== package + test extras installed at $(( $(date +%s) - T0 )) s"
set +e
"$VENV/bin/pytest" -q -p no:cacheprovider tests
rc=$?
set -e
[ $rc -ne 5 ] || { echo "pytest collected no tests"; exit 1; }
echo "== triton $TRITON suite rc=$rc in $(( $(date +%s) - T0 )) s"
exit $rc
