"""pytest plugin: the cuda backend on CPU tensors, its kernels those of the simulated CUDA library
(tests/cudasim/build.py). ``WEIGHTKIT_CUDASIM_LIB`` names the library; tests/test_cudasim.py runs the op tests with
``-p tests.cudasim.plugin``.

What it changes, for the test process only:
* weightkit._C opens the simulated library as its CUDA library (``native.CUDA``);
* every op table's ``cuda`` backend counts as usable on CPU tensors, so the op tests' loops over
  ``usable_backends(table, "cpu")`` include it and compare it with the reference as for the other backends, and
  ``use_backend("cuda")`` reaches it; ``triton`` counts as unusable (the main suite runs its interpreter; here it
  would only double the time, which the sanitizers multiply);
* the cuda backend's host code gets device 0 and a null stream for CPU tensors, and 132 SMs (an H100/H200);
* its float32 products of 16-bit operands (backends/_blocked.mm_float32 with tensor cores: torch.mm's
  ``out_dtype=torch.float32``, whose CUDA kernel has no CPU one) are the upcast products, what the GPU computes
  (exact products, float32 sums), instead of mm_float32's fallback for a torch without it (a 16-bit result).
Everything else in the cuda backend runs as it is (argument preparation, launch plans, torch's matmuls, on the CPU).
"""

from __future__ import annotations

import os

LIB_ENV = "WEIGHTKIT_CUDASIM_LIB"
REPORT_ENV = "WEIGHTKIT_CUDASIM_REPORT"  # where the launch counts go (JSON), at the end of the session
SMS = 132


def pytest_configure(config):
    path = os.environ.get(LIB_ENV)
    if not path:
        raise RuntimeError(f"{LIB_ENV} must name the simulated CUDA library (tests/cudasim/build.py)")
    import importlib
    import pkgutil

    import torch

    from weightkit import backend, native
    from weightkit.backends import cuda as cuda_backend

    error = native._C.load_cuda(path)
    if error:
        raise RuntimeError(f"the simulated CUDA library {path} did not load: {error}")
    native.CUDA, native.CUDA_PATH, native.CUDA_ERROR = native._C.cuda, path, None
    native.CUDA_ARCHS = tuple(native.CUDA.archs().split(";"))

    original = backend.KernelTable.why_not

    def why_not(self, name: str, device: torch.device):
        device = torch.device(device)
        if name == "cuda" and device.type == "cpu":
            return None if "cuda" in self.impls else f"{self.name} has no cuda implementation"
        if name == "triton":
            return "triton is off in the cudasim run (its interpreter runs in the main suite)"
        return original(self, name, device)

    backend.KernelTable.why_not = why_not

    def stream(t):
        return 0, 0

    modules = [cuda_backend] + [importlib.import_module(f"{cuda_backend.__name__}.{m.name}")
                                for m in pkgutil.iter_modules(cuda_backend.__path__)]
    real_stream, real_sm_count = cuda_backend.stream, cuda_backend.sm_count
    for module in modules:
        if getattr(module, "stream", None) is real_stream:
            module.stream = stream
        if getattr(module, "sm_count", None) is real_sm_count:
            module.sm_count = lambda index: SMS
    from weightkit.backends import _blocked

    real_mm_float32 = _blocked.mm_float32

    def mm_float32(a, b, tensor_cores):
        return real_mm_float32(a, b, tensor_cores and a.device.type == "cuda")

    _blocked.mm_float32 = mm_float32
    backend.reload_env()


def pytest_sessionfinish(session, exitstatus):
    report = os.environ.get(REPORT_ENV)
    if report:
        import ctypes

        counts = ctypes.CDLL(os.environ[LIB_ENV]).cudasim_launch_counts  # the handle _C opened: the same counts
        counts.restype = ctypes.c_char_p
        with open(report, "w") as f:
            f.write(counts().decode())


def pytest_report_header(config):
    return f"cudasim: cuda backend on CPU tensors, kernels from {os.environ.get(LIB_ENV)}"
