"""Packaging: a built wheel holds the Python package, the Triton kernels (the top-level kernels/ folder, installed as
weightkit.kernels) and weightkit._C (the pybind11 module with the CPU kernels), tagged for this Python version (cp3xx,
like torch's wheels); an editable install finds the same files in the checkout; _C exports only its init function and
the CUDA library only the C ABI of csrc/weightkit.h, and neither needs torch; ninja's build is
incremental, tracks headers and writes compile_commands.json."""

import glob
import os
import subprocess
import sys
import zipfile

import pytest

from weightkit import native

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc"))
import build_libs  # noqa: E402  (csrc/build_libs.py: the ninja build)

sys.path.pop(0)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL_FILES = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "kernels", "*.py")))
# where the wheel holds them: the package weightkit.kernels
KERNEL_SOURCES = [f"weightkit/kernels/{name}" for name in KERNEL_FILES]


def test_kernels_are_a_top_level_package_folder():
    folder = os.path.join(ROOT, "kernels")
    assert not os.path.islink(folder) and os.path.isfile(os.path.join(folder, "__init__.py"))
    assert len(KERNEL_FILES) >= 5, KERNEL_FILES
    assert not os.path.exists(os.path.join(ROOT, "weightkit", "kernels")), "one home for the Triton kernels: kernels/"


@pytest.fixture(scope="module")
def cpu_wheel(tmp_path_factory):
    pytest.importorskip("setuptools")
    pytest.importorskip("wheel")
    out = tmp_path_factory.mktemp("wheel")
    env = dict(os.environ, WEIGHTKIT_WITH_CUDA="0")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", "-w",
                           str(out), ROOT], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = glob.glob(str(out / "weightkit-*.whl"))
    return wheel


def test_wheel_holds_package_kernels_and_library(cpu_wheel):
    names = set(zipfile.ZipFile(cpu_wheel).namelist())
    for src in KERNEL_SOURCES:
        assert src in names, f"{src} missing from {os.path.basename(cpu_wheel)}"
    for path in ("weightkit/__init__.py", "weightkit/native.py", "weightkit/ops/_registry.py", "weightkit/py.typed",
                 "weightkit/backends/cpu/int8.py", "weightkit/backends/cuda/int8.py", "weightkit/backends/triton/int8.py",
                 f"weightkit/{build_libs.module_filename()}"):
        assert path in names, path
    assert f"weightkit/lib/{native.CUDA_LIB}" not in names  # WEIGHTKIT_WITH_CUDA=0
    assert [n for n in names if n.endswith(".so")] == [f"weightkit/{build_libs.module_filename()}"], names
    # a CPython extension: one wheel per Python version (any torch >= 2.6)
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    assert os.path.basename(cpu_wheel).endswith(f"-{tag}-{tag}-linux_x86_64.whl"), cpu_wheel


