"""weightkit._C (the pybind11 binding of csrc/weightkit.h) and the CPU kernels' thread pool: every C function is
bound, with its signature from the header (wrong arguments raise TypeError); results do not depend on the thread
count, concurrent calls from several Python threads (each call releases the GIL) and calls in a forked child work;
errors are reported; and the load errors (module missing, wrong ABI, CUDA library missing, unloadable, of another
ABI or stale) are clear messages, in weightkit.native, in the import warning and in `python -m weightkit info`."""

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from weightkit import backend, native, use_backend
from weightkit.backends import cpu as cpu_backend
from weightkit.ops import int4, int8, memoryformer

pytestmark = pytest.mark.skipif(native.CPU is None, reason=f"compiled kernels not loaded: {native.CPU_ERROR}")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = os.path.join(ROOT, "csrc", "weightkit.h")


def _work(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(300, 1024, generator=g)  # large enough to be split over threads
    s = int8.absmax_scale(x, 128)
    with use_backend("cpu"):
        q = int8.stochastic_round_int8(x, s, 128, seed=5)
        y = int8.int8_matmul(torch.randn(5, 1024, generator=g), q, s, 128)
        packed, scale, zero = int4.quantize_int4(x, 64)
        w = int4.dequantize_int4(packed, scale, zero, 64, x.shape)
        m = memoryformer.memory_lookup(torch.randn(64, 32, generator=g), torch.randn(4, 256, 300, generator=g), 1.0)
    return q, y, packed, scale, zero, w, m


def _same(a, b):
    return all(torch.equal(u, v) for u, v in zip(a, b))


def test_results_do_not_depend_on_thread_count():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _work()
        torch.set_num_threads(4)  # more threads than this machine's cores: tasks still cover every index once
        four = _work()
    finally:
        torch.set_num_threads(before)
    assert _same(one, four)


def test_concurrent_calls_from_python_threads():
    expected = _work()
    results, errors = [], []

    def run():
        try:
            for _ in range(3):
                results.append(_work())
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and len(results) == 12
    assert all(_same(r, expected) for r in results)


def test_kernels_run_in_a_forked_child():
    """The pool's threads do not survive fork(); the child must build its own. (The child calls only the library:
    torch's own OpenMP-parallel ops can hang in a forked child, which is torch's matter, not weightkit's.)"""
    x = torch.randn(300, 1024)
    s = int8.absmax_scale(x, 128)

    def call(out):
        return native.CPU.stochastic_round_int8(x.data_ptr(), 0, s.data_ptr(), out.data_ptr(), x.numel(), 128, 5, 0, 4)

    expected = torch.empty(x.shape, dtype=torch.int8)
    assert call(expected) == 0  # the pool has started in this process
    pid = os.fork()
    if pid == 0:  # child: exit code 0 when the kernel ran and gave the same bytes
        out = torch.empty(x.shape, dtype=torch.int8)
        ok = call(out) == 0 and out.numpy().tobytes() == expected.numpy().tobytes()
        os._exit(0 if ok else 3)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the kernel hung in a forked child")
    assert os.waitstatus_to_exitcode(status) == 0


def test_status_and_errors_name_the_library():
    status = backend.status()
    assert status["cpu"].startswith("ok (") and native.CPU_PATH in status["cpu"]
    assert os.path.basename(native.CPU_PATH).startswith("_C.")
    if native.CUDA is None:
        assert status["cuda"].startswith("unavailable: ") and native.CUDA_LIB in status["cuda"]
    with pytest.raises(RuntimeError, match="weightkit cpu kernel stochastic_round_int8 failed: unsupported dtype"):
        cpu_backend.check(native.CPU.stochastic_round_int8(0, 99, 0, 0, 0, 1, 0, 0, 1), "stochastic_round_int8")


def _declared(prefix):
    with open(HEADER) as f:
        return set(re.findall(rf"WK_API [^;]*?\b({prefix}\w+)\(", f.read()))


def test_every_function_of_the_header_is_bound():
    """The binding is generated from the header's declarations (csrc/bind.cpp); this checks none was left out."""
    from weightkit import _C

    assert set(_C.CPU_FUNCTIONS) == _declared("wk_cpu_") and len(_C.CPU_FUNCTIONS) == len(set(_C.CPU_FUNCTIONS))
    assert set(_C.CUDA_FUNCTIONS) == _declared("wk_cuda_")
    for name in _C.CPU_FUNCTIONS:
        assert callable(getattr(_C.cpu, name[len("wk_cpu_"):]))
    with open(HEADER) as f:
        assert f"#define WK_ABI_VERSION {native.ABI_VERSION}" in f.read()
    assert _C.ABI_VERSION == native.ABI_VERSION


def test_wrong_arguments_raise_type_errors_not_memory_errors():
    """The signatures come from the C declarations: a missing argument or a float for an integer is refused
    before any C code runs (ctypes' hand-copied table would have passed garbage)."""
    with pytest.raises(TypeError, match="incompatible function arguments"):
        native.CPU.stochastic_round_int8(0, 0, 0, 0, 0, 1, 0, 0)  # 8 of 9 arguments
    with pytest.raises(TypeError, match="incompatible function arguments"):
        native.CPU.stochastic_round_int8(0, 0, 0, 0, 0, 1.5, 0, 0, 1)  # group_size is int64_t
    with pytest.raises(TypeError, match="incompatible function arguments"):
        native.CPU.stochastic_round_int8(0, 0, 0, 0, 0, 1, -1, 0, 1)  # seed is uint64_t


def test_abi_mismatch_is_a_clear_error():
    module, error = native.load_module(abi_version=native.ABI_VERSION + 1)
    assert module is None
    assert f"has ABI version {native.ABI_VERSION}, this weightkit needs {native.ABI_VERSION + 1}" in error
    assert "pip install" in error


def _run_info(prelude):
    code = f"{prelude}\nimport sys, runpy\nsys.argv = ['weightkit', 'info']\nrunpy.run_module('weightkit', run_name='__main__')"
    env = {k: v for k, v in os.environ.items() if k != "WEIGHTKIT_DISABLE_EXTENSION"}
    return subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=300)


