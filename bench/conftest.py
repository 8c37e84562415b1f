"""pytest-benchmark setup shared by the suites: device and versions in every JSON, throughput in extra_info.

Run with ``make bench`` (scripts/bench.sh), which writes bench/results/<device>-<date>.json.
"""

import os
import platform

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import weightkit  # noqa: E402
from weightkit import backend  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU x{os.cpu_count()}"


def copy_bandwidth_gbps(mib: int = 256, reps: int = 5) -> float:
    """This device's copy bandwidth (bytes read + written per second, best of ``reps`` copies of ``mib`` MiB): the
    roofline of the bandwidth-bound kernels, measured on the benchmarks' device in the same run."""
    import time

    a = torch.empty(mib * 2**20 // 4, device=DEVICE).uniform_()
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(reps + 1):  # the first copy warms the allocator and caches
        _sync()
        t0 = time.perf_counter()
        b.copy_(a)
        _sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * a.numel() * 4 / best / 1e9


def pytest_benchmark_update_machine_info(config, machine_info):
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = None
    machine_info["weightkit"] = {
        "version": weightkit.__version__,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "device": device_name(),
        "threads": torch.get_num_threads(),
        "backends": backend.status(),
        "copy_GBps": copy_bandwidth_gbps(),
    }


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def stat(benchmark, name):
    """A timing statistic of the benchmark's rounds (seconds), or None when there are none: under
    ``--benchmark-disable`` (the suites run as tests, each body once) pytest-benchmark keeps no statistics."""
    stats = getattr(benchmark, "stats", None)
    return None if stats is None else getattr(stats.stats, name)


@pytest.fixture
def measure(benchmark):
    """``measure(fn, bytes=..., flops=..., **info)`` times ``fn`` and records GB/s and TFLOP/s from the mean."""

    def run(fn, *, bytes=None, flops=None, rounds=None, **info):  # noqa: A002 - mirrors the quantity's name
        def timed():
            out = fn()
            _sync()
            return out

        timed()  # warm-up: compilation, autotuning, allocator
        if rounds is None:
            result = benchmark(timed)
        else:
            result = benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=0)
        mean = stat(benchmark, "mean")
        benchmark.extra_info.update(info)
        benchmark.extra_info["device"] = device_name()
        if bytes is not None:
            benchmark.extra_info["bytes"] = bytes
            if mean is not None:
                benchmark.extra_info["GB/s"] = bytes / mean / 1e9
        if flops is not None:
            benchmark.extra_info["flops"] = flops
            if mean is not None:
                benchmark.extra_info["TFLOP/s"] = flops / mean / 1e12
        return result

    return run
