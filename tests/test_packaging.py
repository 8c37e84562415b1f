"""Packaging: a built wheel holds the Python package, the Triton kernels (the top-level kernels/ folder,
installed as weightkit.kernels)
and the CPU kernel library, tagged for any Python 3; an editable install finds the same files in the checkout; the
kernel libraries export only the C ABI of csrc/weightkit.h and need no torch, Python or C++ runtime."""

import glob
import os
import subprocess
import sys
import zipfile

import pytest

from weightkit import native

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
                 f"weightkit/lib/{native.CPU_LIB}"):
        assert path in names, path
    assert f"weightkit/lib/{native.CUDA_LIB}" not in names  # WEIGHTKIT_WITH_CUDA=0
    # no Python extension module: one wheel for every Python 3 and every torch
    assert os.path.basename(cpu_wheel).endswith("-py3-none-linux_x86_64.whl"), cpu_wheel
    assert not [n for n in names if n.endswith(".so") and "cpython" in n]


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
               "print(k.__file__); print(n.CPU.path if n.CPU else n.CPU_ERROR)")
    assert proc.returncode == 0, proc.stderr
    kernels, library = proc.stdout.split("\n")[:2]
    assert kernels == os.path.join(ROOT, "kernels", "int8.py")
    assert library == os.path.join(ROOT, "weightkit", "lib", native.CPU_LIB)


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


def test_cpu_library_exports_only_the_c_abi_and_needs_only_libc():
    assert native.CPU is not None, native.CPU_ERROR
    symbols = _dynamic_symbols(native.CPU.path)
    assert set(symbols) == set(native._CPU_SIGNATURES), sorted(set(symbols) ^ set(native._CPU_SIGNATURES))
    # no libtorch, no libpython, no libstdc++ / OpenMP: loads under any torch and any Python
    assert set(_needed(native.CPU.path)) <= GLIBC, _needed(native.CPU.path)


def test_cuda_library_exports_only_the_c_abi():
    if native.CUDA is None:
        pytest.skip(native.CUDA_ERROR)
    symbols = set(_dynamic_symbols(native.CUDA.path))
    expected = set(native._CUDA_SIGNATURES) | {"wk_cuda_archs", "wk_cuda_error_string"}
    assert symbols == expected, sorted(symbols ^ expected)
    # the CUDA runtime is linked in statically; the driver (libcuda.so.1) is loaded by it at run time
    assert set(_needed(native.CUDA.path)) <= GLIBC | {"libgcc_s.so.1"}, _needed(native.CUDA.path)


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
