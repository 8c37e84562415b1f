"""cpu backend of weightkit/ops/galore.py."""

from __future__ import annotations

import torch
from torch import Tensor

from ... import native
from .._blocked import low_rank_update
from . import check, threads


def galore_adam_update_(weight: Tensor, low_grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, ortho: Tensor,
                        left: bool, beta1: float, beta2: float, eps: float, step_size: float, scale: float,
                        decay: float) -> None:
    """weight, exp_avg, exp_avg_sq contiguous (the op makes them so). The kernel updates M, V and writes U in one
    pass; then BLAS applies P U (weightkit.backends._blocked.low_rank_update)."""
    low_grad = low_grad.contiguous()
    update = torch.empty_like(low_grad)
    check(native.CPU.low_rank_adam(low_grad.data_ptr(), exp_avg.data_ptr(), exp_avg_sq.data_ptr(), update.data_ptr(),
                                   low_grad.numel(), beta1, beta2, eps, threads()), "galore_adam_update_")
    low_rank_update(weight, update, ortho.contiguous(), left, step_size, scale, decay)
