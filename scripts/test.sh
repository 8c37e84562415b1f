#!/usr/bin/env bash
# The test command (README): make a venv if needed, install what the tests need, build the extension,
# compile-check the CUDA sources when nvcc exists, and run the test-suite. Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${WEIGHTKIT_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --disable-pip-version-check -r requirements-dev.txt
python -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
python -m weightkit info
python scripts/compile_cuda.py
if ! python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export TRITON_INTERPRET=1  # Triton kernels run on the CPU through the interpreter
fi
python -m pytest -q -p no:cacheprovider tests "$@"
