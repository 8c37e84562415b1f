"""Build weightkit with its compiled kernels (csrc/build_libs.py writes the ninja file, ninja compiles):

* ``weightkit/_C<EXT_SUFFIX>``: the pybind11 module over csrc/weightkit.h with the CPU kernels compiled in, always,
  with g++ alone (no torch needed to build; pybind11 and ninja are build requirements);
* ``weightkit/lib/libweightkit_cuda.so``: the CUDA kernels, when nvcc is found and either the installed torch has
  CUDA or ``WEIGHTKIT_WITH_CUDA=1`` (``WEIGHTKIT_WITH_CUDA=0`` skips them). Architectures: ``WEIGHTKIT_CUDA_ARCHS``
  or ``TORCH_CUDA_ARCH_LIST`` (e.g. "80;90"), else the visible GPU's, else sm_80, sm_90 and sm_100 (those nvcc
  supports), plus PTX of the newest. _C opens it at run time.
* ``WEIGHTKIT_NO_EXTENSION=1`` builds a pure-Python package; it still works (reference and Triton backends).

Neither links libtorch (see csrc/bind.cpp), so one build serves every torch release; _C is a CPython extension, so
the wheel is tagged per Python version (cp3xx-cp3xx-<platform>; scripts/build_wheel.sh retags it manylinux).
Objects and the ninja file live under build/ninja/ (incremental); build/compile_commands.json is for editors.
"""

import importlib.util
import os
import shutil

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("weightkit_build_libs", os.path.join(HERE, "csrc", "build_libs.py"))
build_libs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_libs)


class CompiledOutput(Extension):
    """A file that ninja builds (csrc/build_libs.py): the module weightkit._C or the CUDA kernel library."""

    def __init__(self, name: str, kind: str, archs=()):
        super().__init__(name, sources=[])
        self.kind = kind
        self.archs = list(archs)


class BuildWithNinja(build_ext):
    """One ninja run builds every output (in parallel, incrementally); build_extension then copies each into place."""

    def get_ext_filename(self, fullname):
        # called with the full name and (by get_ext_fullpath) with the last component alone: ext_map knows both
        ext = getattr(self, "ext_map", {}).get(fullname)
        if (isinstance(ext, CompiledOutput) and ext.kind == "cuda") or fullname.startswith("weightkit.lib."):
            return os.path.join(*fullname.split(".")) + ".so"  # libweightkit_cuda.so, no Python ABI suffix
        return super().get_ext_filename(fullname)

    def run(self):
        # build/lib is reused between builds: drop a compiled file this build does not make (e.g. the CUDA library of
        # an earlier `make wheel-cuda`, or the ctypes-era libweightkit_cpu.so), so that a wheel holds exactly what
        # was built now
        wanted = {self.get_ext_filename(e.name) for e in self.extensions}
        for folder in ("weightkit", os.path.join("weightkit", "lib")):
            path = os.path.join(self.build_lib, folder)
            for name in os.listdir(path) if os.path.isdir(path) else ():
                if name.endswith(".so") and os.path.join(folder, name) not in wanted:
                    os.remove(os.path.join(path, name))
        outputs = {e.kind: os.path.join(build_libs.BUILD_DIR, "out", os.path.basename(self.get_ext_filename(e.name)))
                   for e in self.extensions}
        if self.extensions:
            cuda = [e for e in self.extensions if e.kind == "cuda"]
            build_libs.build(module_out=outputs.get("module"), cuda_out=outputs.get("cuda"),
                             cuda_archs=cuda[0].archs if cuda else (), verbose=self.verbose > 1)
        self._ninja_outputs = outputs
        super().run()

    def copy_extensions_to_source(self):  # editable installs: into the checkout (weightkit/lib/ may not exist yet)
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            inplace_file, regular_file = self._get_inplace_equivalent(build_py, ext)
            _replace_file(regular_file, inplace_file)

    def build_extension(self, ext):
        _replace_file(self._ninja_outputs[ext.kind], self.get_ext_fullpath(ext.name))


def _replace_file(src: str, dst: str) -> None:
    """A copy of src renamed over dst: a process that has the old dst loaded (a test run while rebuilding) keeps an
    intact mapping, where an in-place overwrite would change the code under it."""
    os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
    tmp = f"{dst}.tmp{os.getpid()}"
    shutil.copyfile(src, tmp)
    shutil.copymode(src, tmp)
    os.replace(tmp, dst)


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


def compiled_outputs():
    if os.environ.get("WEIGHTKIT_NO_EXTENSION") == "1":
        return []
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        raise RuntimeError("a C++ compiler (g++, or $CXX) is needed to build weightkit's CPU kernels; "
                           "WEIGHTKIT_NO_EXTENSION=1 builds without them")
    outputs = [CompiledOutput("weightkit._C", "module")]
    if _with_cuda():
        outputs.append(CompiledOutput("weightkit.lib.libweightkit_cuda", "cuda", _cuda_archs()))
    return outputs


setup(
    # The Triton kernels live in the top-level kernels/ folder and install as weightkit.kernels (an editable install
    # maps the name to the folder; a wheel holds weightkit/kernels/).
    packages=find_packages(include=["weightkit", "weightkit.*"]) + ["weightkit.kernels"],
    package_dir={"weightkit.kernels": "kernels"},
    package_data={"weightkit": ["py.typed", "auto_choices.json"]},
    ext_modules=compiled_outputs(),
    cmdclass={"build_ext": BuildWithNinja},
)
