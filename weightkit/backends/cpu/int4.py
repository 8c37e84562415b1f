"""cpu backend of weightkit/ops/int4.py."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ... import native
from .._blocked import int4_matmul_blocked, matmul_out_dtype
from . import check, threads


def quantize_int4(x: Tensor, group_size: int) -> Tuple[Tensor, Tensor, Tensor]:
    """(packed uint8, scale fp32, zero uint8)."""
    xf = x.to(torch.float32).contiguous()
    n = xf.numel()
    groups = n // group_size
    packed = torch.empty((n // 2,), dtype=torch.uint8)
    scale = torch.empty((groups,), dtype=torch.float32)
    zero = torch.empty((groups,), dtype=torch.uint8)
    check(native.CPU.quantize_int4(xf.data_ptr(), packed.data_ptr(), scale.data_ptr(), zero.data_ptr(), groups,
                                   group_size, threads()), "quantize_int4")
    return packed, scale, zero


def _dequantize_into(out: Tensor, packed: Tensor, scale: Tensor, zero: Tensor, group_size: int, e0: int,
                     e1: int) -> None:
    """out (fp32, contiguous) <- the flat elements [e0, e1) of the dequantized matrix."""
    check(native.CPU.dequantize_int4(packed.data_ptr(), scale.data_ptr(), zero.data_ptr(), out.data_ptr(), group_size,
                                     e0, e1, threads()), "dequantize_int4")


def dequantize_int4(packed: Tensor, scale: Tensor, zero: Tensor, group_size: int) -> Tensor:
    """Flat float32 values."""
    packed, scale, zero = packed.contiguous(), scale.contiguous(), zero.contiguous()
    n = packed.numel() * 2
    out = torch.empty((n,), dtype=torch.float32)
    _dequantize_into(out, packed, scale, zero, group_size, 0, n)
    return out


def int4_matmul(x: Tensor, packed: Tensor, scale: Tensor, zero: Tensor, group_size: int, shape,
                transpose: bool, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """y = x W^T or x W, W = dequant (rows x cols = shape); x of any rank and strides (~4M values (16 MB) per block).
    ``out_dtype=float32`` for a 16-bit x: x converted to float32 by blocks of rows (matmul_out_dtype)."""
    return matmul_out_dtype(x, shape[1] if transpose else shape[0], out_dtype, lambda x2: int4_matmul_blocked(
        x2, packed, scale, zero, group_size, shape, transpose, _dequantize_into, 1 << 22))
