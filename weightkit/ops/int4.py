"""INT4 matrices (Q-GaLore's projection bases): group-wise asymmetric quantization packed two per byte, and a
matmul that dequantizes inside the kernel.

Format. Values q in [0, 15]; element 2j (row-major, flattened) is the low nibble of byte j and element 2j+1 the
high nibble. Each group of ``group_size`` (even) consecutive elements has a float32 scale s and a uint8 zero point
z, and x ~ (q - z) * s, with, over the group's values g (in float32)::

    lo = min(min(g), 0),  hi = max(max(g), 0)            (the range always holds 0, so z is exact)
    s  = max((hi - lo) / 15, FLT_MIN)
    z  = clamp(round(-lo / s), 0, 15)                    round = round half to even
    q  = clamp(round(g / s + z), 0, 15)

so |x - (q - z) s| <= s / 2 + (rounding of z) <= s for every element (tested). Every division, product and sum is
a single fp32 operation (no fused multiply-add), which all backends follow: they agree bit for bit.

Ops (each ``torch.ops.weightkit.<name>``, defined with ``_registry.define``; reference / cpu / cuda / triton backends):

* ``quantize_int4(x, group_size) -> (packed uint8 [numel/2], scale float32 [groups], zero uint8 [groups])``
* ``dequantize_int4(packed, scale, zero, group_size, shape) -> float32`` (unpack + dequantize)
* ``int4_matmul(x, packed, scale, zero, group_size, shape, transpose=False)``: with W = dequant (rows x cols),
  ``x @ W^T`` (x: (..., cols)) or, with ``transpose``, ``x @ W`` (x: (..., rows)); differentiable in x. The
  reference dequantizes W whole; cpu dequantizes blocks of about 4M values to fp32 around BLAS; cuda dequantizes W to
  x's dtype (blocks of at most 128 MB) and multiplies with cuBLAS; Triton dequantizes tile by tile in registers. The
  output has x's dtype, accumulation is fp32; the weight may be rounded to x's dtype first (``int4_matmul``'s
  precision contract).

``unpack_int4`` (the raw nibbles) is a plain PyTorch helper.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..backend import KernelTable, requested_backend, rows_of, tf32_allowed, token_bucket
from ..backends.cpu import int4 as cpu_int4
from ..backends.cuda import int4 as cuda_int4
from ..backends.triton import int4 as triton_int4
from ._checks import FLOAT_DTYPES, check_positive_int, check_tensor, exact_div, require_finite
from ._registry import define

__all__ = ["quantize_int4", "dequantize_int4", "unpack_int4", "int4_matmul"]

_FLT_MIN = torch.finfo(torch.float32).tiny


# -- quantize / pack --------------------------------------------------------------------------------------------

# auto by measurement per regime (weightkit/backend.py, "Measured choice"): element count rounded up to a power of
# two, dtype, group size; cuda first where nothing is measured or recorded
_QUANT = KernelTable("quantize_int4", regime=lambda x, group_size: (token_bucket(x.numel()), x.dtype, group_size))


def _check_group(group_size: int, numel: int, what: str = "x.numel()") -> None:
    check_positive_int("group_size", group_size)
    if group_size % 2 or numel % group_size:
        raise ValueError(f"group_size={group_size} must be even and divide {what}={numel}")


@_QUANT.register("reference")
def quantize_int4_reference(x: Tensor, group_size: int):
    g = x.detach().reshape(-1, group_size).to(torch.float32)
    lo = g.amin(1, keepdim=True).clamp_max(0.0)
    hi = g.amax(1, keepdim=True).clamp_min(0.0)
    scale = exact_div(hi - lo, 15).clamp_min(_FLT_MIN)
    zero = torch.round(-lo / scale).clamp(0, 15)
    q = torch.round(g / scale + zero).clamp(0, 15).to(torch.uint8).reshape(-1)
    packed = q[0::2] | (q[1::2] << 4)
    return packed, scale.reshape(-1), zero.reshape(-1).to(torch.uint8)


_QUANT.register("cpu")(cpu_int4.quantize_int4)
_QUANT.register("cuda")(cuda_int4.quantize_int4)
_QUANT.register("triton")(triton_int4.quantize_int4)


def _check_quantize(x: Tensor, group_size: int) -> None:
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    _check_group(group_size, x.numel())


def _quantize_int4_fake(x, group_size):
    groups = x.numel() // group_size
    return (x.new_empty((x.numel() // 2,), dtype=torch.uint8), x.new_empty((groups,), dtype=torch.float32),
            x.new_empty((groups,), dtype=torch.uint8))


_quantize_int4_op = define(
    "quantize_int4(Tensor x, SymInt group_size) -> (Tensor, Tensor, Tensor)",
    table=_QUANT, check=_check_quantize, debug_check=lambda x, _: require_finite("x", x), fake=_quantize_int4_fake)


def quantize_int4(x: Tensor, group_size: int = 64) -> Tuple[Tensor, Tensor, Tensor]:
    """(packed uint8 [numel/2], scale float32 [groups], zero uint8 [groups]) of ``x`` (see the module docstring)."""
    return _quantize_int4_op(x, group_size)


# -- unpack / dequantize ----------------------------------------------------------------------------------------

_DEQUANT = KernelTable("dequantize_int4", regime=lambda packed, scale, zero, group_size: (
    token_bucket(packed.numel()), group_size))


def _check_int4(packed: Tensor, scale: Tensor, zero: Tensor, group_size: int, shape: Sequence[int]) -> None:
    check_tensor("packed", packed, dtypes=(torch.uint8,))
    check_tensor("scale", scale, dtypes=(torch.float32,), device=packed.device)
    check_tensor("zero", zero, dtypes=(torch.uint8,), device=packed.device)
    numel = 1
    for s in shape:
        numel *= int(s)
    if packed.numel() * 2 != numel:
        raise ValueError(f"packed holds {packed.numel() * 2} values, shape {tuple(shape)} needs {numel}")
    _check_group(group_size, numel, "the number of values")
    groups = numel // group_size
    if scale.numel() != groups or zero.numel() != groups:
        raise ValueError(f"scale ({scale.numel()}) and zero ({zero.numel()}) must hold one value per group ({groups})")


@_DEQUANT.register("reference")
def dequantize_int4_reference(packed: Tensor, scale: Tensor, zero: Tensor, group_size: int) -> Tensor:
    q = unpack_int4(packed).reshape(-1, group_size).to(torch.float32)
    return ((q - zero.reshape(-1, 1).to(torch.float32)) * scale.reshape(-1, 1)).reshape(-1)


_DEQUANT.register("cpu")(cpu_int4.dequantize_int4)
_DEQUANT.register("cuda")(cuda_int4.dequantize_int4)
_DEQUANT.register("triton")(triton_int4.dequantize_int4)

_dequantize_int4_op = define(
    "dequantize_int4(Tensor packed, Tensor scale, Tensor zero, SymInt group_size, SymInt[] shape) -> Tensor",
    impl=lambda packed, scale, zero, group_size, shape: _DEQUANT(packed.device, packed, scale, zero,
                                                                 group_size).reshape(shape),
    check=_check_int4, fake=lambda packed, scale, zero, group_size, shape: scale.new_empty(tuple(shape)))


def dequantize_int4(packed: Tensor, scale: Tensor, zero: Tensor, group_size: int, shape) -> Tensor:
    """float32 tensor of ``shape`` from :func:`quantize_int4`'s output."""
    return _dequantize_int4_op(packed, scale, zero, group_size, [int(s) for s in shape])


