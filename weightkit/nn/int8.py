"""Int8Linear: an nn.Linear whose weight lives in int8 with per-group scales (Q-GaLore, arXiv 2407.08296).

``weight`` is an :class:`Int8Weight`: a tensor subclass that stores the int8 values (``qdata``, out x in) and their
float32 scales (``scale``, one per group of ``group_size`` consecutive elements of a row) but presents itself to
autograd, optimizers and torch.distributed as a float tensor (float32 unless the layer was built or cast to another
float dtype). Its gradient is therefore an ordinary ``.grad`` of that dtype, made and accumulated by autograd and
freed by ``zero_grad()``, so everything that works on ``.grad`` works on it unchanged: ``clip_grad_norm_``,
``GradScaler``, DDP's all-reduce, FSDP2's reduce-scatter, ``register_post_accumulate_grad_hook``, Trainer.

The forward runs ``weightkit::int8_matmul``, which dequantizes inside the kernel: no full-precision copy of the
weight exists. The backward computes the input gradient with the same op and the weight gradient
G = grad_out^T x in the activations' dtype (bf16/fp16 under autocast, as nn.Linear's), returned in the weight's
dtype.

Updates: ``weightkit.optim.QGaLoreAdamW8bit`` (and the other GaLore presets) write the int8 values and scales back
with the fused ``weightkit::int8_sr_update_``. Any other optimizer updates the weight with in-place tensor ops
(``add_``, ``addcdiv_``, ``lerp_``, ...): each is computed on the dequantized weight and the result written back by
unbiased stochastic rounding (``weightkit::int8_assign_sr_``: fresh absmax scales, Philox noise keyed by the weight's
seed and an update counter, so a run is reproducible; ``mul_`` by a positive number only rescales). ``copy_`` of a
float tensor rounds to nearest (a value set, not an update).

A state dict holds the plain int8 tensor (``weight``) next to ``scale``, as before this type existed; checkpoints
written by earlier versions load unchanged.
"""

from __future__ import annotations

import hashlib
import itertools
import warnings
from typing import Callable, Optional

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import return_and_correct_aliasing

from ..ops._checks import check_positive_int, check_tensor
from ..ops._registry import define
from ..ops.int8 import absmax_scale, dequantize_int8, int8_matmul, stochastic_round_int8
from ._bias import add_bias

aten = torch.ops.aten

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# One stochastic-rounding seed per weight created in this process, in creation order: no draw from torch's RNG (a
# model's other random numbers stay what they were), and processes that build the same model agree (DDP replicas
# round their identical updates identically).
_SEED_COUNTER = itertools.count()


def _next_seed() -> int:
    return (next(_SEED_COUNTER) * 0x9E3779B97F4A7C15 + 0x2545F4914F6CDD1D) % 2**62


def _new_sr_state(seed: Optional[int] = None) -> Tensor:
    """[seed, number of stochastic-rounding updates so far]: int64 on the CPU (read on the host at each update,
    which costs no device synchronization)."""
    return torch.tensor([_next_seed() if seed is None else int(seed), 0], dtype=torch.int64)


# -- the write-back op: value -> (int8, scales) by stochastic rounding, one counter step ---------------------------------
def _check_assign_sr(w_q, scale, sr_state, value, group_size):
    check_tensor("w_q", w_q, dtypes=(torch.int8,))
    check_tensor("scale", scale, dtypes=(torch.float32,), device=w_q.device)
    check_tensor("sr_state", sr_state, dtypes=(torch.int64,), device=torch.device("cpu"))
    check_tensor("value", value, dtypes=_FLOAT_DTYPES, device=w_q.device)
    check_positive_int("group_size", group_size)
    if sr_state.shape != (2,):
        raise ValueError(f"sr_state must hold [seed, count], got shape {tuple(sr_state.shape)}")
    if value.shape != w_q.shape:
        raise ValueError(f"value has shape {tuple(value.shape)}, w_q has {tuple(w_q.shape)}")
    if w_q.numel() % group_size or scale.numel() != w_q.numel() // group_size:
        raise ValueError(f"scale must hold one value per group of {group_size}: {w_q.numel() // group_size}, "
                         f"got {scale.numel()}")


