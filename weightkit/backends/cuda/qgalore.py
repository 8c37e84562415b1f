"""cuda backend of weightkit/ops/qgalore.py: the write-back composed of this backend's INT4 dequantization and fused
INT8 update, a block of rows at a time (weightkit.backends._blocked.sr_lowrank_update_composed)."""

from __future__ import annotations

from torch import Tensor

from .._blocked import sr_lowrank_update_composed
from .int4 import dequantize_int4
from .int8 import int8_sr_update_


def int8_sr_lowrank_update_(w_q: Tensor, scale: Tensor, ortho_q: Tensor, ortho_scale: Tensor, ortho_zero: Tensor,
                            update: Tensor, group_size: int, proj_group_size: int, left: bool, alpha: float,
                            decay: float, precision: str, seed: int, offset: int) -> None:
    sr_lowrank_update_composed(w_q, scale, ortho_q, ortho_scale, ortho_zero, update, group_size, proj_group_size, left,
                               alpha, decay, precision, seed, offset, dequantize=dequantize_int4,
                               sr_update=int8_sr_update_)
