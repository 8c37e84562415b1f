"""triton backend of weightkit/ops/galore.py."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from .._blocked import matmul_precision


def galore_adam_update_(weight: Tensor, low_grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, ortho: Tensor,
                        left: bool, beta1: float, beta2: float, eps: float, step_size: float, scale: float,
                        decay: float, found_inf: Optional[Tensor] = None, step_size_t: Optional[Tensor] = None) -> None:
    from ...kernels.galore import galore_adam_update_triton

    galore_adam_update_triton(weight, low_grad.contiguous(), exp_avg, exp_avg_sq, ortho.contiguous(), left, beta1,
                              beta2, eps, step_size, scale, decay, found_inf=found_inf, step_size_t=step_size_t,
                              tf32=matmul_precision(weight.device) == "tf32")


def lowrank_update_(weight: Tensor, update: Tensor, ortho: Tensor, left: bool, step_size: float, scale: float,
                    decay: float, found_inf: Optional[Tensor] = None, step_size_t: Optional[Tensor] = None) -> None:
    from ...kernels.galore import lowrank_update_triton

    # a 16-bit basis's products take U in its dtype (as galore_adam_update_'s kernel writes it): rounded once here,
    # the same values the kernel's in-register cast gives, half the bytes per tile and galore_adam_update_'s tuning
    update = update.to(ortho.dtype).contiguous()
    lowrank_update_triton(weight, update, ortho.contiguous(), left, step_size, scale, decay, found_inf=found_inf,
                          step_size_t=step_size_t, tf32=matmul_precision(weight.device) == "tf32")


def bf16_parts(x: Tensor, dim: int) -> Tensor:
    from ...kernels.galore import bf16_parts_triton

    return bf16_parts_triton(x, dim)
