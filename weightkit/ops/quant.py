"""INT8 stochastic rounding (Q-GaLore, arXiv 2407.08296).

``stochastic_round_int8(x, scale, group_size, seed, offset)`` quantizes ``x`` in groups of ``group_size``
consecutive elements (row-major order), group ``j`` sharing ``scale[j]``:

    q = clamp(floor(x * (1 / scale) + u), -128, 127),   u ~ U[0, 1) from Philox (weightkit.ops.rng)

so that E[q * scale] = x inside the representable range. The product and the sum are rounded separately in
fp32 (no fused multiply-add), which every backend follows, so results agree bit for bit across backends for a
given (seed, offset).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..backend import KernelTable
from . import rng
from ._checks import FLOAT_DTYPES, check_finite, check_positive_int, check_tensor

__all__ = ["stochastic_round_int8", "absmax_scale"]

_SR = KernelTable("stochastic_round_int8", compiled="stochastic_round_int8_kernel")


def _check_sr_args(x: Tensor, scale: Tensor, group_size: int) -> None:
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    check_positive_int("group_size", group_size)
    if x.numel() % group_size:
        raise ValueError(f"group_size={group_size} must divide x.numel()={x.numel()}")
    check_tensor("scale", scale, dtypes=(torch.float32,), device=x.device)
    if scale.numel() != x.numel() // group_size:
        raise ValueError(
            f"scale must hold one value per group: x.numel() / group_size = {x.numel() // group_size}, "
            f"got scale.numel() = {scale.numel()}"
        )


@_SR.register("reference")
def stochastic_round_int8_reference(x: Tensor, scale: Tensor, group_size: int, seed: int, offset: int) -> Tensor:
    xf = x.reshape(-1, group_size).to(torch.float32)
    inv = 1.0 / scale.reshape(-1, 1)
    u = rng.uniform(x.numel(), seed, offset, device=x.device).reshape(-1, group_size)
    q = torch.floor(xf * inv + u)  # eager torch rounds the product and the sum separately, like the kernels
    return q.clamp_(-128, 127).to(torch.int8).reshape(x.shape)


@_SR.register("cpu")
@_SR.register("cuda")
def _stochastic_round_int8_compiled(x, scale, group_size, seed, offset):
    return torch.ops.weightkit.stochastic_round_int8_kernel(x.contiguous(), scale.contiguous(), group_size, seed, offset)


@_SR.register("triton")
def _stochastic_round_int8_triton(x, scale, group_size, seed, offset):
    from ..kernels.quant import stochastic_round_int8_triton

    return stochastic_round_int8_triton(x.contiguous(), scale.contiguous(), group_size, seed, offset)


@torch.library.custom_op("weightkit::stochastic_round_int8", mutates_args=())
def _stochastic_round_int8_op(x: Tensor, scale: Tensor, group_size: int, seed: int, offset: int) -> Tensor:
    _check_sr_args(x, scale, group_size)
    rng.check_seed(seed, offset)
    check_finite("x", x)
    if not bool((scale > 0).all()) or not bool(torch.isfinite(scale).all()):
        raise ValueError("scale must be positive and finite in every group")
    return _SR(x.device, x, scale, group_size, seed, offset)


@_stochastic_round_int8_op.register_fake
def _(x, scale, group_size, seed, offset):
    _check_sr_args(x, scale, group_size)
    return torch.empty(x.shape, dtype=torch.int8, device=x.device)


def stochastic_round_int8(x: Tensor, scale: Tensor, group_size: int, seed: int, offset: int = 0) -> Tensor:
    """Quantize ``x`` to int8 by unbiased stochastic rounding (see the module docstring).

    Args:
        x: float32/float16/bfloat16 tensor of any shape; groups run over its row-major order.
        scale: float32, one positive value per group (``x.numel() // group_size`` of them).
        group_size: elements per group; must divide ``x.numel()``.
        seed, offset: Philox key and stream position of ``x``'s first element, both in [0, 2**63).
    """
    rng.check_seed(seed, offset)  # before the op: values past int64 cannot cross the schema
    return _stochastic_round_int8_op(x, scale, group_size, seed, offset)


def absmax_scale(x: Tensor, group_size: int, qmax: int = 127) -> Tensor:
    """Per-group symmetric scale ``max|x| / qmax`` (float32), floored so that an all-zero group stays valid."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    check_positive_int("group_size", group_size)
    if x.numel() % group_size:
        raise ValueError(f"group_size={group_size} must divide x.numel()={x.numel()}")
    amax = x.detach().reshape(-1, group_size).abs().amax(dim=1).to(torch.float32)
    return (amax / qmax).clamp_min(torch.finfo(torch.float32).tiny)
