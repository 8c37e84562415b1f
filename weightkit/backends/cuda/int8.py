"""cuda backend of weightkit/ops/int8.py."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ... import native
from .._blocked import dequant_matmul, flag_ptr
from . import GEMV_MAX_TOKENS, check, gemv, stream


def stochastic_round_int8(x: Tensor, scale: Tensor, group_size: int, seed: int, offset: int) -> Tensor:
    x, scale = x.contiguous(), scale.contiguous()
    out = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    check(native.CUDA.stochastic_round_int8(x.data_ptr(), native.FLOAT_CODES[x.dtype], scale.data_ptr(),
                                            out.data_ptr(), x.numel(), group_size, seed, offset, *stream(x)),
          "stochastic_round_int8")
    return out


def int8_sr_update_(w_q: Tensor, scale: Tensor, delta: Tensor, group_size: int, decay: float, seed: int,
                    offset: int, found_inf: Optional[Tensor] = None) -> None:
    """In place on w_q and scale (contiguous: the op checks it); nothing written where found_inf is set (read by
    the kernel, on the device)."""
    delta = delta.contiguous()
    check(native.CUDA.int8_sr_update(w_q.data_ptr(), scale.data_ptr(), delta.data_ptr(),
                                     native.FLOAT_CODES[delta.dtype], scale.numel(), group_size, decay, seed, offset,
                                     flag_ptr(found_inf), *stream(w_q)), "int8_sr_update_")


def int8_matmul(x: Tensor, w_q: Tensor, scale: Tensor, group_size: int, transpose: bool) -> Tensor:
    """y = x W^T, or x W with transpose. Up to GEMV_MAX_TOKENS tokens of y = x W^T (in_f and group_size multiples of
    16): one GEMV kernel reading W once (wk_cuda_int8_gemv). Otherwise W dequantized to x's dtype (blocks of at most
    128 MB) and multiplied by cuBLAS through torch (backends/_blocked.dequant_matmul)."""
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    w_q, scale = w_q.contiguous(), scale.contiguous()
    out_f, in_f = w_q.shape
    q, s = w_q.data_ptr(), scale.data_ptr()
    code = native.FLOAT_CODES[x.dtype]
    device, st = stream(x2)
    if (not transpose and 1 <= x2.shape[0] <= GEMV_MAX_TOKENS and in_f % 16 == 0 and group_size % 16 == 0
            and q % 16 == 0):
        return gemv(x, out_f, device, lambda xp, yp, tokens, rows: native.CUDA.int8_gemv(
            xp, code, q, s, yp, tokens, out_f, in_f, group_size, rows, device, st), "int8_matmul")

    def dequant(dst, r0, nr, c0, nc):
        check(native.CUDA.dequantize_int8(q, s, dst.data_ptr(), code, in_f, group_size, r0, nr, c0, nc, device, st),
              "int8_matmul")

    y = dequant_matmul(x2, out_f, in_f, transpose, dequant)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])
