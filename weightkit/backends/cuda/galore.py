"""cuda backend of weightkit/ops/galore.py."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ... import native
from .._blocked import low_rank_update, masked_low_rank_adam
from . import check, stream


def galore_adam_update_(weight: Tensor, low_grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, ortho: Tensor,
                        left: bool, beta1: float, beta2: float, eps: float, step_size: float, scale: float,
                        decay: float, found_inf: Optional[Tensor] = None, step_size_t: Optional[Tensor] = None) -> None:
    """weight, exp_avg, exp_avg_sq contiguous (the op makes them so). The kernel updates M, V and writes U in one
    pass (with a device-side ``found_inf``, torch does it predicated); then cuBLAS applies P U
    (weightkit.backends._blocked.low_rank_update: no full-size temporary)."""
    low_grad = low_grad.contiguous()
    if found_inf is not None:
        update = masked_low_rank_adam(low_grad, exp_avg, exp_avg_sq, beta1, beta2, eps, found_inf)
    else:
        update = torch.empty_like(low_grad)
        check(native.CUDA.low_rank_adam(low_grad.data_ptr(), exp_avg.data_ptr(), exp_avg_sq.data_ptr(), update.data_ptr(),
                                        low_grad.numel(), beta1, beta2, eps, *stream(weight)), "galore_adam_update_")
    low_rank_update(weight, update, ortho.contiguous(), left, step_size, scale, decay, found_inf, step_size_t,
                    tensor_cores=True)
