"""GaLoreAdamW, GaLoreAdamW8bit and layer-wise GaLore (arXiv 2403.03507), compatible with galore-torch 1.0.

Param groups carrying ``rank`` are trained with low-rank optimizer state: each 2-D parameter's gradient is
projected (weightkit.optim.projector), Adam runs on the projection, and the update is projected back and applied
with decoupled weight decay by the fused op ``weightkit::galore_adam_update_``. Parameters in other groups, and
non-2-D parameters of GaLore groups (biases, norms), get plain AdamW. The update matches galore-torch's
``GaLoreAdamW`` (same projection sides, refresh schedule, bias correction, weight decay order, eps=1e-6); moments
are kept in float32.

Group keys: ``params, lr, betas, eps, weight_decay, correct_bias`` and, for GaLore groups, ``rank,
update_proj_gap, scale, proj_type, svd ('exact' | 'randomized'), oversample, power_iters, seed, proj_dtype``
(storage dtype of the projection bases: None = float32 as galore-torch, or 'bfloat16' / 'float16', which halves
their bytes: at rank d/4 the state is then 31% of AdamW's instead of 37.5%). Unknown keys raise.

A step runs in three phases so that a bad gradient never leaves the optimizer half-updated: (1) every parameter's
gradient is projected (bases due for a refresh are computed from the gradient but not yet stored); (2) the
projected gradients and the dense gradients of non-GaLore parameters are checked for NaN/Inf with a single
host sync; (3) bases, moments and weights are updated. A NaN/Inf anywhere in G reaches R = P^T G (IEEE: NaN and
Inf propagate through the products and sums), so checking R (r x n) instead of G (m x n) catches every bad
gradient while reading 1/4 of the bytes at rank d/4; a gradient whose basis is refreshed this step is checked
in full before its SVD. ``nonfinite='raise'`` (default) raises before anything is changed; ``'skip'`` skips the
whole step (counted in ``skipped_steps``). The projected gradients of all parameters coexist between phases 1
and 3 (each the size of one low-rank moment; layer-wise mode holds one at a time).
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, Optional

import torch
from torch import Tensor

from ..ops._checks import debug_checks_enabled, finite_flags
from ..ops.galore import galore_adam_update_
from .projector import PROJ_TYPES, SVD_METHODS, GaLoreProjector, project, project_back, projection_side

GALORE_KEYS = ("rank", "update_proj_gap", "scale", "proj_type", "svd", "oversample", "power_iters", "seed",
               "proj_dtype")
ADAM_KEYS = ("params", "lr", "betas", "eps", "weight_decay", "correct_bias")
# State entries that describe shapes: read on the host every step (``.tolist()``), so they stay on the CPU, where
# reading them costs no device synchronization (on a GPU, a CUDA copy of them would sync at every step).
HOST_KEYS = ("moment_shape", "ortho_shape")


def gradient_checks_enabled() -> bool:
    """Whether the optimizers check their gradients for NaN/Inf (one host sync per step): on unless switched off
    with ``weightkit.ops._checks.debug_checks(False)`` / ``set_debug_checks(False)`` or ``WEIGHTKIT_DEBUG_CHECKS=0``
    (``WEIGHTKIT_CHECK_FINITE=0``). Unlike the ops' data checks this one is on by default: it is what makes
    ``nonfinite='raise' | 'skip'`` hold, and it costs one sync per step, not one per op."""
    return debug_checks_enabled(default=True)


def host_shape(state: Dict, key: str) -> tuple:
    """A shape kept in the state as a small int64 tensor, read without a device sync: a copy that ended up on a
    device (a state moved by hand, an old checkpoint) is brought back to the CPU once."""
    t = state[key]
    if t.device.type != "cpu":
        t = state[key] = t.cpu()
    return tuple(t.tolist())


class GaLoreAdamW(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0,
                 correct_bias: bool = True, update_proj_gap: int = 200, scale: float = 1.0, proj_type: str = "std",
                 svd: str = "exact", oversample: int = 8, power_iters: int = 2, seed: int = 0,
                 proj_dtype=None, nonfinite: str = "raise"):
        if not lr >= 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if not eps >= 0.0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
        self.nonfinite = nonfinite
        self.skipped_steps = 0
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, correct_bias=correct_bias,
                        update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type, svd=svd,
                        oversample=oversample, power_iters=power_iters, seed=seed, proj_dtype=proj_dtype)
        super().__init__(params, defaults)
        self._keys = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}

    EXTRA_KEYS: tuple = ()

    # -- groups ---------------------------------------------------------------------------------------------
    def add_param_group(self, param_group: Dict) -> None:
        allowed = ADAM_KEYS + GALORE_KEYS + self.EXTRA_KEYS
        unknown = sorted(set(param_group) - set(allowed))
        if unknown:
            raise ValueError(f"unknown param group key(s) {unknown}; groups take {list(allowed)}")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if "rank" in group:
            proj = self._projector(group)  # validates rank, gap, proj_type, svd
            for p in group["params"]:
                if p.dim() == 2:
                    proj.check_shape(p.shape)
        for p in group["params"]:
            if p.is_sparse:
                raise ValueError("GaLoreAdamW does not support sparse parameters")

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

    def _state_device(self, p: Tensor, key: str) -> torch.device:
        """Where state entry ``key`` of parameter ``p`` lives: the CPU for shapes (HOST_KEYS), else p's device."""
        return torch.device("cpu") if key in HOST_KEYS else p.device

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
                        state[key] = value.to(device=self._state_device(p, key))

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

    def _expected_low_shape(self, group: Dict, p: Tensor):
        m, n = p.shape
        r = group["rank"]
        side = projection_side((m, n), group["proj_type"])
        return side, {"left": (r, n), "right": (m, r), "full": (r, r)}[side]

    def _validate_param_state(self, where: str, p: Tensor, state: Dict, group: Dict) -> None:
        if not isinstance(state, dict):
            raise ValueError(f"{where}: state must be a dict, got {type(state).__name__}")
        step = state.get("step", 0)
        step = int(step.item()) if isinstance(step, Tensor) else step
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"{where}: step must be an int >= 0, got {state.get('step')!r}")
        galore = "rank" in group and p.dim() == 2
        want: Dict[str, tuple] = {}
        if galore:
            if group["rank"] > min(p.shape):
                raise ValueError(f"{where}: saved rank {group['rank']} is larger than min(m, n) = {min(p.shape)}")
            side, low = self._expected_low_shape(group, p)
            m, n = p.shape
            r = group["rank"]
            want.update({"ortho": (m, r) if side in ("left", "full") else (r, n), "ortho_right": (r, n)})
        else:
            low = tuple(p.shape)
        want.update({"exp_avg": low, "exp_avg_sq": low})
        for key, shape in want.items():
            t = state.get(key)
            if t is None:
                continue
            if not isinstance(t, Tensor):
                raise ValueError(f"{where}: {key} must be a tensor, got {type(t).__name__}")
            if tuple(t.shape) != tuple(shape):
                raise ValueError(f"{where}: saved {key} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        if galore and step > 0 and not self._has_basis_entries(state):
            raise ValueError(f"{where}: state at step {step} has no projection basis (truncated checkpoint?)")
        if step > 0 and not self._has_moments(state):
            raise ValueError(f"{where}: state at step {step} has no moments (truncated checkpoint?)")
        for key, t in state.items():
            if isinstance(t, Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ValueError(f"{where}: saved {key} holds NaN/Inf")

    def _has_basis_entries(self, state: Dict) -> bool:
        return "ortho" in state

    # -- moments: overridden by the 8-bit variant ---------------------------------------------------------
    def _init_moments(self, state: Dict, like: Tensor) -> None:
        state["exp_avg"] = torch.zeros(like.shape, dtype=torch.float32, device=like.device)
        state["exp_avg_sq"] = torch.zeros(like.shape, dtype=torch.float32, device=like.device)

    def _load_moments(self, state: Dict):
        return state["exp_avg"], state["exp_avg_sq"]

    def _store_moments(self, state: Dict, exp_avg: Tensor, exp_avg_sq: Tensor) -> None:
        pass  # updated in place

    def _has_moments(self, state: Dict) -> bool:
        return "exp_avg" in state

    # -- the step --------------------------------------------------------------------------------------------
    def _grad(self, p: Tensor) -> Optional[Tensor]:
        """The gradient of ``p`` (Q-GaLore reads int8 weights' ``float_grad`` instead)."""
        return p.grad

    def _check_grads(self, items) -> None:
        for _, p in items:
            grad = self._grad(p)
            if grad.is_sparse:
                raise RuntimeError(f"GaLoreAdamW does not support sparse gradients (parameter of shape {tuple(p.shape)})")
            if grad.shape != p.shape:
                raise RuntimeError(f"gradient shape {tuple(grad.shape)} does not match parameter {tuple(p.shape)}")

    # where the "nothing was changed" promise holds (the sharded optimizer extends it to every rank)
    _UNCHANGED = "no parameter or optimizer state was changed"

    def _nonfinite(self, items, prepared) -> bool:
        """True when a gradient holds NaN/Inf (then raise, or count a skipped step). One host sync for all."""
        if not gradient_checks_enabled() or not items:
            return False
        known = [prep["finite"] for prep in prepared]
        if all(k is None for k in known):
            flags = finite_flags([prep["check"] for prep in prepared])
        else:
            flags = [k if k is not None else finite_flags([prep["check"]])[0] for k, prep in zip(known, prepared)]
        if not self._bad_anywhere(flags):
            return False
        bad = [tuple(p.shape) for (_, p), ok in zip(items, flags) if not ok]
        if self.nonfinite == "raise":
            where = f"{len(bad)} parameter(s) of shapes {bad[:4]}" if bad else "a gradient shard of another rank"
            raise FloatingPointError(f"non-finite gradient (NaN/Inf) in {where}; {self._UNCHANGED} "
                                     "(use nonfinite='skip' to skip such steps)")
        self.skipped_steps += 1
        return True

    def _bad_anywhere(self, flags) -> bool:
        """Whether any of this process's finiteness ``flags`` is False (the sharded optimizer asks every rank)."""
        return not all(flags)

    def _local(self, t: Tensor) -> Tensor:
        """The tensor the update writes or reads here (the sharded optimizer's DTensors give their local shard)."""
        return t

    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        items = [(g, p) for g in self.param_groups for p in g["params"] if self._grad(p) is not None]
        self._check_grads(items)
        prepared = [self._prepare(group, p) for group, p in items]
        if self._nonfinite(items, prepared):
            return loss
        for (group, p), prep in zip(items, prepared):
            self._commit(group, p, prep)
        return loss

    def _step_size(self, group: Dict, step: int) -> float:
        if not group["correct_bias"]:
            return group["lr"]
        beta1, beta2 = group["betas"]
        return group["lr"] * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)

    # -- phase 1: project (no state is changed) ------------------------------------------------------------
    def _prepare(self, group: Dict, p: Tensor) -> Dict:
        """{'check': tensor to test for NaN/Inf, 'finite': None or a known answer, ...} for one parameter."""
        grad = self._grad(p)
        if not ("rank" in group and p.dim() == 2):
            return {"check": grad, "finite": None}
        proj = self._projector(group)
        proj.check_shape(grad.shape, "gradient")
        state = self.state[p]
        side = proj.side(p.shape)
        pending = None
        if self._refresh_due(group, proj, state):
            if gradient_checks_enabled() and not finite_flags([grad])[0]:
                return {"check": grad, "finite": False}  # no SVD of a bad gradient
            pending = self._new_basis(group, proj, p, state, grad, side)
            basis = self._basis_of(group, proj, pending)
        else:
            basis = self._basis_of(group, proj, state)
        low = project(grad, side, *basis)
        return {"check": low, "finite": None, "low": low, "basis": basis, "pending": pending, "side": side,
                "proj": proj}

    def _refresh_due(self, group: Dict, proj: GaLoreProjector, state: Dict) -> bool:
        return proj.due(state.get("step", 0), state)

    def _new_basis(self, group: Dict, proj: GaLoreProjector, p: Tensor, state: Dict, grad: Tensor,
                   side: str) -> Dict:
        """State entries of a freshly computed basis (stored in proj_dtype), not yet written to ``state``."""
        pending: Dict = {}
        proj.refresh(grad, state.get("step", 0), pending, key=self._keys.get(id(p), 0))
        return pending

    def _basis_of(self, group: Dict, proj: GaLoreProjector, entries: Dict):
        """The float32 basis (ortho, ortho_right or None) held in state entries."""
        return proj.load_basis(entries)

    # -- phase 3: apply -------------------------------------------------------------------------------------
    def _commit(self, group: Dict, p: Tensor, prep: Dict) -> None:
        state = self.state[p]
        if "step" not in state:
            state["step"] = 0
        weight = self._local(p)
        if "low" not in prep:
            grad = self._local(self._grad(p)).to(torch.float32)
            if not self._has_moments(state):
                self._init_moments(state, grad)
            state["step"] += 1
            self._apply_dense(group, weight, state, grad, self._step_size(group, state["step"]))
            return
        if prep["pending"] is not None:
            state.update(prep["pending"])
        low = prep["low"]
        if not self._has_moments(state):
            self._init_moments(state, low)
        state["step"] += 1
        self._apply_low_rank(group, weight, state, prep["proj"], low, prep["basis"], prep["side"],
                             self._step_size(group, state["step"]))

    def _apply_low_rank(self, group: Dict, p: Tensor, state: Dict, proj: GaLoreProjector, low: Tensor, basis,
                        side: str, step_size: float) -> None:
        """Adam on the low-rank gradient, projected back and applied to ``p`` (overridden by Q-GaLore)."""
        beta1, beta2 = group["betas"]
        decay = 1.0 - group["lr"] * group["weight_decay"]
        exp_avg, exp_avg_sq = self._load_moments(state)
        ortho, ortho_right = basis
        if side == "full":  # two-sided projection: no fused kernel, plain ops on small r x r state
            exp_avg.mul_(beta1).add_(low, alpha=1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(low, low, value=1 - beta2)
            full = project_back(exp_avg / (exp_avg_sq.sqrt() + group["eps"]), side, ortho, ortho_right)
            p.copy_((p.to(torch.float32) - step_size * proj.scale * full) * decay)
        else:
            galore_adam_update_(p.data, low, exp_avg, exp_avg_sq, ortho, side == "left", beta1=beta1,
                                beta2=beta2, eps=group["eps"], step_size=step_size, scale=proj.scale, decay=decay)
        self._store_moments(state, exp_avg, exp_avg_sq)

    def _apply_dense(self, group: Dict, p: Tensor, state: Dict, grad: Tensor, step_size: float) -> None:
        beta1, beta2 = group["betas"]
        exp_avg, exp_avg_sq = self._load_moments(state)
        exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        new = p.to(torch.float32) - step_size * (exp_avg / (exp_avg_sq.sqrt() + group["eps"]))
        if group["weight_decay"] > 0.0:
            new = new * (1.0 - group["lr"] * group["weight_decay"])
        p.copy_(new)
        self._store_moments(state, exp_avg, exp_avg_sq)


class GaLoreAdamW8bit(GaLoreAdamW):
    """GaLoreAdamW with 8-bit moments: bitsandbytes blockwise dynamic quantization (block 256), signed map for the
    first moment and unsigned for the second. Moments of tensors smaller than ``min_8bit_size`` stay float32.
    Each step dequantizes a moment into a float32 temporary of the low-rank size, updates it, and quantizes back."""

    BLOCK = 256

    def __init__(self, params, *args, min_8bit_size: int = 4096, **kwargs):
        self.min_8bit_size = min_8bit_size
        super().__init__(params, *args, **kwargs)
        self._codes = {}

    def _code(self, signed: bool, device) -> Tensor:
        import bitsandbytes.functional as bnbf

        key = (signed, str(device))
        if key not in self._codes:
            self._codes[key] = bnbf.create_dynamic_map(signed=signed).to(device)
        return self._codes[key]

    def _quantize(self, x: Tensor, signed: bool):
        import bitsandbytes.functional as bnbf

        q, qs = bnbf.quantize_blockwise(x, code=self._code(signed, x.device), blocksize=self.BLOCK)
        return q, qs.absmax

    def _dequantize(self, q: Tensor, absmax: Tensor, signed: bool, shape) -> Tensor:
        import bitsandbytes.functional as bnbf

        out = bnbf.dequantize_blockwise(q, absmax=absmax, code=self._code(signed, q.device), blocksize=self.BLOCK)
        return out.reshape(shape).to(torch.float32)

    def _init_moments(self, state: Dict, like: Tensor) -> None:
        if like.numel() < self.min_8bit_size:
            return super()._init_moments(state, like)
        zeros = torch.zeros(like.shape, dtype=torch.float32, device=like.device)
        state["exp_avg_q"], state["exp_avg_absmax"] = self._quantize(zeros, True)
        state["exp_avg_sq_q"], state["exp_avg_sq_absmax"] = self._quantize(zeros, False)
        state["moment_shape"] = torch.tensor(list(like.shape), dtype=torch.int64, device="cpu")  # HOST_KEYS

    def _has_moments(self, state: Dict) -> bool:
        return "exp_avg" in state or "exp_avg_q" in state

    def _validate_param_state(self, where: str, p: Tensor, state: Dict, group: Dict) -> None:
        super()._validate_param_state(where, p, state, group)
        if "exp_avg_q" not in state:
            return
        low = (self._expected_low_shape(group, p)[1] if "rank" in group and p.dim() == 2 else tuple(p.shape))
        numel = 1
        for s in low:
            numel *= s
        shape = tuple(state["moment_shape"].tolist()) if isinstance(state.get("moment_shape"), Tensor) else None
        if shape != tuple(low):
            raise ValueError(f"{where}: saved moment_shape {shape} does not match the expected {tuple(low)}")
        blocks = -(-numel // self.BLOCK)
        for key, size in (("exp_avg_q", numel), ("exp_avg_sq_q", numel), ("exp_avg_absmax", blocks),
                          ("exp_avg_sq_absmax", blocks)):
            t = state.get(key)
            if not isinstance(t, Tensor) or t.numel() != size:
                raise ValueError(f"{where}: saved {key} must hold {size} values, got "
                                 f"{None if not isinstance(t, Tensor) else t.numel()}")

    def _load_moments(self, state: Dict):
        if "exp_avg" in state:
            return state["exp_avg"], state["exp_avg_sq"]
        shape = host_shape(state, "moment_shape")
        return (self._dequantize(state["exp_avg_q"], state["exp_avg_absmax"], True, shape),
                self._dequantize(state["exp_avg_sq_q"], state["exp_avg_sq_absmax"], False, shape))

    def _store_moments(self, state: Dict, exp_avg: Tensor, exp_avg_sq: Tensor) -> None:
        if "exp_avg" in state:
            return
        state["exp_avg_q"], state["exp_avg_absmax"] = self._quantize(exp_avg, True)
        state["exp_avg_sq_q"], state["exp_avg_sq_absmax"] = self._quantize(exp_avg_sq, False)


class LayerwiseGaLore:
    """Layer-wise GaLore: one optimizer per parameter, stepped from a post-accumulate-grad hook during backward,
    and the gradient freed right after, so full gradients of all layers never coexist.

    ``accumulation_steps=N`` accumulates N backward passes before each parameter's update. Do not call ``step()``
    (updates happen in backward); ``zero_grad()`` is a no-op between updates but raises in the middle of an
    accumulation window, where it would silently drop accumulated gradients.

    ``hooks=False`` registers no hooks: the caller steps parameters with :meth:`step_param`, e.g. the DDP
    communication hook :meth:`ddp_comm_hook` (weightkit.optim.distributed), which steps each parameter once DDP has
    averaged its gradient bucket; ``zero_grad()`` then sets the gradients to None.
    """

    def __init__(self, params: Iterable, optimizer_cls=GaLoreAdamW, accumulation_steps: int = 1, hooks: bool = True,
                 **defaults):
        if isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, int) or accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be an int >= 1, got {accumulation_steps!r}")
        self.accumulation_steps = accumulation_steps
        self.hooks = bool(hooks)
        groups = list(params)
        if groups and isinstance(groups[0], torch.Tensor):
            groups = [{"params": groups}]
        self.params, self.optimizers, self._counts, self._handles = [], [], [], []
        for group in groups:
            opts = {k: v for k, v in group.items() if k != "params"}
            for p in group["params"]:
                if not p.requires_grad:
                    continue
                index = len(self.params)
                self.params.append(p)
                self.optimizers.append(optimizer_cls([dict(opts, params=[p])], **defaults))
                self._counts.append(0)
                if self.hooks:
                    self._handles.append(p.register_post_accumulate_grad_hook(self._make_hook(index)))
        self._index = {id(p): i for i, p in enumerate(self.params)}

    def _make_hook(self, index: int):
        def hook(p: Tensor) -> None:
            self._step_index(index, p)

        return hook

    def _step_index(self, index: int, p: Tensor) -> None:
        self._counts[index] += 1
        if self._counts[index] % self.accumulation_steps == 0:
            self.optimizers[index].step()
            p.grad = None

    def step_param(self, p: Tensor) -> None:
        """Count one backward pass of ``p`` (its gradient in ``p.grad``) and, at the end of an accumulation window,
        update it and free the gradient: what the post-accumulate-grad hook does, for callers with hooks=False."""
        index = self._index.get(id(p))
        if index is None:
            raise KeyError(f"parameter of shape {tuple(p.shape)} is not trained by this LayerwiseGaLore")
        self._step_index(index, p)

    def ddp_comm_hook(self, process_group=None):
        """A DDP communication hook stepping each bucket's parameters after its all-reduce (needs hooks=False):
        ``ddp_model.register_comm_hook(None, opt.ddp_comm_hook())``. See weightkit.optim.distributed."""
        from .distributed import ddp_layerwise_comm_hook

        return ddp_layerwise_comm_hook(self, process_group)

    def pending(self) -> bool:
        """True inside an accumulation window (some gradients accumulated but not yet applied)."""
        return any(c % self.accumulation_steps for c in self._counts)

    def step(self, closure=None):
        raise RuntimeError("layer-wise GaLore applies each parameter's update inside backward; do not call step(). "
                           "For gradient accumulation pass accumulation_steps=N.")

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self.pending():
            raise RuntimeError(f"zero_grad() in the middle of an accumulation window of {self.accumulation_steps} "
                               "backward passes would drop the accumulated gradients")
        if not self.hooks:
            for p in self.params:
                p.grad = None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def state_dict(self) -> Dict:
        return {"accumulation_steps": self.accumulation_steps, "counts": list(self._counts),
                "optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state: Dict) -> None:
        if len(state.get("optimizers", [])) != len(self.optimizers):
            raise ValueError(f"state holds {len(state.get('optimizers', []))} per-parameter optimizers, "
                             f"this layer-wise optimizer has {len(self.optimizers)}")
        if state.get("accumulation_steps") != self.accumulation_steps:
            raise ValueError(f"state was saved with accumulation_steps={state.get('accumulation_steps')}, "
                             f"this optimizer has {self.accumulation_steps}")
        for opt, sd in zip(self.optimizers, state["optimizers"]):
            opt.load_state_dict(sd)
        self._counts = list(state["counts"])
