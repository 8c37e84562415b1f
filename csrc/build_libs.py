"""Build weightkit's two kernel libraries from csrc/ (used by setup.py, scripts/compile_cuda.py, build_wheel.sh).

* ``libweightkit_cpu.so``: csrc/cpu/*.cpp with g++ (or $CXX) alone: no torch, no Python, no OpenMP headers.
* ``libweightkit_cuda.so``: csrc/cuda/*.cu with nvcc, the CUDA runtime linked statically (``-cudart static``), SASS
  for each requested architecture plus PTX for the newest, so later GPUs JIT-compile it.

The CPU library uses no C++ runtime (no exceptions, no RTTI, pthreads directly) and links libgcc statically; the CUDA
library links libstdc++/libgcc statically with their symbols hidden (``--exclude-libs``). Both then need only glibc
(and the CUDA driver, which the runtime loads at run time), which is what makes one build loadable under any torch
and a manylinux wheel. Only the ``wk_*`` functions of csrc/weightkit.h are exported (csrc/exports.map).

Objects are cached under ``build/native/`` and rebuilt when a source, any csrc header or the flags change.
"""

from __future__ import annotations

import concurrent.futures
import glob
import hashlib
import os
import shutil
import subprocess
from typing import List, Optional, Sequence

CSRC = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(CSRC)

# -ffp-contract=off: no fused multiply-add, so the kernels round every product and sum like the reference (bit
# identity); -fno-math-errno: sqrt vectorizes; -fvisibility=hidden: only WK_API functions are exported.
# -fno-exceptions -fno-rtti: no C++ runtime is linked at all (csrc/cpu/parallel.cpp uses pthreads directly).
CXX_FLAGS = ["-O3", "-std=c++20", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-fvisibility=hidden", "-pthread",
             "-fno-exceptions", "-fno-rtti", "-Wall", "-Wno-unused-function"]
EXPORTS = os.path.join(CSRC, "exports.map")
HOST_LINK_FLAGS = ["-static-libstdc++", "-static-libgcc", "-Wl,--exclude-libs,ALL", "-Wl,-z,defs", "-Wl,--as-needed",
                   f"-Wl,--version-script={EXPORTS}"]
# --fmad=false: no fused multiply-add on the GPU either (the kernels use __fmul_rn/__fadd_rn where it matters).
NVCC_FLAGS = ["-O3", "-std=c++20", "--fmad=false", "-lineinfo", "--expt-relaxed-constexpr",
              "-Xcompiler", "-fPIC,-fvisibility=hidden,-ffp-contract=off"]
DEFAULT_CUDA_ARCHS = ("80", "90", "100")

CPU_LIB = "libweightkit_cpu.so"
CUDA_LIB = "libweightkit_cuda.so"


def cpu_sources() -> List[str]:
    return sorted(glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))


def cuda_sources() -> List[str]:
    return sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))


def _headers() -> List[str]:
    return sorted(glob.glob(os.path.join(CSRC, "**", "*.h"), recursive=True)
                  + glob.glob(os.path.join(CSRC, "**", "*.cuh"), recursive=True) + [EXPORTS, __file__])


def find_nvcc() -> Optional[str]:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        return os.path.join(cuda_home, "bin", "nvcc")
    return shutil.which("nvcc")


def nvcc_supports(nvcc: str, arch: str) -> bool:
    out = subprocess.run([nvcc, "--list-gpu-code"], capture_output=True, text=True)
    return out.returncode == 0 and f"sm_{arch}" in out.stdout.split()


def parse_archs(spec: str) -> List[str]:
    """'8.0;9.0+PTX 10.0' or '80,90' -> ['80', '90', '100'] (TORCH_CUDA_ARCH_LIST's spelling is accepted)."""
    archs = []
    for item in spec.replace(",", ";").replace(" ", ";").split(";"):
        item = item.strip().replace("+PTX", "").replace("sm_", "")
        if item:
            archs.append(item.replace(".", ""))
    return archs


