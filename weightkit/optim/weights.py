"""Part (c) of the GaLore step: how a weight is read and written.

A weight part tells the step where a parameter's gradient is, which tensor the update writes, and how the low-rank
Adam update becomes a new weight:

* :class:`FloatWeight` -- a float parameter (float32 / bfloat16 / float16) updated in place. One-sided projections
  run the fused op ``weightkit::galore_adam_update_`` (moments, projection back and decoupled weight decay in one
  call, no full-size temporary for float32 weights); the two-sided 'full' projection uses plain ops on its small
  r x r state. Any parameter that no other part claims is a FloatWeight.
* :class:`Int8Weight` (``weightkit.nn.int8.Int8Weight``, the weight of an ``Int8Linear``) through
  :class:`Int8SRWeight` -- the gradient is the weight's ordinary ``.grad``; the step writes the int8 storage
  directly (``local`` gives the int8 values with ``scale`` and ``group_size`` attached): the low-rank update is
  projected back to a float32 delta (m x n) and ``weightkit::int8_sr_update_`` computes (W + delta) * decay group by
  group, recomputes each group's absmax scale and re-quantizes by stochastic rounding (unbiased; the Philox stream
  is keyed by the group's seed, the parameter and the step, so a resumed run rounds identically), without a float
  copy of W.
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

from ..nn.int8 import Int8Weight
from ..ops._checks import debug_checks, debug_checks_enabled
from ..ops.galore import galore_adam_update_
from ..ops.int8 import int8_sr_update_
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


def adam_direction(low: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, u: LowRankUpdate) -> Tensor:
    """Update the moments in place and return M / (sqrt(V) + eps) (low-rank, float32)."""
    exp_avg.mul_(u.beta1).add_(low, alpha=1 - u.beta1)
    exp_avg_sq.mul_(u.beta2).addcmul_(low, low, value=1 - u.beta2)
    return exp_avg / (exp_avg_sq.sqrt() + u.eps)


class FloatWeight:
    """A float parameter, written in place (see the module docstring)."""

    def accepts(self, p: Tensor) -> bool:
        return True

    def check_param(self, p: Tensor, group: Dict) -> None:
        pass

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
            full = project_back(adam_direction(low, exp_avg, exp_avg_sq, u), side, ortho, ortho_right)
            weight.copy_((weight.to(torch.float32) - u.step_size * u.scale * full) * u.decay)
            return
        galore_adam_update_(weight.data, low, exp_avg, exp_avg_sq, ortho, side == "left", beta1=u.beta1,
                            beta2=u.beta2, eps=u.eps, step_size=u.step_size, scale=u.scale, decay=u.decay)


class Int8SRWeight(FloatWeight):
    """The int8 weight of an Int8Linear (:class:`weightkit.nn.int8.Int8Weight`), written by stochastic rounding."""

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
        delta = project_back(adam_direction(low, exp_avg, exp_avg_sq, u), side, ortho)
        delta.mul_(-(u.step_size * u.scale))
        # w_q, scale <- SR((w_q * scale + delta) * decay), fused: the float weight never exists whole. The op's own
        # NaN check of delta (on by default: it writes in place) would cost a host sync per weight per step; the
        # step has checked the gradients already, so it runs here only when debug checks are asked for.
        with debug_checks(debug_checks_enabled()):
            int8_sr_update_(weight.data, weight.scale, delta, weight.group_size, decay=u.decay, seed=u.seed,
                            offset=(u.step * weight.numel()) % 2**62)
        weight.float_grad = None
