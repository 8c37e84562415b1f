"""triton backend of weightkit/ops/memoryformer.py."""

from __future__ import annotations

from torch import Tensor


def memory_lookup_forward(x: Tensor, tables: Tensor, t: float) -> Tensor:
    from ...kernels.memoryformer import memory_lookup_forward_triton

    x2 = (x if x.dim() == 2 else x.reshape(-1, x.shape[-1])).contiguous()
    y = memory_lookup_forward_triton(x2, tables.contiguous(), t)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], tables.shape[-1])


def memory_lookup_backward(grad: Tensor, x: Tensor, tables: Tensor, t: float, deterministic: bool,
                           segments: bool = True):
    from ...kernels.memoryformer import memory_lookup_backward_triton

    x2 = (x if x.dim() == 2 else x.reshape(-1, x.shape[-1])).contiguous()
    g2 = (grad if grad.dim() == 2 else grad.reshape(-1, grad.shape[-1])).contiguous()
    gx, gt = memory_lookup_backward_triton(g2, x2, tables.contiguous(), t, deterministic, segments)
    return (gx if x.dim() == 2 else gx.reshape(x.shape)), gt
