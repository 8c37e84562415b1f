"""Build weightkit, with the compiled extension weightkit._C when torch is importable at build time.

* C++ CPU kernels (csrc/ops.cpp, csrc/cpu/*.cpp) are always compiled, with ninja.
* CUDA kernels (csrc/cuda/*.cu) are added when the build's torch has CUDA and nvcc is found
  (WEIGHTKIT_WITH_CUDA=0/1 overrides the detection).
* WEIGHTKIT_NO_EXTENSION=1 builds a pure-Python package; it still works (reference and Triton backends).

The extension links against the torch it was built with, so build without isolation against the torch you run:
``pip install --no-build-isolation .`` (pyproject.toml pins torch==2.13.0 for isolated builds).
"""

import glob
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def extension_build():
    if os.environ.get("WEIGHTKIT_NO_EXTENSION") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp", root_dir=HERE))
    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None
    if os.environ.get("WEIGHTKIT_WITH_CUDA") in ("0", "1"):
        with_cuda = os.environ["WEIGHTKIT_WITH_CUDA"] == "1"
    cxx = ["-O3", "-std=c++20", "-ffp-contract=off", "-fno-math-errno"]  # no fma: kernels match the reference bitwise; no errno: sqrt vectorizes
    extra = {"cxx": cxx}
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu", root_dir=HERE))
        extra["nvcc"] = ["-O3", "-std=c++20", "--fmad=false", "-DWEIGHTKIT_WITH_CUDA", "-lineinfo"]
        extra["cxx"] = cxx + ["-DWEIGHTKIT_WITH_CUDA"]
        ext = CUDAExtension("weightkit._C", sources, extra_compile_args=extra, py_limited_api=False)
    else:
        ext = CppExtension("weightkit._C", sources, extra_compile_args=extra)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_build()

setup(
    packages=find_packages(include=["weightkit", "weightkit.*"]),
    package_data={"weightkit": ["py.typed"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
