"""triton backend of weightkit/ops/moments8bit.py."""

from __future__ import annotations

from typing import Optional

from torch import Tensor


def blockwise8bit_adam_(low: Tensor, exp_avg_q: Tensor, exp_avg_absmax: Tensor, exp_avg_sq_q: Tensor,
                        exp_avg_sq_absmax: Tensor, code_signed: Tensor, code_unsigned: Tensor, direction: Tensor,
                        beta1: float, beta2: float, eps: float, found_inf: Optional[Tensor] = None) -> None:
    from ...kernels.qgalore import blockwise8bit_adam_triton

    blockwise8bit_adam_triton(low.contiguous(), exp_avg_q, exp_avg_absmax, exp_avg_sq_q, exp_avg_sq_absmax,
                              code_signed.contiguous(), code_unsigned.contiguous(), direction, beta1, beta2, eps,
                              found_inf)
