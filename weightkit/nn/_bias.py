"""The bias step the drop-in layers share."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def add_bias(y: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``y + bias`` in y's dtype, as nn.Linear under autocast; without autograd in place, into the layer's fresh
    output ``y``."""
    if bias is None:
        return y
    if bias.dtype != y.dtype:
        bias = bias.to(y.dtype)
    return y + bias if torch.is_grad_enabled() else y.add_(bias)
