"""triton backend of weightkit/ops/int4.py."""

from __future__ import annotations

from torch import Tensor


def quantize_int4(x: Tensor, group_size: int):
    from ...kernels.int4 import quantize_int4_triton

    return quantize_int4_triton(x.contiguous(), group_size)


def dequantize_int4(packed: Tensor, scale: Tensor, zero: Tensor, group_size: int) -> Tensor:
    from ...kernels.int4 import dequantize_int4_triton

    return dequantize_int4_triton(packed.contiguous(), scale.contiguous(), zero.contiguous(), group_size)


def int4_matmul(x: Tensor, packed: Tensor, scale: Tensor, zero: Tensor, group_size: int, shape,
                transpose: bool) -> Tensor:
    from ...kernels.int4 import int4_matmul_triton

    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    y = int4_matmul_triton(x2, packed.contiguous(), scale.contiguous(), zero.contiguous(), group_size, shape[0],
                           shape[1], transpose)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])
