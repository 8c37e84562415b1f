#!/usr/bin/env bash
# Triton version check: the Triton kernels (kernels/, as weightkit.kernels) under a second Triton release, by default
# the GPU image's (3.6.0; the test command installs requirements-dev.txt's 3.9.0). No GPU needed:
#   1. makes the environment if needed: $TRITON_VENV (default .venv-triton<version>; one made elsewhere, e.g.
#      TRITON_VENV=/work/venv-t36, is reused, its packages installed only when its triton differs) with
#      torch==$TRITON_TORCH (default 2.13.0, on this machine's disk), triton==$TRITON_VERSION (--no-deps: torch pins
#      its own), what the build and tests need, and this checkout installed editable in it (ninja builds
#      weightkit._C in place, as the test command does),
#   2. compiles every Triton launch for sm_90 with that Triton (tests/ops/test_kernels_host.py --compile: the
#      shape-rule configs, the first and last config of every tuner's space, and every config each tuner's pruner
#      keeps for the cases' shapes); any compile failure or a launched kernel no case reaches fails, and so does a
#      shape-rule or pruner-kept config that spills registers (> 64 B of stack a thread) or needs more than sm_90's
#      227 KB of shared memory,
#   3. the Triton tests of tests/ops (every op, every backend against the reference) in the interpreter of that
#      Triton (TRITON_INTERPRET=1); extra arguments go to that pytest (e.g. tests/nn for the layers too).
# Downloads triton from PyPI the first time, so it is not part of `make test` / CI. Exit status non-zero on any failure.
# The GPU image's exact pair: TRITON_TORCH=2.11.0 TRITON_VERSION=3.6.0 (PyPI's torch 2.11.0 is the cu130 build, ~4.6 GB
# with its CUDA libraries; setup.py then builds the CUDA library too, as on the GPU machine), and `tests` as the extra
# argument for the whole suite (tests needing packages this script does not install skip or fail). The whole suite
# passed under that pair on 2026-12-06, in a venv with requirements-dev.txt's other packages (docs/install.md).
# Usage: bash scripts/check_triton.sh [extra pytest args]   (make check-triton TRITON_VERSION=3.6.0)
set -euo pipefail
cd "$(dirname "$0")/.."
TRITON_VERSION=${TRITON_VERSION:-3.6.0}
TRITON_TORCH=${TRITON_TORCH:-2.13.0}
TRITON_VENV=${TRITON_VENV:-.venv-triton$TRITON_VERSION}
PY="$TRITON_VENV/bin/python"
if [ ! -x "$PY" ]; then
  python3 -m venv "$TRITON_VENV"
fi
# Triton 3.6's interpreter turns a loop bound tensor (a 1-element numpy array there) into a Python int with int(),
# which numpy >= 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars"); 3.9's does not.
case "$TRITON_VERSION" in
  3.[0-8].*) NUMPY="numpy<2.4" ;;
  *) NUMPY=numpy ;;
esac
have=$("$PY" -c 'import triton; print(triton.__version__)' 2>/dev/null || true)
if [ "$have" != "$TRITON_VERSION" ]; then
  "$PY" -m pip install -q --disable-pip-version-check "torch==$TRITON_TORCH" "$NUMPY" tqdm pybind11 ninja \
    setuptools wheel pytest hypothesis
  "$PY" -m pip install -q --disable-pip-version-check --no-deps "triton==$TRITON_VERSION" "bitsandbytes>=0.50"
fi
"$PY" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
CHECKOUT=$PWD
(cd / && "$PY" -c "import weightkit, weightkit.kernels as k; assert k.__file__.startswith('$CHECKOUT/'), k.__file__")
echo "check_triton: $("$PY" -c 'import torch, triton; print("triton", triton.__version__, "torch", torch.__version__)')"
test "$("$PY" -c 'import triton; print(triton.__version__)')" = "$TRITON_VERSION"

status=0
for space in fixed tuned-first tuned-last tuned-all; do  # each prints its summary and failures on stderr
  env -u TRITON_INTERPRET "$PY" tests/ops/test_kernels_host.py --compile "$space" >/dev/null || status=1
done
TRITON_INTERPRET=1 "$PY" -m pytest -q -p no:cacheprovider tests/ops "$@" || status=1
exit $status
