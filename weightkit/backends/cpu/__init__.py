"""The cpu backend: host code that calls the CPU kernels of weightkit._C (csrc/cpu/*.cpp) for every op, one module per
hot path. Each function allocates its outputs with torch, passes data pointers, sizes and dtype codes to one C
function, and does with torch what the kernels leave out (dtype conversions, BLAS matmuls for many tokens). The
callers (weightkit/ops, through weightkit.backend.KernelTable) have checked shapes, dtypes and devices. The kernels
use up to ``torch.get_num_threads()`` threads; results never depend on it."""

from __future__ import annotations

import torch

from ... import native

_STATUS = {1: "unsupported dtype", 2: "out of memory for its scratch buffer",
           3: "malformed codes (with weightkit.debug_checks() the op's data check names the problem)"}

threads = torch.get_num_threads


def check(status: int, name: str) -> None:
    """Raise for a non-zero wk_status of csrc/weightkit.h."""
    if status:
        raise RuntimeError(f"weightkit cpu kernel {name} failed: {_STATUS.get(status, f'status {status}')}")

