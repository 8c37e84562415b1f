"""Argument checks shared by all ops: each error names the argument and says what was expected.

Shape/dtype/device checks read only metadata: they always run, in the fake (meta) implementations too, so
``torch.compile`` reports bad input at trace time. Checks that read the data (NaN/Inf in inputs, positive scales,
index ranges) need the values on the host, i.e. a host-device synchronization per call on a GPU, which stalls
the launch queue: they are off by default and opt-in as debug checks (except in ops that overwrite state in place,
``int8_sr_update_``, where a NaN would destroy the weight in place: on by default there for CPU tensors, where it
costs no sync; on a GPU its callers check, as the optimizers do), with :func:`debug_checks` (a context
manager), :func:`set_debug_checks` (a switch) or ``WEIGHTKIT_DEBUG_CHECKS=1`` (``WEIGHTKIT_CHECK_FINITE=1``, its
former name, works too; read at import). Training state stays safe without them: the optimizers check the
gradients they use once per ``step()`` (one sync) before changing anything, and the layers validate their stored
tensors when they are built or loaded. That guard (``nonfinite='raise' | 'skip'``) is not a debug check: switching
debug checks off (here or with ``WEIGHTKIT_DEBUG_CHECKS=0``) never turns it off.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterable, List, Optional, Sequence

import torch

from ..backend import _ENV

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(
    name: str,
    t,
    *,
    dtypes: Optional[Sequence[torch.dtype]] = None,
    ndim: Optional[int] = None,
    device: Optional[torch.device] = None,
    nonempty: bool = True,
    min_ndim: Optional[int] = None,
) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in ({_dtype_names(dtypes)}), got {str(t.dtype).replace('torch.', '')}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension{'s' * (min_ndim > 1)}, got shape "
                         f"{tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other inputs are on {device}")
    if nonempty and t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")


def check_flag(name: str, t, device: torch.device) -> None:
    """An optional device-side scalar of the optimizer steps (``found_inf``, ``step_size_t``): None, or a one-element
    float32 tensor on ``device``."""
    if t is None:
        return
    check_tensor(name, t, dtypes=(torch.float32,), device=device)
    if t.numel() != 1:
        raise ValueError(f"{name} must hold one value, got shape {tuple(t.shape)}")


_DEBUG: contextvars.ContextVar[Optional[bool]] = contextvars.ContextVar("weightkit_debug_checks", default=None)


def debug_checks_enabled(default: bool = False) -> bool:
    """Whether the data-reading checks run (see the module docstring): the innermost :func:`debug_checks` /
    :func:`set_debug_checks` setting, else ``WEIGHTKIT_DEBUG_CHECKS`` (or ``WEIGHTKIT_CHECK_FINITE``) when set,
    else ``default`` (False, except for ops that overwrite state in place)."""
    forced = _DEBUG.get()
    if forced is not None:
        return forced
    env = _ENV["debug"]  # read at import (weightkit.backend.reload_env re-reads it)
    if env is None:
        return default
    return env == "1"


@contextlib.contextmanager
def debug_checks(enabled: bool = True):
    """Turn the data-reading checks on (or off) inside a block: ``with weightkit.debug_checks(): ...``."""
    token = _DEBUG.set(bool(enabled))
    try:
        yield
    finally:
        _DEBUG.reset(token)


def set_debug_checks(enabled: Optional[bool]) -> None:
    """Switch the ops' data-reading checks on or off for the current context (``None``: back to the environment).
    The optimizers' NaN/Inf guard is not one of them and stays on (see the module docstring)."""
    _DEBUG.set(None if enabled is None else bool(enabled))


def check_finite(name: str, t: torch.Tensor, default: bool = False) -> None:
    """The NaN/Inf debug check of ``t``, when debug checks are on (see :func:`debug_checks_enabled`)."""
    if debug_checks_enabled(default):
        require_finite(name, t)


def require_finite(name: str, t: torch.Tensor) -> None:
    # one reduction and one sync: a finite sum proves every element finite (see finite_flags)
    if t.is_floating_point() and t.numel() and not finite_flags([t])[0]:
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name} contains {bad} non-finite value(s) (NaN or Inf)")


def finite_flags(tensors: Sequence[torch.Tensor]) -> List[bool]:
    """Whether each tensor is free of NaN/Inf, with one host sync in the common (all finite) case.

    A finite sum proves every element finite (NaN and Inf propagate through addition in any order), so the fast
    path reduces each tensor to one sum and syncs once. A non-finite total, which finite values can also give by
    overflow, is confirmed element-wise, tensor by tensor."""
    sums = [t.sum(dtype=torch.promote_types(t.dtype, torch.float32)) for t in tensors if t.numel()]
    if not sums:
        return [True] * len(tensors)
    if len(sums) == 1:
        total = sums[0]
    else:
        dev = sums[0].device
        total = torch.stack([s.to(dev, torch.float64) for s in sums]).sum()
    if bool(total.isfinite()):
        return [True] * len(tensors)
    return [bool(torch.isfinite(t).all()) for t in tensors]


def exact_div(t: torch.Tensor, divisor: float) -> torch.Tensor:
    """``t / divisor`` correctly rounded on every device. On CUDA, torch divides by a Python (CPU) scalar as
    ``t * (1 / divisor)``, two roundings that can differ from the division in the last bit; the kernels divide
    (IEEE, no fma), so the reference must too to be bit-identical with them on a GPU. A one-element tensor on
    ``t``'s device (a fill, no host copy) makes torch run the true division."""
    if t.device.type == "cpu":
        return t / divisor
    return t / torch.full((), divisor, dtype=t.dtype, device=t.device)


def rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a 2-D (rows, last dimension) view, without a reshape call when it is 2-D already (a reshape costs
    about a microsecond of host time, as much as a decode-size kernel)."""
    return t if t.dim() == 2 else t.reshape(-1, t.shape[-1])


def check_positive_int(name: str, value, *, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
