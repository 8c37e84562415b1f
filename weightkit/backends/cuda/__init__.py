"""The cuda backend: host code that calls the CUDA kernels of libweightkit_cuda.so (csrc/cuda/*.cu, opened by
weightkit._C) for every op, one module per hot path. Each function allocates with torch, passes data pointers,
sizes, dtype codes, the device index and the cudaStream_t of torch's current stream on that device (so the kernels
order with torch's own work), and does with torch what the kernels leave out (BLAS matmuls, the sort of the
deterministic MemoryFormer backward). The callers have checked shapes, dtypes and devices."""

from __future__ import annotations

import functools
from typing import Tuple

import torch
from torch import Tensor

from ... import native

_get_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def stream(t: Tensor) -> Tuple[int, int]:
    """(device index, cudaStream_t of torch's current stream there) for a CUDA tensor."""
    index = t.get_device()
    if _get_raw_stream is not None:
        return index, _get_raw_stream(index)
    return index, torch.cuda.current_stream(index).cuda_stream


@functools.lru_cache(maxsize=None)
def sm_count(index: int) -> int:
    """The streaming multiprocessors of cuda:index (the launch plans size their grids by it)."""
    return torch.cuda.get_device_properties(index).multi_processor_count


def check(status: int, name: str) -> None:
    """Raise for a non-zero cudaError_t."""
    if status:
        raise RuntimeError(f"weightkit cuda kernel {name} failed: {native.cuda_error_string(status)}")
