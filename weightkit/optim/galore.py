"""The GaLore step (arXiv 2403.03507), compatible with galore-torch 1.0, built from three parts, and its presets
GaLoreAdamW and GaLoreAdamW8bit (QGaLoreAdamW8bit: weightkit.optim.qgalore; the sharded ones:
weightkit.optim.distributed; layer-wise stepping: weightkit.optim.layerwise).

Param groups carrying ``rank`` are trained with low-rank optimizer state: each 2-D parameter's gradient is
projected (weightkit.optim.projector), Adam runs on the projection, and the update is projected back and applied
with decoupled weight decay. Parameters in other groups, and non-2-D parameters of GaLore groups (biases, norms),
get plain AdamW. The update matches galore-torch's ``GaLoreAdamW`` (same projection sides, refresh schedule, bias
correction, weight decay order, eps=1e-6).

One step, three parts (``GaLoreParts``), each a small object with its own tests (tests/optim/test_parts.py):

1. ``basis`` -- how the projection basis is stored (weightkit.optim.basis): float in the group's ``proj_dtype``
   (float32 / bfloat16 / float16), or INT4 packed;
2. ``moments`` -- how Adam's moments are stored (weightkit.optim.moments): float32, or 8-bit blockwise;
3. ``weights`` -- how a weight is read and written (weightkit.optim.weights): a float parameter in place, an int8
   ``Int8Weight`` by stochastic rounding, or a DTensor's local shard (weightkit.optim.distributed); the first part
   of the tuple that accepts a parameter handles it;

plus the refresh schedule (weightkit.optim.refresh: every ``update_proj_gap`` steps, optionally staggered across
parameters, or Q-GaLore's lazy one). A new basis is computed in one place (``GaLoreProjector.compute``).

=====================  ==============  =======================  ===============================  =========
preset                 basis           moments                  weights                          refresh
=====================  ==============  =======================  ===============================  =========
GaLoreAdamW            float           float32                  int8 SR, float                   fixed
GaLoreAdamW8bit        float           8-bit (min_8bit_size)    int8 SR, float                   fixed
QGaLoreAdamW8bit       INT4            8-bit (min_8bit_size)    int8 SR, float                   lazy
ShardedGaLoreAdamW     float           float32                  DTensor shard, float             fixed
ShardedGaLoreAdamW8bit float           8-bit (min_8bit_size)    DTensor shard, float             fixed
=====================  ==============  =======================  ===============================  =========

Other combinations are made by passing ``parts=GaLoreParts(...)`` to GaLoreAdamW. The state entries each part
writes are the checkpoint format of the presets (unchanged since before the parts existed; tests/optim/
test_fixtures.py resumes checkpoints written by the earlier code bit for bit).

Group keys: ``params, lr, betas, eps, weight_decay, correct_bias`` and, for GaLore groups, ``rank,
update_proj_gap, scale, proj_type, svd ('exact' | 'randomized'), oversample, power_iters, seed, proj_dtype``
(storage dtype of float bases: None = float32 as galore-torch, or 'bfloat16' / 'float16', which halves their
bytes: at rank d/4 the state is then 31% of AdamW's instead of 37.5%), plus the keys of the parts (INT4:
``proj_group_size``; lazy refresh: ``cos_threshold, gamma_proj, queue_size``). Unknown keys raise.

A step runs in three phases so that a bad gradient never leaves the optimizer half-updated: (1) every parameter's
gradient is projected (bases due for a refresh are computed from the gradient but not yet stored); (2) the
projected gradients and the dense gradients of non-GaLore parameters are checked for NaN/Inf on the device: one
multi-tensor launch per device and dtype sets a flag (``found_inf_flags``, torch.amp.GradScaler's found_inf
pattern); (3) bases, moments and weights are updated. A NaN/Inf anywhere in G reaches R = P^T G (IEEE: NaN and Inf
propagate through the products and sums), so checking R (r x n) instead of G (m x n) catches every bad gradient
while reading 1/4 of the bytes at rank d/4; a gradient whose basis is refreshed this step is checked in full
before its SVD.

``nonfinite='raise'`` (default) reads the flag once (the step's one host sync) and raises before anything is
changed. ``'skip'`` skips the whole step (counted in ``skipped_steps``) without reading the flag: the commit is
predicated on it on the device (the fused update leaves W, M, V unchanged where it is set; dense AdamW, the 'full'
projection and replaced 8-bit entries by ``torch.where``; int8 weights are saved and restored), so a steady step
makes no host sync at all. Adam's step count then stays right on the device: the state's ``step`` (the refresh
schedule's clock, on the host) advances, ``nonfinite_skips`` (a 0-d device tensor, only in 'skip' mode) counts the
skipped steps, and the bias correction uses ``step - nonfinite_skips``. Steps that refresh a basis, optimizers
spanning several devices and sharded weights (whose verdict is all-reduced) read the flag on the host instead
(the refresh's SVD synchronizes anyway); there a skipped step leaves ``step`` unchanged too. The projected
gradients of all parameters coexist between phases 1 and 3 (each the size of one low-rank moment; layer-wise mode
holds one at a time).

Precision. With TF32 allowed (``torch.backends.cuda.matmul.allow_tf32``) the float32 projections run TF32 (cuBLAS
follows the flag; the Triton kernel gets it as its input precision); never otherwise. A basis stored in bfloat16 /
float16 (``proj_dtype``) is used as stored on a GPU: the projections run on 16-bit tensor cores with fp32
accumulation (weightkit.optim.projector.projection_basis_dtype), and the randomized refresh's range finder in that
dtype; the CPU keeps float32, bit for bit with earlier versions.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

from ..ops._checks import finite_flags
from .basis import FloatBasis, Int4Basis
from .moments import BlockwiseMoments8bit, FloatMoments, FusedBlockwiseMoments8bit
from .projector import PROJ_TYPES, SVD_METHODS, GaLoreProjector, projection_basis_dtype, projection_side
from .refresh import FixedRefresh
from .weights import FloatWeight, Int8SRWeight, LowRankUpdate

GALORE_KEYS = ("rank", "update_proj_gap", "scale", "proj_type", "svd", "oversample", "power_iters", "seed",
               "proj_dtype")
ADAM_KEYS = ("params", "lr", "betas", "eps", "weight_decay", "correct_bias")
# State entries that describe shapes: read on the host every step (``.tolist()``), so they stay on the CPU, where
# reading them costs no device synchronization (on a GPU, a CUDA copy of them would sync at every step).
HOST_KEYS = BlockwiseMoments8bit.host_keys + Int4Basis.host_keys


@dataclasses.dataclass(frozen=True)
class GaLoreParts:
    """The parts of one GaLore step (see the module docstring); the defaults make GaLoreAdamW."""

    basis: object = dataclasses.field(default_factory=FloatBasis)
    moments: object = dataclasses.field(default_factory=FloatMoments)
    weights: Tuple = (Int8SRWeight(), FloatWeight())  # Int8Linear weights by the fused SR update
    refresh: object = dataclasses.field(default_factory=FixedRefresh)

    def group_keys(self) -> Dict:
        """Group keys the parts add, with their defaults."""
        return {**getattr(self.basis, "group_keys", {}), **getattr(self.refresh, "group_keys", {})}


def check_adam_settings(where: str, lr, betas, eps, weight_decay) -> None:
    """AdamW's settings, of the defaults (``where`` = "") or of one param group: finite, lr, eps and weight_decay
    >= 0, betas a pair in [0, 1) (torch.optim.AdamW's rules, with inf and NaN refused too)."""
    if not 0.0 <= lr < math.inf:
        raise ValueError(f"{where}lr must be a finite number >= 0, got {lr}")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas)):
        raise ValueError(f"{where}betas must be a pair of numbers in [0, 1), got {betas}")
    if not 0.0 <= eps < math.inf:
        raise ValueError(f"{where}eps must be a finite number >= 0, got {eps}")
    if not 0.0 <= weight_decay < math.inf:
        raise ValueError(f"{where}weight_decay must be a finite number >= 0, got {weight_decay}")


