#!/usr/bin/env bash
# Incremental in-place build of weightkit's compiled code (weightkit/_C<EXT_SUFFIX>: the pybind11 module with the CPU
# kernels; weightkit/lib/libweightkit_cuda.so when nvcc and a CUDA torch are present; see setup.py) for development.
# ninja rebuilds only what changed (objects under build/ninja/) and writes build/compile_commands.json for editors.
# flock serializes concurrent builds from several shells sharing this checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
exec flock /tmp/weightkit-build.lock python setup.py -q build_ext --inplace
