"""cpu backend of weightkit/ops/memoryformer.py."""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from ... import native
from .._blocked import memory_rows
from . import check, threads


def memory_lookup_forward(x: Tensor, tables: Tensor, t: float) -> Tensor:
    """y (..., d_out) in x's dtype."""
    x2, _, tables, (n, k, buckets, d_out, tau) = memory_rows(x, tables)
    y = torch.empty((n, d_out), dtype=x.dtype)
    check(native.CPU.memory_lookup_forward(x2.data_ptr(), native.FLOAT_CODES[x.dtype], tables.data_ptr(),
                                           native.FLOAT_CODES[tables.dtype], y.data_ptr(), n, k, buckets, d_out,
                                           tau, t, threads()), "memory_lookup_forward")
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], d_out)


def memory_lookup_backward(grad: Tensor, x: Tensor, tables: Tensor, t: float, deterministic: bool,
                           segments: bool = True) -> Tuple[Tensor, Tensor]:
    """(grad_x in x's dtype, grad_tables in tables' dtype). Always deterministic (one thread per table, tokens in
    order), so ``deterministic`` and ``segments`` change nothing here."""
    x2, g2, tables, (n, k, buckets, d_out, tau) = memory_rows(x, tables, grad)
    xf, gf, tf = x2.to(torch.float32), g2.to(torch.float32), tables.to(torch.float32)
    gx = torch.empty((n, k * tau), dtype=torch.float32)
    gt = torch.zeros((k, buckets, d_out), dtype=torch.float32)
    check(native.CPU.memory_lookup_backward(gf.data_ptr(), xf.data_ptr(), tf.data_ptr(), gx.data_ptr(), gt.data_ptr(),
                                            n, k, buckets, d_out, tau, t, threads()), "memory_lookup_backward")
    gx = gx.to(x.dtype)
    return (gx if x.dim() == 2 else gx.reshape(x.shape)), gt.to(tables.dtype)
