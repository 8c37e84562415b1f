"""Builds csrc/cuda/*.cu for the CPU: the CUDA kernel library's own sources, compiled by g++ against cudasim
(tests/cudasim/include/cudasim.h: CUDA's threads, barriers, warp collectives and runtime API on the host), as a
library with the same wk_cuda_* C ABI that weightkit._C.load_cuda opens. tests/test_cudasim.py runs the cuda
backend's tests on it, built with AddressSanitizer + UndefinedBehaviorSanitizer ("sanitize") where g++ has their
runtimes, else without ("plain").

Two rewrites make the sources valid C++ (both mechanical; the kernels' code is otherwise compiled as it is):
* ``kernel<<<grid, block, shared, stream>>>(args)`` becomes
  ``::cudasim::launch("kernel", kernel, grid, block, shared, stream)(args)``;
* ``__shared__ T name[...];`` becomes ``static T name[...]; ::cudasim::shared_region(&name, sizeof(name));``
  (per-block poisoning of shared memory).

``python -m tests.cudasim.build [plain|sanitize]`` prints the library's path. Builds are cached under
build/cudasim/ by a hash of the sources, the simulator and the flags.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Callable, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CSRC = os.path.join(ROOT, "csrc")
INCLUDE = os.path.join(HERE, "include")
BUILD_DIR = os.path.join(ROOT, "build", "cudasim")
LIBRARY = "libweightkit_cuda_sim.so"
SELFTEST_LIBRARY = "libcudasim_selftest.so"
REPORT = os.path.join(HERE, "report.cpp")
SELFTEST = os.path.join(HERE, "selftest.cu")

# -ffp-contract=off as the real build (results bit for bit the reference's); -fno-strict-aliasing: the kernels read a
# uint4's bytes as other types, as CUDA code does
COMMON_FLAGS = ["-std=c++20", "-fPIC", "-shared", "-pthread", "-g", "-ffp-contract=off", "-fno-strict-aliasing",
                "-Wall", "-Wno-unknown-pragmas", "-Wno-unused-function", '-DWK_CUDA_ARCHS="cudasim"']
VARIANTS: Dict[str, List[str]] = {
    "plain": ["-O1"],
    # alignment is part of undefined; bool catches a poisoned (never written) __shared__ flag
    "sanitize": ["-O1", "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"],
}


def _match_back(text: str, end: int) -> int:
    """The start of the kernel expression that ends at ``end`` (exclusive): a name, maybe qualified, maybe with
    template arguments."""
    i = end
    while i > 0 and text[i - 1].isspace():
        i -= 1
    if text[i - 1] == ">":  # template arguments: walk back to the matching '<'
        depth = 0
        while True:
            i -= 1
            c = text[i]
            if c == ">":
                depth += 1
            elif c == "<":
                depth -= 1
                if depth == 0:
                    break
    while i > 0 and (text[i - 1].isalnum() or text[i - 1] in "_:"):
        i -= 1
    return i


def rewrite_launches(text: str, filename: str = "") -> str:
    """Every ``kernel<<<config>>>(`` as ``::cudasim::launch("file:line kernel", kernel, config)(``: the launch
    site names the launch in cudasim's counts (``cudasim_launch_counts``) and messages."""
    out = text
    while True:
        at = out.find("<<<")
        if at < 0:
            return out
        close = out.index(">>>", at)
        start = _match_back(out, at)
        kernel = out[start:at].strip()
        if not kernel:
            raise ValueError(f"no kernel before <<< at offset {at}")
        config = out[at + 3:close]
        name = f"{filename}:{out.count(chr(10), 0, at) + 1} {' '.join(kernel.split())}"
        out = f'{out[:start]}::cudasim::launch("{name}", {kernel}, {config}){out[close + 3:]}'


_SHARED = re.compile(r"__shared__\s+([^;]*?)\s*\b(\w+)\s*((?:\[[^\]]*\]\s*)*);")


def rewrite_shared(text: str) -> str:
    return _SHARED.sub(lambda m: f"static {m.group(1)} {m.group(2)}{m.group(3)}; "
                                 f"::cudasim::shared_region(&{m.group(2)}, sizeof({m.group(2)}));", text)


def rewrite(text: str, filename: str = "") -> str:
    return rewrite_shared(rewrite_launches(text, filename))


def launch_sites() -> List[str]:
    """The names of every launch site of csrc/cuda (as cudasim counts them)."""
    sites = []
    for path in sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")) + glob.glob(os.path.join(CSRC, "cuda", "*.cuh"))):
        with open(path) as f:
            text = rewrite_launches(f.read(), os.path.basename(path))
        sites += re.findall(r'::cudasim::launch\("([^"]*)"', text)
    return sites


def _digest(paths: List[str], variant: str) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(os.path.relpath(path, ROOT).encode())
        with open(path, "rb") as f:
            digest.update(f.read())
    digest.update(" ".join(COMMON_FLAGS + VARIANTS[variant]).encode())
    return digest.hexdigest()[:16]


def _simulator_files() -> List[str]:
    return sorted(glob.glob(os.path.join(INCLUDE, "*"))) + [__file__]


def library_path(variant: str) -> str:
    inputs = sorted(glob.glob(os.path.join(CSRC, "cuda", "*"))) + [os.path.join(CSRC, "philox.h"),
                                                                   os.path.join(CSRC, "weightkit.h"), REPORT]
    return os.path.join(BUILD_DIR, f"{variant}-{_digest(inputs + _simulator_files(), variant)}", LIBRARY)


def selftest_path(variant: str) -> str:
    return os.path.join(BUILD_DIR, f"{variant}-{_digest([SELFTEST] + _simulator_files(), variant)}", SELFTEST_LIBRARY)


def _compile(sources: List[str], out: str, variant: str, cxx: str) -> None:
    cxx = cxx or os.environ.get("CXX", "g++")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    partial = out + f".{os.getpid()}.tmp"
    cmd = [cxx, *COMMON_FLAGS, *VARIANTS[variant], f"-I{INCLUDE}", "-x", "c++", *sources, "-o", partial]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"cudasim build failed ({' '.join(cmd)}):\n{proc.stderr[-8000:]}")
    os.replace(partial, out)


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")


def _stage(path: str, dst_dir: str) -> str:
    """``path`` copied into ``dst_dir``, rewritten if it is CUDA source; the copy's path."""
    with open(path) as f:
        text = f.read()
    dst = os.path.join(dst_dir, os.path.basename(path))
    with open(dst, "w") as f:
        f.write(rewrite(text, os.path.basename(path)) if path.endswith((".cu", ".cuh")) else text)
    return dst


def _build_once(out: str, variant: str, cxx: str, stage: Callable[[str], List[str]]) -> str:
    """``out``, compiled from the sources ``stage(tmp)`` writes into a temporary folder, unless it exists."""
    if not os.path.exists(out):
        with tempfile.TemporaryDirectory(prefix="cudasim-") as tmp:
            _compile(stage(tmp), out, variant, cxx)
    return out


def build(variant: str = "plain", cxx: str = "") -> str:
    """The simulated CUDA library's path, built if missing (20-50 s on 2 cores)."""
    _check_variant(variant)

    def stage(tmp: str) -> List[str]:
        cuda = os.path.join(tmp, "csrc", "cuda")  # the layout of csrc/: the sources include "../philox.h"
        os.makedirs(cuda)
        for name in ("philox.h", "weightkit.h"):
            shutil.copy(os.path.join(CSRC, name), os.path.dirname(cuda))
        staged = [_stage(path, cuda) for path in sorted(glob.glob(os.path.join(CSRC, "cuda", "*")))]
        return [path for path in staged if path.endswith(".cu")] + [REPORT]

    return _build_once(library_path(variant), variant, cxx, stage)


def build_selftest(variant: str = "plain", cxx: str = "") -> str:
    """The library of tests/cudasim/selftest.cu (cudasim's own tests), built if missing."""
    _check_variant(variant)
    return _build_once(selftest_path(variant), variant, cxx, lambda tmp: [_stage(SELFTEST, tmp)])


if __name__ == "__main__":
    variant = sys.argv[1] if len(sys.argv) > 1 else "plain"
    print(build_selftest(variant) if "--selftest" in sys.argv else build(variant))
