"""triton backend of weightkit/ops/int4.py."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._blocked import matmul_out_dtype


def quantize_int4(x: Tensor, group_size: int):
    from ...kernels.int4 import quantize_int4_triton

    return quantize_int4_triton(x.contiguous(), group_size)


def dequantize_int4(packed: Tensor, scale: Tensor, zero: Tensor, group_size: int) -> Tensor:
    from ...kernels.int4 import dequantize_int4_triton

    return dequantize_int4_triton(packed.contiguous(), scale.contiguous(), zero.contiguous(), group_size)


def int4_matmul(x: Tensor, packed: Tensor, scale: Tensor, zero: Tensor, group_size: int, shape,
                transpose: bool, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """``out_dtype=float32`` for a 16-bit x (GaLore's projections of a 16-bit gradient,
    weightkit.optim.basis.Int4Basis.project): the kernels read x's 16-bit values as they are and store their float32
    accumulators, no float32 copy of x, each product exact in float32:
    - W not transposed, its rows whole groups that the tensor-core kernel's K steps divide (kernels._shared.mm_k_step):
      x times W's integers q - z, each K step's dot scaled by the group scales in float32 (the right projection
      G P^T);
    - otherwise W's float32 values split in three bf16 parts, three products with a bf16 x's values, five with an
      fp16 x's two bf16 parts (the sixth product, below 2^-26 of the terms, left out; the kernel's SPLIT3; the left
      projection P^T G = (G^T P)^T, transposed);
    - the GEMV (at most GEMV_MAX_M rows of x) multiplies in float32 anyway."""
    from ...kernels.int4 import int4_matmul_triton

    rows, cols = int(shape[0]), int(shape[1])
    packed, scale, zero = packed.contiguous(), scale.contiguous(), zero.contiguous()

    def run(x2: Tensor, out: Optional[torch.dtype] = None) -> Tensor:
        return int4_matmul_triton(x2, packed, scale, zero, group_size, rows, cols, transpose, out_dtype=out)

    n_out = cols if transpose else rows
    if out_dtype is not None and out_dtype != x.dtype:  # (a 16-bit x: _check_mm)
        return matmul_out_dtype(x, n_out, None, lambda x2: run(x2, out_dtype))
    return matmul_out_dtype(x, n_out, out_dtype, run)
