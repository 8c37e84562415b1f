"""Fused GaLore Adam step: low-rank Adam moments, project back, decoupled weight decay, in place.

``galore_adam_update_(weight, low_grad, exp_avg, exp_avg_sq, ortho, left, beta1, beta2, eps, step_size, scale,
decay)`` performs, with R = ``low_grad`` and P = ``ortho``::

    M <- beta1 M + (1 - beta1) R
    V <- beta2 V + (1 - beta2) R^2
    U  = M / (sqrt(V) + eps)                           (low-rank, same shape as R)
    N  = P @ U if left else U @ P                       (full size, m x n)
    W <- (W - step_size * scale * N) * decay            (decay = 1 - lr * weight_decay)

which is galore-torch's AdamW step (its weight decay is applied after the update, to the updated weight).
``step_size`` carries Adam's bias correction. R, M, V and P are float32; W may be float32, bfloat16 or float16.

Temporaries. The reference materialises U and the full-size N. The fused backends keep U (low-rank, r x n or
m x r) and no full-size tensor: the ``cpu`` and ``cuda`` backends update M, V and write U in one pass, then call
``addmm_`` (W <- decay W - step_size scale decay P U) for float32 weights; the Triton backend computes P U tile by
tile and applies the update in the matmul epilogue for every weight dtype. For bf16/fp16 weights the cpu/cuda
backends still form N in float32 (one m x n temporary), since BLAS has no mixed-precision in-place addmm.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..backend import KernelTable
from ..backends.cpu import galore as cpu_galore
from ..backends.cuda import galore as cuda_galore
from ..backends.triton import galore as triton_galore
from ._checks import FLOAT_DTYPES, check_tensor
from ._registry import define

__all__ = ["galore_adam_update_"]

# auto on CUDA: the cuda kernel first. Measured on an H200 (torch 2.11, Triton 3.6, 2026-11-26,
# bench/results/nvidia-h200-2026-11-26-gpu-report.json), whole GaLoreAdamW step, 4096^2 r1024: cuda 1.43 ms vs
# triton 1.90 (strict fp32), 0.25 vs 1.31 (TF32); 4096x11008 r512: 2.01 vs 2.56, 0.44 vs 1.87.
_GALORE = KernelTable("galore_adam_update_", cuda_order=("cuda", "triton"))


def _check_args(weight, low_grad, exp_avg, exp_avg_sq, ortho, left):
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES, ndim=2)
    dev = weight.device
    for name, t in (("low_grad", low_grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq), ("ortho", ortho)):
        check_tensor(name, t, dtypes=(torch.float32,), ndim=2, device=dev)
    if exp_avg.shape != low_grad.shape or exp_avg_sq.shape != low_grad.shape:
        raise ValueError(f"exp_avg {tuple(exp_avg.shape)} and exp_avg_sq {tuple(exp_avg_sq.shape)} must match "
                         f"low_grad {tuple(low_grad.shape)}")
    m, n = weight.shape
    if left:
        ok = ortho.shape[0] == m and low_grad.shape == (ortho.shape[1], n)
    else:
        ok = ortho.shape[1] == n and low_grad.shape == (m, ortho.shape[0])
    if not ok:
        side = "left (ortho m x r, low_grad r x n)" if left else "right (ortho r x n, low_grad m x r)"
        raise ValueError(f"shapes do not fit a {side} projection of weight {tuple(weight.shape)}: "
                         f"ortho {tuple(ortho.shape)}, low_grad {tuple(low_grad.shape)}")


@_GALORE.register("reference")
def galore_adam_update_reference(weight, low_grad, exp_avg, exp_avg_sq, ortho, left, beta1, beta2, eps, step_size,
                                 scale, decay):
    exp_avg.mul_(beta1).add_(low_grad, alpha=1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(low_grad, low_grad, value=1 - beta2)
    update = exp_avg / (exp_avg_sq.sqrt() + eps)
    full = ortho @ update if left else update @ ortho
    new = (weight.to(torch.float32) - step_size * scale * full) * decay
    weight.copy_(new)


_GALORE.register("cpu")(cpu_galore.galore_adam_update_)
_GALORE.register("cuda")(cuda_galore.galore_adam_update_)
_GALORE.register("triton")(triton_galore.galore_adam_update_)


def _galore_impl(weight, low_grad, exp_avg, exp_avg_sq, ortho, left, beta1, beta2, eps, step_size, scale, decay):
    if not (exp_avg.is_contiguous() and exp_avg_sq.is_contiguous() and weight.is_contiguous()):
        # in-place state must be updated where it lives: work on contiguous copies, then write back
        w, m, v = weight.contiguous(), exp_avg.contiguous(), exp_avg_sq.contiguous()
        _GALORE(weight.device, w, low_grad, m, v, ortho, left, beta1, beta2, eps, step_size, scale, decay)
        weight.copy_(w), exp_avg.copy_(m), exp_avg_sq.copy_(v)
        return
    _GALORE(weight.device, weight, low_grad, exp_avg, exp_avg_sq, ortho, left, beta1, beta2, eps, step_size, scale,
            decay)


_galore_adam_update_op = define(
    "galore_adam_update_(Tensor(a0!) weight, Tensor low_grad, Tensor(a2!) exp_avg, Tensor(a3!) exp_avg_sq, "
    "Tensor ortho, bool left, float beta1, float beta2, float eps, float step_size, float scale, float decay) -> ()",
    impl=_galore_impl, check=lambda *args: _check_args(*args[:6]), fake=lambda *args: None)


def galore_adam_update_(weight: Tensor, low_grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, ortho: Tensor,
                        left: bool, *, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-6,
                        step_size: float = 1e-3, scale: float = 1.0, decay: float = 1.0) -> None:
    """In-place fused GaLore Adam step (see the module docstring for the maths and the temporaries)."""
    _galore_adam_update_op(weight, low_grad, exp_avg, exp_avg_sq, ortho, bool(left), float(beta1), float(beta2),
                           float(eps), float(step_size), float(scale), float(decay))