def _assign_sr_impl(w_q, scale, sr_state, value, group_size):
    seed, count = (int(v) for v in sr_state.tolist())
    new_scale = absmax_scale(value, group_size)
    q = stochastic_round_int8(value, new_scale, group_size, seed, (count * w_q.numel()) % 2**62)
    w_q.copy_(q.reshape(w_q.shape))
    scale.copy_(new_scale.reshape(scale.shape))
    sr_state[1] += 1


_int8_assign_sr_op = define(
    "int8_assign_sr_(Tensor(a0!) w_q, Tensor(a1!) scale, Tensor(a2!) sr_state, Tensor value, SymInt group_size) -> ()",
    impl=_assign_sr_impl, check=_check_assign_sr, fake=lambda *args: None)


def int8_assign_sr_(w_q: Tensor, scale: Tensor, sr_state: Tensor, value: Tensor, group_size: int) -> None:
    """In place: ``w_q, scale <- SR(value)`` with fresh per-group absmax scales; the Philox stream is keyed by
    ``sr_state = [seed, count]`` (offset ``count * numel``) and ``count`` is incremented. Opaque to torch.compile,
    so a compiled optimizer step draws new noise at every call."""
    _int8_assign_sr_op(w_q, scale, sr_state, value, group_size)


# -- the weight ------------------------------------------------------------------------------------------------------
class Int8Weight(Tensor):
    """The weight of an :class:`Int8Linear`: int8 values and float32 group scales presented as a float tensor.

    * ``qdata``: int8, out x in (contiguous);
    * ``scale``: float32, one positive value per group of ``group_size`` consecutive elements of a row (row-major,
      ``qdata.numel() // group_size`` values);
    * ``group_size``: elements per scale group;
    * ``sr_state``: int64 [seed, updates] on the CPU, the key of the stochastic rounding of in-place updates.

    Its ``dtype`` is the float dtype it presents (``Int8Linear``'s ``dtype``, float32 by default; ``.to(dtype)``
    changes it, never the storage). Operations that read it (``torch.equal``, ``w * 2``, ``w.norm()``...) see the
    dequantized values and return plain tensors; in-place updates write back by stochastic rounding (see the
    module docstring). ``.to(device)``, ``copy.deepcopy``, pickling and ``load_state_dict(assign=True)`` keep the
    type and its attributes.
    """

    qdata: Tensor
    scale: Tensor
    group_size: int
    sr_state: Tensor

    @staticmethod
    def __new__(cls, qdata: Tensor, scale: Optional[Tensor] = None, group_size: Optional[int] = None, *,
                dtype: torch.dtype = torch.float32, sr_state: Optional[Tensor] = None, requires_grad: bool = False):
        if not isinstance(qdata, Tensor) or qdata.dtype != torch.int8:
            raise TypeError(f"Int8Weight holds int8 data, got {getattr(qdata, 'dtype', type(qdata).__name__)}")
        if scale is None or group_size is None:
            raise TypeError("Int8Weight needs its scale (float32, one per group) and group_size")
        if dtype not in _FLOAT_DTYPES:
            raise TypeError(f"Int8Weight presents a float dtype ({', '.join(map(str, _FLOAT_DTYPES))}), got {dtype}")
        return Tensor._make_wrapper_subclass(cls, qdata.shape, dtype=dtype, device=qdata.device,
                                             requires_grad=requires_grad)

    def __init__(self, qdata: Tensor, scale: Optional[Tensor] = None, group_size: Optional[int] = None, *,
                 dtype: torch.dtype = torch.float32, sr_state: Optional[Tensor] = None, requires_grad: bool = False):
        self.qdata = qdata
        self.scale = scale
        self.group_size = int(group_size)
        self.sr_state = _new_sr_state() if sr_state is None else sr_state

    # -- traceable wrapper subclass protocol (torch.compile, Module._apply's swap, FSDP2) ----------------------------
    def __tensor_flatten__(self):
        return ["qdata", "scale", "sr_state"], (self.group_size, self.dtype)

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        group_size, dtype = meta
        return Int8Weight(inner["qdata"], inner["scale"], group_size, dtype=dtype, sr_state=inner["sr_state"])

    def _stable_hash_for_caching(self) -> str:
        """torch.compile's AOTAutograd cache key of this weight (torch >= 2.13 asks a wrapper subclass for one, and
        warns once where it has none): what a compiled graph depends on -- the presented shape, dtype and
        requires_grad, the group size, and each held tensor's dtype, shape, strides and device type -- never the
        values (the rounding counter in ``sr_state`` advances at every update and is read at run time)."""
        held = [(str(t.dtype), tuple(t.shape), t.stride(), t.device.type)
                for t in (self.qdata, self.scale, self.sr_state)]
        key = repr((type(self).__qualname__, tuple(self.shape), str(self.dtype), self.requires_grad, self.group_size,
                    held))
        return hashlib.blake2b(key.encode(), digest_size=16).hexdigest()

    def _like(self, qdata: Tensor, scale: Tensor, sr_state: Optional[Tensor] = None, dtype=None) -> "Int8Weight":
        return Int8Weight(qdata, scale, self.group_size, dtype=dtype or self.dtype,
                          sr_state=self.sr_state if sr_state is None else sr_state)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        """The float weight (``dtype``, default: the presented dtype) as a plain tensor."""
        w = dequantize_int8(self.qdata, self.scale, self.group_size)
        return w.to(dtype or self.dtype)

    def __repr__(self) -> str:
        return (f"Int8Weight(shape={tuple(self.shape)}, dtype={self.dtype}, group_size={self.group_size}, "
                f"device={self.device}, requires_grad={self.requires_grad})")

    def __deepcopy__(self, memo):
        if id(self) in memo:
            return memo[id(self)]
        result = Int8Weight(self.qdata.clone(), self.scale.clone(), self.group_size, dtype=self.dtype,
                            sr_state=self.sr_state.clone(), requires_grad=self.requires_grad)
        if getattr(self, "_is_param", False):
            result._is_param = True
        if self.grad is not None:
            result.grad = self.grad.clone()
        memo[id(self)] = result
        return result

    def __reduce_ex__(self, proto):
        return (_rebuild_int8_weight, (self.qdata, self.scale, self.group_size, self.dtype, self.sr_state,
                                       self.requires_grad, bool(getattr(self, "_is_param", False)), self.grad))

    # -- the float_grad API (before this type held a float dtype): deprecated ------------------------------------------
    @property
    def float_grad(self) -> Optional[Tensor]:
        warnings.warn("Int8Weight.float_grad is deprecated: the gradient of an Int8Linear weight is its ordinary "
                      ".grad now; read weight.grad", DeprecationWarning, stacklevel=2)
        return self.grad

    @float_grad.setter
    def float_grad(self, value: Optional[Tensor]) -> None:
        warnings.warn("Int8Weight.float_grad is deprecated: the gradient of an Int8Linear weight is its ordinary "
                      ".grad now; set weight.grad (optimizer.zero_grad() frees it)", DeprecationWarning, stacklevel=2)
        self.grad = value

    def register_float_grad_hook(self, hook: Callable[["Int8Weight"], None]):
        """Deprecated: use ``register_post_accumulate_grad_hook`` (the gradient is ``.grad``)."""
        warnings.warn("Int8Weight.register_float_grad_hook is deprecated: the gradient is the ordinary .grad; use "
                      "weight.register_post_accumulate_grad_hook(hook)", DeprecationWarning, stacklevel=2)
        if not callable(hook):
            raise TypeError(f"hook must be callable, got {type(hook).__name__}")
        return self.register_post_accumulate_grad_hook(hook)

    # -- what torch ops do with it ----------------------------------------------------------------------------------
    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _HANDLERS.get(func)
        if handler is not None:
            return handler(func, args, kwargs)
        schema = func._schema
        if schema.is_mutable and args and isinstance(args[0], Int8Weight) and _mutates_first(schema):
            return _update_in_place(func, args, kwargs)
        if func.namespace == "aten" and (func._opname.endswith("_like") or func._opname.startswith("new_")):
            return _factory(func, args, kwargs)
        # anything else reads the values: run it on the dequantized weight (a plain tensor comes back)
        return func(*_dequantized(args), **_dequantized(kwargs))


