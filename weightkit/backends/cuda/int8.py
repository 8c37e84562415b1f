"""cuda backend of weightkit/ops/int8.py."""

from __future__ import annotations

import torch
from torch import Tensor

from ... import native
from .._blocked import blocked_dequant_matmul
from . import check, stream


def stochastic_round_int8(x: Tensor, scale: Tensor, group_size: int, seed: int, offset: int) -> Tensor:
    x, scale = x.contiguous(), scale.contiguous()
    out = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    check(native.CUDA.stochastic_round_int8(x.data_ptr(), native.FLOAT_CODES[x.dtype], scale.data_ptr(),
                                            out.data_ptr(), x.numel(), group_size, seed, offset, *stream(x)),
          "stochastic_round_int8")
    return out


def int8_sr_update_(w_q: Tensor, scale: Tensor, delta: Tensor, group_size: int, decay: float, seed: int,
                    offset: int) -> None:
    """In place on w_q and scale (contiguous: the op checks it)."""
    delta = delta.contiguous()
    check(native.CUDA.int8_sr_update(w_q.data_ptr(), scale.data_ptr(), delta.data_ptr(),
                                     native.FLOAT_CODES[delta.dtype], scale.numel(), group_size, decay, seed, offset,
                                     *stream(w_q)), "int8_sr_update_")


def int8_matmul(x: Tensor, w_q: Tensor, scale: Tensor, group_size: int, transpose: bool) -> Tensor:
    """y = x W^T, or x W with transpose: blocks of dequantized rows (up to 16M values) around cuBLAS."""
    x2 = (x if x.dim() == 2 else x.reshape(-1, x.shape[-1])).contiguous()
    w_q, scale = w_q.contiguous(), scale.contiguous()
    out_f, in_f = w_q.shape
    q, s = w_q.data_ptr(), scale.data_ptr()
    device, st = stream(x2)

    def dequant(dst, r0, nr):
        check(native.CUDA.int8_dequantize_rows(q, s, dst.data_ptr(), r0, nr, in_f, group_size, device, st),
              "int8_matmul")

    y = blocked_dequant_matmul(x2, out_f, in_f, transpose, (1 << 24) // max(in_f, 1), dequant)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])
