"""The CUDA kernel library's own code (csrc/cuda/*.cu) run on this machine's CPU by cudasim (tests/cudasim/): no GPU
has run these kernels since their port to the C ABI, and a session without one can still run every kernel, with
CUDA's thread semantics, under AddressSanitizer and UndefinedBehaviorSanitizer.

* cudasim itself: its rewrites of the sources, its warp collectives against what CUDA computes, the undefined
  behaviour it stops on, and the sanitizers' reports of an out-of-bounds and a misaligned vector access
  (tests/cudasim/selftest.cu);
* the cuda backend's op, optimizer and property tests, and tests/cudasim/cuda_paths.py (the kernel paths that small
  shapes miss), in a child pytest whose cuda backend runs CPU tensors on the simulated library
  (tests/cudasim/plugin.py); every launch site of csrc/cuda must have run.

What this cannot show: speed, behaviour that needs a GPU's concurrency or memory model, cuBLAS (torch's CPU matmul
stands in), nvcc's own code generation (scripts/compile_cuda.py compile-checks that).
"""

import functools
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.cudasim import build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CXX = os.environ.get("CXX", "g++")
pytestmark = pytest.mark.skipif(shutil.which(CXX) is None, reason=f"cudasim needs a C++ compiler ({CXX} not found)")

# the child run: every test file whose loops over usable_backends(table, "cpu") then include the cuda backend
CHILD_TESTS = [
    "tests/ops/test_int8_ops.py", "tests/ops/test_int4_ops.py", "tests/ops/test_memoryformer_ops.py",
    "tests/ops/test_dictionary_ops.py", "tests/ops/test_galore_ops.py", "tests/ops/test_qgalore_ops.py",
    "tests/ops/test_sr_paths.py", "tests/optim/test_galore.py", "tests/optim/test_nonfinite.py",
    "tests/optim/test_precision.py", "tests/test_properties.py", "tests/cudasim/cuda_paths.py",
]
# asserts the real rule (no cuda backend on CPU tensors), which the plugin lifts
CHILD_DESELECT = ["tests/ops/test_dictionary_ops.py::test_bitmask_cuda_backend_is_registered_and_falls_back"]


