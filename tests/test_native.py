"""The ctypes layer and the CPU library's thread pool: results do not depend on the thread count, concurrent calls
from several Python threads (ctypes releases the GIL) and calls in a forked child work, errors are reported."""

import os
import signal
import threading
import time

import pytest
import torch

from weightkit import backend, native, use_backend
from weightkit.ops import int4, int8, memoryformer

pytestmark = pytest.mark.skipif(native.CPU is None, reason=f"CPU kernel library not loaded: {native.CPU_ERROR}")


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
    assert status["cpu"].startswith("ok (") and native.CPU.path in status["cpu"]
    if native.CUDA is None:
        assert status["cuda"].startswith("unavailable: ") and native.CUDA_LIB in status["cuda"]
    with pytest.raises(RuntimeError, match="weightkit cpu kernel stochastic_round_int8 failed: unsupported dtype"):
        native._check(native.CPU.stochastic_round_int8(0, 99, 0, 0, 0, 1, 0, 0, 1), "stochastic_round_int8")
