"""INT8 stochastic rounding: time and GB/s per backend (reference vs compiled vs Triton on GPU)."""

import pytest
import torch

from bench.conftest import DEVICE
from weightkit import backend, use_backend
from weightkit.ops import int8

SHAPES = [(1024, 1024), (4096, 4096)]
BACKENDS = [b for b in backend.BACKENDS if not (b == "triton" and DEVICE == "cpu")]  # the interpreter is not a speed


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", BACKENDS)
def test_stochastic_round_int8(measure, name, shape):
    device = torch.device(DEVICE)
    reason = int8._SR.why_not(name, device)
    if reason is not None:
        pytest.skip(reason)
    x = torch.randn(shape, device=device)
    scale = int8.absmax_scale(x, 128)
    with use_backend(name):
        measure(lambda: int8.stochastic_round_int8(x, scale, 128, seed=1),
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
        reason = int8._INT8_MM.why_not(name, device)
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


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", BACKENDS)
def test_int8_sr_update(measure, name, shape):
    """Fused Q-GaLore write-back (dequantize + delta + new absmax scale + SR) vs the unfused reference sequence."""
    device = torch.device(DEVICE)
    reason = int8._SR_UPDATE.why_not(name, device)
    if reason is not None:
        pytest.skip(reason)
    w = torch.randn(shape, device=device)
    scale0 = int8.absmax_scale(w, 128)
    q0 = int8.stochastic_round_int8(w, scale0, 128, seed=0)
    delta = torch.randn(shape, device=device) * 1e-3
    q, scale = q0.clone(), scale0.clone()
    with use_backend(name):
        measure(lambda: int8.int8_sr_update_(q, scale, delta, 128, decay=0.999, seed=1),
                bytes=w.numel() * (1 + 4 + 1) + 2 * scale.numel() * 4,
                rounds=3 if (name == "reference" and shape[0] >= 4096) else None,
                op="int8_sr_update_", backend=name, shape=list(shape))


@pytest.mark.parametrize("shape", [(1024, 256), (4096, 1024)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", BACKENDS)
def test_quantize_int4(measure, name, shape):
    """Pack a GaLore projector (m x r, orthonormal columns) to INT4, group 64."""
    from weightkit.ops import int4

    device = torch.device(DEVICE)
    reason = int4._QUANT.why_not(name, device)
    if reason is not None:
        pytest.skip(reason)
    p = torch.linalg.qr(torch.randn(shape, device=device))[0].contiguous()
    with use_backend(name):
        measure(lambda: int4.quantize_int4(p, 64), bytes=p.numel() * (4 + 0.5),
                op="quantize_int4", backend=name, shape=list(shape))


@pytest.mark.parametrize("case", [((1024, 1024), 256), ((4096, 4096), 1024)], ids=lambda c: f"{c[0][0]}x{c[0][1]}-r{c[1]}")
@pytest.mark.parametrize("name", ["fp32 matmul"] + BACKENDS)
def test_int4_project(measure, name, case):
    """GaLore's projection R = G P^T with the INT4 projector P (r x n) dequantized inside the matmul, vs the same
    product with a float32 P."""
    from weightkit.ops import int4

    (m, n), r = case
    device = torch.device(DEVICE)
    g = torch.randn(m, n, device=device)
    p = torch.linalg.qr(torch.randn(n, r, device=device))[0].T.contiguous()
    flops = 2 * m * n * r
    if name == "fp32 matmul":
        measure(lambda: g @ p.T, flops=flops, op="int4_project", backend=name, shape=[m, n, r])
        return
    reason = int4._MM.why_not(name, device)
    if reason is not None:
        pytest.skip(reason)
    packed, scale, zero = int4.quantize_int4(p, 64)
    with use_backend(name):
        measure(lambda: int4.int4_matmul(g, packed, scale, zero, 64, p.shape), flops=flops,
                rounds=3 if m >= 4096 else None, op="int4_project", backend=name, shape=[m, n, r])
