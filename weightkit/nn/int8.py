"""Int8Linear: an nn.Linear whose weight lives in int8 with per-group scales (Q-GaLore, arXiv 2407.08296).

``weight`` is an :class:`Int8Weight`: an int8 ``nn.Parameter`` (``requires_grad=False``; integer tensors cannot
carry autograd gradients) that carries what training it needs, ``scale`` (float32, one value per group of
``group_size`` consecutive elements of a row: the layer's ``scale`` buffer, the same tensor), ``group_size`` and
``float_grad``. The forward runs ``weightkit::int8_matmul``, which dequantizes inside the kernel: no full-precision
copy of the weight is kept. The input gradient comes from the same op; the weight's gradient G = grad_out^T x
(float32, out x in) is accumulated into ``weight.float_grad`` when ``track_weight_grad`` is on (the default), for
``weightkit.optim.QGaLoreAdamW8bit``, which recognises the type, consumes and clears the gradient, and writes weight
and scale back by stochastic rounding. Training through ``torch.compile`` is not supported (the weight gradient is a
side effect); inference compiles.
"""

from __future__ import annotations

import copy
import weakref
from collections import OrderedDict
from typing import Callable, Dict, Optional

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..ops.int8 import absmax_scale, dequantize_int8, int8_matmul
from ._bias import add_bias


# An empty leaf that requires grad: passed to the Function when the weight gradient is tracked so that backward
# runs even when neither the input nor any float parameter needs a gradient (it receives None). One per device, so
# that the autograd graph of a CUDA layer has no CPU input (whose node the engine would schedule on its CPU queue).
_GRAD_ANCHORS: Dict[torch.device, Tensor] = {}


def _grad_anchor(device: torch.device) -> Tensor:
    anchor = _GRAD_ANCHORS.get(device)
    if anchor is None:
        anchor = _GRAD_ANCHORS[device] = torch.empty(0, device=device, requires_grad=True)
    return anchor


class Int8Weight(nn.Parameter):
    """The int8 weight of an :class:`Int8Linear`, with the training protocol as attributes.

    * ``scale``: float32 per-group scales, the owning layer's ``scale`` buffer (the same tensor, so an optimizer
      that writes the weight back updates the layer's scales with it);
    * ``group_size``: elements per scale group, consecutive along a row;
    * ``float_grad``: the float32 weight gradient accumulated by backward (None when there is none), which
      ``QGaLoreAdamW8bit`` consumes;
    * ``int8_owner``: a weak reference to the owning layer (None for a weight outside a layer).

    :meth:`register_float_grad_hook` is the int8 counterpart of ``register_post_accumulate_grad_hook``: the hook
    runs after each backward pass has added its gradient to ``float_grad`` (``LayerwiseGaLore`` steps Q-GaLore's
    per-parameter optimizers from it). It runs once per call of the layer in the forward: a layer called twice
    in one forward fires it twice.

    A state dict holds the plain int8 tensor (``weight``) next to ``scale``, as before this type existed; the layer
    re-attaches the attributes after ``load_state_dict`` and ``.to()``. ``copy.deepcopy`` and pickling keep the type
    and its attributes (a deep copy of the layer shares one new scale tensor between weight and buffer).
    """

    def __new__(cls, data: Optional[Tensor] = None, requires_grad: bool = False, *, scale: Optional[Tensor] = None,
                group_size: Optional[int] = None):
        if data is None:
            data = torch.empty(0, dtype=torch.int8)
        if data.dtype != torch.int8:
            raise TypeError(f"Int8Weight holds int8 data, got {data.dtype}")
        if requires_grad:
            raise ValueError("Int8Weight cannot require grad (integer tensors carry no autograd gradient); its "
                             "gradient is accumulated in float_grad")
        return torch.Tensor._make_subclass(cls, data.detach(), False)

    def __init__(self, data: Optional[Tensor] = None, requires_grad: bool = False, *, scale: Optional[Tensor] = None,
                 group_size: Optional[int] = None):
        self.scale = scale
        self.group_size = group_size
        self.float_grad: Optional[Tensor] = None
        self.int8_owner: Optional[weakref.ref] = None
        self._float_grad_hooks: Dict[int, Callable[["Int8Weight"], None]] = OrderedDict()  # weakref-able

    def register_float_grad_hook(self, hook: Callable[["Int8Weight"], None]) -> RemovableHandle:
        """Run ``hook(weight)`` after backward has accumulated a gradient into ``float_grad``; returns a handle
        whose ``remove()`` unregisters it."""
        if not callable(hook):
            raise TypeError(f"hook must be callable, got {type(hook).__name__}")
        if not hasattr(self, "_float_grad_hooks"):  # a weight rebuilt by torch internals without __init__
            self._float_grad_hooks = OrderedDict()
        handle = RemovableHandle(self._float_grad_hooks)
        self._float_grad_hooks[handle.id] = hook
        return handle

    def _run_float_grad_hooks(self) -> None:
        for hook in list(getattr(self, "_float_grad_hooks", {}).values()):
            hook(self)

    def __deepcopy__(self, memo):
        if id(self) in memo:
            return memo[id(self)]
        result = Int8Weight(self.data.clone(memory_format=torch.preserve_format),
                            scale=copy.deepcopy(self.scale, memo), group_size=self.group_size)
        result.float_grad = copy.deepcopy(self.float_grad, memo)
        memo[id(self)] = result
        return result

    def __reduce_ex__(self, proto):
        return (_rebuild_int8_weight, (self.data, self.scale, self.group_size, self.float_grad))

    def __repr__(self) -> str:
        return f"Int8Weight(group_size={self.group_size}) containing:\n{super().__repr__()}"


