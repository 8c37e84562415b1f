"""The blocked dequantize-then-BLAS matmul that the cpu and cuda backends share for many tokens (device-agnostic
torch code: the dequantization of each block is the backend's kernel, passed in)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def blocked_dequant_matmul(x: Tensor, rows: int, cols: int, transpose: bool, block_rows: int,
                           dequant: Callable[[Tensor, int, int], None]) -> Tensor:
    """y = x W^T (transpose=False) or x W (transpose=True) for a quantized W (rows x cols), of which ``dequant(dst,
    r0, nr)`` writes rows [r0, r0 + nr) into dst (nr x cols, fp32, contiguous). At most ``block_rows`` rows are
    dequantized at a time, so the float weight never exists whole:

    * transpose=False: block by block into Y^T (rows x tokens): each block's product is a contiguous row range of
      Y^T that BLAS writes in place, one transpose at the end; a single block writes Y = X W^T directly;
    * transpose=True: Y += X[:, r0:r0+nr] W[r0:r0+nr, :].

    x may have any strides (BLAS takes transposed views without copies); fp32 accumulation, output in x's dtype.
    """
    tokens = x.shape[0]
    step = max(1, min(rows, block_rows))
    xf = x if x.dtype == torch.float32 else x.to(torch.float32)
    buf = torch.empty((step, cols), dtype=torch.float32, device=x.device)
    if transpose:
        y = torch.zeros((tokens, cols), dtype=torch.float32, device=x.device)
    elif step == rows:
        y = torch.empty((tokens, rows), dtype=torch.float32, device=x.device)
    else:
        y = torch.empty((rows, tokens), dtype=torch.float32, device=x.device)  # Y^T
    for r0 in range(0, rows, step):
        nr = min(rows - r0, step)
        block = buf[:nr]
        dequant(block, r0, nr)
        if transpose:
            y.addmm_(xf[:, r0:r0 + nr], block)
        elif step == rows:
            torch.mm(xf, block.t(), out=y)
        else:
            torch.mm(block, xf.t(), out=y[r0:r0 + nr])
    if not transpose and step != rows:
        y = y.t().contiguous()
    return y if y.dtype == x.dtype else y.to(x.dtype)


def low_rank_update(weight: Tensor, update: Tensor, ortho: Tensor, left: bool, step_size: float, scale: float,
                    decay: float) -> None:
    """GaLore's W <- decay W - step_size scale decay (P U | U P), after the backend's kernel wrote U: BLAS addmm_
    straight into a float32 W (no full-size temporary); a bf16/fp16 W goes through one float32 m x n product, since
    BLAS has no mixed-precision in-place addmm."""
    alpha = -step_size * scale * decay
    if weight.dtype == torch.float32:
        if left:
            weight.addmm_(ortho, update, beta=decay, alpha=alpha)
        else:
            weight.addmm_(update, ortho, beta=decay, alpha=alpha)
        return
    full = torch.mm(ortho, update) if left else torch.mm(update, ortho)
    full.mul_(alpha).add_(weight.to(torch.float32), alpha=decay)
    weight.copy_(full)