def _rebuild_int8_weight(qdata, scale, group_size, dtype=torch.float32, sr_state=None, requires_grad=False,
                         is_param=False, grad=None) -> Int8Weight:
    weight = Int8Weight(qdata, scale, group_size, dtype=dtype, sr_state=sr_state, requires_grad=requires_grad)
    if is_param:
        weight._is_param = True
    if grad is not None:
        weight.grad = grad
    return weight


def _mutates_first(schema) -> bool:
    info = schema.arguments[0].alias_info if schema.arguments else None
    return info is not None and info.is_write


def _dequantized(tree):
    if isinstance(tree, Int8Weight):
        return tree.dequantize()
    if isinstance(tree, (list, tuple)):
        return type(tree)(_dequantized(t) for t in tree)
    if isinstance(tree, dict):
        return {k: _dequantized(v) for k, v in tree.items()}
    return tree


def _factory(func, args, kwargs):
    """``*_like`` and ``new_*`` ops: a plain float tensor of the weight's dtype and device (optimizer state,
    autograd's gradient buffers), never a dequantization."""
    self = args[0]
    if func._opname.startswith("new_"):
        stand_in = torch.empty((), dtype=self.dtype, device=self.device)
    else:
        stand_in = torch.empty(self.shape, dtype=self.dtype, device=self.device)
    return func(stand_in, *args[1:], **kwargs)


