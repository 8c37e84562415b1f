#!/usr/bin/env bash
# Incremental in-place build of weightkit's kernel libraries (weightkit/lib/libweightkit_cpu.so, and
# libweightkit_cuda.so when nvcc and a CUDA torch are present; see setup.py) for development. Objects are cached
# under build/native/. flock serializes concurrent builds from several shells sharing this checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
exec flock /tmp/weightkit-build.lock python setup.py -q build_ext --inplace
