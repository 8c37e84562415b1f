"""Part (c) of the GaLore step: how a weight is read and written.

A weight part tells the step where a parameter's gradient is, which tensor the update writes, and how the low-rank
Adam update becomes a new weight:

* :class:`FloatWeight` -- a float parameter (float32 / bfloat16 / float16) updated in place. One-sided projections
  run the fused op ``weightkit::galore_adam_update_`` (moments, projection back and decoupled weight decay in one
  call, no full-size temporary for float32 weights), or, where 8-bit moments gave Adam's direction in one pass,
  ``weightkit::lowrank_update_`` (its write-back alone); the two-sided 'full' projection uses plain ops on its
  small r x r state. Any parameter that no other part claims is a FloatWeight.
* :class:`Int8Weight` (``weightkit.nn.int8.Int8Weight``, the weight of an ``Int8Linear``) through
  :class:`Int8SRWeight` -- the gradient is the weight's ordinary ``.grad``; the step writes the int8 storage
  directly (``local`` gives the int8 values with ``scale`` and ``group_size`` attached). With the packed INT4 basis
  (Q-GaLore) one fused op, ``weightkit::int8_sr_lowrank_update_``, computes (W - a P U) * decay tile by tile from
  the packed basis and the low-rank update U, recomputes each group's absmax scale and re-quantizes by stochastic
  rounding (unbiased; the Philox stream is keyed by the group's seed, the parameter and the step, so a resumed run
  rounds identically): neither a float copy of W nor the m x n update exists whole. With a float basis the update is
  projected back to a float32 delta (m x n) for ``weightkit::int8_sr_update_`` (same arithmetic).
* ``ShardedWeight`` (weightkit.optim.distributed) -- the local shard of an FSDP2 DTensor parameter.

For a parameter's refresh a part also gives the whole gradient (``gather``), agrees on the new basis across
processes and keeps this process's part of it (``share_basis``), and completes a projected gradient that was
computed from a part of the rows (``reduce_low``); for a single process these are identities.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from ..backends._blocked import keep_unless_found, lowrank_factor, masked_low_rank_adam
from ..nn.int8 import Int8Weight
from ..ops._checks import FLOAT_DTYPES, debug_checks, debug_checks_enabled
from ..ops.galore import galore_adam_update_, lowrank_update_
from ..ops.int8 import int8_sr_update_
from ..ops.qgalore import PRECISIONS, int8_sr_lowrank_update_
from .basis import PackedInt4
from .projector import project_back


@dataclass
class LowRankUpdate:
    """The numbers of one low-rank Adam update of one parameter."""

    beta1: float
    beta2: float
    eps: float
    step_size: float  # lr with Adam's bias correction
    scale: float  # GaLore's scale of the projected-back update
    decay: float  # 1 - lr * weight_decay
    step: int  # the parameter's step count after this step's increment
    seed: int  # the SR stream's key for this parameter (int8 weights)
    # nonfinite='skip' without a host read: a one-element float32 flag (nonzero: leave weight and moments unchanged)
    # and the step size counted on the device (0-d float32, replaces step_size), or None
    found_inf: Optional[Tensor] = None
    step_size_t: Optional[Tensor] = None


def adam_direction(low: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, u: LowRankUpdate) -> Tensor:
    """Update the moments in place and return M / (sqrt(V) + eps) (low-rank, float32); under a device flag
    (u.found_inf) the moments stay where it is set and the direction is 0."""
    if u.found_inf is not None:
        return masked_low_rank_adam(low, exp_avg, exp_avg_sq, u.beta1, u.beta2, u.eps, u.found_inf)
    exp_avg.mul_(u.beta1).add_(low, alpha=1 - u.beta1)
    exp_avg_sq.mul_(u.beta2).addcmul_(low, low, value=1 - u.beta2)
    return exp_avg / (exp_avg_sq.sqrt() + u.eps)


class FloatWeight:
    """A float parameter, written in place (see the module docstring)."""

    # apply_low_rank takes a bfloat16 / float16 basis as stored (the fused op's 16-bit product on a GPU)
    takes_16bit_basis = True

    def accepts(self, p: Tensor) -> bool:
        return True

    def check_param(self, p: Tensor, group: Dict) -> None:
        if "rank" in group and p.dim() == 2 and p.dtype not in FLOAT_DTYPES:
            raise ValueError(f"a {str(p.dtype).replace('torch.', '')} parameter of shape {tuple(p.shape)} in a "
                             "low-rank group (one with a 'rank'): the fused low-rank update writes float32, bfloat16 "
                             "and float16 weights (and an Int8Linear's); put it in a group without 'rank' (AdamW)")

    def grad(self, p: Tensor) -> Optional[Tensor]:
        return p.grad

    def clear_grad(self, p: Tensor) -> None:
        pass  # .grad is Optimizer.zero_grad's

    def check_grad(self, p: Tensor, grad: Tensor) -> None:
        pass

    def local(self, t: Tensor) -> Tensor:
        """The tensor this process reads or writes for ``t`` (a parameter or its gradient)."""
        return t

    def check_local(self, p: Tensor, local: Tensor) -> None:
        pass

    def gather(self, p: Tensor, grad: Tensor) -> Tensor:
        """The whole gradient, from which a new basis is computed."""
        return grad

    def share_basis(self, p: Tensor, ortho: Tensor, ortho_right: Optional[Tensor],
                    side: str) -> Tuple[Tensor, Optional[Tensor]]:
        """The basis that every process agrees on, and the part of it this process keeps."""
        return ortho, ortho_right

    def reduce_low(self, p: Tensor, low: Tensor, side: str) -> Tensor:
        """The projected gradient of the whole weight from this process's projection."""
        return low

    def validates_shapes(self, p: Tensor) -> bool:
        """Whether a checkpoint's state entries of ``p`` have the shapes of the whole parameter."""
        return True

    def any_bad(self, params, bad: bool) -> bool:
        """Whether any process saw a non-finite gradient, given whether this one did (``params``: those of this
        part in the optimizer)."""
        return bad

    def apply_low_rank(self, weight: Tensor, low: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, ortho: Tensor,
                       ortho_right: Optional[Tensor], side: str, u: LowRankUpdate) -> None:
        if side == "full":  # two-sided projection: no fused kernel, plain ops on small r x r state
            # (adam_direction and apply_direction's keep_unless_found predicate on u.found_inf, when given)
            self.apply_direction(weight, adam_direction(low, exp_avg, exp_avg_sq, u), ortho, ortho_right, side, u)
            return
        step_size_t = None if u.step_size_t is None else u.step_size_t.reshape(1)
        galore_adam_update_(weight.data, low, exp_avg, exp_avg_sq, ortho, side == "left", beta1=u.beta1,
                            beta2=u.beta2, eps=u.eps, step_size=u.step_size, scale=u.scale, decay=u.decay,
                            found_inf=u.found_inf, step_size_t=step_size_t)

    def apply_direction(self, weight: Tensor, direction: Tensor, ortho: Tensor, ortho_right: Optional[Tensor],
                        side: str, u: LowRankUpdate) -> None:
        """Write back Adam's low-rank direction U, the moments already updated (in one pass by 8-bit moments,
        weightkit.optim.moments.FusedBlockwiseMoments8bit): W <- (W - step_size scale N) decay by the fused op
        ``weightkit::lowrank_update_`` (no full-size temporary for one-sided projections), predicated on u.found_inf
        and scaled by u.step_size_t when given, as :meth:`apply_low_rank`."""
        if side == "full":  # plain ops on the small r x r state
            full = project_back(direction, side, ortho.to(torch.float32), ortho_right.to(torch.float32))
            size = u.step_size if u.step_size_t is None else u.step_size_t
            keep_unless_found(weight, (weight.to(torch.float32) - size * u.scale * full) * u.decay, u.found_inf)
            return
        step_size_t = None if u.step_size_t is None else u.step_size_t.reshape(1)
        lowrank_update_(weight.data, direction.to(torch.float32), ortho, side == "left", step_size=u.step_size,
                        scale=u.scale, decay=u.decay, found_inf=u.found_inf, step_size_t=step_size_t)


