"""Layer-wise GaLore: one optimizer per parameter, stepped during backward, so that full gradients of all layers
never coexist; and the DDP communication hook that steps each parameter once DDP has averaged its bucket (see
weightkit.optim.distributed for the DDP story)."""

from __future__ import annotations

import threading
from typing import Dict, Iterable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .galore import GaLoreAdamW


# The id of the backward pass running in this thread (-1 outside one); where torch lacks it, verdicts are not deferred
_graph_task_id = getattr(torch._C, "_current_graph_task_id", lambda: -1)


class LayerwiseGaLore:
    """Layer-wise GaLore: one optimizer per parameter, stepped from a post-accumulate-grad hook during backward,
    and the gradient freed right after, so full gradients of all layers never coexist.

    ``accumulation_steps=N`` accumulates N backward passes before each parameter's update. Do not call ``step()``
    (updates happen in backward); ``zero_grad()`` is a no-op between updates but raises in the middle of an
    accumulation window, where it would silently drop accumulated gradients.

    ``hooks=False`` registers no hooks: the caller steps parameters with :meth:`step_param`, e.g. the DDP
    communication hook :meth:`ddp_comm_hook` (weightkit.optim.distributed), which steps each parameter once DDP has
    averaged its gradient bucket; ``zero_grad()`` then sets the gradients to None.

    Q-GaLore: with ``optimizer_cls=QGaLoreAdamW8bit``, an Int8Linear's :class:`~weightkit.nn.int8.Int8Weight` is
    stepped from the same post-accumulate-grad hook (its gradient is an ordinary ``.grad``), so neither full float
    gradients nor float weights of all layers coexist.

    ``optimizer_cls`` is any optimizer of the GaLore family (GaLoreAdamW by default), built once per parameter with
    ``defaults`` as keyword arguments; ``stagger_refresh=True`` among them spreads the parameters' refreshes over the
    steps (the i-th parameter's optimizer gets ``refresh_offset=i``).

    NaN/Inf gradients (``nonfinite`` among ``defaults``). A parameter's own step checks its gradient as
    GaLoreAdamW.step does. With ``nonfinite='raise'`` (the default) that check would read a device flag on the
    host once per parameter, i.e. one host sync per parameter in the middle of backward, stalling the launch
    queue each time. So the verdict is deferred (``defer_nonfinite``; by default for CUDA parameters, where a sync
    costs): each parameter's update is predicated on its device flag (a bad gradient leaves that parameter's
    weight and moments unchanged, on the device), and the flags of the whole backward pass are read once when it
    ends (a callback of the autograd engine): if any was set, the step counts of those parameters are put back and
    a FloatingPointError names them, the other parameters of the pass having been updated. Steps that refresh a
    basis decide on the host and raise at once, as before. ``nonfinite='skip'`` predicates without any read (each
    parameter's skips are counted on the device: :attr:`skipped_updates`).
    """

    def __init__(self, params: Iterable, optimizer_cls=GaLoreAdamW, accumulation_steps: int = 1, hooks: bool = True,
                 defer_nonfinite: Optional[bool] = None, **defaults):
        if isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, int) or accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be an int >= 1, got {accumulation_steps!r}")
        if defer_nonfinite not in (None, True, False):
            raise ValueError(f"defer_nonfinite must be None (for CUDA parameters), True or False, got "
                             f"{defer_nonfinite!r}")
        self.accumulation_steps = accumulation_steps
        self.hooks = bool(hooks)
        self.nonfinite = defaults.get("nonfinite", "raise")  # (the optimizers validate it)
        self.defer_nonfinite = defer_nonfinite
        self._deferred = []  # (parameter index, device flag) of the predicated updates not yet read
        self._check_task = None  # the backward pass (graph task id) whose end will read them
        self._lock = threading.Lock()  # hooks of parameters on several GPUs run on their devices' threads
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
                # a staggered schedule tells the per-parameter optimizers apart by position (each holds key 0)
                shift = {"refresh_offset": index} if defaults.get("stagger_refresh") else {}
                self.optimizers.append(optimizer_cls([dict(opts, params=[p])], **defaults, **shift))
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
        if self._counts[index] % self.accumulation_steps:
            return
        opt = self.optimizers[index]
        task = _graph_task_id()
        defer = task != -1 and self._defers(p)  # inside a backward pass, whose end reads the flags
        opt._defer = defer
        opt.step()
        p.grad = None
        if defer and opt.deferred_found is not None:
            with self._lock:
                self._deferred.append((index, opt.deferred_found))
                if self._check_task != task:
                    self._check_task = task
                    torch.autograd.Variable._execution_engine.queue_callback(self._read_deferred)

    def _defers(self, p: Tensor) -> bool:
        if self.nonfinite != "raise":
            return False  # 'skip' predicates (and counts) without any read
        return p.device.type == "cuda" if self.defer_nonfinite is None else self.defer_nonfinite

    def _read_deferred(self) -> None:
        """End of a backward pass: read its parameters' device flags (one host read per device) and raise for the
        bad ones, whose updates were skipped on the device; their step counts are put back."""
        with self._lock:
            pending, self._deferred, self._check_task = self._deferred, [], None
        by_device: Dict = {}
        for index, flag in pending:
            by_device.setdefault(flag.device, []).append((index, flag))
        bad = []
        for entries in by_device.values():
            values = torch.cat([flag.reshape(1) for _, flag in entries])
            if bool(values.any()):  # the pass's one host sync (per device)
                bad += [index for (index, _), v in zip(entries, values.tolist()) if v != 0]
        if not bad:
            return
        for index in bad:
            self.optimizers[index].state[self.params[index]]["step"] -= 1
        shapes = [tuple(self.params[i].shape) for i in sorted(bad)]
        raise FloatingPointError(f"non-finite gradient (NaN/Inf) in {len(bad)} parameter(s) of shapes {shapes[:4]}: "
                                 "their updates were skipped (weights, moments and step counts unchanged); the other "
                                 "parameters of this backward pass were updated (nonfinite='skip' skips such updates "
                                 "without raising)")

    @property
    def skipped_updates(self) -> int:
        """Parameter updates skipped for a NaN/Inf gradient with ``nonfinite='skip'`` (the per-parameter optimizers'
        ``skipped_steps`` summed; reading it synchronizes with the devices: for logging, not every step)."""
        return sum(opt.skipped_steps for opt in self.optimizers)

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


