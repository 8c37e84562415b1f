"""QGaLoreAdamW8bit (Q-GaLore, arXiv 2407.08296): GaLore with INT4 projection matrices, INT8 weights written back by
stochastic rounding, 8-bit Adam moments, and the lazy layer-adaptive subspace refresh.

* Weights of ``weightkit.nn.Int8Linear`` layers (int8 parameters) are trained through their ``float_grad``
  (filled by Int8Linear's backward): the low-rank update is projected back to delta (float32, m x n) and the
  fused kernel ``weightkit::int8_sr_update_`` computes (W + delta) * decay group by group, recomputes the
  per-group absmax scale and re-quantizes by stochastic rounding (unbiased; the Philox stream is keyed by the
  group seed, the parameter and the step, so a resumed run rounds identically), without a float copy of W. Float 2-D weights
  in GaLore groups follow GaLoreAdamW8bit, with the INT4 projector.
* Projection bases are stored as INT4 (``weightkit.ops.int4``: two per byte, per-group scale and zero,
  ``proj_group_size`` elements per group) and dequantized by the INT4 kernel when used (one float32 m x r
  temporary per step, a quarter of the weight at rank d/4).
* Lazy refresh, as q-galore-torch does it: at each refresh the cosine similarity between the first basis vector
  and the previous one is queued (``queue_size``); when the queue is full and its mean is at least
  ``cos_threshold``, the layer's refresh interval is multiplied by ``gamma_proj``. ``refresh_counts()`` reports
  how many SVDs each layer ran.

Only 'std', 'reverse_std', 'left' and 'right' projections are supported (one-sided bases).
"""

from __future__ import annotations

from typing import Dict

import torch
from torch import Tensor

from ..ops._checks import debug_checks, debug_checks_enabled
from ..ops.int4 import dequantize_int4, quantize_int4
from ..ops.int8 import int8_sr_update_
from .galore import GaLoreAdamW8bit, host_shape
from .projector import basis_seed, compute_basis, project_back


