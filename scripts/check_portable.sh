#!/usr/bin/env bash
# Portability check (README): weightkit's compiled kernels (weightkit._C, and the CUDA library where built), built
# once here under the test command's torch, run unchanged and bit-identically under a second torch release.
#   1. builds weightkit._C in place with the current python and ninja (no torch involved in the build),
#   2. makes the second environment if needed: $PORTABLE_VENV (default .venv-portable) with $PORTABLE_TORCH
#      (default torch==2.14.1: on this machine's disk a CUDA build, ~5.5 GB, that runs on the CPU),
#   3. tests/test_portable.py: every CPU kernel on fixed inputs under both torches, outputs compared bit for bit,
#      and the _C file loaded by the second torch must be the one built in step 1 (so the second environment must
#      have the same Python version: _C is a CPython extension, like torch's own),
#   4. the op tests (tests/ops, every backend against the reference) under the second torch, same built files.
# Exit status non-zero on any failure. Usage: bash scripts/check_portable.sh [extra pytest args for step 4]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
PORTABLE_VENV=${PORTABLE_VENV:-.venv-portable}
PORTABLE_TORCH=${PORTABLE_TORCH:-torch==2.14.1}

"$PY" setup.py -q build_ext --inplace >/dev/null
if [ ! -x "$PORTABLE_VENV/bin/python" ]; then
  python3 -m venv "$PORTABLE_VENV"
  "$PORTABLE_VENV/bin/python" -m pip install -q --disable-pip-version-check "$PORTABLE_TORCH" numpy tqdm pytest hypothesis
fi
OTHER="$(cd "$PORTABLE_VENV" && pwd)/bin/python"
echo "check_portable: built with $("$PY" -c 'import torch; print("torch", torch.__version__)'); second: $("$OTHER" -c 'import torch; print("torch", torch.__version__)')"
WEIGHTKIT_PORTABLE_PYTHON="$OTHER" "$PY" -m pytest -q -p no:cacheprovider tests/test_portable.py
# The second environment sees this checkout as the first does: the editable install's import finder (setuptools'
# __editable__ files: weightkit -> weightkit/, weightkit.kernels -> kernels/) is copied into it, so nothing is rebuilt
# or installed there and the op tests import the very files built in step 1.
SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
OTHER_SITE=$("$OTHER" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if ! ls "$SITE"/__editable__*weightkit* >/dev/null 2>&1; then
  echo "check_portable: $PY has no editable install of this checkout (run \`pip install --no-build-isolation -e .\`)" >&2
  exit 1
fi
cp "$SITE"/__editable__*weightkit* "$OTHER_SITE"/
CHECKOUT=$PWD
(cd / && "$OTHER" -c "import weightkit, weightkit.kernels; assert weightkit.__file__.startswith('$CHECKOUT/'), weightkit.__file__")
"$OTHER" -m pytest -q -p no:cacheprovider tests/ops -k "not triton" "$@"
