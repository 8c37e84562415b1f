"""Backend discovery and selection.

Every op in weightkit has a plain-PyTorch ``reference`` implementation (always present, the specification)
and up to three accelerated ones:

* ``cpu``    -- C++ kernels compiled into ``weightkit._C`` (CPU tensors; host code in weightkit/backends/cpu),
* ``cuda``   -- CUDA kernels in ``weightkit/lib/libweightkit_cuda.so``, opened by weightkit._C (CUDA tensors; built
  when nvcc was found at install time, shipped in the CUDA wheel; host code in weightkit/backends/cuda),
* ``triton`` -- Triton kernels in ``weightkit.kernels`` (CUDA tensors; CPU tensors only under
  ``TRITON_INTERPRET=1``, which is how the test-suite exercises them without a GPU; host code in
  weightkit/backends/triton).

``auto`` (the default) picks the best usable backend for the tensors' device. ``WEIGHTKIT_BACKEND`` or the
:func:`use_backend` context manager force one; a forced backend that cannot run falls back to ``reference``
with one warning that says why.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import warnings
import weakref
from typing import Callable, Dict, Optional, Tuple

import torch

from . import native

BACKENDS = ("reference", "cpu", "cuda", "triton")
_CHOICES = ("auto",) + BACKENDS

# ---------------------------------------------------------------------------------------------------------
# What loaded, and why not (weightkit._C and the CUDA kernel library are loaded by weightkit.native).

if native.CPU is None and os.environ.get("WEIGHTKIT_DISABLE_EXTENSION") != "1":
    warnings.warn(
        f"weightkit: compiled kernels unavailable: {native.CPU_ERROR}. The 'cpu' and 'cuda' backends are off and ops "
        "use triton/reference.",
        RuntimeWarning,
        stacklevel=2,
    )
elif native.CUDA is None and os.path.exists(os.path.join(native.LIB_DIR, native.CUDA_LIB)):
    warnings.warn(f"weightkit: {native.CUDA_ERROR}; the 'cuda' backend is unavailable", RuntimeWarning, stacklevel=2)


def _probe_triton() -> Tuple[bool, Optional[str]]:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        return False, f"{type(exc).__name__}: {exc}"
    return True, None


_TRITON_OK, _TRITON_ERROR = _probe_triton()


def extension_loaded() -> bool:
    """Whether weightkit._C, with the CPU kernels (the ``cpu`` backend), loaded."""
    return native.CPU is not None


def extension_has_cuda() -> bool:
    """Whether the CUDA kernel library (the ``cuda`` backend) loaded; it may still not fit the GPU (see status())."""
    return native.CUDA is not None


# Environment settings, read once (at import and by reload_env()): os.environ lookups cost ~1.5 us each, and an
# op call would need four. Change them at run time with use_backend() / weightkit.debug_checks(), or set the
# variables and call reload_env().
_ENV: Dict[str, Optional[str]] = {}
_TABLES: "weakref.WeakSet[KernelTable]" = weakref.WeakSet()


def reload_env() -> None:
    """Re-read WEIGHTKIT_BACKEND, TRITON_INTERPRET and WEIGHTKIT_DEBUG_CHECKS (WEIGHTKIT_CHECK_FINITE)."""
    _ENV["backend"] = os.environ.get("WEIGHTKIT_BACKEND", "auto") or "auto"
    _ENV["interpret"] = os.environ.get("TRITON_INTERPRET")
    _ENV["debug"] = os.environ.get("WEIGHTKIT_DEBUG_CHECKS", os.environ.get("WEIGHTKIT_CHECK_FINITE")) or None
    for table in _TABLES:  # their choices depend on the backend and interpreter settings
        table._chosen.clear()


reload_env()


def triton_interpret() -> bool:
    return _ENV["interpret"] == "1"


def status() -> Dict[str, str]:
    """One line per backend: 'ok' or why it is unavailable (used by ``python -m weightkit info``)."""
    out = {"reference": "ok (always present)"}
    if native.CPU is None:
        out["cpu"] = f"unavailable: {native.CPU_ERROR}"
    else:
        out["cpu"] = f"ok ({native.CPU_PATH}, up to torch.get_num_threads() = {torch.get_num_threads()} threads)"
    if native.CUDA is None:
        out["cuda"] = f"unavailable: {native.CUDA_ERROR}"
    else:
        built = f"sm_{', sm_'.join(native.CUDA_ARCHS)} + PTX"
        if not torch.cuda.is_available():
            out["cuda"] = f"built ({built}), but no CUDA device is visible"
        else:
            reason = native.cuda_why_not(torch.device("cuda", torch.cuda.current_device()))
            out["cuda"] = f"ok ({built})" if reason is None else f"unavailable: {reason}"
    if not _TRITON_OK:
        out["triton"] = f"unavailable: {_TRITON_ERROR}"
    elif torch.cuda.is_available():
        out["triton"] = "ok"
    elif triton_interpret():
        out["triton"] = "ok on CPU through the interpreter (TRITON_INTERPRET=1; slow, for testing)"
    else:
        out["triton"] = "installed, but no GPU (set TRITON_INTERPRET=1 to run kernels on CPU for testing)"
    return out


# ---------------------------------------------------------------------------------------------------------
# Forcing a backend.

_FORCED: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("weightkit_backend", default=None)


def _validate(name: str, what: str) -> str:
    if name not in _CHOICES:
        raise ValueError(f"{what}={name!r} is not a weightkit backend; choose one of {', '.join(_CHOICES)}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Force every weightkit op inside the block to use ``name`` ('auto' restores the automatic choice)."""
    token = _FORCED.set(_validate(name, "backend"))
    try:
        yield
    finally:
        _FORCED.reset(token)


