"""The cuda backend: host code that calls the CUDA kernels of libweightkit_cuda.so (csrc/cuda/*.cu, opened by
weightkit._C) for every op, one module per hot path. Each function allocates with torch, passes data pointers,
sizes, dtype codes, the device index and the cudaStream_t of torch's current stream on that device (so the kernels
order with torch's own work), and does with torch what the kernels leave out (BLAS matmuls, the sort of the
deterministic MemoryFormer backward). The callers have checked shapes, dtypes and devices."""

from __future__ import annotations

import functools
from typing import Callable, Tuple

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


GEMV_MAX_TOKENS = 8  # the quantized matmuls' GEMV (csrc/cuda/gemv.cuh, kGemvMaxTokens); more: dequantize, cuBLAS
GEMV_WARPS = 8  # warps per block of the GEMV (kGemvWarps)


@functools.lru_cache(maxsize=1024)
def gemv_rows_per_warp(out_f: int, sms: int) -> int:
    """Rows a warp of the GEMV computes: 4 (each lane 4 x 16 bytes of weights in flight) while the grid keeps >= 2
    blocks per SM, else 2, else 1."""
    for rows in (4, 2):
        if -(-out_f // (GEMV_WARPS * rows)) >= 2 * sms:
            return rows
    return 1


def gemv(x: Tensor, out_f: int, device: int, launch: Callable[[int, int, int, int], int], name: str) -> Tensor:
    """y = x W^T (x's leading dims, out_f features, x's dtype) by the quantized matmuls' GEMV, for up to
    GEMV_MAX_TOKENS tokens: ``launch(x_ptr, y_ptr, tokens, rows_per_warp)`` calls the weight format's entry point
    (wk_cuda_int8_gemv, wk_cuda_int4_gemv) and returns its status."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    y = torch.empty((x2.shape[0], out_f), dtype=x.dtype, device=x.device)
    check(launch(x2.data_ptr(), y.data_ptr(), x2.shape[0], gemv_rows_per_warp(out_f, sm_count(device))), name)
    return y.reshape(*x.shape[:-1], out_f)
