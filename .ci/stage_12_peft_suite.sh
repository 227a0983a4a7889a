#!/usr/bin/env bash
# PEFT's own test suite as our test of sorsa_kernels.integrations.peft.accelerate. Fetches the sdist
# of the peft that the Quick start's venv holds (the sdist ships tests/), runs its LoRA cases
# (tests/peft_suite/sk_peft_plugin.py says which; the hub-dependent ones in hub_tests.txt are left
# out) twice, as-is and with every model PEFT builds passed through accelerate(backend="torch"),
# and fails on any test that passes as-is and not accelerated (tests/peft_suite/compare.py).
# The two runs go in parallel, one torch thread each (two cores). PEFT's test modules import
# diffusers, datasets, scipy and parameterized, and peft's CorDA module imports attrs: they go into
# an overlay venv that sees .venv's packages through a .pth (.venv itself is left as the README
# builds it), pinned to .venv's versions of everything they share. The package is put on
# PYTHONPATH (the tree's source). Logs and outcomes: $PEFT_SUITE_DIR (default ./.ci-peft-suite).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY="$ROOT/.venv/bin/python"
WORK=${PEFT_SUITE_DIR:-$ROOT/.ci-peft-suite}
VENV=$WORK/venv
T0=$(date +%s)
pipq() { local log; log=$(mktemp); if ! "$@" -q > "$log" 2>&1; then cat "$log"; rm -f "$log"; return 1; fi; rm -f "$log"; }
mkdir -p "$WORK"

PEFT=$("$PY" -c "import peft; print(peft.__version__)")
SRC=$WORK/peft-$PEFT
if [ ! -d "$SRC/tests" ]; then
  pipq "$PY" -m pip download --no-deps --no-binary :all: "peft==$PEFT" -d "$WORK"
  tar -xzf "$WORK/peft-$PEFT.tar.gz" -C "$WORK"
fi
# PEFT's test modules import each other relatively (from .testing_common import ...); the sdist
# leaves out the package marker its repository has
touch "$SRC/tests/__init__.py"

# reused while it overlays this .venv and imports what the suite needs
MAIN_SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
PTH=$VENV/main_venv.pth.path
if [ "$(cat "$PTH" 2>/dev/null)" != "$MAIN_SITE" ] || ! "$VENV/bin/python" -c \
    "import diffusers, datasets, scipy, parameterized, attr, peft; assert peft.__version__ == '$PEFT'; assert diffusers.__version__ == '0.42.1'" 2>/dev/null; then
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  echo "$MAIN_SITE" > "$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/main_venv.pth"
  echo "$MAIN_SITE" > "$PTH"
  "$ROOT/.venv/bin/pip" freeze --exclude-editable | grep -v ' @ ' > "$WORK/constraints.txt"
  # the versions this stage was last run with (a new upstream release must not turn CI red by itself)
  pipq "$VENV/bin/pip" install -c "$WORK/constraints.txt" diffusers==0.42.1 datasets==5.2.0 scipy==1.17.1 \
    parameterized==0.9.0 attrs==26.1.0
fi
echo "== peft $PEFT sdist and test venv ready in $(( $(date +%s) - T0 )) s"

run() {  # $1 name, then extra pytest options
  local name=$1; shift
  (cd "$SRC" && HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 \
     PYTHONPATH="$ROOT/tests/peft_suite:$ROOT" timeout 900 "$VENV/bin/python" -m pytest -q -p no:cacheprovider \
     -o addopts= --rootdir=. --basetemp="$WORK/tmp-$name" -W ignore --tb=short -p sk_peft_plugin \
     --sk-exclude="$ROOT/tests/peft_suite/hub_tests.txt" --sk-outcomes="$WORK/$name.json" "$@" \
     tests/test_custom_models.py tests/test_initialization.py tests/test_tuners_utils.py) > "$WORK/$name.log" 2>&1
}
T1=$(date +%s)
rm -f "$WORK/asis.json" "$WORK/accelerated.json"
set +e
run asis & P1=$!
run accelerated --sk-accelerate & P2=$!
wait $P1; RC1=$?
wait $P2; RC2=$?
set -e
for name in asis accelerated; do
  echo "== $name: $(grep -E '^sorsa-kernels PEFT suite|^[0-9]+ (passed|failed)' "$WORK/$name.log" | tr '\n' ' ')"
done
echo "== both runs in $(( $(date +%s) - T1 )) s (pytest rc: as-is $RC1, accelerated $RC2)"
if [ ! -s "$WORK/asis.json" ] || [ ! -s "$WORK/accelerated.json" ]; then
  echo "a run wrote no outcomes (crashed or timed out):"; tail -n 30 "$WORK/asis.log" "$WORK/accelerated.log"; exit 1
fi
set +e
"$PY" "$ROOT/tests/peft_suite/compare.py" "$WORK/asis.json" "$WORK/accelerated.json"
rc=$?
set -e
if [ $rc -ne 0 ]; then
  echo "== accelerated run's failures (first 300 lines; all in $WORK/accelerated.log):"
  sed -n '/^=* FAILURES =*$/,$p' "$WORK/accelerated.log" | head -n 300 || true  # head closes the pipe early
fi
echo "== PEFT suite stage in $(( $(date +%s) - T0 )) s"
exit $rc
