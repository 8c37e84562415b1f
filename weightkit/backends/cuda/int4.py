"""cuda backend of weightkit/ops/int4.py."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ... import native
from ...backend import rows_of
from .._blocked import dequant_matmul, matmul_out_dtype, split3_dequant_matmul, split_products_apply
from . import GEMV_MAX_TOKENS, check, gemv, stream
from .galore import bf16_parts


def quantize_int4(x: Tensor, group_size: int) -> Tuple[Tensor, Tensor, Tensor]:
    """(packed uint8, scale fp32, zero uint8)."""
    xf = x.to(torch.float32).contiguous()
    n = xf.numel()
    groups = n // group_size
    packed = torch.empty((n // 2,), dtype=torch.uint8, device=x.device)
    scale = torch.empty((groups,), dtype=torch.float32, device=x.device)
    zero = torch.empty((groups,), dtype=torch.uint8, device=x.device)
    check(native.CUDA.quantize_int4(xf.data_ptr(), packed.data_ptr(), scale.data_ptr(), zero.data_ptr(), groups,
                                    group_size, *stream(xf)), "quantize_int4")
    return packed, scale, zero


def dequantize_int4(packed: Tensor, scale: Tensor, zero: Tensor, group_size: int) -> Tensor:
    """Flat float32 values (the block of one row holding them all)."""
    packed, scale, zero = packed.contiguous(), scale.contiguous(), zero.contiguous()
    n = packed.numel() * 2
    out = torch.empty((n,), dtype=torch.float32, device=packed.device)
    check(native.CUDA.dequantize_int4(packed.data_ptr(), scale.data_ptr(), zero.data_ptr(), out.data_ptr(),
                                      native.FLOAT_CODES[torch.float32], n, group_size, 0, 1, 0, n, *stream(packed)),
          "dequantize_int4")
    return out


def int4_matmul(x: Tensor, packed: Tensor, scale: Tensor, zero: Tensor, group_size: int, shape,
                transpose: bool, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """y = x W^T or x W, W = dequant (rows x cols = shape); x of any rank and strides. Up to GEMV_MAX_TOKENS tokens
    of y = x W^T (cols and group_size multiples of 32): one GEMV kernel reading the packed W once
    (wk_cuda_int4_gemv). Otherwise W is dequantized to x's dtype (blocks of at most 128 MB) and multiplied by cuBLAS
    through torch (backends/_blocked.dequant_matmul).

    ``out_dtype=float32`` for a 16-bit x (GaLore's projections of a 16-bit gradient): where the GEMV does not run
    and TF32 is not allowed, W's float32 values in three bf16 parts, three cuBLAS products of a bf16 x on bf16
    tensor cores with float32 results, five of a float16 x split in two bf16 parts by blocks of rows (by this
    backend's bf16_parts kernel) (backends/_blocked.split3_dequant_matmul: float32 accuracy, no float32 copy of x;
    where this torch's mm has no float32 output for bf16, as below); otherwise x converted to float32 by blocks of
    rows (matmul_out_dtype) and W dequantized to float32 (TF32 where the user allows it)."""
    rows, cols = shape
    packed, scale, zero = packed.contiguous(), scale.contiguous(), zero.contiguous()
    p, s, z = packed.data_ptr(), scale.data_ptr(), zero.data_ptr()

    def dequant_args(x2: Tensor):
        device, st = stream(x2)

        def dequant(dst, r0, nr, c0, nc):
            check(native.CUDA.dequantize_int4(p, s, z, dst.data_ptr(), native.FLOAT_CODES[dst.dtype], cols,
                                              group_size, r0, nr, c0, nc, device, st), "int4_matmul")
        return device, st, dequant

    def gemv_runs(tokens: int) -> bool:
        return not transpose and 1 <= tokens <= GEMV_MAX_TOKENS and cols % 32 == 0 and group_size % 32 == 0 \
            and p % 16 == 0

    def run(x2: Tensor) -> Tensor:
        device, st, dequant = dequant_args(x2)
        if gemv_runs(x2.shape[0]):
            code = native.FLOAT_CODES[x2.dtype]
            return gemv(x2, rows, device, lambda xp, yp, tokens, rows_per_warp: native.CUDA.int4_gemv(
                xp, code, p, s, z, yp, tokens, rows, cols, group_size, rows_per_warp, device, st), "int4_matmul")
        return dequant_matmul(x2, rows, cols, transpose, dequant)

    n_out = cols if transpose else rows
    if (out_dtype == torch.float32 and x.dtype in (torch.bfloat16, torch.float16) and not gemv_runs(rows_of(x))
            and split_products_apply(x.device)):
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        y = split3_dequant_matmul(x2, rows, cols, transpose, dequant_args(x2)[2], True, stack=bf16_parts)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], n_out)
    return matmul_out_dtype(x, n_out, out_dtype, run)
