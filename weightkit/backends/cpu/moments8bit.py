"""cpu backend of weightkit/ops/moments8bit.py: one C++ pass per block of 256 (csrc/cpu/moments8bit.cpp) decodes
both 8-bit moments, updates them, writes Adam's direction and re-encodes them in place, bit for bit the reference."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from ... import native
from .._blocked import flag_ptr
from . import check, threads


def blockwise8bit_adam_(low: Tensor, exp_avg_q: Tensor, exp_avg_absmax: Tensor, exp_avg_sq_q: Tensor,
                        exp_avg_sq_absmax: Tensor, code_signed: Tensor, code_unsigned: Tensor, direction: Tensor,
                        beta1: float, beta2: float, eps: float, found_inf: Optional[Tensor] = None) -> None:
    low, code_signed, code_unsigned = low.contiguous(), code_signed.contiguous(), code_unsigned.contiguous()
    check(native.CPU.blockwise8bit_adam(
        low.data_ptr(), exp_avg_q.data_ptr(), exp_avg_absmax.data_ptr(), exp_avg_sq_q.data_ptr(),
        exp_avg_sq_absmax.data_ptr(), code_signed.data_ptr(), code_unsigned.data_ptr(), direction.data_ptr(),
        low.numel(), beta1, beta2, 1.0 - beta1, 1.0 - beta2, eps, flag_ptr(found_inf), threads()),
        "blockwise8bit_adam_")
