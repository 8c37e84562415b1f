"""cpu backend of weightkit/ops/int8.py."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ... import native
from .._blocked import blocked_dequant_matmul, flag_ptr
from . import check, threads

# Up to this many tokens the int8 matmul reads the int8 weight directly (wk_cpu_int8_matvec), never dequantizing.
INT8_MATVEC_TOKENS = 8


def stochastic_round_int8(x: Tensor, scale: Tensor, group_size: int, seed: int, offset: int) -> Tensor:
    x, scale = x.contiguous(), scale.contiguous()
    out = torch.empty(x.shape, dtype=torch.int8)
    check(native.CPU.stochastic_round_int8(x.data_ptr(), native.FLOAT_CODES[x.dtype], scale.data_ptr(),
                                           out.data_ptr(), x.numel(), group_size, seed, offset, threads()),
          "stochastic_round_int8")
    return out


def int8_sr_update_(w_q: Tensor, scale: Tensor, delta: Tensor, group_size: int, decay: float, seed: int,
                    offset: int, found_inf: Optional[Tensor] = None) -> None:
    """In place on w_q and scale (contiguous: the op checks it); nothing written where found_inf is set (read by
    the kernel)."""
    delta = delta.contiguous()
    check(native.CPU.int8_sr_update(w_q.data_ptr(), scale.data_ptr(), delta.data_ptr(), native.FLOAT_CODES[delta.dtype],
                                    scale.numel(), group_size, decay, seed, offset, flag_ptr(found_inf), threads()),
          "int8_sr_update_")


def int8_matmul(x: Tensor, w_q: Tensor, scale: Tensor, group_size: int, transpose: bool) -> Tensor:
    """y = x W^T, or x W with transpose (W = dequant(w_q)); x of any rank."""
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    w_q, scale = w_q.contiguous(), scale.contiguous()
    out_f, in_f = w_q.shape
    q, s = w_q.data_ptr(), scale.data_ptr()
    xf = x2.to(torch.float32).contiguous()
    n = threads()
    if x2.shape[0] <= INT8_MATVEC_TOKENS:
        y = torch.empty((x2.shape[0], in_f if transpose else out_f), dtype=torch.float32)
        check(native.CPU.int8_matvec(xf.data_ptr(), q, s, y.data_ptr(), x2.shape[0], out_f, in_f, group_size,
                                     int(transpose), n), "int8_matmul")
        y = y.to(x.dtype)
    else:
        def dequant(dst, r0, nr):
            check(native.CPU.int8_dequantize_rows(q, s, dst.data_ptr(), r0, r0 + nr, in_f, group_size, n),
                  "int8_matmul")

        # ~4M values (16 MB) per block
        y = blocked_dequant_matmul(xf, out_f, in_f, transpose, (1 << 22) // max(in_f, 1), dequant).to(x.dtype)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])