def ddp_layerwise_comm_hook(layerwise: LayerwiseGaLore, process_group=None):
    """A DDP communication hook that averages each gradient bucket and then steps its parameters.

    Usage::

        opt = LayerwiseGaLore(groups, hooks=False)
        ddp = DistributedDataParallel(model)
        ddp.register_comm_hook(None, ddp_layerwise_comm_hook(opt))
        for batch in data:
            loss(ddp(batch)).backward()   # the updates happen here, bucket by bucket
            opt.zero_grad()
    """
    if not isinstance(layerwise, LayerwiseGaLore):
        raise TypeError(f"ddp_layerwise_comm_hook takes a LayerwiseGaLore, got {type(layerwise).__name__}")
    if layerwise.hooks:
        raise ValueError("this LayerwiseGaLore steps from post-accumulate-grad hooks, which fire before DDP's "
                         "all-reduce; build it with hooks=False to use it from the DDP communication hook")
    if layerwise.accumulation_steps != 1:
        raise ValueError("with the DDP communication hook every synchronised backward is one update: use "
                         "accumulation_steps=1 and DistributedDataParallel.no_sync() for gradient accumulation")
    owned = {id(p) for p in layerwise.params}

    def hook(state, bucket):  # (no annotations: this module postpones them, DDP compares them as objects)
        group = process_group if process_group is not None else state
        buffer = bucket.buffer()
        buffer.div_(dist.get_world_size(group))
        fut = dist.all_reduce(buffer, group=group, async_op=True).get_future()

        def apply(done: torch.futures.Future) -> Tensor:
            reduced = done.value()[0]
            params = bucket.parameters()
            total = sum(p.numel() for p in params)
            if total != reduced.numel():
                raise RuntimeError(f"DDP bucket of {reduced.numel()} elements does not hold its {len(params)} "
                                   f"parameters contiguously ({total} elements)")
            offset = 0
            with torch.no_grad():
                for p in params:
                    n = p.numel()
                    if id(p) in owned:
                        p.grad = reduced[offset:offset + n].view_as(p)
                        layerwise.step_param(p)
                    offset += n
            return reduced

        return fut.then(apply)

    return hook
