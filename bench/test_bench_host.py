"""Host time of one eager layer call at decode size: Int8Linear, MemoryLinear, DictLinear vs nn.Linear.

Tiny shapes (4 tokens, 64 -> 64 features), where the Python / dispatcher work around the kernels is the cost: the
target is at most 2x nn.Linear's time per call, for inference (under torch.no_grad, entered per call) and for a
training step (forward, .sum(), backward; gradients accumulate between calls in .grad, Int8Linear's too).
One round times CALLS calls and then synchronizes once (on CUDA the host queues kernels ahead of the GPU, so this
is the host's time per call while the GPU keeps up). pytest-benchmark's statistics are per round; ``extra_info``
has ``us_per_call`` (mean round / CALLS), ``cpu_us_per_call`` (the best round's CPU time of the calling thread /
CALLS: what the calls themselves cost, robust on a busy machine, where wall-clock times swing by +-20%) and
``vs_nn_linear`` (cpu_us_per_call over nn.Linear's, measured just before in the same process).

The layers use one thread on CPU (torch.set_num_threads(1) during the suite), like the issue's measurement.

``test_binding_host_time_per_call`` times the binding alone: one call of a C function of weightkit._C with sizes 0
(the kernel returns at once), so what is left is the crossing from Python into C (argument conversion, GIL release).
Measured on this 2-core VM (shared, load ~10, 2026-12-04; this test, two runs each, the same test run against the
tree before weightkit._C where native.CPU was the ctypes library): best-round CPU time per call, ctypes with argtypes
-> pybind11: 0 args 0.09 -> 0.09 us; 9 args (stochastic_round_int8) 0.88 -> 0.22 us; 12 args with a double
(memory_lookup_forward) 1.23-1.24 -> 0.28-0.29 us. Wall-clock medians: 7.2-9.0 -> 0.23-0.24 us and 10.0-12.0 ->
0.30 us (ctypes' GIL release per call cost far more wall time than CPU time on the loaded machine).
"""

import time

import pytest
import torch

from bench.conftest import DEVICE, device_name, stat
from weightkit.nn import DictLinear, Int8Linear, MemoryLinear
from weightkit.ops import dictionary, memoryformer, int8

TOKENS, D = 4, 64
CALLS, ROUNDS = 200, 30
LAYERS = {
    "Int8Linear": (lambda lin: Int8Linear.from_linear(lin, group_size=32), int8._INT8_MM),
    "MemoryLinear": (lambda lin: MemoryLinear.from_linear(lin, tau=8), memoryformer._FWD),
    "DictLinear": (lambda lin: DictLinear(D, D, k=32, s=16, device=lin.weight.device), dictionary._BM_FWD),
}
_LINEAR_CPU_US = {}  # (layer, mode) -> nn.Linear's cpu_us_per_call, for the ratio


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _step(layer, mode):
    device = torch.device(DEVICE)
    if mode == "inference":
        x = torch.randn(TOKENS, D, device=device)

        def call():
            with torch.no_grad():
                layer(x)
    else:
        x = torch.randn(TOKENS, D, device=device, requires_grad=True)

        def call():
            layer(x).sum().backward()
    return call