def cuda_gencode(archs: Sequence[str]) -> List[str]:
    flags = []
    for arch in archs:
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    newest = max(archs, key=int)
    flags += ["-gencode", f"arch=compute_{newest},code=compute_{newest}"]  # PTX: later GPUs JIT-compile it
    return flags


def _stale(obj: str, deps: Sequence[str]) -> bool:
    if not os.path.exists(obj):
        return True
    built = os.path.getmtime(obj)
    return any(os.path.getmtime(d) > built for d in deps)


def _run(cmd: List[str], verbose: bool) -> None:
    if verbose:
        print(" ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout}{proc.stderr}")


def _compile_all(jobs: List[List[str]], verbose: bool) -> None:
    workers = int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for future in [pool.submit(_run, cmd, verbose) for cmd in jobs]:
            future.result()


def _object_dir(kind: str, flags: Sequence[str], build_dir: str) -> str:
    tag = hashlib.sha1(" ".join(flags).encode()).hexdigest()[:10]
    path = os.path.join(build_dir, f"{kind}-{tag}")
    os.makedirs(path, exist_ok=True)
    return path


def build_cpu(out_path: str, *, build_dir: Optional[str] = None, verbose: bool = False) -> str:
    """Compile and link libweightkit_cpu.so to ``out_path``; returns it."""
    cxx = os.environ.get("CXX", "g++")
    flags = CXX_FLAGS + [f"-I{CSRC}"]
    objdir = _object_dir("cpu", [cxx] + flags, build_dir or os.path.join(ROOT, "build", "native"))
    headers, jobs, objects = _headers(), [], []
    for src in cpu_sources():
        obj = os.path.join(objdir, os.path.basename(src) + ".o")
        objects.append(obj)
        if _stale(obj, [src] + headers):
            jobs.append([cxx, "-c", src, "-o", obj] + flags)
    _compile_all(jobs, verbose)
    if jobs or _stale(out_path, objects):
        os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
        _run([cxx, "-shared", "-o", out_path] + objects + ["-pthread"] + HOST_LINK_FLAGS, verbose)
    return out_path


def cuda_compile_command(src: str, obj: str, archs: Sequence[str], nvcc: str) -> List[str]:
    arch_list = ";".join(archs)
    return ([nvcc, "-c", src, "-o", obj] + NVCC_FLAGS + cuda_gencode(archs)
            + [f"-I{CSRC}", f'-DWK_CUDA_ARCHS="{arch_list}"'])


def build_cuda(out_path: str, archs: Sequence[str], *, nvcc: Optional[str] = None, build_dir: Optional[str] = None,
               verbose: bool = False) -> str:
    """Compile and link libweightkit_cuda.so for ``archs`` (e.g. ['80', '90']) to ``out_path``; returns it."""
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    archs = list(archs)
    probe = cuda_compile_command("x.cu", "x.o", archs, nvcc)
    objdir = _object_dir("cuda", probe, build_dir or os.path.join(ROOT, "build", "native"))
    headers, jobs, objects = _headers(), [], []
    for src in cuda_sources():
        obj = os.path.join(objdir, os.path.basename(src) + ".o")
        objects.append(obj)
        if _stale(obj, [src] + headers):
            jobs.append(cuda_compile_command(src, obj, archs, nvcc))
    _compile_all(jobs, verbose)
    if jobs or _stale(out_path, objects):
        os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
        link = [nvcc, "-shared", "-o", out_path] + objects + ["-cudart", "static"]
        # libstdc++ static (its symbols hidden), the unwinder from the system's libgcc_s.so.1: a static libgcc_eh
        # would bind to glibc 2.35's _dl_find_object on this machine and raise the library's glibc floor to 2.35
        link += ["-Xcompiler", "-static-libstdc++,-shared-libgcc"]
        link += ["-Xlinker", "--exclude-libs,ALL", "-Xlinker", "-z,defs", "-Xlinker", "--as-needed",
                 "-Xlinker", f"--version-script={EXPORTS}"]
        _run(link, verbose)
    return out_path
