"""cpu backend of weightkit/ops/galore.py: this backend's low-rank Adam kernel, then BLAS applies P U
(weightkit.backends._blocked.galore_adam_update_composed; lowrank_update_: that write-back alone)."""

from __future__ import annotations

from torch import Tensor

from ... import native
from .._blocked import galore_adam_update_of, lowrank_update_of
from . import check, threads


def _low_rank_adam(low_grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, update: Tensor, beta1: float, beta2: float,
                   eps: float) -> None:
    """M, V updated in place and U = M / (sqrt(V) + eps) written, in one pass; all contiguous float32."""
    check(native.CPU.low_rank_adam(low_grad.data_ptr(), exp_avg.data_ptr(), exp_avg_sq.data_ptr(), update.data_ptr(),
                                     low_grad.numel(), beta1, beta2, eps, threads()), "galore_adam_update_")


galore_adam_update_ = galore_adam_update_of(_low_rank_adam, False, __name__)
lowrank_update_ = lowrank_update_of(False, __name__)  # the write-back alone (weightkit.ops.galore.lowrank_update_)