def unpack_int4(packed: Tensor) -> Tensor:
    """uint8 values in [0, 15], twice as many as ``packed`` bytes, low nibble first."""
    check_tensor("packed", packed, dtypes=(torch.uint8,), nonempty=False)
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(-1)


# -- dequant-matmul ---------------------------------------------------------------------------------------------

# auto on CUDA: Triton first (as int8_matmul: decode reads the packed weight once only in the fused kernels; the
# lead's per-shape measured choice picks cuda where its GEMM wins). H200, 2026-11-26, 8192^2 g64, bf16 x: triton
# 0.162 / 0.178 / 0.141 / 2.05 ms at 1 / 16 / 256 / 4096 tokens (the cuda figures of that run were of the former
# strict-fp32 design)
# Measured per regime: token bucket, the weight's shape, group size, transpose, x's dtype, TF32 allowed (fp32 x).
_MM = KernelTable("int4_matmul", cuda_order=("triton", "cuda"),
                  regime=lambda x, packed, scale, zero, group_size, shape, transpose: (
                      token_bucket(rows_of(x)), tuple(shape), group_size, transpose, x.dtype,
                      x.dtype is torch.float32 and tf32_allowed()))


def _check_mm(x: Tensor, packed: Tensor, scale: Tensor, zero: Tensor, group_size: int, shape, transpose: bool):
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if len(shape) != 2:
        raise ValueError(f"shape must be (rows, cols) of the INT4 matrix, got {tuple(shape)}")
    _check_int4(packed, scale, zero, group_size, shape)
    if packed.device != x.device:
        raise ValueError(f"packed is on {packed.device} but x is on {x.device}")
    rows, cols = shape
    need = rows if transpose else cols
    if x.shape[-1] != need:
        raise ValueError(f"x has {x.shape[-1]} features in its last dimension, expected {need} "
                         f"({'rows' if transpose else 'cols'} of the INT4 matrix of shape {tuple(shape)})")


@_MM.register("reference")
def int4_matmul_reference(x, packed, scale, zero, group_size, shape, transpose):
    compute = torch.promote_types(x.dtype, torch.float32)
    w = dequantize_int4_reference(packed, scale, zero, group_size).reshape(shape).to(compute)
    return (x.to(compute) @ (w if transpose else w.T)).to(x.dtype)


