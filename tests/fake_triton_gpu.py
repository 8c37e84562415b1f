"""A stand-in for Triton's CUDA driver, so that Triton's own JIT path (its binder, cache keys, compiler and
autotuner) runs on CPU tensors in a process without a GPU: kernels compile for sm_90 with the bundled ptxas, launches
do nothing, benchmarks time nothing (1 ms each). For tests of the host logic that runs only with compiled kernels (the
interpreter bypasses it); import it in a process started without TRITON_INTERPRET. Results of launches are
whatever the output tensors held: nothing about numerics can be learnt here."""

import json
import os
import subprocess
import sys

import torch
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver

# an H100/H200 as Triton's driver describes it (what kernels/_shared.device_info and the launch checks read)
PROPERTIES = {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32,
              "sm_clock_rate": 1980000, "mem_clock_rate": 3201000, "mem_bus_width": 5120}


class _Utils:
    def get_device_properties(self, device):
        return dict(PROPERTIES)

    def load_binary(self, name, kernel, shared, device):  # (module, function, n_regs, n_spills, n_max_threads)
        return 1, 1, 0, 0, 1024


class FakeGPU:
    """The driver object (``triton.runtime.driver.active``); counts launches and benchmark calls."""
    utils = _Utils()

    def __init__(self, arch=90):
        self.target = GPUTarget("cuda", arch, 32)
        self.launches = 0
        self.benchmarks = 0
        self.last_launch = None  # the arguments of the last launch, as the compiled kernel's launcher got them
        self.device = 0

    def is_active(self):
        return True

    def get_current_device(self):
        return self.device

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")

    def launcher_cls(self, src, metadata):
        def launch(*args, **kwargs):
            self.launches += 1
            self.last_launch = args
        return launch

    def bench(self, fn, warmup=25, rep=100, grad_to_none=None, quantiles=None, **kwargs):
        """triton.testing.do_bench's stand-in: one call, 1 ms (so every config ties and the first one wins)."""
        self.benchmarks += 1
        fn()
        return [1.0] * len(quantiles) if quantiles else 1.0

    def get_benchmarker(self):
        return self.bench

    def get_empty_cache_for_benchmark(self):
        return torch.empty(1)

    def clear_cache(self, cache):
        pass


def install(arch=90):
    """Make a FakeGPU Triton's active driver and its benchmark ``triton.testing.do_bench`` (for this process: a
    child started for the purpose); returns it."""
    import triton.testing

    fake = FakeGPU(arch)
    driver.set_active(fake)
    triton.testing.do_bench = fake.bench
    return fake


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_child(script, **env):
    """Run the test file ``script`` as a child process without TRITON_INTERPRET (its ``__main__`` installs this
    driver and prints one JSON line last), with the repository on its path and ``env`` added; returns that JSON."""
    full = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    full["PYTHONPATH"] = ROOT + os.pathsep + full.get("PYTHONPATH", "")
    full.update(env)
    proc = subprocess.run([sys.executable, os.path.abspath(script)], capture_output=True, text=True, env=full,
                          timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
