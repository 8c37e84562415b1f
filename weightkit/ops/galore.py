"""Fused GaLore Adam step: low-rank Adam moments, project back, decoupled weight decay, in place.

``galore_adam_update_(weight, low_grad, exp_avg, exp_avg_sq, ortho, left, beta1, beta2, eps, step_size, scale,
decay, found_inf=None, step_size_t=None)`` performs, with R = ``low_grad`` and P = ``ortho``::

    M <- beta1 M + (1 - beta1) R
    V <- beta2 V + (1 - beta2) R^2
    U  = M / (sqrt(V) + eps)                           (low-rank, same shape as R)
    N  = P @ U if left else U @ P                       (full size, m x n)
    W <- (W - step_size * scale * N) * decay            (decay = 1 - lr * weight_decay)

which is galore-torch's AdamW step (its weight decay is applied after the update, to the updated weight).
``step_size`` carries Adam's bias correction. R, M, V are float32; P is float32, or bfloat16 / float16 (a basis
stored in proj_dtype: the product P U then runs on 16-bit operands with fp32 accumulation on a GPU, U rounded to
P's dtype); W may be float32, bfloat16 or float16.

Device-side predication (the optimizer's ``nonfinite='skip'`` without a host sync): ``found_inf``, a one-element
float32 tensor on W's device; where it is nonzero the op leaves W, M and V unchanged (GradScaler's found_inf
convention). ``step_size_t``, a one-element float32 tensor, replaces ``step_size`` (a bias correction counted on
the device). Neither is read on the host.

Precision. A float32 product runs TF32 only where the user allows it (``torch.backends.cuda.matmul.allow_tf32``,
set by ``torch.set_float32_matmul_precision('high')``): cuBLAS follows the flag, the Triton kernel gets it as its
``input_precision``; float32 accuracy otherwise: strict fp32 on the CPU, and on a GPU's bf16 tensor cores the
exact products of the operands' three-part bf16 splits, six of them (the cuda backend: one cuBLAS bf16 GEMM over
the six pairs side by side, float32 result; the Triton kernel: its 'bf16x6' dots, kernels/_shared.dot6).

Temporaries. The reference materialises U and the full-size N. The fused backends keep U (low-rank, r x n or
m x r) and no full-size tensor: the ``cpu`` and ``cuda`` backends update M, V and write U in one pass, then, for a
float32 weight and basis, call ``addmm_`` (W <- decay W - step_size scale decay P U) straight into W (not the cuda
backend without TF32: its bf16 splits, above); other weights (bfloat16 / float16) and 16-bit bases go block of rows
by block of rows (a float32 product of at most ``BLOCK_ELEMENTS`` values at a time, never m x n). The Triton
backend computes P U tile by tile and applies the update in the matmul epilogue for every weight dtype.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..backend import KernelTable, token_bucket
from ..backends.cpu import galore as cpu_galore
from ..backends.cuda import galore as cuda_galore
from ..backends.triton import galore as triton_galore
from ..backends._blocked import matmul_precision, mm_float32, stacked_parts, stacked_shape, step_coef
from ._checks import FLOAT_DTYPES, check_flag, check_tensor
from ._registry import define

__all__ = ["galore_adam_update_", "lowrank_update_", "bf16_parts", "matmul_precision", "mm_float32"]

# auto on CUDA: the cuda kernel first. Measured on an H200 (torch 2.11, Triton 3.6, 2026-11-26,
# bench/results/nvidia-h200-2026-11-26-gpu-report.json), whole GaLoreAdamW step, 4096^2 r1024: cuda 1.43 ms vs
# triton 1.90 (strict fp32), 0.25 vs 1.31 (TF32); 4096x11008 r512: 2.01 vs 2.56, 0.44 vs 1.87. (The Triton kernel
# then had fixed 32^3 tiles and always ran IEEE fp32; it autotunes and follows the TF32 setting since.)
# auto by measurement (weightkit/backend.py, "Measured choice") per regime: the weight's shape and dtype, the rank and
# side, the basis dtype, the float32 matmul precision the user allows (TF32 changes which backend wins) and whether
# the update is predicated on a device flag; cuda_order is the order where nothing is measured or recorded.


def _regime(weight, low_grad, exp_avg, exp_avg_sq, ortho, left, *rest):
    return (tuple(weight.shape), tuple(low_grad.shape), bool(left), weight.dtype, ortho.dtype,
            matmul_precision(weight.device), len(rest) > 6 and rest[6] is not None)


_GALORE = KernelTable("galore_adam_update_", cuda_order=("cuda", "triton"), regime=_regime, mutates=(0, 2, 3))



def _check_projection(weight, low, low_name, ortho, left, found_inf, step_size_t, moments=()):
    """weight, the low-rank ``low`` (float32, named ``low_name``; ``moments``: (name, tensor) pairs of its shape) and
    ortho: 2-D, dtypes, one device, shapes of a left (ortho m x r, low r x n) or right (ortho r x n, low m x r)
    projection; the optional device flags."""
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES, ndim=2)
    dev = weight.device
    for name, t in ((low_name, low), *moments):
        check_tensor(name, t, dtypes=(torch.float32,), ndim=2, device=dev)
    check_tensor("ortho", ortho, dtypes=FLOAT_DTYPES, ndim=2, device=dev)
    check_flag("found_inf", found_inf, dev)
    check_flag("step_size_t", step_size_t, dev)
    if any(t.shape != low.shape for _, t in moments):
        raise ValueError(" and ".join(f"{name} {tuple(t.shape)}" for name, t in moments)
                         + f" must match {low_name} {tuple(low.shape)}")
    m, n = weight.shape
    if left:
        ok = ortho.shape[0] == m and low.shape == (ortho.shape[1], n)
    else:
        ok = ortho.shape[1] == n and low.shape == (m, ortho.shape[0])
    if not ok:
        side = (f"left (ortho m x r, {low_name} r x n)" if left else f"right (ortho r x n, {low_name} m x r)")
        raise ValueError(f"shapes do not fit a {side} projection of weight {tuple(weight.shape)}: "
                         f"ortho {tuple(ortho.shape)}, {low_name} {tuple(low.shape)}")


def _check_args(weight, low_grad, exp_avg, exp_avg_sq, ortho, left, found_inf=None, step_size_t=None):
    _check_projection(weight, low_grad, "low_grad", ortho, left, found_inf, step_size_t,
                      (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)))


@_GALORE.register("reference")
def galore_adam_update_reference(weight, low_grad, exp_avg, exp_avg_sq, ortho, left, beta1, beta2, eps, step_size,
                                 scale, decay, found_inf=None, step_size_t=None):
    p = ortho.to(torch.float32)
    if found_inf is None:
        exp_avg.mul_(beta1).add_(low_grad, alpha=1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(low_grad, low_grad, value=1 - beta2)
        update = exp_avg / (exp_avg_sq.sqrt() + eps)
    else:
        m = exp_avg.mul(beta1).add_(low_grad, alpha=1 - beta1)
        v = exp_avg_sq.mul(beta2).addcmul_(low_grad, low_grad, value=1 - beta2)
        update = m / (v.sqrt() + eps)
    full = p @ update if left else update @ p
    new = (weight.to(torch.float32) - step_coef(step_size, scale, step_size_t) * full) * decay
    if found_inf is None:
        weight.copy_(new)
        return
    skip = found_inf.ne(0)
    weight.copy_(torch.where(skip, weight, new))
    exp_avg.copy_(torch.where(skip, exp_avg, m))
    exp_avg_sq.copy_(torch.where(skip, exp_avg_sq, v))


_GALORE.register("cpu")(cpu_galore.galore_adam_update_)
_GALORE.register("cuda")(cuda_galore.galore_adam_update_)
_GALORE.register("triton")(triton_galore.galore_adam_update_)


def _galore_impl(weight, low_grad, exp_avg, exp_avg_sq, ortho, left, beta1, beta2, eps, step_size, scale, decay,
                 found_inf=None, step_size_t=None):
    if not (exp_avg.is_contiguous() and exp_avg_sq.is_contiguous() and weight.is_contiguous()):
        # in-place state must be updated where it lives: work on contiguous copies, then write back
        w, m, v = weight.contiguous(), exp_avg.contiguous(), exp_avg_sq.contiguous()
        _GALORE(weight.device, w, low_grad, m, v, ortho, left, beta1, beta2, eps, step_size, scale, decay, found_inf,
                step_size_t)
        weight.copy_(w), exp_avg.copy_(m), exp_avg_sq.copy_(v)
        return
    _GALORE(weight.device, weight, low_grad, exp_avg, exp_avg_sq, ortho, left, beta1, beta2, eps, step_size, scale,
            decay, found_inf, step_size_t)


_galore_adam_update_op = define(
    "galore_adam_update_(Tensor(a0!) weight, Tensor low_grad, Tensor(a2!) exp_avg, Tensor(a3!) exp_avg_sq, "
    "Tensor ortho, bool left, float beta1, float beta2, float eps, float step_size, float scale, float decay, "
    "Tensor? found_inf=None, Tensor? step_size_t=None) -> ()",
    impl=_galore_impl, check=lambda *args: _check_args(*args[:6], *args[12:]), fake=lambda *args: None)


def galore_adam_update_(weight: Tensor, low_grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, ortho: Tensor,
                        left: bool, *, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-6,
                        step_size: float = 1e-3, scale: float = 1.0, decay: float = 1.0,
                        found_inf: Optional[Tensor] = None, step_size_t: Optional[Tensor] = None) -> None:
    """In-place fused GaLore Adam step (see the module docstring for the maths, the device-side predication by
    ``found_inf``, the precision and the temporaries)."""
    _galore_adam_update_op(weight, low_grad, exp_avg, exp_avg_sq, ortho, bool(left), float(beta1), float(beta2),
                           float(eps), float(step_size), float(scale), float(decay), found_inf, step_size_t)


# -- lowrank_update_: the write-back alone, of a low-rank direction computed elsewhere -------------------------------
# GaLoreAdamW8bit's one-pass 8-bit moments (weightkit.ops.moments8bit.blockwise8bit_adam_) give U themselves; the float
# weight then takes the second half of galore_adam_update_: W <- (W - step_size scale N) decay, N = P U (left) or
# U P (right), by the same backend code (the cpu / cuda backends' BLAS composition, the Triton matmul-update kernel),
# with no full-size temporary.

def _update_regime(weight, update, ortho, left, *rest):
    return (tuple(weight.shape), tuple(update.shape), bool(left), weight.dtype, ortho.dtype,
            matmul_precision(weight.device), len(rest) > 3 and rest[3] is not None)


_UPDATE = KernelTable("lowrank_update_", cuda_order=("cuda", "triton"), regime=_update_regime, mutates=(0,))


def _check_update_args(weight, update, ortho, left, found_inf=None, step_size_t=None):
    _check_projection(weight, update, "update", ortho, left, found_inf, step_size_t)


@_UPDATE.register("reference")
def lowrank_update_reference(weight, update, ortho, left, step_size, scale, decay, found_inf=None, step_size_t=None):
    p = ortho.to(torch.float32)
    full = p @ update if left else update @ p
    new = (weight.to(torch.float32) - step_coef(step_size, scale, step_size_t) * full) * decay
    if found_inf is None:
        weight.copy_(new)
    else:
        weight.copy_(torch.where(found_inf.ne(0), weight, new))


_UPDATE.register("cpu")(cpu_galore.lowrank_update_)
_UPDATE.register("cuda")(cuda_galore.lowrank_update_)
_UPDATE.register("triton")(triton_galore.lowrank_update_)


def _update_impl(weight, update, ortho, left, step_size, scale, decay, found_inf=None, step_size_t=None):
    if not weight.is_contiguous():  # written where it lives: a contiguous copy, then back
        w = weight.contiguous()
        _UPDATE(weight.device, w, update, ortho, left, step_size, scale, decay, found_inf, step_size_t)
        weight.copy_(w)
        return
    _UPDATE(weight.device, weight, update, ortho, left, step_size, scale, decay, found_inf, step_size_t)


_lowrank_update_op = define(
    "lowrank_update_(Tensor(a0!) weight, Tensor update, Tensor ortho, bool left, float step_size, float scale, "
    "float decay, Tensor? found_inf=None, Tensor? step_size_t=None) -> ()",
    impl=_update_impl, check=lambda *args: _check_update_args(*args[:4], *args[7:]), fake=lambda *args: None)


def lowrank_update_(weight: Tensor, update: Tensor, ortho: Tensor, left: bool, *, step_size: float = 1e-3,
                    scale: float = 1.0, decay: float = 1.0, found_inf: Optional[Tensor] = None,
                    step_size_t: Optional[Tensor] = None) -> None:
    """In place, GaLore's write-back of a low-rank direction U (``update``, float32; e.g. Adam's M / (sqrt(V) + eps)
    from 8-bit moments updated in one pass)::

        N  = P @ U if left else U @ P                       (P = ``ortho``: float32, bfloat16 or float16)
        W <- (W - step_size * scale * N) * decay            (W: float32, bfloat16 or float16)

    the second half of :func:`galore_adam_update_`, with its precision rules, its temporaries (no full-size one in
    the fused backends) and its device-side ``found_inf`` (W unchanged where set, whatever U holds) and
    ``step_size_t`` (replaces ``step_size``). ``update`` is not modified."""
    _lowrank_update_op(weight, update, ortho, bool(left), float(step_size), float(scale), float(decay), found_inf,
                       step_size_t)


# -- bf16_parts: a float32 / float16 gradient's exact bf16 parts, for the projection's bf16 GEMMs ------------------

def _parts_regime(x, dim):
    """auto's measured choice between the two one-pass kernels per shape class: sizes rounded up to powers of two, the
    dtype, the stacking side, and whether x's rows are contiguous (a projection's column block is strided)."""
    return token_bucket(x.shape[0]), token_bucket(x.shape[1]), x.dtype, dim, x.stride(1) == 1


_PARTS = KernelTable("bf16_parts", cuda_order=("cuda", "triton"), regime=_parts_regime)


def _check_parts(x, dim):
    check_tensor("x", x, dtypes=(torch.float32, torch.float16), ndim=2, nonempty=False)
    if dim not in (0, 1):
        raise ValueError(f"dim must be 0 or 1, got {dim}")


@_PARTS.register("reference")
def bf16_parts_reference(x, dim):
    return stacked_parts(x, dim)


_PARTS.register("cuda")(cuda_galore.bf16_parts)
_PARTS.register("triton")(triton_galore.bf16_parts)

_bf16_parts_op = define("bf16_parts(Tensor x, int dim) -> Tensor", table=_PARTS, check=_check_parts,
                        fake=lambda x, dim: x.new_empty(stacked_shape(x, dim)[1], dtype=torch.bfloat16))


def bf16_parts(x: Tensor, dim: int) -> Tensor:
    """The exact bf16 parts of a 2-D float32 or float16 ``x``, largest first, stacked along ``dim`` in a new
    contiguous bf16 tensor (3 or 2 times x's size along ``dim``): for a float32 x three parts, hi + mid + lo == x,
    each the nearest bf16 (ties to even) of what the previous ones left; for a float16 x two, hi = x with its three
    lowest significand bits cleared and lo = x - hi. A NaN gives NaN parts; an infinity, or a value that rounds to
    one, an infinite hi and NaN below it. GaLore's and Q-GaLore's projection of a float32 or float16 gradient on bf16
    tensor cores multiplies these parts (weightkit.backends._blocked.split3_mm_float32). Backends: ``reference``
    (torch's elementwise ops: four passes over a float32 x, about 30 bytes moved a value; the CPU path), ``cuda``
    and ``triton`` (one pass: x read once, each part written once, 10 bytes a float32 value; auto on a GPU: the
    faster of the two by measurement per shape class, else cuda first)."""
    return _bf16_parts_op(x, int(dim))
