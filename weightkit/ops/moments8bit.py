"""Adam's low-rank moments in bitsandbytes' 8-bit blockwise format, updated in one pass.

``blockwise8bit_adam_(low, exp_avg_q, exp_avg_absmax, exp_avg_sq_q, exp_avg_sq_absmax, code_signed, code_unsigned,
direction, beta1, beta2, eps)`` reads each block of 256 consecutive elements (row-major; the last block may be
shorter) of the two 8-bit moments, updates them with the gradient ``low`` and writes them back as 8-bit, in place,
and writes Adam's direction into ``direction`` (float32, ``low``'s shape; the Python function allocates it)::

    m = code_signed[exp_avg_q] * exp_avg_absmax[block]            (bitsandbytes' dequantize_blockwise)
    v = code_unsigned[exp_avg_sq_q] * exp_avg_sq_absmax[block]
    m = m * beta1 + low * (1 - beta1);   v = v * beta2 + low * low * (1 - beta2)
    direction = m / (sqrt(v) + eps)
    absmax = max |m| over the block  (resp. |v|);   x = clamp(m * (1 / max(absmax, 1e-38)), -1, 1)
    q = number of midpoints (code[i] + code[i + 1]) / 2 below x     (the nearest code value, ties to the lower one;
                                                                     a NaN: 255, as torch.bucketize puts it)

every operation one float32 rounding (no fused multiply-add; the square root correctly rounded). ``found_inf``
(optional, a one-element float32 tensor on ``low``'s device: the optimizers' device-side skip): where it is nonzero
the moments are left unchanged and the direction is 0. The format is bitsandbytes' (``create_dynamic_map``
code tables, one float32 absmax per block of 256): ``bitsandbytes.functional.dequantize_blockwise`` reads these
states bit for bit, and the codes are those of bitsandbytes' pure-PyTorch quantizer (its ``default`` backend:
midpoints and ``torch.bucketize``). Its native CPU quantizer (a table-driven binary search) picks the farther of
two neighbours for some values within a few ulps of a midpoint (measured: 0.15% of normal samples, one code step),
so a state written by either decodes the same way and differs from the other in those few codes.

Backends: ``reference`` (plain PyTorch, the spec), ``cpu`` (csrc/cpu/moments8bit.cpp, since 2026-12-08: the same
pass per block in C++, threads over blocks, the binary search step by step over the block; 2.1-3.2 ms for 1024 x
256 values where the reference takes 16-19 ms, on 2 cores: with the reference's ops GaLoreAdamW8bit's 1024^2 r256
CPU step took 22 ms against 10 ms with the three bitsandbytes passes the one pass replaced, 9.6 ms with this kernel)
and ``triton`` (one kernel: a program per block reads the 8-bit codes, updates in registers, finds the new codes by
an 8-step binary search over the midpoints, writes codes, absmax and the direction: the moments' bytes move once
each way). Each is the reference bit for bit.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..backend import KernelTable
from ..backends._blocked import keep_unless_found
from ..backends.cpu import moments8bit as cpu_moments8bit
from ..backends.triton import moments8bit as triton_moments8bit
from ._checks import check_flag, check_tensor, require_finite
from ._registry import define

__all__ = ["blockwise8bit_adam_", "BLOCK", "code_midpoints"]

BLOCK = 256
_TINY = 1e-38  # bitsandbytes' floor of a block's absmax before taking its reciprocal

_ADAM8 = KernelTable("blockwise8bit_adam_", cuda_order=("triton",))


def code_midpoints(code: Tensor) -> Tensor:
    """The 255 decision boundaries of a sorted 256-entry code table (float32)."""
    return (code[:-1] + code[1:]) / 2


def _check(low, exp_avg_q, exp_avg_absmax, exp_avg_sq_q, exp_avg_sq_absmax, code_signed, code_unsigned, direction,
           beta1, beta2, eps, found_inf=None):
    check_tensor("low", low, dtypes=(torch.float32,))
    dev = low.device
    check_flag("found_inf", found_inf, dev)
    check_tensor("direction", direction, dtypes=(torch.float32,), device=dev)
    if direction.shape != low.shape or not direction.is_contiguous():
        raise ValueError(f"direction must be contiguous with low's shape {tuple(low.shape)}, got "
                         f"{tuple(direction.shape)}")
    blocks = -(-low.numel() // BLOCK)
    for name, t in (("exp_avg_q", exp_avg_q), ("exp_avg_sq_q", exp_avg_sq_q)):
        check_tensor(name, t, dtypes=(torch.uint8,), device=dev)
        if t.numel() != low.numel() or not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous with low's {low.numel()} elements, got {t.numel()}")
    for name, t in (("exp_avg_absmax", exp_avg_absmax), ("exp_avg_sq_absmax", exp_avg_sq_absmax)):
        check_tensor(name, t, dtypes=(torch.float32,), device=dev)
        if t.numel() != blocks or not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous with one value per block of {BLOCK} ({blocks}), "
                             f"got {t.numel()}")
    for name, t in (("code_signed", code_signed), ("code_unsigned", code_unsigned)):
        check_tensor(name, t, dtypes=(torch.float32,), device=dev)
        if t.numel() != 256:
            raise ValueError(f"{name} must be a 256-entry code table (bitsandbytes.functional.create_dynamic_map), "
                             f"got {t.numel()} entries")
    for name, b in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= b < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {b}")
    if not eps >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")


def _blocks(t: Tensor) -> Tensor:
    """``t`` flattened and zero-padded to whole blocks, [blocks, BLOCK]."""
    flat = t.reshape(-1)
    pad = (-flat.numel()) % BLOCK
    return torch.nn.functional.pad(flat, (0, pad)).reshape(-1, BLOCK)


def quantize_reference(x: Tensor, code: Tensor):
    """(uint8 codes, float32 absmax per block) of ``x`` (see the module docstring)."""
    n = x.numel()
    xb = _blocks(x.to(torch.float32))
    absmax = xb.abs().amax(1)
    scaled = torch.clamp(xb * (1.0 / absmax.clamp_min(_TINY)).unsqueeze(1), -1, 1).reshape(-1)[:n]
    q = torch.bucketize(scaled, code_midpoints(code), out_int32=True).to(torch.uint8)
    return q.reshape(x.shape), absmax


def dequantize_reference(q: Tensor, absmax: Tensor, code: Tensor) -> Tensor:
    n = q.numel()
    values = _blocks(code[q.reshape(-1).long()])
    return (values * absmax.unsqueeze(1)).reshape(-1)[:n]


@_ADAM8.register("reference")
def blockwise8bit_adam_reference(low, exp_avg_q, exp_avg_absmax, exp_avg_sq_q, exp_avg_sq_absmax, code_signed,
                                 code_unsigned, direction, beta1, beta2, eps, found_inf=None):
    g = low.reshape(-1)
    m = dequantize_reference(exp_avg_q, exp_avg_absmax, code_signed)
    v = dequantize_reference(exp_avg_sq_q, exp_avg_sq_absmax, code_unsigned)
    m = m * beta1 + g * (1 - beta1)
    v = v * beta2 + (g * g) * (1 - beta2)
    # sqrt correctly rounded (through float64), as the kernels' sqrt_rn: torch's vectorized float32 sqrt on the
    # CPU is not (it differs in the last bit for some values)
    d = m / (v.double().sqrt().float() + eps)
    direction.view(-1).copy_(d if found_inf is None else d.masked_fill_(found_inf.ne(0), 0.0))
    for (q, a), q_out, a_out in ((quantize_reference(m, code_signed), exp_avg_q, exp_avg_absmax),
                                 (quantize_reference(v, code_unsigned), exp_avg_sq_q, exp_avg_sq_absmax)):
        keep_unless_found(q_out.view(-1), q, found_inf)
        keep_unless_found(a_out.view(-1), a, found_inf)


_ADAM8.register("cpu")(cpu_moments8bit.blockwise8bit_adam_)
_ADAM8.register("triton")(triton_moments8bit.blockwise8bit_adam_)


def _check_data(low, *args):
    if args[-1] is None:  # with a device flag, a non-finite low is the flagged case (nothing is written)
        require_finite("low", low)


_blockwise8bit_adam_op = define(
    "blockwise8bit_adam_(Tensor low, Tensor(a1!) exp_avg_q, Tensor(a2!) exp_avg_absmax, Tensor(a3!) exp_avg_sq_q, "
    "Tensor(a4!) exp_avg_sq_absmax, Tensor code_signed, Tensor code_unsigned, Tensor(a7!) direction, float beta1, "
    "float beta2, float eps, Tensor? found_inf=None) -> ()",
    table=_ADAM8, check=_check, debug_check=_check_data, fake=lambda *args: None)


def blockwise8bit_adam_(low: Tensor, exp_avg_q: Tensor, exp_avg_absmax: Tensor, exp_avg_sq_q: Tensor,
                        exp_avg_sq_absmax: Tensor, code_signed: Tensor, code_unsigned: Tensor, *, beta1: float = 0.9,
                        beta2: float = 0.999, eps: float = 1e-6, found_inf: Optional[Tensor] = None) -> Tensor:
    """Update the 8-bit moments in place in one pass; return Adam's direction (see the module docstring). Where the
    device flag ``found_inf`` is set, nothing changes and the direction is 0."""
    direction = torch.empty(low.shape, dtype=torch.float32, device=low.device)
    _blockwise8bit_adam_op(low, exp_avg_q, exp_avg_absmax, exp_avg_sq_q, exp_avg_sq_absmax, code_signed,
                           code_unsigned, direction, float(beta1), float(beta2), float(eps), found_inf)
    return direction
