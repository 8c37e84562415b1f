"""Defining a weightkit op: one :func:`define` call per op gives ``torch.ops.weightkit.<name>``.

``define(schema, impl=..., check=..., fake=..., backward=..., setup_context=...)`` registers, with
``torch.library.Library(...).define`` + ``.impl`` (a few microseconds per call less than ``torch.library.custom_op``,
see /work/shared/GPU-KERNELS.md section 7):

* the schema; a ``Tensor(a!)`` argument is mutated in place: its version counter is bumped after each call, so that
  autograd notices the change, and ``torch.compile`` functionalizes the op from the schema alone;
* one eager kernel for every device (``CompositeExplicitAutograd``): ``check(*args)`` (shape / dtype / device
  checks, metadata only: always), ``debug_check(*args)`` (checks that read the data, i.e. a host sync on a GPU:
  only when :func:`weightkit.debug_checks` is on, see ``_checks``), then ``impl(*args)``, usually a
  :class:`~weightkit.backend.KernelTable` that picks the reference / cpu / cuda / triton implementation;
* the fake (meta) kernel: the same ``check`` then ``fake(*args)``, so ``torch.compile`` reports bad input at trace
  time;
* for differentiable ops, one Python kernel on the ``Autograd`` key: when a gradient is needed it runs an
  autograd.Function built from ``setup_context(ctx, inputs, output)`` and ``backward(ctx, *grads)`` (the
  conventions of ``torch.library.register_autograd``; ``backward`` returns one gradient or None per input).

Cost of a call. The op is called through the dispatcher (``torch.ops.weightkit.<name>.default``) in every mode:
eager, no-grad, training, ``torch.compile``, ``torch.func``, under dispatch modes. The only shortcut is the one the
dispatcher allows: the Python kernel that runs first (the Autograd kernel for differentiable ops, the eager kernel
otherwise) receives the dispatch key set of the call, and when nothing but the device key (CPU or CUDA) lies below
autograd -- plain tensors, no FakeTensor / functionalization / dispatch mode / functorch layer -- it calls the eager
kernel directly instead of redispatching, and the autograd.Function's forward does the same. So an eager call
crosses from C++ into Python once, with one set of checks.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from ..backend import KernelTable
from ._checks import debug_checks_enabled

__all__ = ["define"]

_LIB = torch.library.Library("weightkit", "FRAGMENT")

# The dispatch keys below autograd (what torch.library.register_autograd redispatches to), and the key sets below
# autograd of a call on plain CPU or CUDA tensors, as raw integers (a set lookup per call).
_BELOW_AUTOGRAD = torch._C._after_autograd_keyset
_PLAIN = frozenset(torch._C.DispatchKeySet(k).raw_repr() for k in (torch._C.DispatchKey.CPU, torch._C.DispatchKey.CUDA))


def define(schema: str, *, fake: Callable, table: Optional[KernelTable] = None, impl: Optional[Callable] = None,
           check: Optional[Callable] = None,
           debug_check: Optional[Callable] = None, debug_default: bool = False, backward: Optional[Callable] = None,
           setup_context: Optional[Callable] = None) -> torch._ops.OpOverload:
    """Define ``weightkit::<schema>`` once (see the module docstring) and return its handle
    ``torch.ops.weightkit.<name>.default``.

    Args:
        schema: ``"name(Tensor x, ..., SymInt n) -> Tensor"``; ``Tensor(a!)`` marks an argument mutated in place.
        table: the op's implementations; called with the op's arguments, on the device of the first one.
        impl: instead of ``table``, the implementation, called with the op's arguments after the checks.
        fake: output metadata from the arguments (FakeTensors / meta tensors), after ``check``.
        check: metadata checks (shapes, dtypes, devices, int ranges); raise with a message naming the argument.
        debug_check: data-reading checks (NaN, ranges); run only when ``debug_checks_enabled(debug_default)``.
        backward, setup_context: autograd formula (``torch.library.register_autograd`` conventions).
    """
    name = schema.split("(", 1)[0].strip()
    if impl is None:
        impl = lambda *args: table(args[0].device, *args)  # noqa: E731
    _LIB.define(schema)
    overload = getattr(torch.ops.weightkit, name).default
    args_schema = overload._schema.arguments
    mutated = tuple(i for i, a in enumerate(args_schema) if a.alias_info is not None and a.alias_info.is_write)
    tensor_args = tuple(i for i, a in enumerate(args_schema) if a.type.isSubtypeOf(torch._C.TensorType.get()))

    def eager(*args):
        if check is not None:
            check(*args)
        if debug_check is not None and debug_checks_enabled(debug_default):
            debug_check(*args)
        out = impl(*args)
        if mutated:  # the kernels write through data pointers, which autograd's version counters do not see
            torch.autograd.graph.increment_version([args[i] for i in mutated])
        return out

    eager.__name__ = eager.__qualname__ = f"{name}_eager"
    _LIB.impl(name, eager, "CompositeExplicitAutograd")

    def fake_kernel(*args):
        if check is not None:
            check(*args)
        return fake(*args)

    torch.library.register_fake(overload, fake_kernel, lib=_LIB)

    if backward is not None:
        _define_autograd(name, overload, eager, tensor_args, backward, setup_context)
    return overload


def _define_autograd(name: str, overload, eager: Callable, tensor_args: Sequence[int], backward: Callable,
                     setup_context: Optional[Callable]) -> None:
    plain, below_autograd = _PLAIN, _BELOW_AUTOGRAD
    grad_enabled = torch.is_grad_enabled

    def run_below(below, args):
        if below.raw_repr() in plain:
            return eager(*args)
        with torch._C._AutoDispatchBelowAutograd():
            return overload.redispatch(below, *args)

    def forward(ctx, below, *args):
        out = run_below(below, args)
        if setup_context is not None:
            setup_context(ctx, args, out)
        return out

    def backward_fn(ctx, *grads):
        return (None, *backward(ctx, *grads))

    function = type(f"{name}_autograd", (torch.autograd.Function,),
                    {"forward": staticmethod(forward), "backward": staticmethod(backward_fn)})
    apply = function.apply

    def autograd_kernel(keyset, *args):
        below = keyset & below_autograd
        if grad_enabled():
            for i in tensor_args:
                if args[i].requires_grad:
                    return apply(below, *args)
        return run_below(below, args)

    autograd_kernel.__name__ = autograd_kernel.__qualname__ = f"{name}_autograd_kernel"
    _LIB.impl(name, autograd_kernel, "Autograd", with_keyset=True)
