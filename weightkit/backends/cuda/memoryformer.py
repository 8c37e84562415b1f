"""cuda backend of weightkit/ops/memoryformer.py."""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from ... import native
from . import check, stream


def memory_lookup_forward(x: Tensor, tables: Tensor, t: float) -> Tensor:
    x2 = (x if x.dim() == 2 else x.reshape(-1, x.shape[-1])).contiguous()
    tables = tables.contiguous()
    n = x2.shape[0]
    k, buckets, d_out = tables.shape
    y = torch.empty((n, d_out), dtype=x.dtype, device=x.device)
    check(native.CUDA.memory_lookup_forward(x2.data_ptr(), native.FLOAT_CODES[x.dtype], tables.data_ptr(),
                                            native.FLOAT_CODES[tables.dtype], y.data_ptr(), n, k, buckets, d_out,
                                            buckets.bit_length() - 1, t, *stream(x2)), "memory_lookup_forward")
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], d_out)


def memory_lookup_backward(grad: Tensor, x: Tensor, tables: Tensor, t: float,
                           deterministic: bool) -> Tuple[Tensor, Tensor]:
    """(grad_x in x's dtype, grad_tables in tables' dtype): atomics unless ``deterministic``, then a stable
    torch.sort of the (table, bucket) keys and a segmented sum."""
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    g2 = grad if grad.dim() == 2 else grad.reshape(-1, grad.shape[-1])
    n = x2.shape[0]
    k, buckets, d_out = tables.shape
    tau = buckets.bit_length() - 1
    xf, gf = x2.to(torch.float32).contiguous(), g2.to(torch.float32).contiguous()
    tf = tables.to(torch.float32).contiguous()
    gx = torch.empty((n, k * tau), dtype=torch.float32, device=x.device)
    gt = torch.zeros((k, buckets, d_out), dtype=torch.float32, device=x.device)
    device, st = stream(xf)
    keys = torch.empty((n, k), dtype=torch.int64, device=x.device)
    ps = torch.empty((n, k), dtype=torch.float32, device=x.device)
    if n > 0:
        check(native.CUDA.memory_lookup_backward(gf.data_ptr(), xf.data_ptr(), tf.data_ptr(), gx.data_ptr(),
                                                 gt.data_ptr(), keys.data_ptr(), ps.data_ptr(), n, k, buckets, d_out,
                                                 tau, t, int(not deterministic), device, st), "memory_lookup_backward")
        if deterministic and k > 0 and d_out > 0:
            sorted_keys, order = torch.sort(keys.reshape(-1), stable=True)
            check(native.CUDA.memory_segment_sum(sorted_keys.data_ptr(), order.data_ptr(), ps.data_ptr(),
                                                 gf.data_ptr(), gt.data_ptr(), n * k, k, d_out, device, st),
                  "memory_lookup_backward")
    gx = gx.to(x.dtype)
    return (gx if x.dim() == 2 else gx.reshape(x.shape)), gt.to(tables.dtype)
