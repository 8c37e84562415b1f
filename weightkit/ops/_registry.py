"""Defining a weightkit op: one :func:`define` call per op gives ``torch.ops.weightkit.<name>``.

``define(schema, table=..., check=..., fake=..., backward=..., setup_context=...)`` registers, with
``torch.library.Library(...).define`` + ``.impl`` + ``register_fake`` (a few microseconds per call less than
``torch.library.custom_op``: about 6 vs 11 us per call in pytorch/pytorch#177109):

* the schema; a ``Tensor(a!)`` argument is mutated in place: its version counter is bumped after each call (the
  kernels write through data pointers, which autograd does not see), and ``torch.compile`` functionalizes the op
  from the schema alone;
* one eager kernel for every device (``CompositeExplicitAutograd``): ``check(*args)`` (shape / dtype / device
  checks, metadata only: always), ``debug_check(*args)`` (checks that read the data, i.e. a host sync on a GPU:
  only when :func:`weightkit.debug_checks` is on, see ``_checks``), then the implementation, usually a
  :class:`~weightkit.backend.KernelTable` that picks the reference / cpu / cuda / triton backend;
* the fake (meta) kernel: the same ``check``, then ``fake(*args)`` (output metadata), so ``torch.compile`` reports
  bad input at trace time;
* for differentiable ops, a Python kernel on the ``Autograd`` key that runs an autograd.Function built from
  ``setup_context(ctx, inputs, output)`` and ``backward(ctx, *grads)`` (``torch.library.register_autograd``'s
  conventions; ``backward`` returns one gradient or None per input) when a gradient is needed. The backend forced
  in forward (``use_backend``, a ContextVar) is recorded on the autograd context and forced again around
  ``backward``: autograd runs a CUDA backward on its own device thread, where the forward's ContextVar is unset, so
  without this a forced forward would be followed by an ``auto`` backward. (Under ``torch.compile`` the backend
  is chosen when the compiled graph runs, in the thread that runs it.)

Host cost of a call, and the one shortcut. Through the dispatcher (``torch.ops.weightkit.<name>.default``), a call
crosses from C++ into Python once: the first Python kernel (the Autograd kernel of differentiable ops, else the
eager kernel) receives the call's dispatch key set, and when only the device key (CPU or CUDA) lies below autograd
it runs the eager kernel (or the autograd.Function, whose forward does the same) directly instead of
redispatching. That crossing costs ~2 us, as much as the kernel of a decode-size matmul, so :func:`define` returns
a Python callable, used by weightkit's own functions, that skips the dispatcher when the dispatcher could only have
taken that plain path: no ``torch.compile`` tracing, no TorchDispatchMode or TorchFunctionMode, no functorch
transform (vmap, grad, ...) active, and every tensor argument an exact ``torch.Tensor`` / ``nn.Parameter`` (no
FakeTensor, FunctionalTensor, DTensor, other subclass) on a CPU or CUDA device. It then calls the same eager kernel
(or, when a gradient is needed, the same autograd.Function): same checks, same kernels, same autograd graph. The
tests compare both paths and check that modes, compile and fake tensors still see the op. The state it reads is
only visible through four ``torch._C`` functions; where one is missing (another torch version), every call goes
through the dispatcher.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from ..backend import _FORCED, KernelTable
from ._checks import debug_checks_enabled

__all__ = ["define"]

_LIB = torch.library.Library("weightkit", "FRAGMENT")

# The dispatch keys below autograd (what torch.library.register_autograd redispatches to), and the key sets below
# autograd of a call on plain CPU or CUDA tensors, as raw integers (one set lookup per call).
_BELOW_AUTOGRAD = torch._C._after_autograd_keyset
_PLAIN = frozenset(torch._C.DispatchKeySet(k).raw_repr() for k in (torch._C.DispatchKey.CPU, torch._C.DispatchKey.CUDA))
_below_autograd_dispatch = torch._C._AutoDispatchBelowAutograd

# What the dispatcher would see beyond the arguments (see the module docstring).
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)
_is_compiling = torch.compiler.is_compiling
_STATE_PROBES = tuple(getattr(torch._C, name, None) for name in (
    "_len_torch_dispatch_stack", "_are_functorch_transforms_active", "_is_torch_function_mode_enabled"))
FAST_PATH = all(_STATE_PROBES)  # tests switch it off to run every call through the dispatcher
_dispatch_modes, _functorch_active, _function_modes = _STATE_PROBES if FAST_PATH else (None, None, None)


def _no_check(*args) -> None:
    return None


def define(schema: str, *, fake: Callable, table: Optional[KernelTable] = None, impl: Optional[Callable] = None,
           check: Callable = _no_check, debug_check: Optional[Callable] = None, debug_default: bool = False,
           backward: Optional[Callable] = None, setup_context: Optional[Callable] = None,
           empty: Optional[Callable] = None) -> Callable:
    """Define ``weightkit::<schema>`` once (see the module docstring).

    Args:
        schema: ``"name(Tensor x, ..., SymInt n) -> Tensor"``; ``Tensor(a!)`` marks an argument mutated in place.
        fake: output metadata from the arguments (FakeTensors / meta tensors), called after ``check``.
        table: the op's implementations; called with the op's arguments, on the device of the first one.
        impl: instead of ``table``, the implementation, called with the op's arguments after the checks.
        check: metadata checks (shapes, dtypes, devices, int ranges); raise with a message naming the argument.
        debug_check: data-reading checks (NaN, ranges); run only when ``debug_checks_enabled(debug_default)``.
        backward, setup_context: the autograd formula (``torch.library.register_autograd`` conventions).
        empty: ``empty(*args)``, true for a call without tokens (an empty batch, which nn.Linear takes): after the
            checks, no kernel runs and the result is ``fake``'s with every value zero (an empty output; zero
            gradients of the operands the tokens would have summed into).

    Returns:
        the op as a Python callable with the schema's positional arguments; ``.overload`` is
        ``torch.ops.weightkit.<name>.default``.
    """
    name = schema.split("(", 1)[0].strip()
    if impl is None:
        impl = table.run
    _LIB.define(schema)
    overload = getattr(torch.ops.weightkit, name).default
    args_schema = overload._schema.arguments
    mutated = tuple(i for i, a in enumerate(args_schema) if a.alias_info is not None and a.alias_info.is_write)
    tensor_args = tuple(i for i, a in enumerate(args_schema) if a.type.isSubtypeOf(torch._C.TensorType.get()))
    # The dispatcher hands a Python kernel the arguments as the caller gave them, less trailing ones left at their
    # defaults: those are filled in here, so every kernel, check and autograd formula sees the whole schema
    n_args, defaults = len(args_schema), tuple(a.default_value for a in args_schema)

    def eager(*args):
        if len(args) < n_args:
            args = (*args, *defaults[len(args):])
        check(*args)
        if empty is not None and empty(*args):
            return torch.utils._pytree.tree_map_only(torch.Tensor, torch.Tensor.zero_, fake(*args))
        if debug_check is not None and debug_checks_enabled(debug_default):
            debug_check(*args)
        if not mutated:
            return impl(*args)
        impl(*args)  # mutating ops return nothing
        torch.autograd.graph.increment_version([args[i] for i in mutated])

    eager.__name__ = eager.__qualname__ = f"{name}_eager"
    _LIB.impl(name, eager, "CompositeExplicitAutograd")

    def fake_kernel(*args):
        if len(args) < n_args:
            args = (*args, *defaults[len(args):])
        check(*args)
        return fake(*args)

    torch.library.register_fake(overload, fake_kernel, lib=_LIB)
    apply = None if backward is None else _define_autograd(name, overload, eager, tensor_args, backward,
                                                           setup_context, n_args, defaults)
    return _python_entry(name, overload, eager, apply, tensor_args)


def _define_autograd(name: str, overload, eager: Callable, tensor_args: Sequence[int], backward: Callable,
                     setup_context: Optional[Callable], n_args: int, defaults: tuple) -> Callable:
    """Registers the Autograd kernel; returns the autograd.Function's ``apply(below, *args)`` (``below``: the key
    set to redispatch to, None for plain tensors)."""
    plain, below_autograd, grad_enabled = _PLAIN, _BELOW_AUTOGRAD, torch.is_grad_enabled

    forced_now = _FORCED.get

    def forward(ctx, below, *args):
        if below is None or below.raw_repr() in plain:
            out = eager(*args)
        else:
            with _below_autograd_dispatch():
                out = overload.redispatch(below, *args)
        if setup_context is not None:
            setup_context(ctx, args, out)
        ctx.weightkit_backend = forced_now()
        return out

    def backward_fn(ctx, *grads):
        # The backend forced in forward (use_backend) is a ContextVar of the forward's thread; autograd runs a CUDA
        # backward on its own device thread, where it is unset: re-enter it here so that backward runs the same
        # backend. Unforced forwards leave the choice to the backward's own context (auto, or a use_backend there).
        forced = ctx.weightkit_backend
        if forced is None or forced == forced_now():
            return (None, *backward(ctx, *grads))
        token = _FORCED.set(forced)
        try:
            return (None, *backward(ctx, *grads))
        finally:
            _FORCED.reset(token)

    apply = type(f"{name}_autograd", (torch.autograd.Function,),
                 {"forward": staticmethod(forward), "backward": staticmethod(backward_fn)}).apply

    def autograd_kernel(keyset, *args):
        if len(args) < n_args:  # (trailing defaults, as in eager)
            args = (*args, *defaults[len(args):])
        below = keyset & below_autograd
        if grad_enabled():
            for i in tensor_args:
                if args[i].requires_grad:
                    return apply(below, *args)
        if below.raw_repr() in plain:
            return eager(*args)
        with _below_autograd_dispatch():
            return overload.redispatch(below, *args)

    autograd_kernel.__name__ = autograd_kernel.__qualname__ = f"{name}_autograd_kernel"
    _LIB.impl(name, autograd_kernel, "Autograd", with_keyset=True)
    return apply


def _python_entry(name: str, overload, eager: Callable, apply: Optional[Callable], tensor_args: Sequence[int]):
    grad_enabled, first = torch.is_grad_enabled, tensor_args[0]

    def op(*args):
        if FAST_PATH and not (_is_compiling() or _dispatch_modes() or _functorch_active() or _function_modes()):
            grad = grad_enabled()
            needs_grad = False
            for i in tensor_args:
                t = args[i]
                if type(t) not in _PLAIN_TYPES:
                    return overload(*args)
                if grad and t.requires_grad:
                    needs_grad = True
            if args[first].is_cpu or args[first].is_cuda:  # (the other tensors' devices are checked by the op)
                if not needs_grad:
                    return eager(*args)
                if apply is not None:
                    return apply(None, *args)
        return overload(*args)

    op.__name__ = op.__qualname__ = name
    op.overload = overload
    return op
