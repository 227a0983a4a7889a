#!/usr/bin/env bash
# The second supported stack. The Quick start's venv (.venv) gets whatever torch pip resolves today
# (torch 2.15.0 with triton 3.9.0 at the time of writing; torch 2.14.1 with triton 3.8.0 when a pip
# constraint caps it); this stage builds the other of the two newest stacks in its own venv, installs
# the package the README's way with the CPU extension (the CUDA kernels come from
# `scripts/build_wheel.sh`) and runs the suite there: every kernel under that Triton's
# interpreter, Triton's deprecation warnings as errors (pyproject's filterwarnings). The AOT stage
# compiles under this venv's Triton too. The venv is reused when it already holds the stack.
# tests/integrations (PEFT, DeepSpeed, the examples: third-party libraries at the same versions in
# both venvs, driving our public API) run on the main stack only, to keep CI's time in bounds;
# everything that touches torch or Triton directly (kernels, custom ops, compile, FSDP2/DTensor,
# the extension, 4-bit, init) runs here too.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${SECOND_VENV:-$ROOT/.ci-venv-second}
MAIN_TORCH=$("$ROOT/.venv/bin/python" -c "import torch; print(torch.__version__.split('+')[0])")
if [ "$MAIN_TORCH" = "2.15.0" ]; then TORCH=2.14.1 TRITON=3.8.0; else TORCH=2.15.0 TRITON=3.9.0; fi
T0=$(date +%s)
pipq() { local log; log=$(mktemp); if ! "$@" -q > "$log" 2>&1; then cat "$log"; rm -f "$log"; return 1; fi; rm -f "$log"; }

if ! "$VENV/bin/python" -c "import torch, triton; assert torch.__version__.split('+')[0] == '$TORCH' and triton.__version__ == '$TRITON'" 2>/dev/null; then
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  # no pip config: a machine-wide constraint file may cap torch below the stack wanted here
  PIP_CONFIG_FILE=/dev/null pipq "$VENV/bin/pip" install "torch==$TORCH" "triton==$TRITON" numpy setuptools wheel ninja
  echo "== torch $TORCH venv built in $(( $(date +%s) - T0 )) s"
fi
"$VENV/bin/python" -c "import torch, triton, sys; print('== second stack: torch', torch.__version__, 'triton', triton.__version__, 'python', sys.version.split()[0], '(main venv: torch $MAIN_TORCH)')"
PIP_CONFIG_FILE=/dev/null SORSA_KERNELS_SKIP_CUDA=1 pipq "$VENV/bin/pip" install --no-build-isolation ".[test]"
echo "== package + test extras installed at $(( $(date +%s) - T0 )) s"
set +e
"$VENV/bin/pytest" -q -p no:cacheprovider tests --ignore=tests/integrations
rc=$?
set -e
[ $rc -ne 5 ] || { echo "pytest collected no tests"; exit 1; }
echo "== triton $TRITON suite rc=$rc in $(( $(date +%s) - T0 )) s"
exit $rc
