"""cuda backend of weightkit/ops/dictionary.py (S in the bitmask format): decode S to a dense S^T in the activation's
dtype (csrc/cuda/dictionary.cu: values staged through shared memory, each mask word decoded by one warp with a
popcount prefix) and let cuBLAS multiply.

Forward: y = z S = z (S^T)^T. Backward: grad_z = grad S^T with the same decode; grad S^T = grad^T z (dense, cuBLAS),
whose entries at S's nonzeros the gather kernel writes into grad_values' order (each once: deterministic). The dense
S^T (d_out x k) exists for the call only. It costs k d_out writes and reads more than the fused Triton kernels, which
decode in registers: this path is for token counts where the GEMM dominates (the measured auto picks per shape).
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from ... import native
from . import check, stream


def _dense_t(values: Tensor, bitmask: Tensor, offsets: Tensor, k: int, dtype: torch.dtype) -> Tensor:
    """S^T (d_out x k) in ``dtype``, decoded from the (contiguous) codes."""
    s, d_out = values.shape
    dense_t = torch.empty((d_out, k), dtype=dtype, device=values.device)
    check(native.CUDA.dict_bitmask_to_dense_t(values.data_ptr(), native.FLOAT_CODES[values.dtype], bitmask.data_ptr(),
                                              offsets.data_ptr(), native.OFFSET_CODES[offsets.dtype],
                                              dense_t.data_ptr(), native.FLOAT_CODES[dtype], k, s, d_out,
                                              *stream(values)), "dict_bitmask_matmul")
    return dense_t


def dict_bitmask_matmul(z: Tensor, values: Tensor, bitmask: Tensor, offsets: Tensor) -> Tensor:
    """y = z S in z's dtype (cuBLAS on the decoded S^T; fp32 follows torch's TF32 setting, as torch.matmul does)."""
    values, bitmask, offsets = values.contiguous(), bitmask.contiguous(), offsets.contiguous()
    return torch.matmul(z, _dense_t(values, bitmask, offsets, z.shape[1], z.dtype).t())


def dict_bitmask_matmul_backward(grad: Tensor, z: Tensor, values: Tensor, bitmask: Tensor,
                                 offsets: Tensor) -> Tuple[Tensor, Tensor]:
    """(grad_z in z's dtype, grad_values in values' dtype)."""
    values, bitmask, offsets = values.contiguous(), bitmask.contiguous(), offsets.contiguous()
    k = z.shape[1]
    s, d_out = values.shape
    g = grad if grad.dtype == z.dtype else grad.to(z.dtype)
    grad_z = torch.matmul(g, _dense_t(values, bitmask, offsets, k, z.dtype))
    # grad S^T = grad^T z: in z's dtype (cuBLAS accumulates in fp32), in fp32 when values hold more precision
    if values.dtype == torch.float32 and z.dtype != torch.float32:
        grad_s_t = torch.matmul(grad.t().to(torch.float32), z.to(torch.float32))
    else:
        grad_s_t = torch.matmul(g.t(), z)
    grad_s_t = grad_s_t.contiguous()  # (d_out x k) row-major, as the kernel reads it (matmul's output already is)
    grad_values = torch.empty_like(values)
    check(native.CUDA.dict_bitmask_gather_dense_t(grad_s_t.data_ptr(), native.FLOAT_CODES[grad_s_t.dtype],
                                                  bitmask.data_ptr(), offsets.data_ptr(),
                                                  native.OFFSET_CODES[offsets.dtype], grad_values.data_ptr(),
                                                  native.FLOAT_CODES[values.dtype], k, s, d_out, *stream(values)),
          "dict_bitmask_matmul_backward")
    return grad_z, grad_values
