"""cuda backend of weightkit/ops/qgalore.py: the write-back composed of this backend's INT4 dequantization and fused
INT8 update, a block of rows at a time (weightkit.backends._blocked.sr_lowrank_update_by_rows)."""

from __future__ import annotations

from torch import Tensor

from .._blocked import sr_lowrank_update_by_rows
from .int4 import dequantize_int4
from .int8 import int8_sr_update_


def int8_sr_lowrank_update_(w_q: Tensor, scale: Tensor, ortho_q: Tensor, ortho_scale: Tensor, ortho_zero: Tensor,
                            update: Tensor, group_size: int, proj_group_size: int, left: bool, alpha: float,
                            decay: float, precision: str, seed: int, offset: int) -> None:
    m, n = w_q.shape
    shape = (m, update.shape[0]) if left else (update.shape[1], n)
    ortho = dequantize_int4(ortho_q.contiguous(), ortho_scale.contiguous(), ortho_zero.contiguous(),
                            proj_group_size).reshape(shape)
    sr_lowrank_update_by_rows(w_q, scale, ortho, update, group_size, left, alpha, decay, precision, seed, offset,
                              int8_sr_update_)
