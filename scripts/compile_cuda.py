"""Compile csrc/cuda/*.cu for sm_90 with nvcc (the flags of the CUDA kernel library, csrc/build_libs.py), to catch
errors on machines without a GPU. Needs only nvcc: the CUDA sources include no torch header.

The objects are thrown away: this is a compile check, run by the test command when nvcc exists.
Usage: python scripts/compile_cuda.py [csrc/cuda/file.cu ...]   (default: every csrc/cuda/*.cu)
"""

import importlib.util
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("weightkit_build_libs", os.path.join(HERE, "csrc", "build_libs.py"))
build_libs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_libs)


def main() -> int:
    nvcc = build_libs.find_nvcc()
    if nvcc is None:
        print("compile_cuda: nvcc not found, skipping the CUDA compile check")
        return 0
    sources = [os.path.abspath(p) for p in sys.argv[1:]] or build_libs.cuda_sources()
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for src in sources:
            obj = os.path.join(tmp, os.path.basename(src) + ".o")
            proc = subprocess.run(build_libs.cuda_compile_command(src, obj, ["90"], nvcc), capture_output=True, text=True)
            status = "ok" if proc.returncode == 0 else "FAILED"
            print(f"compile_cuda: {os.path.relpath(src, HERE)} for sm_90: {status}")
            if proc.returncode:
                failed += 1
                print(proc.stdout + proc.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
