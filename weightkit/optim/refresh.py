"""When the GaLore step recomputes a parameter's basis (the refresh schedule, beside the three storage parts).

* :class:`FixedRefresh` -- galore-torch's rule: at steps 0, T, 2T, ... (``update_proj_gap`` = T, the step counted
  before its increment), and whenever there is no basis yet. With ``stagger=True`` the refreshes of different
  parameters are spread over the T steps of a period: parameter ``key`` (its index in the param groups) refreshes at
  the steps where ``(step + key) % T == 0`` after its first one, so that with L layers no step after the first
  refreshes more than ceil(L / T) of them (the first step has no basis at all and computes every one). ``offset``
  shifts the keys: LayerwiseGaLore, whose optimizers hold one parameter each (key 0), passes each parameter's
  position.
* :class:`LazyRefresh` -- Q-GaLore's layer-adaptive rule, as q-galore-torch does it: at each refresh the cosine
  similarity between the first basis vector and the previous one is queued (``queue_size``); when the queue is full
  and its mean is at least ``cos_threshold``, the parameter's interval is multiplied by ``gamma_proj``. Its state
  entries (``similarities``, ``first_vector``, ``gap``, ``next_refresh``, ``refresh_count``) are part of the
  checkpoint format.

A schedule decides from the state (``due``) and, when a new basis was computed, returns the state entries that go
with it (``entries``); it never computes a basis itself (:meth:`GaLoreProjector.compute` does, in one place).
"""

from __future__ import annotations

from typing import Dict

import torch
from torch import Tensor


class FixedRefresh:
    """Refresh every ``update_proj_gap`` steps (optionally staggered across parameters)."""

    def __init__(self, stagger: bool = False, offset: int = 0):
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValueError(f"refresh offset must be an int >= 0, got {offset!r}")
        self.stagger = bool(stagger)
        self.offset = offset  # added to the parameter's key (LayerwiseGaLore: the parameter's position)
        self.group_keys: Dict = {}

    def check_group(self, group: Dict) -> None:
        pass  # update_proj_gap is checked by the projector

    def due(self, state: Dict, group: Dict, has_basis: bool, key: int) -> bool:
        if not has_basis:
            return True
        step = state.get("step", 0)
        shift = key + self.offset if self.stagger else 0
        return (step + shift) % group["update_proj_gap"] == 0

    def entries(self, state: Dict, group: Dict, ortho: Tensor, side: str) -> Dict:
        return {}


class LazyRefresh:
    """Q-GaLore's lazy layer-adaptive refresh (see the module docstring)."""

    def __init__(self, cos_threshold: float = 0.4, gamma_proj: float = 2.0, queue_size: int = 5):
        self.group_keys = dict(cos_threshold=cos_threshold, gamma_proj=gamma_proj, queue_size=queue_size)

    def check_group(self, group: Dict) -> None:
        q = group.get("queue_size")
        if isinstance(q, bool) or not isinstance(q, int) or q < 1:
            raise ValueError(f"queue_size must be an int >= 1, got {q!r}")
        for name in ("cos_threshold", "gamma_proj"):
            v = group.get(name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"{name} must be a number, got {v!r}")
        if group["gamma_proj"] < 1:
            raise ValueError(f"gamma_proj must be >= 1 (the interval only grows), got {group['gamma_proj']!r}")

    def due(self, state: Dict, group: Dict, has_basis: bool, key: int) -> bool:
        return not has_basis or state.get("step", 0) >= state["next_refresh"]

    def entries(self, state: Dict, group: Dict, ortho: Tensor, side: str) -> Dict:
        step = state.get("step", 0)
        first = ortho[:, 0] if side == "left" else ortho[0]
        gap = state.get("gap", group["update_proj_gap"])
        out: Dict = {}
        if "first_vector" in state:
            # on first's device and dtype: a state from an older version (similarities made on the CPU) or moved by
            # hand must not mix devices in the cat
            cos = torch.nn.functional.cosine_similarity(state["first_vector"].to(first.device, first.dtype), first,
                                                        dim=0).reshape(1)
            previous = state.get("similarities", first.new_zeros(0)).to(device=first.device, dtype=cos.dtype)
            sims = torch.cat([previous, cos])[-group["queue_size"]:]
            out["similarities"] = sims
            # host sync (the queue's mean decides the next interval): at refreshes only, next to the SVD's own syncs
            if sims.numel() == group["queue_size"] and float(sims.mean()) >= group["cos_threshold"]:
                gap = int(gap * group["gamma_proj"])
        else:
            out["similarities"] = first.new_zeros(0)
        out["first_vector"] = first.clone()
        out["gap"] = gap
        out["next_refresh"] = step + gap
        out["refresh_count"] = state.get("refresh_count", 0) + 1
        return out
