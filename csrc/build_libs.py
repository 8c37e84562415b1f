"""The build of weightkit's compiled code, as a ninja file (used by setup.py, scripts/compile_cuda.py, build_wheel.sh).

Two outputs:

* ``weightkit._C`` (``_C<EXT_SUFFIX>``, e.g. ``_C.cpython-311-x86_64-linux-gnu.so``): the pybind11 binding
  (csrc/bind.cpp) with the CPU kernels (csrc/cpu/*.cpp) compiled in. No torch, no libtorch: one build serves every
  torch release; it is a CPython extension, so one build per Python version.
* ``libweightkit_cuda.so`` (optional): csrc/cuda/*.cu with nvcc, the CUDA runtime linked statically
  (``-cudart static``), SASS for each requested architecture plus PTX for the newest, so later GPUs JIT-compile it.
  _C opens it at run time (csrc/bind.cpp explains why).

ninja does the scheduling: it compiles in parallel (``MAX_JOBS`` caps the jobs, default: ninja's own choice), rebuilds
only what changed (a source, any header it includes: compiler depfiles; or the command line: ninja's log), and writes
``build/compile_commands.json`` for editors (``ninja -t compdb``; clangd finds it under build/). ninja is the
``ninja`` PyPI package (a build requirement) or any ninja on PATH.

Flags. The kernels: no fused multiply-add (-ffp-contract=off, nvcc --fmad=false: they round like the reference, bit
for bit), -fno-exceptions -fno-rtti (no C++ runtime inside a kernel). The binding needs exceptions (pybind11).
_C links libstdc++ dynamically: torch has loaded it already in every process that imports weightkit, pybind11 then
shares one C++ runtime with torch's own pybind11 modules, and a static libstdc++ (GCC 12) would pull in
std::random_device's arc4random and raise the glibc floor to 2.36 (with libstdc++.so.6 _C needs glibc 2.34 and
GLIBCXX_3.4.29, within manylinux_2_34, the CUDA library's floor). The CUDA library links libstdc++ statically with
its symbols hidden (``--exclude-libs``) and the unwinder from the system's libgcc_s.so.1 (a static libgcc_eh would
bind to glibc 2.35's _dl_find_object on this machine). _C exports only PyInit__C (csrc/module.map), the CUDA library
only its wk_* functions (csrc/exports.map).
"""

from __future__ import annotations

import glob
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
from typing import List, Optional, Sequence

CSRC = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(CSRC)
BUILD_DIR = os.path.join(ROOT, "build", "ninja")

KERNEL_CXX_FLAGS = ["-O3", "-std=c++20", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-fvisibility=hidden",
                    "-pthread", "-fno-exceptions", "-fno-rtti", "-Wall", "-Wno-unused-function"]
BIND_CXX_FLAGS = ["-O2", "-std=c++20", "-fPIC", "-fvisibility=hidden", "-Wall"]
MODULE_MAP = os.path.join(CSRC, "module.map")
EXPORTS = os.path.join(CSRC, "exports.map")
LINK_RUNTIME = ["-static-libstdc++", "-shared-libgcc"]
# No -z defs for _C: a CPython extension resolves the Python C API from the interpreter that loads it.
MODULE_LINK_FLAGS = ["-shared-libgcc", "-pthread", "-Wl,--as-needed", f"-Wl,--version-script={MODULE_MAP}"]
# --fmad=false: no fused multiply-add on the GPU either (the kernels use __fmul_rn/__fadd_rn where it matters).
NVCC_FLAGS = ["-O3", "-std=c++20", "--fmad=false", "-lineinfo", "--expt-relaxed-constexpr",
              "-Xcompiler", "-fPIC,-fvisibility=hidden,-ffp-contract=off"]
CUDA_LINK_FLAGS = (["-cudart", "static", "-Xcompiler", ",".join(LINK_RUNTIME)]
                   + ["-Xlinker", "--exclude-libs,ALL", "-Xlinker", "-z,defs", "-Xlinker", "--as-needed",
                      "-Xlinker", f"--version-script={EXPORTS}"])
DEFAULT_CUDA_ARCHS = ("80", "90", "100")

CUDA_LIB = "libweightkit_cuda.so"


def module_filename() -> str:
    """_C's file name for this Python (``_C.cpython-311-x86_64-linux-gnu.so``)."""
    return "_C" + sysconfig.get_config_var("EXT_SUFFIX")


def cpu_sources() -> List[str]:
    return sorted(glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))


def cuda_sources() -> List[str]:
    return sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))


def find_ninja() -> str:
    try:
        import ninja  # the PyPI package: its binary, whatever PATH holds

        path = os.path.join(ninja.BIN_DIR, "ninja")
        if os.path.exists(path):
            return path
    except ImportError:
        pass
    path = shutil.which("ninja")
    if path is None:
        raise RuntimeError("ninja not found: `pip install ninja` (a build requirement of weightkit: pyproject.toml)")
    return path


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


def cuda_flags(archs: Sequence[str]) -> List[str]:
    return NVCC_FLAGS + cuda_gencode(archs) + [f"-I{CSRC}", f'-DWK_CUDA_ARCHS="{";".join(archs)}"']


def _q(args: Sequence[str]) -> str:
    return " ".join(shlex.quote(a) for a in args)


def _path(p: str) -> str:
    return p.replace(" ", "$ ").replace(":", "$:")


def _obj(build_dir: str, kind: str, src: str) -> str:
    return os.path.join(build_dir, "obj", kind, os.path.relpath(src, CSRC).replace(os.sep, "_") + ".o")


