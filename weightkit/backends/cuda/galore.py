"""cuda backend of weightkit/ops/galore.py: this backend's low-rank Adam kernel, then cuBLAS applies P U
(weightkit.backends._blocked.galore_adam_update_composed; lowrank_update_: that write-back alone); the bf16 parts of
a projection's gradient in one pass."""

from __future__ import annotations

import torch
from torch import Tensor

from ... import native
from .._blocked import galore_adam_update_of, lowrank_update_of, stacked_shape
from . import check, stream


def _low_rank_adam(low_grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, update: Tensor, beta1: float, beta2: float,
                   eps: float) -> None:
    """M, V updated in place and U = M / (sqrt(V) + eps) written, in one pass; all contiguous float32."""
    check(native.CUDA.low_rank_adam(low_grad.data_ptr(), exp_avg.data_ptr(), exp_avg_sq.data_ptr(), update.data_ptr(),
                                     low_grad.numel(), beta1, beta2, eps, *stream(low_grad)), "galore_adam_update_")


galore_adam_update_ = galore_adam_update_of(_low_rank_adam, True, __name__)
lowrank_update_ = lowrank_update_of(True, __name__)  # the write-back alone (weightkit.ops.galore.lowrank_update_)


def bf16_parts(x: Tensor, dim: int) -> Tensor:
    """weightkit.ops.galore.bf16_parts: one kernel pass (x read once, any strides; each part written once)."""
    rows, cols = x.shape
    out = torch.empty(stacked_shape(x, dim)[1], dtype=torch.bfloat16, device=x.device)
    device, raw_stream = stream(x)
    check(native.CUDA.bf16_parts(x.data_ptr(), native.FLOAT_CODES[x.dtype], out.data_ptr(), rows, cols, x.stride(0),
                                 x.stride(1), out.stride(0), rows * cols if dim == 0 else cols, device, raw_stream),
          "bf16_parts")
    return out