class Int8SRWeight(FloatWeight):
    """The int8 weight of an Int8Linear (:class:`weightkit.nn.int8.Int8Weight`), written by stochastic rounding.
    ``precision`` of the fused write-back's low-rank product: 'fp32' (default), 'tf32x3', 'bf16x3' or 'bf16'
    (tensor cores on a GPU; see weightkit.ops.qgalore)."""

    packed_basis = True  # apply_low_rank takes the INT4 basis as stored (a PackedInt4), not dequantized

    def __init__(self, precision: str = "fp32"):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.precision = precision

    takes_16bit_basis = False  # its projection back (project_back) runs in float32

    def accepts(self, p: Tensor) -> bool:
        return isinstance(p, Int8Weight) or p.dtype == torch.int8

    def check_param(self, p: Tensor, group: Dict) -> None:
        if not isinstance(p, Int8Weight):
            raise ValueError("int8 parameters must belong to a weightkit.nn.Int8Linear (an Int8Weight: its scale is "
                             f"updated too), got a {type(p).__name__}")
        if "rank" not in group:
            raise ValueError("Int8Linear weights in a GaLore optimizer must be in a param group with a 'rank' (see "
                             "weightkit.optim.param_groups): the step writes them by the fused low-rank update; "
                             "for a dense update use a torch optimizer (e.g. torch.optim.AdamW), which updates them "
                             "by stochastic rounding")

    def local(self, t: Tensor) -> Tensor:
        """For the weight: its int8 values (an alias, written in place) carrying ``scale`` and ``group_size``, what
        :meth:`apply_low_rank` updates; a gradient is itself."""
        if not isinstance(t, Int8Weight):
            return t
        values = t.qdata.detach()
        values.scale, values.group_size = t.scale, t.group_size
        return values

    def apply_low_rank(self, weight: Tensor, low: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, ortho: Tensor,
                       ortho_right: Optional[Tensor], side: str, u: LowRankUpdate) -> None:
        self.apply_direction(weight, adam_direction(low, exp_avg, exp_avg_sq, u), ortho, ortho_right, side, u)

    def apply_direction(self, weight: Tensor, direction: Tensor, ortho, ortho_right: Optional[Tensor], side: str,
                        u: LowRankUpdate) -> None:
        """Write back Adam's low-rank direction U (the moments already updated: by ``apply_low_rank``, or in one
        pass by 8-bit moments, weightkit.optim.moments.FusedBlockwiseMoments8bit). Under a device flag
        (u.found_inf) nothing is written where it is set, and a step size counted on the device (u.step_size_t)
        scales the update: both read by the kernels, no host sync, no copy of the weight."""
        offset = (u.step * weight.numel()) % 2**62
        alpha = u.scale if u.step_size_t is not None else u.step_size * u.scale
        # The ops' own NaN check of their input (on by default: they write in place) would cost a host sync per
        # weight per step; the step has checked the gradients already, so it runs only when debug checks are on.
        with debug_checks(debug_checks_enabled()):
            if isinstance(ortho, PackedInt4):
                # w_q, scale <- SR((w_q * scale - a P U) * decay), tile by tile from the packed basis
                int8_sr_lowrank_update_(weight.data, weight.scale, ortho.q, ortho.scale, ortho.zero, direction,
                                        weight.group_size, ortho.group_size, side == "left", alpha=alpha,
                                        decay=u.decay, precision=self.precision, seed=u.seed, offset=offset,
                                        found_inf=u.found_inf, step_size_t=u.step_size_t)
            else:  # a float basis (GaLoreParts built by hand): the same arithmetic through a float32 delta
                delta = project_back(direction, side, ortho).mul_(lowrank_factor(alpha, u.step_size_t))
                int8_sr_update_(weight.data, weight.scale, delta, weight.group_size, decay=u.decay, seed=u.seed,
                                offset=offset, found_inf=u.found_inf)