def _quantize_nearest(value: Tensor, group_size: int):
    scale = absmax_scale(value, group_size)
    q = torch.round(value.reshape(-1, group_size).to(torch.float32) / scale[:, None]).clamp_(-127, 127)
    return q.to(torch.int8).reshape(value.shape), scale


def _update_in_place(func, args, kwargs):
    """An in-place op on the weight (an optimizer's update): computed on the dequantized weight, written back by
    stochastic rounding; multiplying by a positive number rescales the groups (exact up to the scales' rounding)."""
    self = args[0]
    name = func._opname if func.namespace == "aten" else ""
    if name in ("mul_", "div_") and len(args) == 2 and not kwargs:
        factor = args[1]
        if type(factor) is Tensor and factor.dim() == 0 and factor.device.type == "cpu" and factor.is_floating_point():
            factor = factor.item()  # a Python number arrives wrapped in a CPU scalar tensor (read: no device sync)
        if isinstance(factor, (int, float)) and not isinstance(factor, bool) and 0 < factor < float("inf"):
            self.scale.mul_(factor if name == "mul_" else 1.0 / factor)
            return self
    if name == "zero_":
        self.qdata.zero_()
        self.scale.fill_(torch.finfo(torch.float32).tiny)
        return self
    value = self.dequantize()
    out = func(value, *_dequantized(args[1:]), **_dequantized(kwargs))
    result = value if out is None else out
    int8_assign_sr_(self.qdata, self.scale, self.sr_state, result, self.group_size)
    return self


def _copy_(func, args, kwargs):
    dst, src = args[0], args[1]
    if isinstance(dst, Int8Weight):
        if isinstance(src, Int8Weight) and src.group_size == dst.group_size and src.shape == dst.shape:
            dst.qdata.copy_(src.qdata)
            dst.scale.copy_(src.scale)
            if src.sr_state is not dst.sr_state:
                dst.sr_state.copy_(src.sr_state)
            return dst
        value = src.dequantize() if isinstance(src, Int8Weight) else src
        value = value.to(device=dst.device).expand(dst.shape)
        q, scale = _quantize_nearest(value, dst.group_size)  # a value set: round to nearest, deterministic
        dst.qdata.copy_(q)
        dst.scale.copy_(scale.reshape(dst.scale.shape))
        return dst
    return dst.copy_(src.dequantize(dst.dtype), **kwargs)


def _alias(func, args, kwargs):
    self = args[0]
    out = self._like(func(self.qdata), func(self.scale))
    return return_and_correct_aliasing(func, args, kwargs, out)


def _clone(func, args, kwargs):
    self = args[0]
    return self._like(self.qdata.clone(), self.scale.clone(), self.sr_state.clone())


def _to_copy(func, args, kwargs):
    self = args[0]
    kwargs = dict(kwargs)
    dtype = kwargs.pop("dtype", None) or self.dtype
    device = kwargs.pop("device", None) or self.device
    non_blocking = bool(kwargs.pop("non_blocking", False))
    if dtype not in _FLOAT_DTYPES:  # .to(int) and friends: the values, as any tensor
        return self.dequantize().to(device=device, dtype=dtype)
    # only the device moves the storage; the dtype is the one presented (the scales stay float32)
    return self._like(self.qdata.to(device, non_blocking=non_blocking, copy=True),
                      self.scale.to(device, non_blocking=non_blocking, copy=True), self.sr_state.clone(), dtype=dtype)


def _row_scale(self: Int8Weight) -> Tensor:
    return self.scale.view(self.shape[0], -1)