def _rebuild_int8_weight(data: Tensor, scale: Optional[Tensor], group_size: Optional[int],
                         float_grad: Optional[Tensor]) -> Int8Weight:
    weight = Int8Weight(data, scale=scale, group_size=group_size)
    weight.float_grad = float_grad
    return weight


class _Int8LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, scale: Tensor, group_size: int, track: bool, anchor: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight, scale)
        ctx.group_size, ctx.track = group_size, track
        return int8_matmul(x, weight, scale, group_size, transpose=False)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight, scale = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = int8_matmul(grad_out.contiguous(), weight, scale, ctx.group_size, transpose=True)
        if ctx.track:
            # in the activations' dtype, as nn.Linear's weight gradient under autocast: bf16/fp16 activations use
            # the tensor cores (fp32 accumulation inside the GEMM), fp32 ones an fp32 GEMM (TF32 if allowed);
            # accumulated into the float32 float_grad
            dt = torch.promote_types(grad_out.dtype, x.dtype)
            g2 = grad_out.reshape(-1, grad_out.shape[-1]).to(dt)
            x2 = x.reshape(-1, x.shape[-1]).to(dt)
            g_w = g2.T @ x2
            if weight.float_grad is None:
                weight.float_grad = g_w.to(torch.float32)
            else:
                weight.float_grad.add_(g_w)
            if isinstance(weight, Int8Weight):
                weight._run_float_grad_hooks()
        return grad_x, None, None, None, None, None


