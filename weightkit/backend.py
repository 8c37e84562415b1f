"""Backend discovery and selection.

Every op in weightkit has a plain-PyTorch ``reference`` implementation (always present, the specification)
and up to three accelerated ones:

* ``cpu``    -- C++ kernels compiled into ``weightkit._C`` (CPU tensors; host code in weightkit/backends/cpu),
* ``cuda``   -- CUDA kernels in ``weightkit/lib/libweightkit_cuda.so``, opened by weightkit._C (CUDA tensors; built
  when nvcc was found at install time, shipped in the CUDA wheel; host code in weightkit/backends/cuda),
* ``triton`` -- Triton kernels in ``weightkit.kernels`` (CUDA tensors; CPU tensors only under
  ``TRITON_INTERPRET=1``, which is how the test-suite exercises them without a GPU; host code in
  weightkit/backends/triton).

``auto`` (the default) picks the best usable backend for the tensors' device: ``cpu`` for CPU tensors; on a GPU,
for ops whose table names a *regime* (the shape class of a call: token count rounded up to a power of two, sizes,
dtypes), the backend measured fastest for that regime on this GPU model (see "Measured choice" below), else the
first usable one of the table's ``cuda_order``. ``WEIGHTKIT_BACKEND`` or the :func:`use_backend` context manager
force one; a forced backend that cannot run falls back to ``reference`` with one warning that says why.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import math
import os
import re
import threading
import warnings
import weakref
from typing import Callable, Dict, List, Optional, Tuple

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
elif native.CUDA is None and native.cuda_lib_expected():
    warnings.warn(f"weightkit: {native.CUDA_ERROR}; the 'cuda' backend is unavailable", RuntimeWarning, stacklevel=2)


# The oldest Triton release the kernels of weightkit.kernels are compiled for sm_90 and tested with (in its
# interpreter) by scripts/check_triton.sh; the GPU image has 3.6 (torch 2.11), the test command 3.9. With an older one
# (e.g. torch 2.6's 3.2, whose autotuner and launch API differ) the triton backend is off and CUDA tensors use the
# cuda backend, then the reference; nothing else changes.
TRITON_MIN = (3, 6)


def _triton_version_tuple(version: str) -> Tuple[int, int]:
    """(major, minor) of a Triton version string ('3.6.0', '3.10.0+git1a2b', '3.6.0rc1'); (0, 0) if unreadable."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match[1]), int(match[2])) if match else (0, 0)


def _probe_triton() -> Tuple[bool, Optional[str]]:
    try:
        import triton
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        return False, f"{type(exc).__name__}: {exc}"
    version = str(getattr(triton, "__version__", "0"))
    if _triton_version_tuple(version) < TRITON_MIN:
        floor = ".".join(map(str, TRITON_MIN))
        return False, (f"triton {version} is older than {floor}, the oldest weightkit's Triton kernels are built and "
                       f"tested with (torch >= 2.11 ships {floor}); upgrade torch and triton, or use the cuda backend")
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
_RECORDED: Dict[str, Dict[str, Dict[str, str]]] = {}  # device name -> op -> regime -> backend (loaded lazily)
_AUTO_LOG: Dict[Tuple[str, str, str], dict] = {}  # (device name, op, regime) -> what auto chose, how, the timings