def _split(func, args, kwargs):
    """FSDP2 shards by rows (dim 0): rows keep their scales, so a row block is an Int8Weight (sharing storage)."""
    self, size = args[0], args[1]
    dim = args[2] if len(args) > 2 else kwargs.get("dim", 0)
    if dim not in (0, -2):
        raise NotImplementedError("an Int8Weight splits along its rows only (dim 0): its scale groups lie in rows")
    rows = func(self.qdata, size, 0)
    scales = func(_row_scale(self), size, 0)
    return [self._like(q, s.reshape(-1)) for q, s in zip(rows, scales)]


def _slice(func, args, kwargs):
    self = args[0]
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    if dim not in (0, -2):
        return func(self.dequantize(), *args[1:], **kwargs)  # a column slice reads values
    rest = args[2:]
    out = self._like(func(self.qdata, 0, *rest), func(_row_scale(self), 0, *rest).view(-1))
    return return_and_correct_aliasing(func, args, kwargs, out)


def _new_zeros(func, args, kwargs):
    """FSDP2 pads a shard into ``new_zeros`` of the padded shape and copies the shard in: an Int8Weight of zeros
    (a weight-shaped request; anything else is a plain float tensor)."""
    self, size = args[0], list(args[1])
    dtype = kwargs.get("dtype") or self.dtype
    device = kwargs.get("device") or self.device
    if len(size) != 2 or size[1] != self.shape[1] or dtype not in _FLOAT_DTYPES:
        return torch.zeros(size, dtype=dtype, device=device)
    groups = size[0] * size[1] // self.group_size
    return Int8Weight(torch.zeros(size, dtype=torch.int8, device=device),
                      torch.full((groups,), torch.finfo(torch.float32).tiny, device=device), self.group_size,
                      dtype=dtype, sr_state=self.sr_state)


def _view(func, args, kwargs):
    """A view that keeps every scale group inside its last dimension (groups are consecutive in row-major order,
    so flattening, as DDP's and FSDP2's flat buffers do, or regrouping rows keeps them) is an Int8Weight sharing
    the storage; any other shape reads the values."""
    self = args[0]
    qdata = self.qdata.view(list(args[1]))
    if qdata.dim() == 1 or qdata.shape[-1] % self.group_size == 0:
        out = self._like(qdata, self.scale.view(self.scale.shape))
        return return_and_correct_aliasing(func, args, kwargs, out)
    return func(self.dequantize(), *args[1:], **kwargs)


def _as_strided(func, args, kwargs):
    """FSDP2 re-views the all-gathered weight with as_strided to its own (contiguous) shape: an alias then; any other
    striding reads the values."""
    self, size, stride = args[0], list(args[1]), list(args[2])
    offset = args[3] if len(args) > 3 else kwargs.get("storage_offset", 0)
    if size == list(self.shape) and stride == list(self.qdata.stride()) and not offset:
        out = self._like(self.qdata.view(size), self.scale.view(self.scale.shape))
        return return_and_correct_aliasing(func, args, kwargs, out)
    return func(self.dequantize(), *args[1:], **kwargs)


def _equal(func, args, kwargs):
    a, b = args
    if isinstance(a, Int8Weight) and isinstance(b, Int8Weight) and a.group_size == b.group_size:
        if torch.equal(a.qdata, b.qdata) and torch.equal(a.scale, b.scale):
            return True
    return func(*_dequantized(args))


def _storage_op(func, args, kwargs):
    """weightkit's in-place int8 ops given the weight itself write its storage (``int8_sr_update_(w, w.scale, ...)``
    as with the int8 parameter of earlier versions)."""
    return func(*(a.qdata if isinstance(a, Int8Weight) else a for a in args), **kwargs)


_HANDLERS = {
    torch.ops.weightkit.int8_sr_update_.default: _storage_op,
    aten.detach.default: _alias,
    aten.alias.default: _alias,
    aten.clone.default: _clone,
    aten._to_copy.default: _to_copy,
    aten.copy_.default: _copy_,
    aten.split.Tensor: _split,
    aten.slice.Tensor: _slice,
    aten.new_zeros.default: _new_zeros,
    aten.view.default: _view,
    aten.as_strided.default: _as_strided,
    aten.equal.default: _equal,
    aten.is_same_size.default: lambda func, args, kwargs: args[0].shape == args[1].shape,
}