class GaLoreAdamW(torch.optim.Optimizer):
    """GaLore with AdamW: float bases, float32 moments, float weights (galore-torch's GaLoreAdamW), and the one
    step that every preset of the family runs with its own ``parts`` (see the module docstring).

    ``stagger_refresh=True`` spreads the parameters' basis refreshes over the steps of each ``update_proj_gap``
    period instead of refreshing every layer on the same step (weightkit.optim.refresh.FixedRefresh; parameter k,
    its index in the param groups plus ``refresh_offset``, refreshes when (step + k) % update_proj_gap == 0).
    ``parts`` (a :class:`GaLoreParts`) chooses the storage and weight parts; the presets pass their own."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0,
                 correct_bias: bool = True, update_proj_gap: int = 200, scale: float = 1.0, proj_type: str = "std",
                 svd: str = "exact", oversample: int = 8, power_iters: int = 2, seed: int = 0,
                 proj_dtype=None, nonfinite: str = "raise", *, stagger_refresh: bool = False,
                 refresh_offset: int = 0, parts: Optional[GaLoreParts] = None):
        check_adam_settings("", lr, betas, eps, weight_decay)
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
        if parts is None:
            parts = GaLoreParts()
        if not isinstance(parts, GaLoreParts):
            raise TypeError(f"parts must be a GaLoreParts, got {type(parts).__name__}")
        if not parts.weights:
            raise ValueError("parts.weights must name at least one weight part")
        if stagger_refresh:
            if not isinstance(parts.refresh, FixedRefresh):
                raise ValueError("stagger_refresh applies to the fixed refresh schedule, not to "
                                 f"{type(parts.refresh).__name__}")
            parts = dataclasses.replace(parts, refresh=FixedRefresh(stagger=True, offset=refresh_offset))
        self.parts = parts
        self.nonfinite = nonfinite
        # LayerwiseGaLore's deferred verdict: steady steps commit predicated on the device flag, which the step
        # leaves in ``deferred_found`` for the caller to read later (one read per backward pass, not per parameter)
        self._defer = False
        self.deferred_found: Optional[Tensor] = None
        self._host_skips = 0  # steps skipped on the host (see skipped_steps)
        self._device_skips: Dict[torch.device, Tensor] = {}  # per device: steps skipped on the device flag
        self._weight_parts: Dict[int, object] = {}
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, correct_bias=correct_bias,
                        update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type, svd=svd,
                        oversample=oversample, power_iters=power_iters, seed=seed, proj_dtype=proj_dtype)
        self._part_defaults = parts.group_keys()
        # parameter -> its index over all groups, in the order they were added (add_param_group extends it): the
        # stochastic-rounding seed and the staggered refresh slot of each parameter
        self._keys: Dict[int, int] = {}
        super().__init__(params, defaults)

    # where the "nothing was changed" promise holds (the sharded presets extend it to every rank)
    _UNCHANGED = "no parameter or optimizer state was changed"

    # -- groups ---------------------------------------------------------------------------------------------
    def add_param_group(self, param_group: Dict) -> None:
        extra = getattr(self, "_part_defaults", {})
        allowed = ADAM_KEYS + GALORE_KEYS + tuple(extra)
        unknown = sorted(set(param_group) - set(allowed))
        if unknown:
            raise ValueError(f"unknown param group key(s) {unknown}; groups take {list(allowed)}")
        for k, v in extra.items():
            param_group.setdefault(k, v)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._check_group(group, len(self.param_groups) - 1)
        except Exception:
            self.param_groups.pop()  # a group refused leaves the optimizer as it was
            raise
        for p in group["params"]:
            self._keys.setdefault(id(p), len(self._keys))

    def _check_group(self, group: Dict, index: int) -> None:
        check_adam_settings(f"param group {index}: ", group["lr"], group["betas"], group["eps"],
                            group["weight_decay"])
        if "rank" in group:
            proj = self._projector(group)  # validates rank, gap, proj_type, svd
            self.parts.basis.check_group(group)
            self.parts.refresh.check_group(group)
            for p in group["params"]:
                if p.dim() == 2:
                    proj.check_shape(p.shape)
        for p in group["params"]:
            if p.is_sparse:
                raise ValueError("GaLoreAdamW does not support sparse parameters")
            self._weight_part(p).check_param(p, group)

    def _weight_part(self, p: Tensor):
        """The weight part that handles ``p``: the first of ``parts.weights`` that accepts it."""
        part = self._weight_parts.get(id(p))
        if part is None:
            part = next((w for w in self.parts.weights if w.accepts(p)), None)
            if part is None:
                raise ValueError(f"no weight part of this optimizer handles a {type(p).__name__} of dtype {p.dtype}")
            self._weight_parts[id(p)] = part
        return part

    @staticmethod
    def _projector(group: Dict) -> GaLoreProjector:
        if group.get("proj_type") not in PROJ_TYPES:
            raise ValueError(f"proj_type={group.get('proj_type')!r} is not one of {', '.join(PROJ_TYPES)}")
        if group.get("svd") not in SVD_METHODS:
            raise ValueError(f"svd={group.get('svd')!r} is not one of {', '.join(SVD_METHODS)}")
        return GaLoreProjector(group["rank"], group["update_proj_gap"], group["scale"], group["proj_type"],
                               group["svd"], group["oversample"], group["power_iters"], group["seed"],
                               group.get("proj_dtype"))

    # -- checkpoints: validate everything before loading anything ----------------------------------------------
    def load_state_dict(self, state_dict: Dict) -> None:
        """torch.optim.Optimizer.load_state_dict after checking that every saved tensor fits this optimizer's
        parameters (shapes of bases and moments for the saved rank and projection side, finite values). A
        truncated, mismatched or corrupted state raises ValueError naming the parameter and entry, and leaves the
        optimizer unchanged."""
        self._validate_state_dict(state_dict)
        super().load_state_dict(state_dict)
        self._place_loaded_state(state_dict)

    def _place_loaded_state(self, sd: Dict) -> None:
        """torch.optim.Optimizer.load_state_dict moves every state tensor to its parameter's device and casts the
        floating ones to the parameter's dtype. Undo the cast (moments stay float32, bases keep proj_dtype, INT4
        scales float32, whatever the weight's dtype: a bfloat16 weight would otherwise get bfloat16 moments),
        keep the shapes on the CPU (HOST_KEYS) and the step a Python int, so a checkpoint loads the same from any
        device (``map_location='cpu'`` included) and costs no host sync per step afterwards."""
        for saved_group, group in zip(sd["param_groups"], self.param_groups):
            for idx, p in zip(saved_group["params"], group["params"]):
                saved = sd["state"].get(idx)
                if not isinstance(saved, dict) or p not in self.state:
                    continue
                state = self.state[p]
                for key, value in saved.items():
                    if key == "step":
                        if isinstance(value, Tensor):
                            state[key] = int(value.item())
                    elif isinstance(value, Tensor):
                        state[key] = value.to(device=torch.device("cpu") if key in HOST_KEYS else p.device)

    def _validate_state_dict(self, sd) -> None:
        if not isinstance(sd, dict) or not isinstance(sd.get("state"), dict) or not isinstance(sd.get("param_groups"), list):
            raise ValueError("optimizer state_dict must be a dict with 'state' (dict) and 'param_groups' (list)")
        saved_groups = sd["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(saved_groups)} param groups, this optimizer has {len(self.param_groups)}")
        for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved.get("params", [])) != len(group["params"]):
                raise ValueError(f"param group {gi} holds {len(saved.get('params', []))} parameters in the state_dict, "
                                 f"{len(group['params'])} here")
            for idx, p in zip(saved["params"], group["params"]):
                state = sd["state"].get(idx)
                if state is not None:
                    self._validate_param_state(f"parameter {idx} (shape {tuple(p.shape)})", p, state, saved)

    def _validate_param_state(self, where: str, p: Tensor, state: Dict, group: Dict) -> None:
        if not isinstance(state, dict):
            raise ValueError(f"{where}: state must be a dict, got {type(state).__name__}")
        if self._weight_part(p).validates_shapes(p):
            self._validate_shapes(where, p, state, group)
        for key, t in state.items():
            if isinstance(t, Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ValueError(f"{where}: saved {key} holds NaN/Inf")

    def _validate_shapes(self, where: str, p: Tensor, state: Dict, group: Dict) -> None:
        step = state.get("step", 0)
        step = int(step.item()) if isinstance(step, Tensor) else step
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"{where}: step must be an int >= 0, got {state.get('step')!r}")
        galore = "rank" in group and p.dim() == 2
        low = tuple(p.shape)
        if galore:
            m, n = p.shape
            r = group["rank"]
            if r > min(m, n):
                raise ValueError(f"{where}: saved rank {r} is larger than min(m, n) = {min(m, n)}")
            side = projection_side((m, n), group["proj_type"])
            low = {"left": (r, n), "right": (m, r), "full": (r, r)}[side]
            shapes = {"ortho": (m, r) if side in ("left", "full") else (r, n), "ortho_right": (r, n)}
            self.parts.basis.validate(where, state, shapes, group)
        self.parts.moments.validate(where, state, low)
        if galore and step > 0 and not self.parts.basis.has(state):
            raise ValueError(f"{where}: state at step {step} has no projection basis (truncated checkpoint?)")
        if step > 0 and not self.parts.moments.has(state):
            raise ValueError(f"{where}: state at step {step} has no moments (truncated checkpoint?)")

    # -- the step --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                self._weight_part(p).clear_grad(p)
        super().zero_grad(set_to_none)

    def _check_grads(self, items) -> None:
        for _, p, part, grad in items:
            part.check_grad(p, grad)
            if grad.is_sparse:
                raise RuntimeError(f"GaLoreAdamW does not support sparse gradients (parameter of shape {tuple(p.shape)})")
            if grad.shape != p.shape:
                raise RuntimeError(f"gradient shape {tuple(grad.shape)} does not match parameter {tuple(p.shape)}")

    def _nonfinite(self, items, prepared):
        """Phase 2: the step's NaN/Inf verdict. ``None``: commit; ``True``: skip the step (``nonfinite='skip'``,
        counted); a dict device -> flag: commit predicated on the device flags (``nonfinite='skip'`` without a host
        sync). ``nonfinite='raise'`` raises here, before anything is changed.

        The flags come from one multi-tensor launch per device and dtype (:func:`found_inf_flags`). ``'raise'``
        reads them once (the step's one host sync). ``'skip'`` does not read them when it can predicate the commit
        on them: not across devices (one flag per device), not on a step that refreshes a basis (its SVD
        synchronizes anyway, and a basis computed from a gradient is only stored when the whole step is good), nor
        for weight parts that combine the verdict over processes (sharded weights: one flag all-reduce, read on
        the host)."""
        if not items:  # the guard always runs: the debug-check switch is for the ops' checks only
            return None
        known_bad = any(prep["finite"] is False for prep in prepared)  # a refreshed gradient checked in full
        flags = {} if known_bad else found_inf_flags([prep["check"] for prep in prepared])
        shared = [part for part in self.parts.weights if type(part).any_bad is not FloatWeight.any_bad]
        refreshing = any(prep.get("pending") is not None for prep in prepared)
        predicable = len(flags) == 1 and not (known_bad or shared or refreshing)
        if predicable and (self.nonfinite == "skip" or self._defer or self._reads_late(flags, items)):
            if self._defer:  # the caller reads the flag later; a bad step is then undone on the host (step count)
                self.deferred_found = next(iter(flags.values()))
            elif self.nonfinite == "skip":
                self._count_device_skips(flags)
            return flags  # 'raise' read late: step() reads them once every update is queued
        bad = known_bad or any(bool(flag) for flag in flags.values())  # the one host sync (one per device)
        for part in self.parts.weights:
            bad = part.any_bad([p for g in self.param_groups for p in g["params"] if self._weight_part(p) is part],
                               bad)
        if not bad:
            return None
        if self.nonfinite == "raise":
            self._raise_nonfinite(items, prepared)
        self._host_skips += 1
        return True

    # Devices where 'raise' reads the verdict after the step's updates are queued (predicated on the flag), not
    # before: a sync costs there (tests add "cpu" to check the mechanism; on the CPU nothing changes)
    _LATE_READ_DEVICES = ("cuda",)

    def _reads_late(self, flags: Dict, items) -> bool:
        """Whether ``nonfinite='raise'`` reads the step's flag late: after every update was queued predicated on it,
        so that the host queues the step's kernels while the GPU still runs backward, instead of waiting for the
        GPU first and then queueing them to an idle GPU. A bad step then raises with nothing changed, as an early
        read does (the masked updates left weights, moments and bases; the step counts are put back). Not on a
        parameter's first step (its moments would be created). On a GPU the read waits for the flag's copy to
        page-locked memory, queued right after the check (:func:`_flag_reader`), not for the updates queued after
        it: the host goes on to the next iteration while the GPU runs them."""
        device = next(iter(flags))
        return (self.nonfinite == "raise" and device.type in self._LATE_READ_DEVICES
                and all("step" in self.state[p] for _, p, _, _ in items))

    def _raise_nonfinite(self, items, prepared) -> None:
        # the error path may sync more: which parameters were bad
        shapes = [tuple(p.shape) for (_, p, _, _), prep in zip(items, prepared)
                  if prep["finite"] is False or (prep["finite"] is None and not finite_flags([prep["check"]])[0])]
        where = f"{len(shapes)} parameter(s) of shapes {shapes[:4]}" if shapes else "a gradient shard of another rank"
        raise FloatingPointError(f"non-finite gradient (NaN/Inf) in {where}; {self._UNCHANGED} "
                                 "(use nonfinite='skip' to skip such steps)")

    def _count_device_skips(self, flags: Dict) -> None:
        for device, flag in flags.items():
            count = self._device_skips.get(device)
            if count is None:
                count = self._device_skips[device] = torch.zeros(1, dtype=torch.float32, device=device)
            count.add_(flag.ne(0))  # 1 per skipped step, whatever the flag's value

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for a NaN/Inf gradient (``nonfinite='skip'``). Reading it synchronizes with the devices
        whose steps were skipped without a host read (one sync per device, when called: logging, not the step)."""
        return self._host_skips + sum(int(c.item()) for c in self._device_skips.values())

    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None:
        self._host_skips = int(value)
        self._device_skips = {}

    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        items = []  # (group, parameter, its weight part, its gradient)
        for group in self.param_groups:
            for p in group["params"]:
                part = self._weight_part(p)
                grad = part.grad(p)
                if grad is not None:
                    items.append((group, p, part, grad))
        self._check_grads(items)
        self.deferred_found = None
        prepared = [self._prepare(group, p, part, grad) for group, p, part, grad in items]
        verdict = self._nonfinite(items, prepared)
        if verdict is True:
            return loss
        late = None  # 'raise' read late (_reads_late): the flag's copy queued now, before the updates, read after
        if verdict is not None and self.nonfinite == "raise" and not self._defer:
            late = _flag_reader(next(iter(verdict.values())))
        if verdict is not None:
            self._device_step_sizes(items, prepared, verdict)
        for (group, p, part, grad), prep in zip(items, prepared):
            found = None if verdict is None else verdict.get(prep["check"].device)
            if found is None:
                self._commit(group, p, part, grad, prep)
            else:
                self._commit_predicated(group, p, part, grad, prep, found)
        if late is not None:
            if late():  # the step's one host read, its updates all queued (on a GPU: waits for the check alone)
                for _, p, _, _ in items:
                    self.state[p]["step"] -= 1  # the masked updates changed nothing else
                self._raise_nonfinite(items, prepared)
        return loss

    def _step_size(self, group: Dict, step: int) -> float:
        if not group["correct_bias"]:
            return group["lr"]
        beta1, beta2 = group["betas"]
        return group["lr"] * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)

    # -- phase 1: project (no state is changed) ------------------------------------------------------------
    def _prepare(self, group: Dict, p: Tensor, part, grad: Tensor) -> Dict:
        """{'check': tensor to test for NaN/Inf, 'finite': None or a known answer, ...} for one parameter."""
        local = part.local(grad)
        if not ("rank" in group and p.dim() == 2):
            return {"check": local, "finite": None}
        proj = self._projector(group)
        proj.check_shape(grad.shape, "gradient")
        part.check_local(p, local)
        state = self.state[p]
        side = proj.side(p.shape)
        key = self._keys.get(id(p), 0)
        storage = self.parts.basis
        pending = None
        if self.parts.refresh.due(state, group, storage.has(state), key):
            full = part.gather(p, grad)
            if not finite_flags([full])[0]:
                return {"check": local, "finite": False}  # no SVD of a bad gradient (every rank sees the same)
            ortho, ortho_right = part.share_basis(p, *proj.compute(full, state.get("step", 0), key), side)
            del full
            pending = self.parts.refresh.entries(state, group, ortho, side)
            storage.store(pending, ortho, ortho_right, group)
            basis = self._load_basis(part, pending, group, local.device)
        else:
            basis = self._load_basis(part, state, group, local.device)
        low = part.reduce_low(p, storage.project(local, side, basis), side)
        return {"check": low, "finite": None, "low": low, "basis": basis, "pending": pending, "side": side,
                "proj": proj, "key": key}

    def _load_basis(self, part, entries: Dict, group: Dict, device: torch.device):
        """The basis as the projections use it: a 16-bit float basis on a GPU as stored (bf16/fp16 tensor cores with
        fp32 accumulation, projector.projection_basis_dtype), for weight parts that take one; else float32."""
        storage = self.parts.basis
        if isinstance(storage, FloatBasis) and getattr(part, "takes_16bit_basis", False):
            stored = storage.dtype(group)
            if projection_basis_dtype(stored, device) != torch.float32:
                right = entries.get("ortho_right")
                return entries["ortho"], right
        return storage.load(entries, group)

    # -- phase 3: apply -------------------------------------------------------------------------------------
    def _commit(self, group: Dict, p: Tensor, part, grad: Tensor, prep: Dict, found: Optional[Tensor] = None) -> None:
        state = self.state[p]
        if "step" not in state:
            state["step"] = 0
        weight = part.local(p)
        moments = self.parts.moments
        if "low" not in prep:
            grad = part.local(grad)  # (a 16-bit one goes to float32 a block at a time, in _apply_dense)
            if not moments.has(state):
                moments.init(state, grad)
            state["step"] += 1
            step_size_t = self._step_size_t(group, state, prep, found)
            self._apply_dense(group, weight, state, grad, self._step_size(group, state["step"]), found, step_size_t)
            return
        if prep["pending"] is not None:
            state.update(prep["pending"])
        low = prep["low"]
        if not moments.has(state):
            moments.init(state, low)
        state["step"] += 1
        step_size_t = self._step_size_t(group, state, prep, found)
        beta1, beta2 = group["betas"]
        update = LowRankUpdate(beta1=beta1, beta2=beta2, eps=group["eps"],
                               step_size=self._step_size(group, state["step"]), scale=prep["proj"].scale,
                               decay=1.0 - group["lr"] * group["weight_decay"], step=state["step"],
                               seed=hash((group["seed"], prep["key"])) % 2**62, found_inf=found,
                               step_size_t=step_size_t)
        basis = prep["basis"] if getattr(part, "packed_basis", False) else self.parts.basis.dense(prep["basis"])
        if hasattr(part, "apply_direction") and hasattr(moments, "adam_direction_"):
            direction = moments.adam_direction_(state, low, update)  # 8-bit moments in one pass (the 8-bit presets)
            if direction is not None:
                part.apply_direction(weight, direction, *basis, prep["side"], update)
                return
        exp_avg, exp_avg_sq = moments.load(state)
        part.apply_low_rank(weight, low, exp_avg, exp_avg_sq, *basis, prep["side"], update)
        moments.store(state, exp_avg, exp_avg_sq)

    def _commit_predicated(self, group: Dict, p: Tensor, part, grad: Tensor, prep: Dict, found: Tensor) -> None:
        """Phase 3 under the device flag ``found`` (``nonfinite='skip'`` without a host read): the update of
        :meth:`_commit` where the flag is 0; where it is set, weight, moments and Adam's step count keep their values.
        The state's ``step`` (the refresh schedule's clock, kept on the host) advances either way; the entry
        ``nonfinite_skips`` (on the device) counts the skipped ones, and the bias correction uses
        ``step - nonfinite_skips``. Refresh steps never get here (the verdict is read on the host there).

        The weight parts take the flag themselves (LowRankUpdate.found_inf): the fused ops leave the weight (float, or
        int8 with its scales), the float moments and the one-pass 8-bit moments unchanged where it is set, with no
        copy; entries that a part replaces rather than updates in place (the three-pass 8-bit moments) are put back
        here where the flag is set."""
        state = self.state[p]
        replaced = {k: v for k, v in state.items() if isinstance(v, Tensor)}
        self._commit(group, p, part, grad, prep, found)
        skip = None  # (made only where an entry was replaced: the fused paths replace none)
        for k, old in replaced.items():
            new = state.get(k)
            if new is not old and isinstance(new, Tensor) and new.shape == old.shape and new.dtype == old.dtype:
                if skip is None:
                    skip = found.ne(0).reshape(())
                state[k] = torch.where(skip, old, new)

    def _counts_skips(self, found: Optional[Tensor]) -> bool:
        """Whether a predicated commit counts its skip on the device (``nonfinite='skip'``); a 'raise' one read late,
        or deferred to LayerwiseGaLore, does not: a bad step is undone on the host (the step count), so Adam's step
        size stays the host's."""
        return found is not None and self.nonfinite == "skip" and not self._defer

    def _step_size_t(self, group: Dict, state: Dict, prep: Dict, found: Optional[Tensor]) -> Optional[Tensor]:
        """The device step size of a commit that counts its skip on the device: the one :meth:`_device_step_sizes`
        computed with the step's other parameters, else this parameter's own (:meth:`_device_step_size`: a
        LayerwiseGaLore or single commit); None otherwise."""
        if "step_size_t" in prep:
            return prep.pop("step_size_t")
        return self._device_step_size(group, state, found) if self._counts_skips(found) else None

    def _device_step_sizes(self, items, prepared, verdict: Dict) -> None:
        """:meth:`_device_step_size` for every parameter of a step at once (into ``prep['step_size_t']``): one
        vectorized computation per device, group and step count over the parameters' ``nonfinite_skips`` (a dozen
        small launches a batch instead of a dozen a parameter: the host time of a 'skip' step), then one foreach
        launch per device counts this step in all of them where its flag is set. The same formula
        (:meth:`_bias_corrected_size`), value for value."""
        batches: Dict[tuple, tuple] = {}  # (device, group, step) -> (group, flag, [(prep, skips)])
        for (group, p, _, _), prep in zip(items, prepared):
            found = verdict.get(prep["check"].device)
            if found is None or not self._counts_skips(found):
                continue
            state = self.state[p]
            key = (found.device, id(group), state.get("step", 0) + 1)
            batches.setdefault(key, (group, found, []))[2].append((prep, self._skips_counter(state, found.device)))
        counters: Dict[torch.device, tuple] = {}  # device -> (flag, [skips])
        for (device, _, step), (group, found, entries) in batches.items():
            size = self._bias_corrected_size(group, step, [skips for _, skips in entries])
            for i, (prep, _) in enumerate(entries):
                prep["step_size_t"] = None if size is None else size[i]
            counters.setdefault(device, (found, []))[1].extend(skips for _, skips in entries)
        for found, skips in counters.values():
            flag = found.ne(0).reshape(()).to(torch.float32)
            torch._foreach_add_(skips, [flag] * len(skips))

    def _device_step_size(self, group: Dict, state: Dict, found: Tensor) -> Optional[Tensor]:
        """Adam's step size with the bias correction of ``step - nonfinite_skips`` steps, computed on the device
        (0-d float32; None without bias correction, where the step count does not matter); then counts this step
        in ``nonfinite_skips`` where ``found`` is set."""
        skips = self._skips_counter(state, found.device)
        size = self._bias_corrected_size(group, state["step"], skips)
        skips.add_(found.ne(0).reshape(()))
        return size

    def _skips_counter(self, state: Dict, device: torch.device) -> Tensor:
        """The parameter's ``nonfinite_skips`` (0-d float32) on ``device``, made or moved there."""
        skips = state.get("nonfinite_skips")
        if not isinstance(skips, Tensor):
            skips = state["nonfinite_skips"] = torch.zeros((), dtype=torch.float32, device=device)
        elif skips.device != device:
            skips = state["nonfinite_skips"] = skips.to(device)
        return skips

    @staticmethod
    def _bias_corrected_size(group: Dict, step: int, skips) -> Optional[Tensor]:
        """Adam's step size after ``step - skips`` steps (``skips``: one counter, or a list of them, stacked: one
        size each), float32 on the device, None without bias correction. Same formula as :meth:`_step_size`, in
        float64."""
        if not group["correct_bias"]:
            return None
        if isinstance(skips, list):
            skips = torch.stack(skips)
        beta1, beta2 = group["betas"]
        # rsub(x, c) = c - x: one launch, the bits of -x + c
        t = torch.rsub(skips.to(torch.float64), step)
        size = torch.rsub(torch.pow(beta2, t), 1.0).sqrt_().mul_(group["lr"])
        return size.div_(torch.rsub(torch.pow(beta1, t), 1.0)).to(torch.float32)

    def _apply_dense(self, group: Dict, p: Tensor, state: Dict, grad: Tensor, step_size: float,
                     found: Optional[Tensor] = None, step_size_t: Optional[Tensor] = None) -> None:
        """AdamW on a parameter outside the GaLore groups (or a non-2-D one inside), by flat blocks of at most
        moments.DENSE_BLOCK values (the moments part's ``dense_blocks``): no float32 temporary of the parameter's
        size (an embedding of LLaMA-7B has 131M values: whole, its moments, their 8-bit copies dequantized and the
        new weight were gigabytes of temporaries). Under a device flag ``found``, weight and moments are left
        unchanged where it is set. Elementwise, so the blocks give the whole-tensor update bit for bit."""
        beta1, beta2 = group["betas"]
        eps, decay = group["eps"], (1.0 - group["lr"] * group["weight_decay"]) if group["weight_decay"] > 0.0 else None
        skip = None if found is None else found.ne(0).reshape(())
        size = step_size if step_size_t is None else step_size_t
        for p_b, g_b, m_b, v_b in self.parts.moments.dense_blocks(state, (p, grad), found):
            g_b = g_b.to(torch.float32)
            if skip is None:
                m_b.mul_(beta1).add_(g_b, alpha=1 - beta1)
                v_b.mul_(beta2).addcmul_(g_b, g_b, value=1 - beta2)
                new = p_b.to(torch.float32) - size * (m_b / (v_b.sqrt() + eps))
                p_b.copy_(new if decay is None else new * decay)
            else:  # out of place, then kept where the flag is set
                m = m_b.mul(beta1).add_(g_b, alpha=1 - beta1)
                v = v_b.mul(beta2).addcmul_(g_b, g_b, value=1 - beta2)
                new = p_b.to(torch.float32) - size * (m / (v.sqrt() + eps))
                if decay is not None:
                    new = new * decay
                p_b.copy_(torch.where(skip, p_b, new))
                m_b.copy_(torch.where(skip, m_b, m))
                v_b.copy_(torch.where(skip, v_b, v))