class QGaLoreAdamW8bit(GaLoreAdamW8bit):
    EXTRA_KEYS = ("cos_threshold", "gamma_proj", "queue_size", "proj_group_size")

    def __init__(self, params, lr: float = 1e-3, *args, cos_threshold: float = 0.4, gamma_proj: float = 2.0,
                 queue_size: int = 5, proj_group_size: int = 64, **kwargs):
        self._qgalore_defaults = dict(cos_threshold=cos_threshold, gamma_proj=gamma_proj, queue_size=queue_size,
                                      proj_group_size=proj_group_size)
        super().__init__(params, lr, *args, **kwargs)

    def add_param_group(self, param_group: Dict) -> None:
        for k, v in getattr(self, "_qgalore_defaults", {}).items():
            param_group.setdefault(k, v)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for p in group["params"]:
            if p.dtype == torch.int8 and "rank" not in group:
                raise ValueError("int8 weights (Int8Linear) must be in a param group with a 'rank' (see "
                                 "weightkit.optim.param_groups)")
            if p.dtype == torch.int8 and getattr(p, "int8_owner", None) is None:
                raise ValueError("int8 parameters must belong to a weightkit.nn.Int8Linear (its scale is updated too)")
        if "rank" in group and group["proj_type"] == "full":
            raise ValueError("QGaLoreAdamW8bit supports one-sided projections only; proj_type='full' is not supported")

    def _grad(self, p: Tensor):
        return getattr(p, "float_grad", None) if p.dtype == torch.int8 else p.grad

    @torch.no_grad()
    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.dtype == torch.int8:
                    p.float_grad = None
        super().zero_grad(set_to_none)

    def refresh_counts(self) -> Dict[int, int]:
        """Number of projector refreshes (SVDs) per parameter, keyed by its index in the param groups."""
        return {self._keys[id(p)]: int(self.state[p].get("refresh_count", 0))
                for g in self.param_groups for p in g["params"] if "rank" in g and p.dim() == 2}

    # -- lazy layer-adaptive refresh with INT4 storage (phase 1 computes, phase 3 stores; see GaLoreAdamW) -------
    def _refresh_due(self, group: Dict, proj, state: Dict) -> bool:
        return "ortho_q" not in state or state.get("step", 0) >= state["next_refresh"]

    def _new_basis(self, group: Dict, proj, p: Tensor, state: Dict, grad: Tensor, side: str) -> Dict:
        step = state.get("step", 0)
        ortho, _ = compute_basis(grad, group["rank"], side, group["svd"], oversample=group["oversample"],
                                 power_iters=group["power_iters"],
                                 seed=basis_seed(group["seed"], self._keys.get(id(p), 0), step))
        first = ortho[:, 0] if side == "left" else ortho[0]
        gap = state.get("gap", group["update_proj_gap"])
        pending: Dict = {}
        if "first_vector" in state:
            # on first's device and dtype: a state from an older version (similarities made on the CPU) or moved by
            # hand must not mix devices in the cat
            cos = torch.nn.functional.cosine_similarity(state["first_vector"].to(first.device, first.dtype), first,
                                                        dim=0).reshape(1)
            previous = state.get("similarities", first.new_zeros(0)).to(device=first.device, dtype=cos.dtype)
            sims = torch.cat([previous, cos])[-group["queue_size"]:]
            pending["similarities"] = sims
            # host sync (the queue's mean decides the next interval): at refreshes only, next to the SVD's own syncs
            if sims.numel() == group["queue_size"] and float(sims.mean()) >= group["cos_threshold"]:
                gap = int(gap * group["gamma_proj"])
        else:
            pending["similarities"] = first.new_zeros(0)
        pending["first_vector"] = first.clone()
        pending["gap"] = gap
        pending["next_refresh"] = step + gap
        pending["refresh_count"] = state.get("refresh_count", 0) + 1
        pending["ortho_q"], pending["ortho_scale"], pending["ortho_zero"] = quantize_int4(ortho,
                                                                                          group["proj_group_size"])
        pending["ortho_shape"] = torch.tensor(list(ortho.shape), dtype=torch.int64, device="cpu")  # HOST_KEYS
        return pending

    def _basis_of(self, group: Dict, proj, entries: Dict):
        ortho = dequantize_int4(entries["ortho_q"], entries["ortho_scale"], entries["ortho_zero"],
                                group["proj_group_size"], host_shape(entries, "ortho_shape"))
        return ortho, None

    def _has_basis_entries(self, state: Dict) -> bool:
        return "ortho_q" in state

    def _validate_param_state(self, where: str, p: Tensor, state: Dict, group: Dict) -> None:
        super()._validate_param_state(where, p, state, group)
        if "ortho_q" not in state:
            return
        side, _ = self._expected_low_shape(group, p)
        m, n = p.shape
        r = group["rank"]
        shape = (m, r) if side == "left" else (r, n)
        saved = tuple(state["ortho_shape"].tolist()) if isinstance(state.get("ortho_shape"), Tensor) else None
        if saved != shape:
            raise ValueError(f"{where}: saved ortho_shape {saved}, expected {shape}")
        numel = shape[0] * shape[1]  # m r (left) or r n (right)
        groups = numel // group["proj_group_size"]
        for key, size in (("ortho_q", numel // 2), ("ortho_scale", groups), ("ortho_zero", groups)):
            t = state.get(key)
            if not isinstance(t, Tensor) or t.numel() != size:
                raise ValueError(f"{where}: saved {key} must hold {size} values, got "
                                 f"{None if not isinstance(t, Tensor) else t.numel()}")

    def _apply_low_rank(self, group: Dict, p: Tensor, state: Dict, proj, low: Tensor, basis, side: str,
                        step_size: float) -> None:
        if p.dtype != torch.int8:
            return super()._apply_low_rank(group, p, state, proj, low, basis, side, step_size)
        ortho = basis[0]
        beta1, beta2 = group["betas"]
        decay = 1.0 - group["lr"] * group["weight_decay"]
        exp_avg, exp_avg_sq = self._load_moments(state)
        exp_avg.mul_(beta1).add_(low, alpha=1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(low, low, value=1 - beta2)
        delta = project_back(exp_avg / (exp_avg_sq.sqrt() + group["eps"]), side, ortho)
        delta.mul_(-(step_size * proj.scale))
        owner = p.int8_owner()
        key = hash((group["seed"], self._keys.get(id(p), 0))) % 2**62
        # w_q, scale <- SR((w_q * scale + delta) * decay), fused: the float weight never exists whole. The op's own
        # NaN check of delta (on by default: it writes in place) would cost a host sync per weight per step; the
        # step has checked the gradients already, so it runs here only when debug checks are asked for.
        with debug_checks(debug_checks_enabled()):
            int8_sr_update_(p.data, owner.scale, delta, owner.group_size, decay=decay, seed=key,
                            offset=(state["step"] * p.numel()) % 2**62)
        p.float_grad = None
        self._store_moments(state, exp_avg, exp_avg_sq)