def requested_backend() -> str:
    forced = _FORCED.get()
    if forced is not None:
        return forced
    return _validate(_ENV["backend"], "WEIGHTKIT_BACKEND")


_WARNED: set = set()


def _warn_once(key: tuple, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


# ---------------------------------------------------------------------------------------------------------
# Per-op implementation tables.


class KernelTable:
    """The implementations of one op, keyed by backend, and the rule that picks one for a device.

    The implementations are the functions of weightkit/backends/<name>/ (and the reference in weightkit/ops); the
    table knows whether each backend can run on a device (weightkit.native: whether the compiled kernels loaded and
    fit the GPU; Triton: importable, on a GPU or under the interpreter). This is the one place that chooses.
    """

    def __init__(self, name: str, cuda_order: Tuple[str, ...] = ("cuda", "triton")):
        self.name = name
        self.cuda_order = cuda_order
        self.impls: Dict[str, Callable] = {}
        # (forced backend or None, device) -> (backend name, implementation); cleared by reload_env()
        self._chosen: Dict[tuple, Tuple[str, Callable]] = {}
        _TABLES.add(self)

    def register(self, backend: str):
        _validate(backend, "backend")

        def deco(fn: Callable) -> Callable:
            self.impls[backend] = fn
            self._chosen.clear()
            return fn

        return deco

    def why_not(self, backend: str, device: torch.device) -> Optional[str]:
        """None when ``backend`` can run this op on ``device``, else the reason it cannot."""
        if backend not in self.impls:
            return f"{self.name} has no {backend} implementation"
        if backend == "reference":
            return None
        if backend == "cpu":
            if device.type != "cpu":
                return f"the cpu backend runs CPU tensors, got {device.type}"
            if native.CPU is None:
                return f"CPU kernels not loaded ({native.CPU_ERROR})"
            return None
        if backend == "cuda":
            if device.type != "cuda":
                return f"the cuda backend runs CUDA tensors, got {device.type}"
            reason = native.cuda_why_not(device)
            return None if reason is None else f"CUDA kernel library unusable ({reason})"
        if backend == "triton":
            if not _TRITON_OK:
                return f"triton not importable ({_TRITON_ERROR})"
            if device.type == "cuda" or (device.type == "cpu" and triton_interpret()):
                return None
            return f"triton needs a CUDA tensor (or TRITON_INTERPRET=1 for CPU), got {device.type}"
        return f"unknown backend {backend}"

    def select(self, device: torch.device) -> str:
        return self._lookup(device)[0]

    def _lookup(self, device: torch.device) -> Tuple[str, Callable]:
        # The answer depends only on the forced backend, the device and the environment (the kernel libraries and
        # triton are probed once; reload_env() clears this cache): cached, since the probing costs tens of
        # microseconds per call, comparable to a small kernel, and even building a longer key costs ~0.5 us.
        key = (_FORCED.get(), device)
        found = self._chosen.get(key)
        if found is None:
            name = self._select(requested_backend(), device)
            found = self._chosen[key] = (name, self.impls[name])
        return found

    def _select(self, requested: str, device: torch.device) -> str:
        if requested == "auto":
            order = self.cuda_order if device.type == "cuda" else ("cpu",)
            for backend in order:
                if self.why_not(backend, device) is None:
                    return backend
            return "reference"
        reason = self.why_not(requested, device)
        if reason is None:
            return requested
        _warn_once(
            (self.name, requested, device.type),
            f"weightkit: backend {requested!r} cannot run {self.name} on {device.type}: {reason}; using 'reference'",
        )
        return "reference"

    def __call__(self, device: torch.device, *args, **kwargs):
        found = self._chosen.get((_FORCED.get(), device))
        if found is None:
            found = self._lookup(device)
        return found[1](*args, **kwargs)

    def run(self, *args):
        """The implementation for the device of the first argument (a tensor), called with ``args``."""
        device = args[0].device
        found = self._chosen.get((_FORCED.get(), device))
        if found is None:
            found = self._lookup(device)
        return found[1](*args)