@functools.lru_cache(maxsize=None)
def sanitizer_preload():
    """The runtimes a Python process must preload to run sanitized code (ASan first; libstdc++ with it, or ASan's
    __cxa_throw interceptor finds no real function behind it when torch raises), or None where g++ has none or
    they do not start here (an ASan runtime older than the kernel's address-space layout aborts at start): then the
    cuda backend's tests run on the plain build."""
    paths = []
    for name in ("libasan.so", "libstdc++.so"):
        out = subprocess.run([CXX, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
        if not (os.path.isabs(out) and os.path.exists(out)):
            return None
        paths.append(out)
    probe = subprocess.run([sys.executable, "-c", "import torch, weightkit"], capture_output=True, text=True,
                           env=sanitized_env(paths), cwd=ROOT, timeout=300)
    if probe.returncode != 0:
        print(f"cudasim: the sanitizer runtimes do not start here, the plain build is used:\n{probe.stderr[-2000:]}")
        return None
    return tuple(paths)


def sanitized_env(preload):
    env = dict(os.environ)
    env["LD_PRELOAD"] = " ".join(preload)
    env["ASAN_OPTIONS"] = "detect_leaks=0"  # the interpreter's own allocations are not the kernels'
    env["UBSAN_OPTIONS"] = "print_stacktrace=1"
    return env


def test_sanitizers_that_do_not_start_give_the_plain_build(monkeypatch, capsys):
    if sanitizer_preload() is None:
        pytest.skip(f"{CXX} has no sanitizer runtimes that start here")
    monkeypatch.setattr(sys.modules[__name__], "sanitized_env", lambda paths: dict(os.environ, PYTHONHOME="/nowhere"))
    assert sanitizer_preload.__wrapped__() is None
    assert "the sanitizer runtimes do not start here" in capsys.readouterr().out


# ---- the source rewrites ---------------------------------------------------------------------------------------


def test_rewrites_launches_with_their_site_and_template_arguments():
    src = ("  foo_kernel<T, 4><<<grid, kThreads, 0, st>>>(a, b);\n"
           "  ns::bar<<<dim3(x, y), 32>>>(c);\n")
    out = build.rewrite_launches(src, "k.cu")
    assert out == ('  ::cudasim::launch("k.cu:1 foo_kernel<T, 4>", foo_kernel<T, 4>, grid, kThreads, 0, st)(a, b);\n'
                   '  ::cudasim::launch("k.cu:2 ns::bar", ns::bar, dim3(x, y), 32)(c);\n')


def test_rewrites_shared_declarations_into_poisoned_statics():
    out = build.rewrite_shared("  __shared__ float s_p[TB][kStage];\n  __shared__ bool s_last;\n")
    assert out == ("  static float s_p[TB][kStage]; ::cudasim::shared_region(&s_p, sizeof(s_p));\n"
                   "  static bool s_last; ::cudasim::shared_region(&s_last, sizeof(s_last));\n")


def test_every_launch_site_of_the_library_is_found():
    sites = build.launch_sites()
    with_chevrons = 0
    for name in os.listdir(os.path.join(ROOT, "csrc", "cuda")):
        if name.endswith((".cu", ".cuh")):
            with open(os.path.join(ROOT, "csrc", "cuda", name)) as f:
                with_chevrons += f.read().count("<<<")
    assert len(sites) == with_chevrons >= 15 and len(set(sites)) == len(sites), sites


# ---- cudasim's own semantics (tests/cudasim/selftest.cu) ----------------------------------------------------------


@pytest.fixture(scope="module")
def selftest():
    import ctypes

    return ctypes.CDLL(build.build_selftest("plain"))


def _ptr(a):
    import ctypes

    return a.ctypes.data_as(ctypes.c_void_p)


def test_warp_collectives_compute_what_cuda_does(selftest):
    blocks, threads = 3, 64
    out = np.full((blocks * threads, 8), -7, dtype=np.int32)
    assert selftest.selftest_collectives(_ptr(out), blocks) == 0
    lane = np.arange(blocks * threads) % 32
    assert (out[:, 0] == 496).all()                       # __shfl_xor_sync butterfly sum of the lanes 0..31
    assert (out[:, 1] == lane + 1).all()                  # __shfl_up_sync inclusive scan of ones
    assert (out[:, 2] == 70).all()                        # __shfl_sync from lane 7
    peers = [sum(1 << j for j in range(32) if j % 3 == r) for r in range(3)]
    assert (out[:, 3].view(np.uint32) == np.array(peers, dtype=np.uint32)[lane % 3]).all()  # __match_any_sync
    assert (out[:, 4].view(np.uint32) == 0xAAAAAAAA).all()  # __ballot_sync of the odd lanes
    assert (out[:, 5] == threads).all()                   # atomicAdd on __shared__ between two __syncthreads
    assert (out[:, 6] == np.repeat(np.arange(blocks), threads)).all()
    assert (out[:, 7] == np.tile(np.arange(threads), blocks)).all()


def test_a_missing_barrier_reads_poisoned_shared_memory(selftest):
    out = np.zeros(64, dtype=np.int32)
    assert selftest.selftest_neighbour(_ptr(out), 1) == 0
    want = (np.arange(64) + 32) % 64
    assert (out == want).all()
    assert selftest.selftest_neighbour(_ptr(out), 0) == 0
    # the warp that runs first gets past its __syncwarp and reads the other warp's slots before they are written
    # (0xFF bytes); the second one reads written slots
    first = out[:32] if (out[:32] == -1).all() else out[32:]
    assert (first == -1).all() and ((out == -1) | (out == want)).sum() == 64 and (out == -1).sum() == 32, out


def test_launches_outside_cuda_limits_fail_as_on_a_gpu(selftest):
    assert selftest.selftest_bad_config() == 1


def _run_case(library, case, env=None):
    code = f"import ctypes; ctypes.CDLL({library!r}).selftest_undefined({case.encode()!r})"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("case,message", [
    ("exit_then_syncthreads", "__syncthreads after some threads of the block exited"),
    ("shuffle_after_exit", "__shfl_xor_sync with the full mask after 1 lanes of the warp exited"),
    ("divergent_collectives", "lanes of a warp meet at different collectives (__shfl_sync and __syncwarp)"),
    ("deadlock", "deadlock: 0 threads exited, 48 at __syncthreads"),
])
def test_undefined_behaviour_stops_the_process_naming_the_kernel(case, message):
    proc = _run_case(build.build_selftest("plain"), case)
    assert proc.returncode != 0 and message in proc.stderr and f"{case}_kernel" in proc.stderr, proc.stderr[-3000:]


@pytest.mark.parametrize("case,report", [
    ("out_of_bounds", "AddressSanitizer: heap-buffer-overflow"),
    ("misaligned_vector", "misaligned address"),
])
def test_the_sanitizers_report_bad_accesses(case, report):
    preload = sanitizer_preload()
    if preload is None:
        pytest.skip(f"{CXX} has no AddressSanitizer runtime")
    proc = _run_case(build.build_selftest("sanitize"), case, sanitized_env(preload))
    assert proc.returncode != 0 and report in proc.stderr and f"{case}_kernel" in proc.stderr, proc.stderr[-3000:]


# ---- the cuda backend on cudasim ---------------------------------------------------------------------------------


def test_cuda_backend_tests_pass_on_simulated_cuda(tmp_path):
    """The child pytest (see the module docstring), sanitized where g++ has the runtimes. Takes ~2.5 minutes on 2
    cores, the library's build (~50 s, cached under build/cudasim/) included."""
    preload = sanitizer_preload()
    variant = "plain" if preload is None else "sanitize"
    env = dict(os.environ) if preload is None else sanitized_env(preload)
    report = tmp_path / "launches.json"
    # the plugin opens the simulated library as weightkit's CUDA library: the real one (built where torch has CUDA)
    # stays closed, as a process opens only one
    env.update(WEIGHTKIT_CUDASIM_LIB=build.build(variant), WEIGHTKIT_CUDASIM_REPORT=str(report),
               WEIGHTKIT_CUDA_LIB="off")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.cudasim.plugin",
           "--capture=sys",  # a sanitizer's or cudasim's report goes to the real stderr, even when it ends the process
           *CHILD_TESTS, *[f"--deselect={d}" for d in CHILD_DESELECT]]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    output = proc.stdout[-6000:] + proc.stderr[-6000:]
    print(f"cudasim ({variant}): {proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ''}")
    assert proc.returncode == 0, f"the cuda backend's tests on cudasim ({variant}) failed:\n{output}"
    launched = json.loads(report.read_text())
    missing = sorted(set(build.launch_sites()) - set(launched))
    assert not missing, f"launch sites of csrc/cuda that no test ran: {missing} (ran: {launched})"
