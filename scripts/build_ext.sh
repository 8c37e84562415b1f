#!/usr/bin/env bash
# Incremental in-place build of weightkit._C for development (ninja reuses build/ objects).
# flock serializes concurrent builds from several shells sharing this checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
exec flock /tmp/weightkit-build.lock python setup.py -q build_ext --inplace