_MM.register("cpu")(cpu_int4.int4_matmul)
_MM.register("cuda")(cuda_int4.int4_matmul)
_MM.register("triton")(triton_int4.int4_matmul)


def _int4_mm_setup(ctx, inputs, output):
    _, packed, scale, zero, group_size, shape, transpose = inputs
    ctx.save_for_backward(packed, scale, zero)
    ctx.group_size, ctx.shape, ctx.transpose = group_size, list(shape), transpose


def _int4_mm_backward(ctx, grad):
    packed, scale, zero = ctx.saved_tensors
    gx = _int4_matmul_op(grad, packed, scale, zero, ctx.group_size, ctx.shape, not ctx.transpose)
    return gx, None, None, None, None, None, None


_int4_matmul_op = define(
    "int4_matmul(Tensor x, Tensor packed, Tensor scale, Tensor zero, SymInt group_size, SymInt[] shape, "
    "bool transpose) -> Tensor",
    table=_MM, check=_check_mm, debug_check=lambda x, *_: require_finite("x", x),
    fake=lambda x, packed, scale, zero, group_size, shape, transpose: x.new_empty(
        (*x.shape[:-1], shape[1] if transpose else shape[0])),
    backward=_int4_mm_backward, setup_context=_int4_mm_setup)


def int4_matmul(x: Tensor, packed: Tensor, scale: Tensor, zero: Tensor, group_size: int, shape,
                transpose: bool = False) -> Tensor:
    """``x @ W^T`` (or ``x @ W`` with ``transpose``) for the INT4 matrix W of ``shape`` (rows, cols), in x's dtype.
    ``x`` may be non-contiguous (a transposed view costs no copy on cpu/cuda).

    Precision contract (every backend; tests/ops/test_int4_ops.py checks it against float64): each weight
    ``(q - z) * s`` is computed in fp32 and may be rounded once to x's dtype before the products, as bitsandbytes and
    torchao do (the cuda backend does: dequantize to x's dtype + cuBLAS; so do the triton backend's tensor-core
    kernels where the weight is scaled before the dot; its GEMV and the cpu backend keep it in fp32); products
    and sums in fp32 (for fp32 x on a GPU, TF32 where ``torch.backends.cuda.matmul.allow_tf32`` allows it); the output
    rounded once to x's dtype. With u the unit roundoff of x's dtype (2^-8 bf16, 2^-11 fp16, 2^-24 fp32) and
    S = |x| @ |W^T|: ``|y - x W^T| <= u |x W^T| + (u + K 2^-23) S`` up to second-order terms (K = the reduced
    dimension; TF32 off)."""
    return _int4_matmul_op(x, packed, scale, zero, group_size, [int(s) for s in shape], bool(transpose))


def int4_matmul_exact_float32(x: Tensor, packed: Tensor, scale: Tensor, zero: Tensor, group_size: int,
                              shape) -> Optional[Tensor]:
    """``x @ W^T`` as float32 for a bfloat16 / float16 ``x`` (2-D, any strides) and the INT4 matrix W (``shape`` =
    (rows, cols)), every product exact: the Triton tensor-core kernel of ``int4_matmul`` (``transpose=False``: W's
    groups run along the reduced axis) multiplies x's values by W's integers q - z, exact in x's dtype, scales each
    K-step's dot by the groups' scales in float32 and stores its float32 accumulators instead of rounding them to
    x's dtype. For GaLore's right projection G P^T of a 16-bit gradient (weightkit.optim.basis.Int4Basis.project):
    float32 accuracy (no rounding of P or G at all, where TF32 rounds both) on 16-bit tensor cores, without a float32
    copy of G. None where it does not apply, and the caller converts x to float32 for ``int4_matmul``: no Triton, a
    backend other than auto / triton asked for (on a CPU tensor: only with triton forced, the interpreter), or W's
    rows not whole groups that the kernel's K steps divide (kernels._shared.mm_k_step: a group of 8, e.g., is
    dequantized and rounded to x's dtype before the dot). At most 4 rows of x take the GEMV instead: float32 products
    of the float32 weight values, float32 accuracy too."""
    rows, cols = int(shape[0]), int(shape[1])
    if x.dtype not in (torch.bfloat16, torch.float16) or x.dim() != 2 or x.shape[1] != cols:
        return None
    forced = requested_backend()
    if forced not in (("auto", "triton") if x.is_cuda else ("triton",)) or _MM.why_not("triton", x.device):
        return None
    from ..kernels._shared import mm_k_step
    from ..kernels.int4 import int4_matmul_triton

    if mm_k_step(group_size, cols % group_size == 0, fma=False) is None:
        return None

    return int4_matmul_triton(x, packed.contiguous(), scale.contiguous(), zero.contiguous(), group_size, rows, cols,
                              False, out_dtype=torch.float32)