def test_missing_module_is_named_in_the_warning_and_in_info():
    proc = _run_info("import sys; sys.modules['weightkit._C'] = None  # as if it was never built")
    assert proc.returncode == 0, proc.stderr
    assert "weightkit._C not found in" in proc.stderr and "'cpu' and 'cuda' backends are off" in proc.stderr
    assert re.search(r"cpu +unavailable: weightkit._C not found in .*pip install", proc.stdout), proc.stdout
    assert re.search(r"reference +ok", proc.stdout), proc.stdout


def _fake_cuda_library(tmp_path, functions, abi):
    """A shared library exporting ``functions`` as stubs (wk_cuda_abi_version returns ``abi``)."""
    tmp_path.mkdir()
    src = tmp_path / "fake.c"
    body = [f"int wk_cuda_abi_version(void) {{ return {abi}; }}"]
    body += [f"int {name}(void) {{ return 0; }}" for name in functions if name != "wk_cuda_abi_version"]
    src.write_text("\n".join(body) + "\n")
    lib_dir = tmp_path / "lib"
    lib_dir.mkdir()
    out = lib_dir / native.CUDA_LIB
    proc = subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(out), str(src)], capture_output=True, text=True)
    if proc.returncode:
        pytest.skip(f"no C compiler to build a fake library: {proc.stderr}")
    return str(lib_dir)


def test_cuda_library_errors_are_clear(tmp_path):
    from weightkit import _C

    if native.CUDA is not None:
        pytest.skip("a CUDA library is loaded in this process; _C holds one at a time")
    path, error = native.load_cuda(_C, str(tmp_path))
    assert path is None and f"{native.CUDA_LIB} not found in {tmp_path}" in error
    (tmp_path / native.CUDA_LIB).write_text("not a library")
    path, error = native.load_cuda(_C, str(tmp_path))
    assert path is None and f"{native.CUDA_LIB} did not load (" in error and "pip install" in error
    wrong_abi = _fake_cuda_library(tmp_path / "abi", _C.CUDA_FUNCTIONS, abi=native.ABI_VERSION + 7)
    path, error = native.load_cuda(_C, wrong_abi)
    assert path is None and f"has ABI version {native.ABI_VERSION + 7}, this weightkit needs {native.ABI_VERSION}" in error
    stale = _fake_cuda_library(tmp_path / "stale", ["wk_cuda_abi_version", "wk_cuda_probe"], abi=native.ABI_VERSION)
    path, error = native.load_cuda(_C, stale)
    assert path is None and "lacks wk_cuda_archs" in error and "wk_cuda_memory_segment_sum" in error
    with pytest.raises(RuntimeError, match="CUDA kernel library is not loaded"):
        _C.cuda.probe(0)  # nothing stayed half-loaded