def reload_env() -> None:
    """Re-read WEIGHTKIT_BACKEND, WEIGHTKIT_AUTO, WEIGHTKIT_AUTO_TABLE, TRITON_INTERPRET and WEIGHTKIT_DEBUG_CHECKS
    (WEIGHTKIT_CHECK_FINITE); forgets the measured choices of this process."""
    _ENV["backend"] = os.environ.get("WEIGHTKIT_BACKEND", "auto") or "auto"
    _ENV["auto"] = os.environ.get("WEIGHTKIT_AUTO", "measure") or "measure"
    _ENV["auto_table"] = os.environ.get("WEIGHTKIT_AUTO_TABLE") or None
    _RECORDED.clear()
    _AUTO_LOG.clear()
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

    def __init__(self, name: str, cuda_order: Tuple[str, ...] = ("cuda", "triton"),
                 regime: Optional[Callable[..., tuple]] = None, mutates: Tuple[int, ...] = ()):
        """``cuda_order``: the backends ``auto`` tries on CUDA tensors, in order, where nothing was measured.
        ``regime(*args)``: the call's shape class (a tuple of ints, bools, strings, dtypes; the token count rounded
        up to a power of two, not exact), which makes ``auto`` choose among the usable backends of ``cuda_order`` by
        measurement per regime (:class:`MeasuredChoice`); ``mutates``: the positions of the arguments the
        implementations write in place (measurement runs on copies of them)."""
        self.name = name
        self.cuda_order = cuda_order
        self.regime = regime
        self.mutates = mutates
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
                return f"triton unavailable ({_TRITON_ERROR})"
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
            requested = requested_backend()
            usable = self._usable(device) if requested == "auto" and device.type == "cuda" else ()
            if len(usable) > 1 and self.regime is not None and _ENV["auto"] != "static":
                found = (MeasuredChoice.LABEL, MeasuredChoice(self, device, usable))
            else:
                name = self._select(requested, device)
                found = (name, self.impls[name])
            self._chosen[key] = found
        return found

    def _usable(self, device: torch.device) -> Tuple[str, ...]:
        return tuple(b for b in self.cuda_order if self.why_not(b, device) is None)

    def backend_for(self, *args, device: Optional[torch.device] = None) -> str:
        """The backend a call with ``args`` (the implementations' arguments; on ``device``, by default the first
        argument's) runs now; on a GPU under ``auto`` with a regime this chooses (and, the first time for the regime,
        measures) as the call would."""
        name, impl = self._lookup(args[0].device if device is None else device)
        return impl.choose(args) if isinstance(impl, MeasuredChoice) else name

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


# ---------------------------------------------------------------------------------------------------------
# Measured choice (ARCHITECTURE.md: ``auto`` picks the measured-fastest backend per regime).
#
# On a GPU, for a table with a ``regime`` and more than one usable backend in its ``cuda_order``, ``auto`` chooses per
# (GPU model, op, regime), once per process:
# 1. a recorded choice: ``weightkit/auto_choices.json`` (shipped: what a GPU run of ``bench/gpu_report.py`` measured,
#    per GPU model) or the file named by ``WEIGHTKIT_AUTO_TABLE`` (read first), when it names a usable backend;
# 2. else, with ``WEIGHTKIT_AUTO=measure`` (the default), a measurement on the call's own arguments: each candidate
#    runs once (compiling and tuning its kernels), then back to back for about MEASURE_MS, timed with CUDA events,
#    on copies of the arguments it writes in place; the fastest is kept. This first call of a regime synchronizes
#    the device (like a Triton autotuning run); later calls are a regime tuple and a dict lookup (0.7-0.8 us
#    of host time for int8_matmul, bench/test_bench_host.py). No measurement during CUDA-graph capture, under ``torch.use_deterministic_algorithms(True)`` (the choice
#    must not depend on timing noise there) or in a torch.distributed job of several ranks (ranks that chose
#    differently would update replicated weights with different kernels): those calls take step 1 or 3, remembered
#    for the process, except inside a capture (a later eager call measures);
# 3. else the first usable backend of ``cuda_order`` (``WEIGHTKIT_AUTO=static`` makes this the only rule;
#    ``WEIGHTKIT_AUTO=table`` allows 1 and 3 only: no measurement, no sync).
# ``auto_choices()`` lists what was chosen, how, and the timings; ``save_auto_choices(path)`` writes the measured
# ones in the recorded format (bench/gpu_report.py's ``auto`` section does, for the shipped file).

MEASURE_MS = 10.0  # time per candidate of a measurement, after its warm-up call
RECORDED_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "auto_choices.json")
_DEVICE_NAMES: Dict[int, str] = {}
_MEASURE_LOCK = threading.Lock()


def token_bucket(rows: int) -> int:
    """The token count of a regime: ``rows`` rounded up to a power of two (1 for 0 or 1)."""
    return 1 << (rows - 1).bit_length() if rows > 1 else 1


def rows_of(x: torch.Tensor) -> int:
    """The number of rows (tokens) of an activation whose last dimension is the features."""
    shape = x.shape
    if len(shape) == 2:
        return shape[0]
    return math.prod(shape[:-1]) if shape else 0


_ALLOW_TF32 = getattr(torch._C, "_get_cublas_allow_tf32", None)


