"""triton backend of weightkit/ops/qgalore.py."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from .._blocked import sr_lowrank_update_composed
from .int4 import dequantize_int4
from .int8 import int8_sr_update_


def int8_sr_lowrank_update_(w_q: Tensor, scale: Tensor, ortho_q: Tensor, ortho_scale: Tensor, ortho_zero: Tensor,
                            update: Tensor, group_size: int, proj_group_size: int, left: bool, alpha: float,
                            decay: float, precision: str, seed: int, offset: int, found_inf: Optional[Tensor] = None,
                            step_size_t: Optional[Tensor] = None) -> None:
    from ...kernels.qgalore import int8_sr_lowrank_update_triton, supports

    if not supports(group_size):
        # e.g. 127 for LLaMA-1B's 5461-wide down_proj: the fused kernel's tiles hold whole power-of-two groups, so
        # such weights take the composition of the Triton dequantization and fused INT8 update, a block of rows at a
        # time (the same results)
        sr_lowrank_update_composed(w_q, scale, ortho_q, ortho_scale, ortho_zero, update, group_size, proj_group_size,
                                   left, alpha, decay, precision, seed, offset, found_inf, step_size_t,
                                   dequantize=dequantize_int4, sr_update=int8_sr_update_)
        return
    int8_sr_lowrank_update_triton(w_q, scale, ortho_q.contiguous(), ortho_scale.contiguous(),
                                  ortho_zero.contiguous(), update.contiguous(), group_size, proj_group_size, left,
                                  alpha, decay, precision, seed, offset, found_inf, step_size_t)