def test_the_cuda_library_can_be_chosen_or_turned_off(tmp_path, monkeypatch):
    """WEIGHTKIT_CUDA_LIB: another library's path (the tests' simulated one where a CUDA torch built the real one too;
    a process opens one) or "off"; a wrong path names the variable."""
    from weightkit import _C

    if native.CUDA is not None:
        pytest.skip("a CUDA library is loaded in this process; _C holds one at a time")
    (tmp_path / native.CUDA_LIB).write_text("not a library")  # lib_dir's own is never opened below
    monkeypatch.setenv(native.CUDA_LIB_ENV, "off")
    assert native.load_cuda(_C, str(tmp_path)) == (None, f"not opened: {native.CUDA_LIB_ENV}=off")
    missing = str(tmp_path / "nowhere.so")
    monkeypatch.setenv(native.CUDA_LIB_ENV, missing)
    assert native.load_cuda(_C, str(tmp_path)) == (None, f"{native.CUDA_LIB_ENV}={missing}: no such file")
    other = tmp_path / "other.so"
    other.write_text("not a library either")
    monkeypatch.setenv(native.CUDA_LIB_ENV, str(other))
    path, error = native.load_cuda(_C, str(tmp_path))
    assert path is None and error.startswith("other.so did not load (")
    stale = _fake_cuda_library(tmp_path / "stale", ["wk_cuda_abi_version", "wk_cuda_probe"], abi=native.ABI_VERSION)
    monkeypatch.setenv(native.CUDA_LIB_ENV, os.path.join(stale, native.CUDA_LIB))
    path, error = native.load_cuda(_C, str(tmp_path))
    assert path is None and "lacks wk_cuda_archs" in error  # the chosen library was the one opened


def test_a_chosen_cuda_library_that_fails_warns_at_import_and_off_is_quiet(tmp_path):
    code = "import warnings; warnings.simplefilter('always'); import weightkit"
    for value, expected in ((str(tmp_path / "nowhere.so"), f"{native.CUDA_LIB_ENV}={tmp_path / 'nowhere.so'}: no such "
                             "file; the 'cuda' backend is unavailable"), ("off", None)):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                              env=dict(os.environ, **{native.CUDA_LIB_ENV: value}))
        assert proc.returncode == 0, proc.stderr
        if expected is None:
            assert "RuntimeWarning" not in proc.stderr, proc.stderr
        else:
            assert expected in proc.stderr, proc.stderr


def test_cuda_compile_check_reports_register_spills():
    """scripts/compile_cuda.py passes ptxas' --resource-usage and sums it up: kernels that spill, by name."""
    import importlib.util
    import shutil

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "compile_cuda.py")
    spec = importlib.util.spec_from_file_location("compile_cuda", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    spilled = "_ZN9weightkit12_GLOBAL__N_121memory_forward_kernelIfEEvPKfi"
    out = "\n".join([
        f"ptxas info    : Compiling entry function '{spilled}' for 'sm_90'",
        f"ptxas info    : Function properties for {spilled}",
        "    16 bytes stack frame, 12 bytes spill stores, 12 bytes spill loads",
        "ptxas info    : Used 40 registers, used 1 barriers",
        "ptxas info    : Function properties for _Z3fooPf",
        "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads"])
    line = mod.spill_summary(out)
    name = "memory_forward_kernel" if shutil.which("c++filt") else spilled
    assert line.endswith(f"2 functions: 1 spill registers (stores a thread, most per kernel: {name} 12 B)"), line
    assert mod.spill_summary(out.replace("12 bytes spill", "0 bytes spill")).endswith("no register spills")