# -- FSDP2: all-gather the int8 values and scales, not a float weight -----------------------------------------------
def _fsdp_pre_all_gather(self, mesh, outer_size=None, outer_stride=None, module=None, mp_policy=None):
    return (self.qdata, _row_scale(self)), None


def _fsdp_post_all_gather(self, outputs, metadata, param_dtype, *, out=None):
    qdata, scale = outputs
    if out is not None:  # FSDP2 reuses the unsharded weight: its inner tensors are the all-gather outputs already
        return None
    return Int8Weight(qdata, scale.view(-1), self.group_size, dtype=self.dtype, sr_state=self.sr_state), outputs


Int8Weight.fsdp_pre_all_gather = _fsdp_pre_all_gather
Int8Weight.fsdp_post_all_gather = _fsdp_post_all_gather


# -- the layer ------------------------------------------------------------------------------------------------------
class _Int8LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Int8Weight) -> Tensor:
        qdata, scale, group_size = weight.qdata, weight.scale, weight.group_size
        ctx.save_for_backward(x, qdata, scale)
        ctx.group_size, ctx.weight_dtype = group_size, weight.dtype
        return int8_matmul(x, qdata, scale, group_size, transpose=False)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, qdata, scale = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = int8_matmul(grad_out.contiguous(), qdata, scale, ctx.group_size, transpose=True)
        if ctx.needs_input_grad[1]:
            # in the activations' dtype, as nn.Linear's weight gradient under autocast: bf16/fp16 activations use
            # the tensor cores (fp32 accumulation inside the GEMM), fp32 ones an fp32 GEMM (TF32 if allowed)
            dt = torch.promote_types(grad_out.dtype, x.dtype)
            g2 = grad_out.reshape(-1, grad_out.shape[-1]).to(dt)
            x2 = x.reshape(-1, x.shape[-1]).to(dt)
            grad_w = (g2.T @ x2).to(ctx.weight_dtype)
        return grad_x, grad_w