class Int8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: int = 128,
                 device=None, dtype: Optional[torch.dtype] = None, track_weight_grad: bool = True):
        super().__init__()
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be an int >= 1, got {group_size!r}")
        if in_features % group_size:
            raise ValueError(f"group_size={group_size} must divide in_features={in_features}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.track_weight_grad = track_weight_grad
        self.register_buffer("scale", torch.ones(out_features * in_features // group_size, device=device))
        self.weight = Int8Weight(torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype or torch.float32)) if bias else None
        self._bind()

    def _bind(self) -> None:
        """Make ``weight`` an Int8Weight bound to this layer: its ``scale`` is the layer's buffer, ``int8_owner`` the
        layer (at construction, after .to(), load_state_dict with assign=True, deepcopy and unpickling)."""
        weight = self._parameters["weight"]
        if not isinstance(weight, Int8Weight):
            float_grad = getattr(weight, "float_grad", None)
            weight = Int8Weight(weight.data, scale=self.scale, group_size=self.group_size)
            weight.float_grad = float_grad
            self._parameters["weight"] = weight
        weight.scale, weight.group_size = self._buffers["scale"], self.group_size
        weight.int8_owner = weakref.ref(self)

    def __setstate__(self, state):
        super().__setstate__(state)  # copy.deepcopy and unpickling: the copy's weight points at the copy
        self._bind()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # load_state_dict would cast silently (a float weight truncated into int8, scales of another group size):
        # refuse instead, naming the entry. Runs before any tensor of this module is copied.
        w, sc = state_dict.get(prefix + "weight"), state_dict.get(prefix + "scale")
        if w is not None and (w.dtype != torch.int8 or tuple(w.shape) != tuple(self.weight.shape)):
            raise ValueError(f"{prefix}weight must be int8 of shape {tuple(self.weight.shape)}, got {w.dtype} "
                             f"{tuple(w.shape)} (quantize float weights with Int8Linear.from_linear)")
        if sc is not None and (sc.dtype != torch.float32 or sc.numel() != self.scale.numel()
                               or not bool(torch.isfinite(sc).all()) or not bool((sc > 0).all())):
            raise ValueError(f"{prefix}scale must hold {self.scale.numel()} positive finite float32 values (one per "
                             f"group of {self.group_size}), got {sc.dtype} with {sc.numel()} values")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._bind()  # load_state_dict(assign=True) replaces the tensors

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128, track_weight_grad: bool = True) -> "Int8Linear":
        """Quantize ``linear``'s weight to int8 (round to nearest, absmax scale per group)."""
        w = linear.weight.detach()
        group = group_size
        if linear.in_features % group:
            raise ValueError(f"group_size={group} must divide in_features={linear.in_features}")
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, group, device=w.device,
                    dtype=w.dtype, track_weight_grad=track_weight_grad)
        scale = absmax_scale(w, group)
        q = torch.round(w.reshape(-1, group).to(torch.float32) / scale[:, None]).clamp(-127, 127)
        layer.weight.data.copy_(q.to(torch.int8).reshape(w.shape))
        layer.scale.copy_(scale)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    def _apply(self, fn, recurse=True):
        # .to(dtype) must not round the scales: keep them float32, follow only the device. The same for an
        # accumulated float_grad (float32, on the weight's device: the next backward adds to it there)
        scale = self.scale
        float_grad = getattr(self.weight, "float_grad", None)
        super()._apply(fn, recurse)
        self.scale = scale.to(device=self.scale.device)
        self._bind()
        if float_grad is not None:
            self.weight.float_grad = float_grad.to(device=self.weight.device)
        return self

    def dequantized_weight(self) -> Tensor:
        return dequantize_int8(self.weight, self.scale, self.group_size)

    def forward(self, x: Tensor) -> Tensor:
        # the tensors from nn.Module's dicts directly: its __getattr__ costs ~0.4 us per parameter or buffer
        params, buffers = self._parameters, self._buffers
        weight = params["weight"] if "weight" in params else self.weight
        scale = buffers["scale"] if "scale" in buffers else self.scale
        bias = params["bias"] if "bias" in params else self.bias
        grad = torch.is_grad_enabled()
        if grad and (self.track_weight_grad or x.requires_grad):
            y = _Int8LinearFunction.apply(x, weight, scale, self.group_size, self.track_weight_grad,
                                          _grad_anchor(x.device))
        else:
            y = int8_matmul(x, weight, scale, self.group_size)
        return add_bias(y, bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"group_size={self.group_size}")
