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
        else:
            print(spill_summary(proc.stdout + proc.stderr))
    return 1 if failed or proc.returncode else 0


def spill_summary(ptxas_output: str) -> str:
    """One line from ptxas' --resource-usage output: how many kernels compiled, and those that spill registers to
    local memory (bytes a thread), demangled where c++filt exists."""
    import re
    import shutil

    spills, kernels, current = {}, set(), None
    for line in ptxas_output.splitlines():
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            current = m.group(1)
            kernels.add(current)
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and current and (int(m.group(1)) or int(m.group(2))):
            spills[current] = max(spills.get(current, 0), int(m.group(1)))
    names = {k: k for k in spills}
    if spills and shutil.which("c++filt"):
        out = subprocess.run(["c++filt"], input="\n".join(spills), capture_output=True, text=True).stdout.split("\n")
        for k, d in zip(spills, out):  # "void weightkit::(anonymous namespace)::name<...>(...)" -> name
            m = re.match(r"(?:void\s+)?([\w:]+)", d.replace("(anonymous namespace)::", ""))
            names[k] = m.group(1).split("::")[-1] if m else k
    by_name = {}
    for k, b in spills.items():
        by_name[names[k]] = max(by_name.get(names[k], 0), b)
    listed = ", ".join(f"{n} {b} B" for n, b in sorted(by_name.items()))
    return (f"compile_cuda: ptxas resource usage of {len(kernels)} functions: "
            + (f"{len(spills)} spill registers (stores a thread, most per kernel: {listed})" if spills else
               "no register spills"))


if __name__ == "__main__":
    sys.exit(main())
