"""weightkit's compiled kernels as Python sees them: what loaded, and why not.

* ``weightkit._C`` (csrc/bind.cpp): a pybind11 module over the plain C functions of csrc/weightkit.h, with the CPU
  kernels compiled in. :data:`CPU` is its ``cpu`` submodule (``CPU.stochastic_round_int8(...)`` calls
  ``wk_cpu_stochastic_round_int8``). Its signatures come from the header at compile time (no hand-copied table).
* ``weightkit/lib/libweightkit_cuda.so``: the CUDA kernels (nvcc, built when nvcc was found at install time, shipped in
  the CUDA wheel), opened by _C at run time (``_C.load_cuda``); :data:`CUDA` is ``_C.cuda`` once it loaded.

Neither links libtorch, so one build loads under every torch release; tensors cross as data pointers, sizes and the
dtype codes below. The host code that calls these functions for each op is in weightkit/backends/cpu and .../cuda.

:data:`CPU` and :data:`CUDA` are None when they did not load, with the reason in :data:`CPU_ERROR` /
:data:`CUDA_ERROR` (weightkit.backend reports them; ``python -m weightkit info`` prints them).
``WEIGHTKIT_DISABLE_EXTENSION=1`` skips both.
"""

from __future__ import annotations

import importlib
import os
from typing import Dict, Optional, Tuple

import torch

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
LIB_DIR = os.path.join(PACKAGE_DIR, "lib")
MODULE = "weightkit._C"
CUDA_LIB = "libweightkit_cuda.so"
CUDA_LIB_ENV = "WEIGHTKIT_CUDA_LIB"  # another CUDA kernel library to open, or "off" (load_cuda)
ABI_VERSION = 9  # WK_ABI_VERSION of csrc/weightkit.h

# wk_dtype codes of csrc/weightkit.h
FLOAT_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
OFFSET_CODES = {torch.uint8: 3, torch.int16: 4, torch.int32: 5}

_REBUILD = "rebuild with `pip install .` (or `pip install -e .` in a clone)"


def load_module(abi_version: int = ABI_VERSION):
    """(weightkit._C, None), or (None, why not)."""
    if os.environ.get("WEIGHTKIT_DISABLE_EXTENSION") == "1":
        return None, "disabled by WEIGHTKIT_DISABLE_EXTENSION=1"
    try:
        module = importlib.import_module(MODULE)
    except ModuleNotFoundError as exc:
        if exc.name != MODULE:
            raise
        return None, (f"{MODULE} not found in {PACKAGE_DIR} (weightkit was installed without building its kernels; "
                      f"{_REBUILD})")
    except ImportError as exc:  # unloadable: built for another Python, glibc too old, ...
        return None, f"{MODULE} did not load (ImportError: {exc}); {_REBUILD}"
    if module.ABI_VERSION != abi_version:
        return None, (f"{MODULE} ({module.__file__}) has ABI version {module.ABI_VERSION}, this weightkit needs "
                      f"{abi_version} (a build of other sources); {_REBUILD}")
    return module, None


def cuda_lib_path(lib_dir: str = LIB_DIR) -> Tuple[Optional[str], bool]:
    """(the CUDA library to open, or None for ``WEIGHTKIT_CUDA_LIB=off``; whether that variable chose it).
    ``WEIGHTKIT_CUDA_LIB=PATH`` opens that library instead of lib_dir's (a process opens one CUDA kernel library: the
    tests' simulated one, tests/cudasim, where a CUDA torch built the real one too); ``=off`` opens none."""
    chosen = os.environ.get(CUDA_LIB_ENV)
    if chosen == "off":
        return None, True
    return (chosen, True) if chosen else (os.path.join(lib_dir, CUDA_LIB), False)


def cuda_lib_expected(lib_dir: str = LIB_DIR) -> bool:
    """Whether a CUDA library was there to open: WEIGHTKIT_CUDA_LIB named one, or lib_dir has one (none built, or
    ``=off``: no, and its absence is no surprise worth a warning)."""
    path, chosen = cuda_lib_path(lib_dir)
    return path is not None and (chosen or os.path.exists(path))


def load_cuda(module, lib_dir: str = LIB_DIR) -> Tuple[Optional[str], Optional[str]]:
    """(path of the CUDA library, None) once ``module`` (weightkit._C) opened it, else (None, why not); which library:
    :func:`cuda_lib_path`."""
    if module is None:
        return None, CPU_ERROR
    path, chosen = cuda_lib_path(lib_dir)
    if path is None:
        return None, f"not opened: {CUDA_LIB_ENV}=off"
    if chosen and not os.path.exists(path):
        return None, f"{CUDA_LIB_ENV}={path}: no such file"
    if not os.path.exists(path):
        return None, (f"{CUDA_LIB} not found in {lib_dir} (not built: setup.py builds it when nvcc is found and torch "
                      "has CUDA, or with WEIGHTKIT_WITH_CUDA=1; the CUDA wheel ships it)")
    error = module.load_cuda(path)
    if error:
        return None, f"{os.path.basename(path)} did not load ({error}); {_REBUILD}"
    return path, None


_C, CPU_ERROR = load_module()
CPU = _C.cpu if _C is not None else None
CPU_PATH: Optional[str] = _C.__file__ if _C is not None else None
CUDA_PATH, CUDA_ERROR = load_cuda(_C) if _C is not None else (None, CPU_ERROR)
CUDA = _C.cuda if CUDA_PATH is not None else None
CUDA_ARCHS: Tuple[str, ...] = tuple(CUDA.archs().split(";")) if CUDA is not None else ()

_PROBED: Dict[int, Optional[str]] = {}


def cuda_error_string(code: int) -> str:
    return CUDA.error_string(code) if CUDA is not None else f"CUDA error {code}"


def cuda_why_not(device: torch.device) -> Optional[str]:
    """None when the CUDA library's kernels can run on ``device`` (probed once per device), else why not."""
    if CUDA is None:
        return CUDA_ERROR
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _PROBED:
        code = CUDA.probe(index)
        if code == 0:
            _PROBED[index] = None
        else:
            cap = torch.cuda.get_device_capability(index)
            _PROBED[index] = (f"{CUDA_LIB} cannot run on cuda:{index} (sm_{cap[0]}{cap[1]}; built for "
                              f"sm_{', sm_'.join(CUDA_ARCHS)} + PTX): {cuda_error_string(code)}")
    return _PROBED[index]
