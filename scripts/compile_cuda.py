"""Compile csrc/cuda/*.cu to object files for sm_90 with nvcc, to catch errors on machines without a GPU.

The objects are thrown away: this is a compile check, run by the test command when nvcc exists.
Usage: python scripts/compile_cuda.py [csrc/cuda/file.cu ...]   (default: every csrc/cuda/*.cu)
"""

import glob
import os
import shutil
import subprocess
import sys
import tempfile

import torch
from torch.utils.cpp_extension import include_paths


def main() -> int:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        print("compile_cuda: nvcc not found, skipping the CUDA compile check")
        return 0
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sources = [os.path.abspath(p) for p in sys.argv[1:]] or sorted(glob.glob(os.path.join(here, "csrc", "cuda", "*.cu")))
    includes = [f"-I{p}" for p in include_paths()] + [f"-I{os.path.join(here, 'csrc')}"]
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        # CPU builds of torch ship c10/cuda headers without this generated one; a stand-in lets them parse.
        macros = os.path.join(tmp, "c10", "cuda", "impl", "cuda_cmake_macros.h")
        os.makedirs(os.path.dirname(macros))
        with open(macros, "w") as f:
            f.write("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        includes.append(f"-I{tmp}")
        for src in sources:
            obj = os.path.join(tmp, os.path.basename(src) + ".o")
            cmd = [nvcc, "-c", src, "-o", obj, "-std=c++20", "-O3", "--fmad=false", "-arch=sm_90",
                   "-DWEIGHTKIT_WITH_CUDA", "-DTORCH_EXTENSION_NAME=_C", abi, "--expt-relaxed-constexpr",
                   "-Xcompiler", "-fPIC"] + includes
            proc = subprocess.run(cmd, capture_output=True, text=True)
            status = "ok" if proc.returncode == 0 else "FAILED"
            print(f"compile_cuda: {os.path.relpath(src, here)} for sm_90: {status}")
            if proc.returncode:
                failed += 1
                print(proc.stdout + proc.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
