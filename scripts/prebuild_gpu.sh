#!/usr/bin/env bash
# The kernel libraries of the GPU machine built here, to carry to it so that `make gpu-check` skips its build stage
# (37-43 s of each fresh machine's device time on an H200, 2026-11-26; no GPU is needed to build them):
#   DIR/weightkit/_C<EXT_SUFFIX>              the CPU module, for the GPU image's Python (default 3.12: a python3.12
#                                             on the PATH or pyenv's; PREBUILD_PYTHON=... chooses another)
#   DIR/weightkit/lib/libweightkit_cuda.so    the CUDA kernels for PREBUILD_ARCHS (default 90: the H100 and H200)
#   DIR/SOURCES                               the hash of the sources they were built from (csrc/, setup.py)
# Usage: bash scripts/prebuild_gpu.sh [DIR]   (DIR default .gpu-prebuilt, git-ignored; name it in the run's carry)
#        bash scripts/prebuild_gpu.sh --hash  (prints the hash of this checkout's build sources)
# scripts/gpu_check.sh uses DIR's files when DIR/SOURCES matches the checkout's sources and they load and run on the
# machine's GPU (its probe); otherwise it builds as usual and says why in summary.txt. Built in a copy of the
# sources under a temporary folder; nothing in the checkout changes but DIR. Needs g++, nvcc and that Python
# (pybind11, ninja and setuptools are installed into a venv of it, build/prebuild-venv-3.12, on first use).
set -euo pipefail
cd "$(dirname "$0")/.."

sources_hash() {  # the files a build compiles or is driven by, by path and content (the same on both machines)
  find csrc setup.py -type f ! -name "*.pyc" ! -name "*.o" ! -name "*.so" | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-16
}
if [ "${1:-}" = "--hash" ]; then
  sources_hash
  exit 0
fi

DIR=${1:-.gpu-prebuilt}
ARCHS=${PREBUILD_ARCHS:-90}
PY=${PREBUILD_PYTHON:-}
if [ -z "$PY" ]; then
  for candidate in python3.12 "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12 \
                   "$HOME"/.pyenv/versions/3.12*/bin/python3.12; do
    if "$candidate" -c "import sys; assert sys.version_info[:2] == (3, 12)" >/dev/null 2>&1; then
      PY=$(command -v "$candidate"); break  # (pyenv's shim of a version not selected fails here)
    fi
  done
fi
[ -n "$PY" ] || { echo "prebuild_gpu: no python3.12 found (the GPU image's Python); set PREBUILD_PYTHON" >&2; exit 1; }
VENV=build/prebuild-venv-$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if ! "$VENV/bin/python" -c "import pybind11, ninja, setuptools" 2>/dev/null; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "setuptools>=64" wheel "pybind11>=2.12" ninja
fi

VENV_PY=$(cd "$VENV" && pwd)/bin/python

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
hash_before=$(sources_hash)
tar -cf - --exclude="*.so" --exclude="__pycache__" setup.py pyproject.toml csrc kernels weightkit | tar -xf - -C "$WORK"
start=$(date +%s)
(cd "$WORK" && WEIGHTKIT_WITH_CUDA=1 WEIGHTKIT_CUDA_ARCHS="$ARCHS" MAX_JOBS=${MAX_JOBS:-$(nproc)} \
  "$VENV_PY" setup.py -q build_ext --inplace >"$WORK/build.log" 2>&1) \
  || { tail -30 "$WORK/build.log" >&2; echo "prebuild_gpu: the build failed" >&2; exit 1; }
[ "$(sources_hash)" = "$hash_before" ] || { echo "prebuild_gpu: the sources changed during the build" >&2; exit 1; }
rm -rf "$DIR"
mkdir -p "$DIR/weightkit/lib"
cp "$WORK"/weightkit/_C*.so "$DIR/weightkit/"
cp "$WORK/weightkit/lib/libweightkit_cuda.so" "$DIR/weightkit/lib/"
echo "$hash_before" >"$DIR/SOURCES"
echo "built $(date -u +%FT%TZ) in $(( $(date +%s) - start )) s: python $("$PY" --version 2>&1 | cut -d' ' -f2), sm_$ARCHS," \
  "$(nvcc --version 2>/dev/null | grep -o 'release [0-9.]*' || echo 'nvcc ?'), $(g++ --version | head -1)" >"$DIR/BUILT"
cat "$DIR/BUILT"
du -sh "$DIR" | cut -f1 | sed 's/^/size: /'
