"""Build weightkit with its two kernel libraries (csrc/build_libs.py does the compiling):

* ``weightkit/lib/libweightkit_cpu.so``: the C++ CPU kernels, always, with g++ alone (no torch needed to build);
* ``weightkit/lib/libweightkit_cuda.so``: the CUDA kernels, when nvcc is found and either the installed torch has
  CUDA or ``WEIGHTKIT_WITH_CUDA=1`` (``WEIGHTKIT_WITH_CUDA=0`` skips them). Architectures: ``WEIGHTKIT_CUDA_ARCHS``
  or ``TORCH_CUDA_ARCH_LIST`` (e.g. "80;90"), else the visible GPU's, else sm_80, sm_90 and sm_100 (those nvcc
  supports), plus PTX of the newest.
* ``WEIGHTKIT_NO_EXTENSION=1`` builds a pure-Python package; it still works (reference and Triton backends).

The libraries link neither libtorch nor Python (plain C ABI, loaded with ctypes by weightkit/native.py), so one
build serves every torch release and Python 3 version: the wheel is tagged ``py3-none-<platform>``
(scripts/build_wheel.sh retags it manylinux).
"""

import importlib.util
import os
import shutil

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

try:
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # setuptools < 70.1
    from wheel.bdist_wheel import bdist_wheel

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("weightkit_build_libs", os.path.join(HERE, "csrc", "build_libs.py"))
build_libs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_libs)


class KernelLibrary(Extension):
    """A plain shared library (not a Python extension module) built by csrc/build_libs.py."""

    def __init__(self, name: str, kind: str, archs=()):
        super().__init__(name, sources=[])
        self.kind = kind
        self.archs = list(archs)


class BuildKernelLibraries(build_ext):
    def get_ext_filename(self, fullname):
        ext = self.ext_map.get(fullname) if hasattr(self, "ext_map") else None
        if isinstance(ext, KernelLibrary) or fullname.startswith("weightkit.lib."):
            return os.path.join(*fullname.split(".")) + ".so"  # libweightkit_cpu.so, no Python ABI suffix
        return super().get_ext_filename(fullname)

    def run(self):
        # build/lib is reused between builds: drop a kernel library this build does not make (e.g. the CUDA one of an
        # earlier `make wheel-cuda`), so that a wheel holds exactly what was built now
        wanted = {self.get_ext_filename(e.name) for e in self.extensions if isinstance(e, KernelLibrary)}
        stale_dir = os.path.join(self.build_lib, "weightkit", "lib")
        for name in os.listdir(stale_dir) if os.path.isdir(stale_dir) else ():
            if os.path.join("weightkit", "lib", name) not in wanted:
                os.remove(os.path.join(stale_dir, name))
        # and the Python extension module weightkit._C of builds before the plain-C libraries (a checkout updated
        # in place keeps it in build/lib, from where bdist_wheel would pack it)
        pkg_dir = os.path.join(self.build_lib, "weightkit")
        for name in os.listdir(pkg_dir) if os.path.isdir(pkg_dir) else ():
            if name.startswith("_C.") and name.endswith(".so"):
                os.remove(os.path.join(pkg_dir, name))
        super().run()

    def copy_extensions_to_source(self):  # --inplace / editable: weightkit/lib/ may not exist yet
        for ext in self.extensions:
            if isinstance(ext, KernelLibrary):
                os.makedirs(os.path.join(HERE, os.path.dirname(self.get_ext_filename(ext.name))), exist_ok=True)
        super().copy_extensions_to_source()

    def build_extension(self, ext):
        if not isinstance(ext, KernelLibrary):
            return super().build_extension(ext)
        out = self.get_ext_fullpath(ext.name)
        if ext.kind == "cpu":
            build_libs.build_cpu(out, verbose=self.verbose > 1)
        else:
            build_libs.build_cuda(out, ext.archs, verbose=self.verbose > 1)


class PlatformWheel(bdist_wheel):
    """The wheel holds shared libraries but no Python extension: any Python 3, any ABI, this platform."""

    def finalize_options(self):
        super().finalize_options()
        self.root_is_pure = False

    def get_tag(self):
        _, _, plat = super().get_tag()
        return "py3", "none", plat


def _cuda_archs():
    spec = os.environ.get("WEIGHTKIT_CUDA_ARCHS") or os.environ.get("TORCH_CUDA_ARCH_LIST")
    if spec:
        return build_libs.parse_archs(spec)
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return [f"{major}{minor}"]
    except ImportError:
        pass
    nvcc = build_libs.find_nvcc()
    return [a for a in build_libs.DEFAULT_CUDA_ARCHS if build_libs.nvcc_supports(nvcc, a)]


def _with_cuda() -> bool:
    choice = os.environ.get("WEIGHTKIT_WITH_CUDA")
    if choice in ("0", "1"):
        return choice == "1"
    if build_libs.find_nvcc() is None:
        return False
    try:
        import torch
    except ImportError:
        return False
    return torch.version.cuda is not None


def kernel_libraries():
    if os.environ.get("WEIGHTKIT_NO_EXTENSION") == "1":
        return []
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        raise RuntimeError("a C++ compiler (g++, or $CXX) is needed to build weightkit's CPU kernels; "
                           "WEIGHTKIT_NO_EXTENSION=1 builds without them")
    libs = [KernelLibrary("weightkit.lib.libweightkit_cpu", "cpu")]
    if _with_cuda():
        libs.append(KernelLibrary("weightkit.lib.libweightkit_cuda", "cuda", _cuda_archs()))
    return libs


setup(
    # The Triton kernels live in the top-level kernels/ folder and install as weightkit.kernels (an editable install
    # maps the name to the folder; a wheel holds weightkit/kernels/).
    packages=find_packages(include=["weightkit", "weightkit.*"]) + ["weightkit.kernels"],
    package_dir={"weightkit.kernels": "kernels"},
    package_data={"weightkit": ["py.typed"]},
    ext_modules=kernel_libraries(),
    cmdclass={"build_ext": BuildKernelLibraries, "bdist_wheel": PlatformWheel},
)