def _flag_reader(flag: Tensor) -> Callable[[], bool]:
    """A function that returns whether the one-element device ``flag`` is nonzero, as ``bool(flag)`` does. On a
    GPU the value is copied now, behind the kernels queued so far, to page-locked host memory (torch's caching host
    allocator: a block is reused only after the copy into it completed), and the function waits for that copy
    alone (a CUDA event recorded after it), not for the kernels queued after it, as ``bool(flag)`` would (it waits
    for the whole stream). Elsewhere it reads the flag when called."""
    if flag.device.type != "cuda":
        return lambda: bool(flag)
    buf = torch.empty(flag.shape, dtype=flag.dtype, pin_memory=True)
    buf.copy_(flag, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record(torch.cuda.current_stream(flag.device))

    def read() -> bool:
        copied.synchronize()
        return bool(buf)

    return read


def found_inf_flags(tensors) -> Dict[torch.device, Tensor]:
    """Per device of ``tensors``, a one-element float32 flag, nonzero when a tensor there holds NaN/Inf; nothing is
    read on the host. One multi-tensor launch per device and dtype: GradScaler's
    ``torch._amp_foreach_non_finite_check_and_unscale_`` with an inverse scale of 1 (it writes x * 1 back: the
    values are unchanged), which checks every element (no sum that finite values could overflow)."""
    groups: Dict = {}
    flags: Dict[torch.device, Tensor] = {}
    for t in tensors:
        if t.device not in flags:
            flags[t.device] = torch.zeros(1, dtype=torch.float32, device=t.device)
        if t.numel():
            if 0 in t.stride():  # an expanded gradient (set by hand): the check writes x * 1 back, so a copy
                t = t.contiguous()
            groups.setdefault((t.device, t.dtype), []).append(t)
    for (device, _), group in groups.items():
        torch._amp_foreach_non_finite_check_and_unscale_(group, flags[device], _ONES.get(device))
    return flags


class _Ones(dict):
    """A cached one-element 1.0 per device (the inverse scale of the non-finite check): made once, never copied
    from the host again."""

    def get(self, device):  # noqa: D102 - dict.get with a default made on the device
        one = dict.get(self, device)
        if one is None:
            one = self[device] = torch.ones(1, dtype=torch.float32, device=device)
        return one


_ONES = _Ones()


class GaLoreAdamW8bit(GaLoreAdamW):
    """GaLoreAdamW with 8-bit moments: bitsandbytes blockwise dynamic quantization (block 256), signed map for the
    first moment and unsigned for the second. Moments of tensors smaller than ``min_8bit_size`` stay float32.
    The low-rank moments are updated in one pass (``weightkit::blockwise8bit_adam_``: read 8-bit, update, write
    8-bit, and Adam's direction U out; no float32 copy of a moment), then the weight part writes U back
    (``weightkit::lowrank_update_`` for a float weight); dense parameters' moments go through float32 a block at a
    time. ``parts``: the other parts (its moments part is replaced by the 8-bit one)."""

    moments_part = FusedBlockwiseMoments8bit

    def __init__(self, params, *args, min_8bit_size: int = 4096, parts: Optional[GaLoreParts] = None, **kwargs):
        self.min_8bit_size = min_8bit_size
        parts = dataclasses.replace(parts or GaLoreParts(), moments=self.moments_part(min_8bit_size))
        super().__init__(params, *args, parts=parts, **kwargs)
