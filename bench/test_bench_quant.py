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


@pytest.mark.parametrize("tokens", [1, 16, 256])
@pytest.mark.parametrize("name", ["nn.Linear"] + BACKENDS)
def test_int8_linear_forward(measure, name, tokens):
    """Int8Linear forward (dequantize inside the matmul) vs nn.Linear, 4096 x 4096, group 128."""
    device = torch.device(DEVICE)
    from weightkit.nn import Int8Linear

    torch.manual_seed(0)
    lin = torch.nn.Linear(4096, 4096, bias=False).to(device)
    x = torch.randn(tokens, 4096, device=device)
    if name == "nn.Linear":
        fn = lambda: lin(x)  # noqa: E731
        weight_bytes = 4096 * 4096 * 4
    else:
        reason = quant._INT8_MM.why_not(name, device)
        if reason is not None:
            pytest.skip(reason)
        layer = Int8Linear.from_linear(lin, group_size=128)

        def fn():
            with use_backend(name), torch.no_grad():
                return layer(x)

        weight_bytes = 4096 * 4096 + layer.scale.numel() * 4
    with torch.no_grad():
        measure(fn, bytes=weight_bytes + tokens * 2 * 4096 * 4, flops=2 * tokens * 4096 * 4096,
                op="int8_linear_forward", backend=name, shape=[tokens, 4096, 4096])