@pytest.mark.parametrize("impl", ["nn.Linear", "weightkit"])
@pytest.mark.parametrize("mode", ["inference", "training"])
@pytest.mark.parametrize("layer_name", list(LAYERS))
def test_host_time_per_call(benchmark, layer_name, mode, impl):
    torch.manual_seed(0)
    lin = torch.nn.Linear(D, D).to(DEVICE)
    build, table = LAYERS[layer_name]
    layer = lin if impl == "nn.Linear" else build(lin)
    call = _step(layer, mode)
    best_cpu = [float("inf")]

    def timed_round():
        t0 = time.thread_time()
        for _ in range(CALLS):
            call()
        _sync()
        best_cpu[0] = min(best_cpu[0], time.thread_time() - t0)

    for _ in range(3):  # warm-up: allocator, backend choice, autograd graph caches
        timed_round()
    best_cpu[0] = float("inf")
    benchmark.pedantic(timed_round, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    cpu_us = best_cpu[0] / CALLS * 1e6
    backend = "nn.Linear" if impl == "nn.Linear" else table.select(torch.device(DEVICE))
    mean = stat(benchmark, "mean")
    info = dict(op=f"{layer_name} host {mode}", backend=backend, shape=[TOKENS, D, D], device=device_name(),
                calls_per_round=CALLS, us_per_call=None if mean is None else mean / CALLS * 1e6,
                cpu_us_per_call=cpu_us)
    if impl == "nn.Linear":
        _LINEAR_CPU_US[layer_name, mode] = cpu_us
    elif (layer_name, mode) in _LINEAR_CPU_US:
        info["vs_nn_linear"] = cpu_us / _LINEAR_CPU_US[layer_name, mode]
    benchmark.extra_info.update(info)


BINDING_CALLS = {
    # name -> (function of weightkit._C.cpu, arguments with every size 0: no work inside the kernel)
    "abi_version (0 args)": ("abi_version", ()),
    "stochastic_round_int8 (9 args)": ("stochastic_round_int8", (0, 0, 0, 0, 0, 32, 1, 0, 1)),
    "memory_lookup_forward (12 args)": ("memory_lookup_forward", (0, 0, 0, 0, 0, 0, 1, 256, 64, 8, 1.0, 1)),
}


@pytest.mark.parametrize("call", list(BINDING_CALLS))
def test_binding_host_time_per_call(benchmark, call):
    from weightkit import native

    if native.CPU is None:
        pytest.skip(native.CPU_ERROR)
    name, args = BINDING_CALLS[call]
    fn = getattr(native.CPU, name)
    best_cpu = [float("inf")]
    calls = 2000

    def timed_round():
        t0 = time.thread_time()
        for _ in range(calls):
            fn(*args)
        best_cpu[0] = min(best_cpu[0], time.thread_time() - t0)

    for _ in range(3):
        timed_round()
    best_cpu[0] = float("inf")
    benchmark.pedantic(timed_round, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    median = stat(benchmark, "median")
    benchmark.extra_info.update(dict(op=f"weightkit._C.cpu.{call}", backend="cpu",
                                     binding="ctypes" if hasattr(native.CPU, "_dll") else "pybind11 (weightkit._C)",
                                     device=device_name(), calls_per_round=calls,
                                     us_per_call=None if median is None else median / calls * 1e6,
                                     cpu_us_per_call=best_cpu[0] / calls * 1e6))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_auto_measured_choice_host_time_per_call(benchmark, dtype, monkeypatch):
    """What ``auto``'s measured choice (weightkit/backend.py) adds to a call on a GPU, on the host: int8_matmul's
    regime tuple and the lookup of the remembered backend, against a table without a regime (the static order).
    Run on the CPU with two do-nothing 'GPU' backends and a fake device name, so only the dispatch is timed.
    Measured on the 2-core VM (idle, 2026-12-04): 0.73 us (bf16) / 0.84 us (fp32, which also reads the TF32 flag)."""
    from weightkit import backend
    from weightkit.backend import KernelTable, MeasuredChoice

    class AnyDevice(KernelTable):
        def why_not(self, name, device):
            return None if name in self.impls else "absent"

    monkeypatch.setattr(backend, "_device_name", lambda device: "host-time bench")
    monkeypatch.setattr(MeasuredChoice, "timer", staticmethod(lambda fn, args, kwargs: 1.0))
    monkeypatch.setattr(backend, "_ENV", dict(backend._ENV, auto="measure"))

    def noop(*args):
        return None

    measured = AnyDevice(f"bench_measured_{dtype}", regime=int8._INT8_MM.regime)
    static = AnyDevice(f"bench_static_{dtype}")
    for t, names in ((measured, ("cuda", "triton", "reference")), (static, ("cuda", "reference"))):
        for name in names:
            t.register(name)(noop)
    gpu = torch.device("cuda", 0)
    x = torch.randn(TOKENS, D, dtype=dtype)
    w, s = torch.zeros(D, D, dtype=torch.int8), torch.ones(D * D // 32)
    measured(gpu, x, w, s, 32, False)  # measures (the fake timer) once
    calls = 20000

    def per_call(table):
        best = float("inf")
        for _ in range(5):
            t0 = time.thread_time()
            for _ in range(calls):
                table(gpu, x, w, s, 32, False)
            best = min(best, time.thread_time() - t0)
        return best / calls * 1e6

    static_us = per_call(static)
    benchmark.pedantic(lambda: measured(gpu, x, w, s, 32, False), rounds=ROUNDS, iterations=1000, warmup_rounds=1)
    measured_us = per_call(measured)
    benchmark.extra_info.update(dict(op="KernelTable dispatch (int8_matmul regime)", backend="measured choice",
                                     device=device_name(), cpu_us_per_call=measured_us, static_cpu_us_per_call=static_us,
                                     regime_cost_us=measured_us - static_us))