class Int8Linear(nn.Module):
    """``nn.Linear`` with an :class:`Int8Weight` (see the module docstring). ``dtype`` is the float dtype the
    weight presents (and its gradient's, and the bias's); ``track_weight_grad=False`` freezes the weight
    (``weight.requires_grad = False``)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: int = 128,
                 device=None, dtype: Optional[torch.dtype] = None, track_weight_grad: bool = True):
        super().__init__()
        self.check_options(group_size)
        if in_features % group_size:
            raise ValueError(f"group_size={group_size} must divide in_features={in_features}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        weight = Int8Weight(torch.zeros(out_features, in_features, dtype=torch.int8, device=device),
                            torch.ones(out_features * in_features // group_size, device=device), group_size,
                            dtype=dtype or torch.float32)
        self.weight = nn.Parameter(weight, requires_grad=bool(track_weight_grad))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype or torch.float32)) if bias else None

    @property
    def scale(self) -> Tensor:
        """The weight's float32 group scales (``weight.scale``; the ``scale`` entry of the state dict)."""
        return self._parameters["weight"].scale

    @property
    def track_weight_grad(self) -> bool:
        return self._parameters["weight"].requires_grad

    @track_weight_grad.setter
    def track_weight_grad(self, value: bool) -> None:
        self._parameters["weight"].requires_grad_(bool(value))

    # -- state dict: the plain int8 tensor and its scales, the format of every earlier version -----------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        weight = self._parameters["weight"]
        if isinstance(weight, Int8Weight):
            destination[prefix + "weight"] = weight.qdata if keep_vars else weight.qdata.detach()
            destination[prefix + "scale"] = weight.scale if keep_vars else weight.scale.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # load_state_dict would cast silently (a float weight truncated into int8, scales of another group size):
        # refuse instead, naming the entry. Runs before any tensor of this module is copied.
        weight = self._parameters["weight"]
        w, sc = state_dict.get(prefix + "weight"), state_dict.get(prefix + "scale")
        if isinstance(w, Int8Weight):  # a state dict kept with keep_vars, or built from parameters
            w, sc = w.qdata, w.scale if sc is None else sc
        if w is not None and (w.dtype != torch.int8 or tuple(w.shape) != tuple(weight.shape)):
            raise ValueError(f"{prefix}weight must be int8 of shape {tuple(weight.shape)}, got {w.dtype} "
                             f"{tuple(w.shape)} (quantize float weights with Int8Linear.from_linear)")
        if sc is not None and (sc.dtype != torch.float32 or sc.numel() != weight.scale.numel()
                               or not bool(torch.isfinite(sc).all()) or not bool((sc > 0).all())):
            raise ValueError(f"{prefix}scale must hold {weight.scale.numel()} positive finite float32 values (one "
                             f"per group of {self.group_size}), got {sc.dtype} with {sc.numel()} values")
        if (w is None) != (sc is None):
            raise ValueError(f"{prefix}weight and {prefix}scale load together (the int8 values mean nothing "
                             f"without their scales); the state dict holds only {prefix}{'weight' if sc is None else 'scale'}")
        rest = {k: v for k, v in state_dict.items() if k not in (prefix + "weight", prefix + "scale")}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if w is None:
            missing_keys.append(prefix + "scale")  # (weight is reported missing by nn.Module)
            return
        missing_keys[:] = [k for k in missing_keys if k != prefix + "weight"]
        if local_metadata.get("assign_to_params_buffers", False):
            new = Int8Weight(w, sc.reshape(weight.scale.shape), self.group_size, dtype=weight.dtype,
                             sr_state=weight.sr_state)
            self.weight = nn.Parameter(new, requires_grad=weight.requires_grad)
        else:
            with torch.no_grad():
                weight.qdata.copy_(w)
                weight.scale.copy_(sc.reshape(weight.scale.shape))

    @staticmethod
    def check_options(group_size: int = 128, track_weight_grad: bool = True) -> None:
        """Check the options of :meth:`from_linear` that do not depend on a layer's shape (weightkit.swap checks
        them once, before it replaces any layer); raises ValueError naming the option."""
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be an int >= 1, got {group_size!r}")

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128, track_weight_grad: bool = True) -> "Int8Linear":
        """Quantize ``linear``'s weight to int8 (round to nearest, absmax scale per group); the weight presents
        ``linear``'s dtype. The constructor checks group_size (check_options) and that it divides in_features."""
        w = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size, device=w.device,
                    dtype=w.dtype, track_weight_grad=track_weight_grad)
        q, scale = _quantize_nearest(w, group_size)
        layer.weight.qdata.copy_(q)
        layer.weight.scale.copy_(scale)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    def _apply(self, fn, recurse=True):
        # nn.Module._apply swaps every tensor-subclass parameter for a new one, even when ``fn`` changes nothing
        # (``.to(device)`` on the device it is on, as Trainer does): the swap would drop hooks registered on the weight
        # (a layer-wise optimizer's post-accumulate-grad hook). Keep the weight when it stays; swap it (as nn.Module
        # does, same Python object, gradient moved with it) only when it moves or changes dtype.
        params = self._parameters
        weight = params.get("weight")
        if not isinstance(weight, Int8Weight):
            return super()._apply(fn, recurse)
        applied = fn(weight)
        order = list(params)
        del params["weight"]
        try:
            super()._apply(fn, recurse)
        finally:
            rest = dict(params)
            params.clear()
            params.update((k, weight if k == "weight" else rest[k]) for k in order)
        if applied is not weight:
            grad = weight.grad
            torch.utils.swap_tensors(weight, nn.Parameter(applied, requires_grad=weight.requires_grad))
            if grad is not None:
                weight.grad = fn(grad)
        return self

    def dequantized_weight(self) -> Tensor:
        """float32 W = qdata * scale."""
        w = self._parameters["weight"]
        return dequantize_int8(w.qdata, w.scale, w.group_size)

    def forward(self, x: Tensor) -> Tensor:
        # the tensors from nn.Module's dicts directly: its __getattr__ costs ~0.4 us per parameter or buffer
        params = self._parameters
        weight, bias = params["weight"], params.get("bias")
        if x.is_floating_point() and torch.is_autocast_enabled(x.device.type):
            # the custom Function is invisible to autocast: cast as autocast casts nn.Linear's input (bf16/fp16),
            # so activations, what backward saves and the weight gradient's GEMM match nn.Linear's
            dtype = torch.get_autocast_dtype(x.device.type)
            if x.dtype != dtype:
                x = x.to(dtype)
        if weight.requires_grad and torch.is_grad_enabled():
            y = _Int8LinearFunction.apply(x, weight)
        else:  # differentiable in x on its own
            y = int8_matmul(x, weight.qdata, weight.scale, weight.group_size)
        return add_bias(y, bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"group_size={self.group_size}")
