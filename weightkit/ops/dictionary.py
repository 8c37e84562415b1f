"""Sparse-dense dictionary matmul (CoSpaDi, arXiv 2509.22075).

A weight with nn.Linear's convention y = x W^T is stored as W^T (d_in x d_out) = D S: D dense (d_in x k) and S
(k x d_out) with exactly s nonzeros per column, kept compactly as ``values`` (s x d_out) and ``indices``
(s x d_out; uint8 when k <= 256, int16 when k <= 32768). With Z = x D (a dense matmul, tokens x k):

    y[:, j] = sum_t values[t, j] * Z[:, indices[t, j]]                     (``dict_sparse_gather``)

Backward (indices frozen): grad_Z[:, indices[t, j]] += values[t, j] grad_y[:, j];
grad_values[t, j] = <grad_y[:, j], Z[:, indices[t, j]]>. Accumulation is fp32; outputs have Z's dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import native
from ..backend import KernelTable
from ._checks import FLOAT_DTYPES, check_tensor, require_finite
from ._registry import define

__all__ = ["dict_sparse_gather", "index_dtype_for"]

INDEX_DTYPES = (torch.uint8, torch.int16, torch.int32, torch.int64)
_FWD = KernelTable("dict_sparse_gather")
_BWD = KernelTable("dict_sparse_gather_backward")


def index_dtype_for(k: int) -> torch.dtype:
    """The narrowest index dtype that holds atom indices 0..k-1."""
    if k <= 256:
        return torch.uint8
    if k <= 32768:
        return torch.int16
    return torch.int32


def _check_args(z: Tensor, values: Tensor, indices: Tensor) -> None:
    dev = z.device
    if (z.dtype in FLOAT_DTYPES and values.dtype in FLOAT_DTYPES and indices.dtype in INDEX_DTYPES and z.dim() == 2
            and values.dim() == 2 and values.device == dev and indices.device == dev and z.numel() and values.numel()
            and indices.shape == values.shape):
        return  # the usual valid call, in one expression (half the cost of the checks below, which name the error)
    check_tensor("z", z, dtypes=FLOAT_DTYPES, ndim=2)
    check_tensor("values", values, dtypes=FLOAT_DTYPES, ndim=2, device=z.device)
    check_tensor("indices", indices, dtypes=INDEX_DTYPES, ndim=2, device=z.device)
    if indices.shape != values.shape:
        raise ValueError(f"indices {tuple(indices.shape)} and values {tuple(values.shape)} must have the same shape")


def _check_data(z: Tensor, values: Tensor, indices: Tensor) -> None:
    # read the data (a host sync on a GPU): debug checks; DictLinear validates its indices when built or loaded, and
    # values are parameters: checking them on every call would cost more than the gather
    k = z.shape[1]
    lo, hi = int(indices.min()), int(indices.max())
    if lo < 0 or hi >= k:
        raise ValueError(f"indices must lie in [0, k={k}) (the columns of z), got values in [{lo}, {hi}]")
    require_finite("z", z)


@_FWD.register("reference")
def dict_sparse_gather_reference(z: Tensor, values: Tensor, indices: Tensor) -> Tensor:
    compute = torch.promote_types(z.dtype, torch.float32)
    gathered = z.to(compute)[:, indices.long()]  # (N, s, d_out)
    return (gathered * values.to(compute)).sum(1).to(z.dtype)


@_BWD.register("reference")
def dict_sparse_gather_backward_reference(grad: Tensor, z: Tensor, values: Tensor, indices: Tensor):
    idx = indices.long()
    g = grad.to(torch.float64)
    gz = torch.zeros(z.shape, dtype=torch.float64, device=z.device)
    gz.index_add_(1, idx.reshape(-1), (values.to(torch.float64)[None] * g[:, None, :]).reshape(g.shape[0], -1))
    gv = (z.to(torch.float64)[:, idx] * g[:, None, :]).sum(0)
    return gz.to(z.dtype), gv.to(values.dtype)


@_FWD.register("cpu")
@_FWD.register("cuda")
def _fwd_compiled(z, values, indices):
    return native.dict_sparse_gather(z, values, indices)


@_BWD.register("cpu")
@_BWD.register("cuda")
def _bwd_compiled(grad, z, values, indices):
    return native.dict_sparse_gather_backward(grad, z, values, indices)


@_FWD.register("triton")
def _fwd_triton(z, values, indices):
    from ..kernels.dictionary import dict_sparse_gather_triton

    return dict_sparse_gather_triton(z.contiguous(), values.contiguous(), indices.contiguous())


@_BWD.register("triton")
def _bwd_triton(grad, z, values, indices):
    from ..kernels.dictionary import dict_sparse_gather_backward_triton

    return dict_sparse_gather_backward_triton(grad.contiguous(), z.contiguous(), values.contiguous(),
                                              indices.contiguous())


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    z, values, indices = ctx.saved_tensors
    gz, gv = _bwd_op(grad.contiguous(), z, values, indices)
    return gz, gv, None


_fwd_op = define(
    "dict_sparse_gather(Tensor z, Tensor values, Tensor indices) -> Tensor",
    table=_FWD, check=_check_args, debug_check=_check_data,
    fake=lambda z, values, indices: z.new_empty((z.shape[0], values.shape[1])),
    backward=_backward, setup_context=_setup)

_bwd_op = define(
    "dict_sparse_gather_backward(Tensor grad, Tensor z, Tensor values, Tensor indices) -> (Tensor, Tensor)",
    table=_BWD, fake=lambda grad, z, values, indices: (torch.empty_like(z), torch.empty_like(values)))


def dict_sparse_gather(z: Tensor, values: Tensor, indices: Tensor) -> Tensor:
    """``y[:, j] = sum_t values[t, j] * z[:, indices[t, j]]`` (see the module docstring); differentiable in z and
    values."""
    return _fwd_op(z, values, indices)
