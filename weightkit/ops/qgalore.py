"""Q-GaLore's fused write-back: the low-rank update projected back through the packed INT4 basis and applied to an
INT8 weight by stochastic rounding, tile by tile.

``int8_sr_lowrank_update_(w_q, scale, ortho_q, ortho_scale, ortho_zero, update, group_size, proj_group_size, left,
alpha, decay, precision, seed, offset)`` performs, in place on the int8 weight ``w_q`` (m x n, groups of
``group_size`` consecutive elements of a row sharing one float32 ``scale``)::

    P      = dequantize_int4(ortho_q, ortho_scale, ortho_zero, proj_group_size)   (m x r if left, else r x n)
    N      = P @ U  if left  else  U @ P           (U = ``update``: r x n if left, else m x r; float32 accumulation)
    w      = (w_q * scale + (-alpha) * N) * decay  (float32, one rounding per operation, no fused multiply-add)
    scale' = max(max|w| / 127, FLT_MIN)            (per group, over the updated weight of the whole group)
    w_q'   = floor(w / scale' + u),  clamped to [-128, 127],  u ~ Philox(seed, offset + element index)

which is ``weightkit.ops.int8.int8_sr_update_`` with ``delta = -alpha * P U``: the same stream, the same rounding,
so the same update in distribution and, for the same N, bit for bit (``alpha`` = Adam's step size times GaLore's
scale, ``decay`` = 1 - lr * weight_decay).

Device-side predication (the optimizers' ``nonfinite='skip'`` and layer-wise steps, without a host read):
``found_inf``, a one-element float32 tensor on the weight's device: where it is nonzero, ``w_q`` and ``scale`` are
left unchanged. ``step_size_t``, a one-element float32 tensor: the factor of P U is then ``alpha * step_size_t``
(one float32 product: Adam's step size counted on the device, ``alpha`` GaLore's scale).

No float copy of the weight and no m x n delta exist whole: the Triton kernel computes each [BLOCK_M, BLOCK_N]
tile of N from the packed basis (dequantized in registers) and the low-rank update with ``tl.dot``, applies the
update and the stochastic rounding to the tile, and writes int8 values and scales; a tile spans whole groups, so
the absmax of each group is computed over its whole updated weight (group sizes that are powers of two up to
512; others, e.g. 127 for a 5461-wide layer, take the composed path). The ``cpu`` / ``cuda`` backends compose the
existing kernels by blocks of rows (N for ~1M elements at a time, then the native ``int8_sr_update_``); the ``cuda``
backend makes N on bf16 tensor cores: 'bf16' as the bf16 products, the three float32 precisions as one GEMM over
the six products of P's and U's three-part bf16 splits (float32 accuracy, as GaLore's cuda write-back:
weightkit.backends._blocked.lowrank_operands).

No precision follows ``torch.backends.cuda.matmul.allow_tf32``: the precision is the argument's, on every backend
(the reference and the cpu / cuda products run with TF32 off).

Precision of N (the one part that is not bit-identical across backends). ``precision='fp32'`` multiplies float32
values with float32 accumulation; ``'tf32x3'`` is the same product on a GPU's tensor cores as three TF32 products
(Triton's ``input_precision='tf32x3'``, near-float32 accuracy; float32 accuracy on the other backends, see above;
its error on a GPU is for the GPU check to measure); ``'bf16x3'`` multiplies on bf16 tensor cores without rounding
P: the basis as its exact integers q - z (4 bits, exact in bf16) times U split in three bf16 parts (hi + mid + lo ==
U: 3 x 8 bits hold float32's significand), each product exact in float32, float32 accumulation, the INT4 scales
applied in float32 outside the products (left: a rank step lies in one group of each row, its product is scaled per
row; right: the scale of basis row k and column group g multiplies U's column k for that group). Float32 accuracy
(in the Triton interpreter, which multiplies the same exact values in float32: below the float32 product's error,
since P's elements are never rounded) from three bf16 products where 'tf32x3' makes three TF32 ones (bf16: twice
TF32's rate); on a basis that is not whole power-of-two groups of >= 16 values it runs as 'tf32x3'; float32 accuracy
elsewhere. ``'bf16'`` rounds P and U to bfloat16 first (tensor cores on a GPU; the products of bf16 values are exact
in float32, the accumulation is float32). The precision contract (tests/optim/test_qgalore_precision.py): an error
against float64 within twice galore-torch's float32 step's; 'fp32' meets it, 'bf16' misses it by ~10^4 (relative
error 2.4e-3 against 1.4e-7 to 2.3e-7 measured on the CPU). A sum of r products rounds differently with each
summation order (BLAS blocking, tensor-core reduction trees), so N agrees across backends to float32 accumulation
error (~r * 2^-24 relative), not bit for bit; everything after N is bit-identical. Where N is exact (dyadic inputs
whose partial sums fit a float32 mantissa, tests/ops/test_qgalore_ops.py) every backend gives the same bits; for
random inputs the tests bound the difference: a few codes off by one (a pre-rounding value on the other side of an
integer), scales within float32 rounding. Forcing one summation order everywhere would take the product off the
tensor cores (a rank-1 update loop on CUDA cores, ~20x slower at r = 1024), for a difference far below the
stochastic rounding's own noise (one quantization step).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..backend import KernelTable
from ..backends._blocked import basis_shape, lowrank_factor, rounded_to, strict_float32
from ..backends.cpu import qgalore as cpu_qgalore
from ..backends.cuda import qgalore as cuda_qgalore
from ..backends.triton import qgalore as triton_qgalore
from . import rng
from ._checks import check_flag, check_positive_int, check_tensor, require_finite
from ._registry import define
from .int4 import dequantize_int4_reference
from .int8 import int8_sr_update_reference

__all__ = ["int8_sr_lowrank_update_", "PRECISIONS"]

PRECISIONS = ("fp32", "tf32x3", "bf16x3", "bf16")



def _regime(w_q, scale, ortho_q, ortho_scale, ortho_zero, update, group_size, proj_group_size, left, *rest):
    # rest: alpha, decay, precision, seed, offset, found_inf, step_size_t
    """auto by measurement per shape, groups, side and projection precision (weightkit/backend.py)."""
    return (tuple(w_q.shape), tuple(update.shape), group_size, proj_group_size, bool(left), rest[2])


# writes w_q and scale in place (measured on copies)
_LOWRANK = KernelTable("int8_sr_lowrank_update_", cuda_order=("triton", "cuda"), regime=_regime, mutates=(0, 1))


def _check_args(w_q, scale, ortho_q, ortho_scale, ortho_zero, update, group_size, proj_group_size, left, alpha,
                decay, precision, seed, offset, found_inf=None, step_size_t=None):
    check_tensor("w_q", w_q, dtypes=(torch.int8,), ndim=2)
    dev = w_q.device
    check_flag("found_inf", found_inf, dev)
    check_flag("step_size_t", step_size_t, dev)
    check_tensor("scale", scale, dtypes=(torch.float32,), device=dev)
    check_tensor("ortho_q", ortho_q, dtypes=(torch.uint8,), device=dev)
    check_tensor("ortho_scale", ortho_scale, dtypes=(torch.float32,), device=dev)
    check_tensor("ortho_zero", ortho_zero, dtypes=(torch.uint8,), device=dev)
    check_tensor("update", update, dtypes=(torch.float32,), ndim=2, device=dev)
    check_positive_int("group_size", group_size)
    check_positive_int("proj_group_size", proj_group_size)
    m, n = w_q.shape
    if n % group_size:
        raise ValueError(f"group_size={group_size} must divide the weight's columns n={n} (groups stay in a row)")
    if scale.numel() != m * n // group_size:
        raise ValueError(f"scale must hold one value per group ({m * n // group_size}), got {scale.numel()}")
    if not (w_q.is_contiguous() and scale.is_contiguous()):
        raise ValueError("w_q and scale are updated in place and must be contiguous")
    if left and update.shape[1] != n:
        raise ValueError(f"update must be r x n = (r, {n}) for a left projection of w_q {tuple(w_q.shape)}, "
                         f"got {tuple(update.shape)}")
    if not left and update.shape[0] != m:
        raise ValueError(f"update must be m x r = ({m}, r) for a right projection of w_q {tuple(w_q.shape)}, "
                         f"got {tuple(update.shape)}")
    rows, cols = basis_shape(w_q, update, left)
    numel = rows * cols
    if ortho_q.numel() * 2 != numel:
        raise ValueError(f"ortho_q holds {ortho_q.numel() * 2} values, the basis ({rows} x {cols}) needs {numel}")
    if proj_group_size % 2 or numel % proj_group_size:
        raise ValueError(f"proj_group_size={proj_group_size} must be even and divide the basis' {numel} values")
    groups = numel // proj_group_size
    if ortho_scale.numel() != groups or ortho_zero.numel() != groups:
        raise ValueError(f"ortho_scale ({ortho_scale.numel()}) and ortho_zero ({ortho_zero.numel()}) must hold one "
                         f"value per basis group ({groups})")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def lowrank_product(ortho_q, ortho_scale, ortho_zero, update, proj_group_size, shape, left, precision) -> Tensor:
    """N = P U (left) or U P (right), float32, P dequantized whole (the reference's product: float32 products of
    the float32 values, or of their bf16 roundings for 'bf16'; on a GPU never TF32, whatever the matmul setting)."""
    ortho = dequantize_int4_reference(ortho_q, ortho_scale, ortho_zero, proj_group_size).reshape(shape)
    ortho, update = rounded_to(ortho, precision), rounded_to(update, precision)
    with strict_float32(ortho.device):
        return ortho @ update if left else update @ ortho


@_LOWRANK.register("reference")
def int8_sr_lowrank_update_reference(w_q, scale, ortho_q, ortho_scale, ortho_zero, update, group_size,
                                     proj_group_size, left, alpha, decay, precision, seed, offset, found_inf=None,
                                     step_size_t=None):
    shape = basis_shape(w_q, update, left)
    full = lowrank_product(ortho_q, ortho_scale, ortho_zero, update, proj_group_size, shape, left, precision)
    # -alpha * N: (w_q * scale + delta) below is w_q * scale - alpha * N exactly
    delta = full.mul_(lowrank_factor(alpha, step_size_t))
    int8_sr_update_reference(w_q, scale, delta, group_size, decay, seed, offset, found_inf)


_LOWRANK.register("cpu")(cpu_qgalore.int8_sr_lowrank_update_)
_LOWRANK.register("cuda")(cuda_qgalore.int8_sr_lowrank_update_)
_LOWRANK.register("triton")(triton_qgalore.int8_sr_lowrank_update_)


def _impl(w_q, scale, ortho_q, ortho_scale, ortho_zero, update, group_size, proj_group_size, left, alpha, decay,
          precision, seed, offset, found_inf=None, step_size_t=None):
    rng.check_seed(seed, offset)  # values, not metadata: eager only
    if offset + w_q.numel() > rng.SEED_LIMIT:
        raise ValueError(f"offset + w_q.numel() must stay below 2**63, got offset={offset}")
    for name, v in (("alpha", alpha), ("decay", decay)):
        if not math.isfinite(v):
            raise ValueError(f"{name} must be finite, got {v}")
    _LOWRANK(w_q.device, w_q, scale, ortho_q, ortho_scale, ortho_zero, update, group_size, proj_group_size, left,
             float(alpha), float(decay), precision, seed, offset, found_inf, step_size_t)


_int8_sr_lowrank_update_op = define(
    "int8_sr_lowrank_update_(Tensor(a0!) w_q, Tensor(a1!) scale, Tensor ortho_q, Tensor ortho_scale, "
    "Tensor ortho_zero, Tensor update, SymInt group_size, SymInt proj_group_size, bool left, float alpha, "
    "float decay, str precision, SymInt seed, SymInt offset, Tensor? found_inf=None, Tensor? step_size_t=None) -> ()",
    impl=_impl, check=_check_args,
    # in place: a NaN in the update would destroy the weight (as int8_sr_update_'s delta check, on by default; the
    # optimizer, which has checked its gradients, switches it off)
    # (with a device flag, a non-finite update is the flagged case: nothing is written)
    debug_check=lambda w_q, scale, oq, os_, oz, update, *rest: rest[-2] is not None or require_finite("update", update),
    debug_default=True,
    fake=lambda *args: None)


def int8_sr_lowrank_update_(w_q: Tensor, scale: Tensor, ortho_q: Tensor, ortho_scale: Tensor, ortho_zero: Tensor,
                            update: Tensor, group_size: int, proj_group_size: int, left: bool, *, alpha: float,
                            decay: float = 1.0, precision: str = "fp32", seed: int = 0, offset: int = 0,
                            found_inf: Optional[Tensor] = None, step_size_t: Optional[Tensor] = None) -> None:
    """In place: ``w_q, scale <- SR((w_q * scale - alpha * P U) * decay)`` (see the module docstring).

    Args:
        w_q: int8 weight (m x n, contiguous); scale: its float32 group scales (contiguous), both updated in place.
        ortho_q, ortho_scale, ortho_zero: the INT4 basis P (``weightkit.ops.int4.quantize_int4`` of an m x r basis
            if ``left``, else r x n), ``proj_group_size`` values per group.
        update: the float32 low-rank update U (r x n if ``left``, else m x r).
        alpha: the factor of P U (step size times GaLore's scale); decay: 1 - lr * weight_decay.
        precision: 'fp32', 'tf32x3' or 'bf16x3' (tensor cores as named: GPU Triton only; float32 accuracy
            elsewhere; see the module docstring) or 'bf16' (P and U rounded to bfloat16 for the product; float32
            accumulation). ``torch.backends.cuda.matmul.allow_tf32`` changes none of them.
        seed, offset: Philox key and stream position of the first element (see weightkit.ops.int8).
        found_inf: optional one-element float32 tensor on w_q's device; where nonzero, nothing is written.
        step_size_t: optional one-element float32 tensor; the factor of P U becomes ``alpha * step_size_t``.
    """
    rng.check_seed(seed, offset)
    _int8_sr_lowrank_update_op(w_q, scale, ortho_q, ortho_scale, ortho_zero, update, group_size, proj_group_size,
                               bool(left), float(alpha), float(decay), str(precision), seed, offset, found_inf,
                               step_size_t)
