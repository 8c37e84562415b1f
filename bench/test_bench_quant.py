"""INT8 stochastic rounding: time and GB/s per backend (reference vs compiled vs Triton on GPU)."""

import pytest
import torch

from bench.conftest import DEVICE
from weightkit import backend, use_backend
from weightkit.ops import quant

SHAPES = [(1024, 1024), (4096, 4096)]
BACKENDS = [b for b in backend.BACKENDS if not (b == "triton" and DEVICE == "cpu")]  # the interpreter is not a speed


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", BACKENDS)
def test_stochastic_round_int8(measure, name, shape):
    device = torch.device(DEVICE)
    reason = quant._SR.why_not(name, device)
    if reason is not None:
        pytest.skip(reason)
    x = torch.randn(shape, device=device)
    scale = quant.absmax_scale(x, 128)
    with use_backend(name):
        measure(lambda: quant.stochastic_round_int8(x, scale, 128, seed=1),
                bytes=x.numel() * (x.element_size() + 1) + scale.numel() * 4,
                rounds=3 if (name == "reference" and shape[0] >= 4096) else None,
                op="stochastic_round_int8", backend=name, shape=list(shape))