def write_ninja(build_dir: str, *, module_out: Optional[str], cuda_out: Optional[str] = None,
                cuda_archs: Sequence[str] = (), nvcc: Optional[str] = None, cuda_compile_only: bool = False) -> str:
    """Write ``build_dir/build.ninja`` for _C (to ``module_out``) and, with ``cuda_out``, the CUDA library; with
    ``cuda_compile_only`` only the CUDA objects (a compile check). Returns the file's path."""
    cxx = os.environ.get("CXX", "g++")
    lines = [f"# generated by {os.path.relpath(__file__, ROOT)}: do not edit", "ninja_required_version = 1.10",
             f"cxx = {cxx}", ""]
    lines += ["rule cxx", "  command = $cxx -MMD -MF $out.d $flags -c $in -o $out", "  depfile = $out.d",
              "  deps = gcc", "  description = CXX $in", ""]
    lines += ["rule link_module", "  command = $cxx -shared -o $out $in $ldflags", "  description = LINK $out", ""]
    targets = []
    if module_out is not None:
        import pybind11

        include = [f"-I{CSRC}", f"-I{sysconfig.get_paths()['include']}", f"-I{pybind11.get_include()}"]
        objects = []
        for src in cpu_sources():
            obj = _obj(build_dir, "cpu", src)
            objects.append(obj)
            lines += [f"build {_path(obj)}: cxx {_path(src)}", f"  flags = {_q(KERNEL_CXX_FLAGS + [f'-I{CSRC}'])}"]
        bind_src = os.path.join(CSRC, "bind.cpp")
        bind_obj = _obj(build_dir, "bind" + sysconfig.get_config_var("EXT_SUFFIX").replace(".so", ""), bind_src)
        objects.append(bind_obj)
        lines += [f"build {_path(bind_obj)}: cxx {_path(bind_src)}", f"  flags = {_q(BIND_CXX_FLAGS + include)}"]
        lines += [f"build {_path(module_out)}: link_module {' '.join(map(_path, objects))} | {_path(MODULE_MAP)}",
                  f"  ldflags = {_q(MODULE_LINK_FLAGS)}", ""]
        targets.append(module_out)
    if cuda_out is not None or cuda_compile_only:
        nvcc = nvcc or find_nvcc()
        if nvcc is None:
            raise RuntimeError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
        lines += [f"nvcc = {nvcc}", "rule nvcc", "  command = $nvcc -MD -MF $out.d $flags -c $in -o $out",
                  "  depfile = $out.d", "  deps = gcc", "  description = NVCC $in", "",
                  "rule link_cuda", "  command = $nvcc -shared -o $out $in $ldflags", "  description = LINK $out", ""]
        objects = []
        tag = "cuda-" + "-".join(cuda_archs)
        for src in cuda_sources():
            obj = _obj(build_dir, tag, src)
            objects.append(obj)
            check = ["--resource-usage"] if cuda_compile_only else []  # ptxas' registers and spills, per kernel
            lines += [f"build {_path(obj)}: nvcc {_path(src)}", f"  flags = {_q(cuda_flags(cuda_archs) + check)}"]
        if cuda_compile_only:
            targets += objects
        else:
            lines += [f"build {_path(cuda_out)}: link_cuda {' '.join(map(_path, objects))} | {_path(EXPORTS)}",
                      f"  ldflags = {_q(CUDA_LINK_FLAGS)}", ""]
            targets.append(cuda_out)
    lines += [f"default {' '.join(map(_path, targets))}", ""]
    os.makedirs(build_dir, exist_ok=True)
    path = os.path.join(build_dir, "build.ninja")
    text = "\n".join(lines)
    if not os.path.exists(path) or open(path).read() != text:  # unchanged: keep its mtime (no ninja regeneration)
        with open(path, "w") as f:
            f.write(text)
    return path


def run_ninja(build_dir: str, *, verbose: bool = False, keep_going: bool = False) -> subprocess.CompletedProcess:
    """Build the default targets of build_dir/build.ninja; raises with the compiler's output on failure."""
    ninja = find_ninja()
    cmd = [ninja, "-C", build_dir]
    if os.environ.get("MAX_JOBS"):
        cmd += ["-j", os.environ["MAX_JOBS"]]
    if keep_going:
        cmd += ["-k", "0"]
    if verbose:
        cmd.append("-v")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if verbose or proc.returncode:
        sys.stdout.write(proc.stdout)
        sys.stderr.write(proc.stderr)
    if proc.returncode:
        raise RuntimeError(f"ninja failed ({proc.returncode}) in {build_dir}:\n{proc.stdout}{proc.stderr}")
    return proc


def write_compile_commands(build_dir: str, dest: str) -> None:
    """``ninja -t compdb`` of the compile rules into ``dest`` (editors: clangd finds build/compile_commands.json)."""
    proc = subprocess.run([find_ninja(), "-C", build_dir, "-t", "compdb", "cxx", "nvcc"], capture_output=True,
                          text=True, check=True)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    with open(dest, "w") as f:
        f.write(proc.stdout)


def build(*, module_out: Optional[str], cuda_out: Optional[str] = None, cuda_archs: Sequence[str] = (),
          build_dir: str = BUILD_DIR, verbose: bool = False) -> None:
    """Build _C to ``module_out`` and (optionally) the CUDA library to ``cuda_out``, incrementally."""
    write_ninja(build_dir, module_out=module_out, cuda_out=cuda_out, cuda_archs=list(cuda_archs))
    run_ninja(build_dir, verbose=verbose)
    write_compile_commands(build_dir, os.path.join(ROOT, "build", "compile_commands.json"))
