"""Compile csrc/cuda/*.cu for sm_90 with nvcc (the flags of the CUDA kernel library, csrc/build_libs.py), to catch
errors on machines without a GPU. Needs only nvcc: the CUDA sources include no torch header.

The files compile in parallel through the same ninja build as `pip install` (csrc/build_libs.py, `-k 0`: every file is
tried and reported); the objects go to a temporary folder and are thrown away: this is a compile check, run by the
test command when nvcc exists.
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
    wanted = [os.path.abspath(p) for p in sys.argv[1:]] or build_libs.cuda_sources()
    with tempfile.TemporaryDirectory() as tmp:
        build_libs.write_ninja(tmp, module_out=None, cuda_archs=["90"], nvcc=nvcc, cuda_compile_only=True)
        objects = {src: build_libs._obj(tmp, "cuda-90", src) for src in wanted}
        ninja = build_libs.find_ninja()
        cmd = [ninja, "-C", tmp, "-k", "0"] + (["-j", os.environ["MAX_JOBS"]] if os.environ.get("MAX_JOBS") else [])
        proc = subprocess.run(cmd + list(objects.values()), capture_output=True, text=True)
        failed = 0
        for src, obj in objects.items():
            ok = os.path.exists(obj)
            failed += not ok
            print(f"compile_cuda: {os.path.relpath(src, HERE)} for sm_90: {'ok' if ok else 'FAILED'}")
        if proc.returncode or failed:
            print(proc.stdout + proc.stderr)
    return 1 if failed or proc.returncode else 0


if __name__ == "__main__":
    sys.exit(main())
