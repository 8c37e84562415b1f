"""MemoryFormer hashed lookup (arXiv 2411.12992): ``y = sum_k p(z_k) T_k[h(z_k)]``.

x (..., d) is cut into K = d / tau chunks z_k of tau values. For chunk k:

* bucket h(z_k) = sum_i [z_{k,i} > 0] 2^i: bit i is element i's sign, element 0 the least significant bit; a zero
  counts as negative (bit 0).
* weight p(z_k) = prod_i sigmoid(2 |z_{k,i}| / t): the closed form of the softmax over all 2^tau codes of
  ``sum_i s_i z_{k,i} / t`` evaluated at the hashed code (paper Eq. 10), temperature ``t``.
* tables T (K, 2^tau, d_out): y = sum_k p(z_k) T[k, h(z_k)], accumulated in fp32, output in x's dtype.

Backward (the hash is piecewise constant, so the input gradient flows through p only):

    dT[k, h_k] += p_k g
    dz_{k,i}    = <g, T[k, h_k]> p_k (2 / t) sign(z_{k,i}) sigmoid(-2 |z_{k,i}| / t),  sign(0) = 0

``deterministic=True`` makes the table gradient a fixed-order sum (the cpu kernel always is: one thread per
table, tokens in order; cuda/triton sort tokens by bucket and sum each bucket's run in order, writing every row
once). ``torch.are_deterministic_algorithms_enabled()`` turns it on too. Otherwise the GPU backends take the
table-gradient method of ``table_grad_mode()``: "segments" (the same sorted segment reduction; the default) or
"atomics" (fp32 atomic adds into a zeroed fp32 buffer, cast to the tables' dtype at the end). Set it with the
environment variable WEIGHTKIT_MEMORY_TABLE_GRAD or ``set_table_grad_mode``. Why segments by default, from bytes
alone: at 1024 tokens x 512 tables of 256 x 4096 bf16, atomics zero a 2 GiB fp32 buffer, read-modify-write it
(2^31 atomics on a buffer 40x the L2) and read it again for the cast (~9 GiB of DRAM traffic); the segment path
writes the 1 GiB gradient once, its sort and run lookup touch O(n K) keys, and both read the same g rows from L2.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from ..backend import KernelTable, rows_of, token_bucket
from ..backends.cpu import memoryformer as cpu_memoryformer
from ..backends.cuda import memoryformer as cuda_memoryformer
from ..backends.triton import memoryformer as triton_memoryformer
from ._checks import FLOAT_DTYPES, check_tensor, require_finite
from ._registry import define

__all__ = ["memory_lookup", "memory_lookup_grads", "set_table_grad_mode", "table_grad_mode"]

TABLE_GRAD_MODES = ("segments", "atomics")
_TABLE_GRAD = [os.environ.get("WEIGHTKIT_MEMORY_TABLE_GRAD", "segments")]
if _TABLE_GRAD[0] not in TABLE_GRAD_MODES:
    raise ValueError(f"WEIGHTKIT_MEMORY_TABLE_GRAD must be one of {TABLE_GRAD_MODES}, got {_TABLE_GRAD[0]!r}")


def table_grad_mode() -> str:
    """How the GPU backends write the table gradient outside deterministic mode: "segments" or "atomics"."""
    return _TABLE_GRAD[0]


def set_table_grad_mode(mode: str) -> str:
    """Set table_grad_mode() (process-wide); returns the previous mode."""
    if mode not in TABLE_GRAD_MODES:
        raise ValueError(f"mode must be one of {TABLE_GRAD_MODES}, got {mode!r}")
    previous, _TABLE_GRAD[0] = _TABLE_GRAD[0], mode
    return previous

# auto on CUDA: Triton first (H200, 2026-11-26, 512 tables x 256 x 4096, fp32: 0.062 / 0.104 / 1.10 ms at 1 / 16 / 1024
# tokens vs cuda 1.05 / 1.07 / 2.11; forward+backward at 1024 tokens 5.9 vs 6.9 ms, deterministic 10.2 vs 11.0).
# Those cuda figures are of the one-block-per-token kernels since replaced (table splits, warp-per-pair backward);
# the order stays until bench/gpu_report.py's memoryformer rows measure the new ones.
# auto by measurement per regime (weightkit/backend.py, "Measured choice"): the token count rounded up to a power of
# two, the tables' shape, the dtypes, and for backward the table-gradient method.


def _fwd_regime(x, tables, t):
    return (token_bucket(rows_of(x)), tables.shape, x.dtype, tables.dtype)


def _bwd_regime(grad, x, tables, t, deterministic, segments=None):
    return (token_bucket(rows_of(x)), tables.shape, x.dtype, tables.dtype, deterministic, segments)


_FWD = KernelTable("memory_lookup_forward", cuda_order=("triton", "cuda"), regime=_fwd_regime)
_BWD = KernelTable("memory_lookup_backward", cuda_order=("triton", "cuda"), regime=_bwd_regime)
MAX_TAU = 16


def _check_args(x: Tensor, tables: Tensor, t: float) -> None:
    if (x.dtype in FLOAT_DTYPES and tables.dtype in FLOAT_DTYPES and tables.dim() == 3 and tables.device == x.device
            and x.dim() and x.numel() and tables.numel() and t > 0):
        k, buckets, _ = tables.shape
        tau = buckets.bit_length() - 1
        if buckets == 1 << tau and 1 <= tau <= MAX_TAU and x.shape[-1] == k * tau:
            return  # the usual valid call (half the cost of the checks below, which name the error)
    check_tensor("x", x, dtypes=FLOAT_DTYPES, nonempty=False, min_ndim=1)  # no tokens: an empty result
    check_tensor("tables", tables, dtypes=FLOAT_DTYPES, ndim=3, device=x.device)
    k, buckets, _ = tables.shape
    tau = buckets.bit_length() - 1
    if buckets != 1 << tau or not 1 <= tau <= MAX_TAU:
        raise ValueError(f"tables must have 2^tau rows per table with 1 <= tau <= {MAX_TAU}, got {buckets}")
    if x.shape[-1] != k * tau:
        raise ValueError(f"x has {x.shape[-1]} features, tables expect K * tau = {k} * {tau} = {k * tau}")
    if not t > 0:
        raise ValueError(f"t (temperature) must be > 0, got {t}")


def memory_lookup_reference(x: Tensor, tables: Tensor, t: float) -> Tensor:
    """Differentiable plain-PyTorch specification (autograd gives the backward above)."""
    k, buckets, d_out = tables.shape
    tau = buckets.bit_length() - 1
    compute = torch.promote_types(x.dtype, torch.float32)
    z = x.reshape(-1, k, tau).to(compute)
    h = ((z > 0).to(torch.int64) << torch.arange(tau, device=x.device)).sum(-1)  # (N, K)
    p = torch.sigmoid(2 * z.abs() / t).prod(-1)  # (N, K)
    rows = tables.to(compute)[torch.arange(k, device=x.device), h]  # (N, K, d_out)
    y = (p.unsqueeze(-1) * rows).sum(1)
    return y.reshape(*x.shape[:-1], d_out).to(x.dtype)


_FWD.register("reference")(memory_lookup_reference)


@_BWD.register("reference")
def memory_lookup_backward_reference(grad: Tensor, x: Tensor, tables: Tensor, t: float, deterministic: bool,
                                     segments: bool = True):
    """The backward formulas of the module docstring, in float64 (tests check them against autograd). Every
    backend's backward takes ``segments`` after the op's arguments: table_grad_mode() == "segments", passed down
    by the op (the backends sit below the ops and do not read their setting)."""
    k, buckets, d_out = tables.shape
    tau = buckets.bit_length() - 1
    z = x.reshape(-1, k, tau).to(torch.float64)
    g = grad.reshape(-1, d_out).to(torch.float64)
    h = ((z > 0).to(torch.int64) << torch.arange(tau, device=x.device)).sum(-1)
    p = torch.sigmoid(2 * z.abs() / t).prod(-1)
    table_idx = torch.arange(k, device=x.device).expand_as(h)
    rows = tables.to(torch.float64)[table_idx, h]  # (N, K, d_out)
    dot = (rows * g[:, None, :]).sum(-1)
    gz = (dot * p)[..., None] * (2 / t) * torch.sign(z) * torch.sigmoid(-2 * z.abs() / t)
    gt = torch.zeros(k, buckets, d_out, dtype=torch.float64, device=x.device)
    gt.index_put_((table_idx, h), p[..., None] * g[:, None, :], accumulate=True)
    return gz.reshape(x.shape).to(x.dtype), gt.to(tables.dtype)


for _name, _module in (("cpu", cpu_memoryformer), ("cuda", cuda_memoryformer), ("triton", triton_memoryformer)):
    _FWD.register(_name)(_module.memory_lookup_forward)
    _BWD.register(_name)(_module.memory_lookup_backward)


def _setup(ctx, inputs, output):
    x, tables, t = inputs
    ctx.save_for_backward(x, tables)
    ctx.t = t


def _backward(ctx, grad):
    x, tables = ctx.saved_tensors
    gx, gt = _backward_op(grad.contiguous(), x, tables, ctx.t, torch.are_deterministic_algorithms_enabled())
    return gx, gt, None


_forward_op = define(
    "memory_lookup_forward(Tensor x, Tensor tables, float t) -> Tensor",
    table=_FWD, check=_check_args, debug_check=lambda x, *_: require_finite("x", x),
    fake=lambda x, tables, t: x.new_empty((*x.shape[:-1], tables.shape[-1])),
    backward=_backward, setup_context=_setup, empty=lambda x, *_: x.numel() == 0)

_backward_op = define(
    "memory_lookup_backward(Tensor grad, Tensor x, Tensor tables, float t, bool deterministic) -> (Tensor, Tensor)",
    impl=lambda grad, x, tables, t, deterministic: _BWD(x.device, grad, x, tables, t, deterministic,
                                                        _TABLE_GRAD[0] == "segments"),
    fake=lambda grad, x, tables, t, deterministic: (torch.empty_like(x), torch.empty_like(tables)),
    empty=lambda grad, x, *_: x.numel() == 0)


def memory_lookup(x: Tensor, tables: Tensor, t: float = 1.0) -> Tensor:
    """MemoryFormer lookup (see the module docstring). Differentiable in ``x`` and ``tables``."""
    return _forward_op(x, tables, float(t))


def memory_lookup_grads(grad: Tensor, x: Tensor, tables: Tensor, t: float = 1.0, deterministic: bool = False):
    """(grad_x, grad_tables) directly, e.g. to test the deterministic table-gradient mode."""
    _check_args(x, tables, t)
    return _backward_op(grad, x, tables, float(t), bool(deterministic))