def tf32_allowed() -> bool:
    """``torch.backends.cuda.matmul.allow_tf32`` (read through torch._C where it can: the property costs ~0.7 us, the
    function ~0.1 us on a CPU of this project's CI machines; regimes read it per call)."""
    return _ALLOW_TF32() if _ALLOW_TF32 is not None else torch.backends.cuda.matmul.allow_tf32


@contextlib.contextmanager
def allow_tf32(on: bool):
    """``torch.backends.cuda.matmul.allow_tf32`` set to ``on`` inside the block, put back after."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = bool(on)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def regime_key(regime: tuple) -> str:
    """The text form of a regime in the recorded file: its values joined by '|' (dtypes without 'torch.',
    shapes as AxB)."""
    out = []
    for v in regime:
        if isinstance(v, torch.dtype):
            out.append(str(v).replace("torch.", ""))
        elif isinstance(v, (tuple, list, torch.Size)):
            out.append("x".join(str(int(d)) for d in v))
        else:
            out.append(str(v))
    return "|".join(out)


def _device_name(device: torch.device) -> str:
    """The GPU model (``torch.cuda.get_device_name``) of a CUDA device, the key of the recorded choices."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    name = _DEVICE_NAMES.get(idx)
    if name is None:
        name = _DEVICE_NAMES[idx] = torch.cuda.get_device_name(idx)
    return name



