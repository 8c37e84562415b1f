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
    """``out_dtype=float32`` for a 16-bit x: where W's rows are whole groups that the tensor-core kernel's K steps
    divide (kernels._shared.mm_k_step) and W is not transposed, the kernel multiplies x's 16-bit values by W's
    integers q - z (exact), scales each K step's dot by the group scales in float32 and stores its float32
    accumulators: every product exact, no float32 copy of x (GaLore's right projection G P^T of a 16-bit gradient,
    weightkit.optim.basis.Int4Basis.project). Otherwise the weight would be rounded to x's dtype before the dot, so x
    goes to float32 by blocks of rows for the float32 kernel (matmul_out_dtype)."""
    from ...kernels._shared import mm_k_step
    from ...kernels.int4 import int4_matmul_triton

    rows, cols = int(shape[0]), int(shape[1])
    packed, scale, zero = packed.contiguous(), scale.contiguous(), zero.contiguous()

    def run(x2: Tensor, out: Optional[torch.dtype] = None) -> Tensor:
        return int4_matmul_triton(x2, packed, scale, zero, group_size, rows, cols, transpose, out_dtype=out)

    n_out = cols if transpose else rows
    if (out_dtype is not None and out_dtype != x.dtype and not transpose
            and mm_k_step(group_size, cols % group_size == 0, fma=False) is not None):
        # exact products: the kernel reads x's 16-bit values as they are and stores float32 (no conversion of x)
        return matmul_out_dtype(x, n_out, None, lambda x2: run(x2, out_dtype))
    return matmul_out_dtype(x, n_out, out_dtype, run)
