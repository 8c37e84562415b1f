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
* ``int4_matmul(x, packed, scale, zero, group_size, shape, transpose=False, out_dtype=None)``: with W = dequant
  (rows x cols), ``x @ W^T`` (x: (..., cols)) or, with ``transpose``, ``x @ W`` (x: (..., rows)); differentiable in
  x. The reference dequantizes W whole; cpu dequantizes blocks of about 4M values to fp32 around BLAS; cuda
  dequantizes W to x's dtype (blocks of at most 128 MB) and multiplies with cuBLAS; Triton dequantizes tile by tile
  in registers. The output has x's dtype, accumulation is fp32; the weight may be rounded to x's dtype first
  (``int4_matmul``'s precision contract). ``out_dtype=torch.float32`` for a 16-bit x: a float32 result of float32
  accuracy (no rounding of W), without a float32 copy of x (GaLore's projections of a 16-bit gradient).

``unpack_int4`` (the raw nibbles) is a plain PyTorch helper.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..backend import KernelTable, rows_of, tf32_allowed, token_bucket
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
# Measured per regime: token bucket, the weight's shape, group size, transpose, x's dtype, TF32 allowed (for a
# float32 product: an fp32 x, or a float32 result, whose cuda path converts x and multiplies in float32), float32 out.
_MM = KernelTable("int4_matmul", cuda_order=("triton", "cuda"),
                  regime=lambda x, packed, scale, zero, group_size, shape, transpose, out_dtype: (
                      token_bucket(rows_of(x)), tuple(shape), group_size, transpose, x.dtype,
                      (x.dtype is torch.float32 or out_dtype is torch.float32) and tf32_allowed(),
                      out_dtype not in (None, x.dtype)))


def _check_mm(x: Tensor, packed: Tensor, scale: Tensor, zero: Tensor, group_size: int, shape, transpose: bool,
              out_dtype: Optional[torch.dtype] = None):
    check_tensor("x", x, dtypes=FLOAT_DTYPES, nonempty=False, min_ndim=1)  # no tokens: an empty result
    if out_dtype is not None and out_dtype != x.dtype and not (
            out_dtype == torch.float32 and x.dtype in (torch.bfloat16, torch.float16)):
        raise ValueError(f"out_dtype must be None, x's dtype ({x.dtype}) or torch.float32 for a bfloat16 / float16 "
                         f"x, got {out_dtype}")
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
def int4_matmul_reference(x, packed, scale, zero, group_size, shape, transpose, out_dtype=None):
    compute = torch.promote_types(x.dtype, torch.float32)
    w = dequantize_int4_reference(packed, scale, zero, group_size).reshape(shape).to(compute)
    return (x.to(compute) @ (w if transpose else w.T)).to(out_dtype or x.dtype)


_MM.register("cpu")(cpu_int4.int4_matmul)
_MM.register("cuda")(cuda_int4.int4_matmul)
_MM.register("triton")(triton_int4.int4_matmul)


def _int4_mm_setup(ctx, inputs, output):
    x, packed, scale, zero, group_size, shape, transpose, _ = inputs
    ctx.save_for_backward(packed, scale, zero)
    ctx.group_size, ctx.shape, ctx.transpose, ctx.x_dtype = group_size, list(shape), transpose, x.dtype


def _int4_mm_backward(ctx, grad):
    packed, scale, zero = ctx.saved_tensors
    gx = _int4_matmul_op(grad, packed, scale, zero, ctx.group_size, ctx.shape, not ctx.transpose, None)
    return gx.to(ctx.x_dtype), None, None, None, None, None, None, None  # (a float32 out_dtype's grad: float32)


_int4_matmul_op = define(
    "int4_matmul(Tensor x, Tensor packed, Tensor scale, Tensor zero, SymInt group_size, SymInt[] shape, "
    "bool transpose, ScalarType? out_dtype=None) -> Tensor",
    table=_MM, check=_check_mm, debug_check=lambda x, *_: require_finite("x", x),
    fake=lambda x, packed, scale, zero, group_size, shape, transpose, out_dtype=None: x.new_empty(
        (*x.shape[:-1], shape[1] if transpose else shape[0]), dtype=out_dtype or x.dtype),
    backward=_int4_mm_backward, setup_context=_int4_mm_setup, empty=lambda x, *_: x.numel() == 0)


def int4_matmul(x: Tensor, packed: Tensor, scale: Tensor, zero: Tensor, group_size: int, shape,
                transpose: bool = False, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """``x @ W^T`` (or ``x @ W`` with ``transpose``) for the INT4 matrix W of ``shape`` (rows, cols), in x's dtype,
    or in ``out_dtype=torch.float32`` for a bfloat16 / float16 x (below). ``x`` may be non-contiguous (a transposed
    view costs no copy on cpu/cuda).

    Precision contract (every backend; tests/ops/test_int4_ops.py checks it against float64): each weight
    ``(q - z) * s`` is computed in fp32 and may be rounded once to x's dtype before the products, as bitsandbytes and
    torchao do (the cuda backend does: dequantize to x's dtype + cuBLAS; so do the triton backend's tensor-core
    kernels where the weight is scaled before the dot; its GEMV and the cpu backend keep it in fp32); products
    and sums in fp32 (for fp32 x on a GPU, TF32 where ``torch.backends.cuda.matmul.allow_tf32`` allows it); the output
    rounded once to x's dtype. With u the unit roundoff of x's dtype (2^-8 bf16, 2^-11 fp16, 2^-24 fp32) and
    S = |x| @ |W^T|: ``|y - x W^T| <= u |x W^T| + (u + K 2^-23) S`` up to second-order terms (K = the reduced
    dimension; TF32 off).

    ``out_dtype=torch.float32`` for a 16-bit x: a float32 result with the accuracy of the float32 product of x's values
    and W's float32 values (the bound above with u = 2^-24; W is never rounded to x's dtype), without a float32 copy
    of x: GaLore's projections of a 16-bit gradient with the INT4 basis (weightkit.optim.basis.Int4Basis.project).
    The triton backend multiplies x's 16-bit values by W's integers on tensor cores where W's groups lie along the
    reduced axis (``transpose=False``, rows of whole groups its K steps divide): every product exact, the group
    scales applied in float32 after each K step's dot; elsewhere by W's float32 values split in three bf16 parts (an
    fp16 x's values in two bf16 parts), exact products again. The cuda backend, for a 16-bit x past its GEMV and
    with TF32 not allowed, multiplies x by W's float32 values in three bf16 parts too (an fp16 x in two bf16 parts),
    cuBLAS products with float32 results (backends/_blocked.split3_dequant_matmul). Elsewhere x goes to float32 by
    blocks of at most 4M values (backends/_blocked.float32_by_blocks) for the float32 product (TF32 on a GPU where
    ``torch.backends.cuda.matmul.allow_tf32`` allows it). Its gradient is x's dtype."""
    return _int4_matmul_op(x, packed, scale, zero, group_size, [int(s) for s in shape], bool(transpose), out_dtype)