@pytest.mark.triton_kernels
def test_editable_install_finds_kernels_and_library():
    """From outside the checkout (so the current directory is not on sys.path), `import weightkit` resolves through
    the environment's install; when that is an editable install of this checkout, the Triton kernels and the kernel
    library come from here."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def run(code):
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", env=env)

    found = run("import importlib.util; s = importlib.util.find_spec('weightkit'); print(s.origin if s else '')")
    package = found.stdout.strip()
    if not package:
        pytest.skip("weightkit is not installed in this environment (the test command installs it with pip -e)")
    if not package.startswith(os.path.join(ROOT, "weightkit")):
        pytest.skip(f"this environment's weightkit is another checkout: {package}")
    proc = run("import weightkit.kernels.int8 as k, weightkit.native as n; "
               "print(k.__file__); print(n.CPU_PATH or n.CPU_ERROR)")
    assert proc.returncode == 0, proc.stderr
    kernels, library = proc.stdout.split("\n")[:2]
    assert kernels == os.path.join(ROOT, "kernels", "int8.py")
    assert library == os.path.join(ROOT, "weightkit", build_libs.module_filename())


GLIBC = {"libc.so.6", "libm.so.6", "ld-linux-x86-64.so.2", "libdl.so.2", "libpthread.so.0", "librt.so.1"}


def _dynamic_symbols(path):
    out = subprocess.run(["nm", "-D", "--defined-only", path], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"nm unavailable: {out.stderr.strip()}")
    return [line.split()[-1] for line in out.stdout.splitlines() if line.strip()]


def _needed(path):
    out = subprocess.run(["objdump", "-p", path], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"objdump unavailable: {out.stderr.strip()}")
    return sorted(line.split()[1] for line in out.stdout.splitlines() if line.strip().startswith("NEEDED"))


def test_module_exports_only_its_init_and_needs_no_torch():
    assert native.CPU is not None, native.CPU_ERROR
    assert _dynamic_symbols(native.CPU_PATH) == ["PyInit__C"]
    # no libtorch, no libpython (the interpreter provides the C API): loads under any torch; the C++ runtime is the
    # one torch has loaded already (csrc/build_libs.py says why it is not linked in)
    assert set(_needed(native.CPU_PATH)) <= GLIBC | {"libgcc_s.so.1", "libstdc++.so.6"}, _needed(native.CPU_PATH)


def test_cuda_library_exports_only_the_c_abi():
    from weightkit import _C

    if native.CUDA is None:
        pytest.skip(native.CUDA_ERROR)
    symbols = set(_dynamic_symbols(native.CUDA_PATH))
    assert symbols == set(_C.CUDA_FUNCTIONS), sorted(symbols ^ set(_C.CUDA_FUNCTIONS))
    # the CUDA runtime is linked in statically; the driver (libcuda.so.1) is loaded by it at run time
    assert set(_needed(native.CUDA_PATH)) <= GLIBC | {"libgcc_s.so.1"}, _needed(native.CUDA_PATH)


def test_ninja_build_is_incremental_and_writes_compile_commands():
    """After the build (the test command builds in place), ninja has nothing left to do, it recorded each object's
    headers (a change of csrc/weightkit.h rebuilds every object), and build/compile_commands.json lists every
    source for editors."""
    build_dir = build_libs.BUILD_DIR
    if not os.path.exists(os.path.join(build_dir, "build.ninja")):
        pytest.skip(f"no in-place ninja build in {build_dir} (`pip install -e .` makes one)")
    ninja = build_libs.find_ninja()
    dry = subprocess.run([ninja, "-C", build_dir, "-n"], capture_output=True, text=True)
    assert dry.returncode == 0 and "no work to do" in dry.stdout, dry.stdout + dry.stderr
    deps = subprocess.run([ninja, "-C", build_dir, "-t", "deps"], capture_output=True, text=True).stdout
    header = os.path.join(build_libs.CSRC, "weightkit.h")
    for src in build_libs.cpu_sources():
        obj = build_libs._obj(build_dir, "cpu", src)
        block = deps.split(obj + ":", 1)[1].split("\n\n", 1)[0]
        assert header in block or os.path.basename(src) == "parallel.cpp", (src, block[:300])
    import json

    with open(os.path.join(ROOT, "build", "compile_commands.json")) as f:
        files = {entry["file"] for entry in json.load(f)}
    assert set(build_libs.cpu_sources()) | {os.path.join(build_libs.CSRC, "bind.cpp")} <= files, files


@pytest.mark.triton_kernels
def test_top_level_kernels_name_is_left_to_the_installed_package():
    """From the checkout's root (on sys.path under ``python -m``), ``import kernels`` must not give the Triton kernels
    folder: transformers and bitsandbytes import Hugging Face's ``kernels`` package by that name. Ours loads it in
    its place, or raises ModuleNotFoundError where it is not installed; ``weightkit.kernels`` is unaffected."""
    code = ("import importlib.util, os\n"
            "try:\n"
            "    import kernels\n"
            "    print('found', os.path.abspath(kernels.__file__))\n"
            "except ModuleNotFoundError as exc:\n"
            "    print('absent', exc.name)\n"
            "import weightkit.kernels.int8 as k\n"
            "print('weightkit.kernels', os.path.abspath(k.__file__))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    first, second = proc.stdout.strip().splitlines()[-2:]
    ours = os.path.join(ROOT, "kernels", "__init__.py")
    assert first == "absent kernels" or (first.startswith("found ") and first != f"found {ours}"), first
    assert second == f"weightkit.kernels {os.path.join(ROOT, 'kernels', 'int8.py')}"