def _read_recorded(path: str) -> Dict[str, Dict[str, Dict[str, str]]]:
    """{device name: {op: {regime key: backend}}} of a recorded-choices file (format 1)."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict) or data.get("format") != 1 or not isinstance(data.get("devices"), dict):
        raise ValueError(f"{path}: not a weightkit auto-choices file (format 1)")
    return data["devices"]


def recorded_choices() -> Dict[str, Dict[str, Dict[str, str]]]:
    """The recorded choices in force: the shipped file's, overridden by WEIGHTKIT_AUTO_TABLE's (read once)."""
    if not _RECORDED:
        merged: Dict[str, Dict[str, Dict[str, str]]] = {}
        paths = [RECORDED_FILE] + ([_ENV["auto_table"]] if _ENV["auto_table"] else [])
        for path in paths:
            if not os.path.exists(path):
                if path != RECORDED_FILE:
                    _warn_once(("auto_table", path), f"weightkit: WEIGHTKIT_AUTO_TABLE={path} does not exist")
                continue
            try:
                devices = _read_recorded(path)
            except (OSError, ValueError) as exc:
                _warn_once(("auto_table", path), f"weightkit: recorded backend choices not used: {exc}")
                continue
            for dev, ops in devices.items():
                for op, regimes in ops.items():
                    merged.setdefault(dev, {}).setdefault(op, {}).update(regimes)
        _RECORDED["loaded"] = merged  # (one entry: the dict is the "loaded" flag too)
    return _RECORDED["loaded"]


def auto_summary() -> str:
    """One line on how ``auto`` chooses on a GPU now (``python -m weightkit info``)."""
    mode = _ENV["auto"]
    rule = {"measure": "recorded choice, else measured once per regime, else the static order",
            "table": "recorded choice, else the static order (no measurement)",
            "static": "the static order"}.get(mode, f"unknown mode {mode!r}")
    recorded = recorded_choices()
    held = ", ".join(f"{dev} ({sum(len(r) for r in ops.values())} regimes)" for dev, ops in sorted(recorded.items()))
    return f"WEIGHTKIT_AUTO={mode}: {rule}; recorded choices: {held or 'none'}"


def auto_choices() -> List[dict]:
    """What ``auto`` chose by regime in this process: dicts with device, op, regime, backend, how ('recorded',
    'measured', 'static') and, when measured, ms per candidate."""
    return [dict(entry) for entry in _AUTO_LOG.values()]


def save_auto_choices(path: str, note: Optional[str] = None, entries: Optional[List[dict]] = None) -> int:
    """Merge the measured choices ``entries`` (by default this process's, :func:`auto_choices`) into the
    recorded-choices file ``path`` (created if missing); returns how many were written. ``note`` (e.g. the run's
    versions and date) is kept per device."""
    data = {"format": 1, "devices": {}, "notes": {}}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        _read_recorded(path)  # validates
        data.setdefault("notes", {})
    count = 0
    for entry in (_AUTO_LOG.values() if entries is None else entries):
        if entry.get("how") != "measured":
            continue
        data["devices"].setdefault(entry["device"], {}).setdefault(entry["op"], {})[entry["regime"]] = entry["backend"]
        if note:
            data["notes"][entry["device"]] = note
        count += 1
    for ops in data["devices"].values():  # stable, reviewable diffs
        for op in list(ops):
            ops[op] = dict(sorted(ops[op].items()))
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
    return count


def _distributed() -> bool:
    """Whether this process is one of several of a torch.distributed job: ranks that measured separately could choose
    different backends (timing noise), and replicated weights updated by different kernels drift apart; they take
    the recorded choice (the same GPU model gives the same one) or the static order instead."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _time_calls(fn: Callable, args: list, kwargs: dict) -> float:
    """ms per call of ``fn`` back to back on the current stream, after one warm-up call."""
    fn(*args, **kwargs)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn(*args, **kwargs)
    end.record()
    end.synchronize()
    once = max(start.elapsed_time(end), 1e-3)
    reps = int(min(max(MEASURE_MS / once, 3), 200))
    start.record()
    for _ in range(reps):
        fn(*args, **kwargs)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


class MeasuredChoice:
    """``auto`` for one op on one CUDA device where several backends can run: the backend per regime (see the
    section comment), remembered per regime; calling it runs the chosen implementation."""

    LABEL = "measured"
    timer = staticmethod(_time_calls)  # tests replace it (no GPU clock on the CPU)

    def __init__(self, table: KernelTable, device: torch.device, candidates: Tuple[str, ...]):
        self.table, self.device, self.candidates = table, device, candidates
        self.by_regime: Dict[tuple, Callable] = {}

    def __call__(self, *args, **kwargs):
        impl = self.by_regime.get(self.table.regime(*args, **kwargs))
        if impl is None:
            impl = self.table.impls[self.choose(args, kwargs)]
        return impl(*args, **kwargs)

    def choose(self, args, kwargs=None) -> str:
        """The backend for ``args``: remembered, recorded, measured or the static order (in this order)."""
        kwargs = kwargs or {}
        regime = self.table.regime(*args, **kwargs)
        impl = self.by_regime.get(regime)
        if impl is not None:
            return next(n for n in self.candidates if self.table.impls[n] is impl)
        dev, key = _device_name(self.device), regime_key(regime)
        name = recorded_choices().get(dev, {}).get(self.table.name, {}).get(key)
        how, ms = "recorded", None
        remember = True
        if name not in self.candidates:
            if _ENV["auto"] == "measure" and self._may_measure():
                with _MEASURE_LOCK:
                    ms = self._measure(args, kwargs)
                how = "measured"
                name = min(ms, key=ms.get) if ms else self.candidates[0]
            else:
                how, name = "static", self.candidates[0]
                remember = not _capturing()  # a call inside a capture: a later eager call measures
        if remember:
            self.by_regime[regime] = self.table.impls[name]
            _AUTO_LOG[(dev, self.table.name, key)] = dict(device=dev, op=self.table.name, regime=key, backend=name,
                                                          how=how, ms=ms)
        return name

    def _may_measure(self) -> bool:
        return not (torch.are_deterministic_algorithms_enabled() or _distributed() or _capturing())

    def _measure(self, args, kwargs) -> Dict[str, float]:
        """ms per call of each candidate on ``args`` (copies of the arguments it writes); a candidate that raises
        is left out with a warning."""
        ms = {}
        guard = torch.cuda.device(self.device) if torch.cuda.is_available() else contextlib.nullcontext()
        with torch.no_grad(), guard:  # (no CUDA: the tests, with a timer of their own)
            for name in self.candidates:
                call = list(args)
                for i in self.table.mutates:
                    if i < len(call) and isinstance(call[i], torch.Tensor):
                        call[i] = call[i].clone()
                try:
                    ms[name] = float(self.timer(self.table.impls[name], call, kwargs))
                except Exception as exc:  # noqa: BLE001 - a candidate that fails here is simply not chosen
                    _warn_once((self.table.name, name, "measure"),
                               f"weightkit: {self.table.name}: backend {name!r} failed while auto measured it "
                               f"({type(exc).__name__}: {exc}); not using it for this shape")
        return ms
