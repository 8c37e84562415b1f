"""MemoryLinear vs nn.Linear of the same shape across token counts: time, effective GB/s (table rows touched +
input + output), and table memory. The layer reads K rows of width d_out per token instead of a d_in x d_out
weight, so it wins where a matmul is bandwidth-bound on the weight: small token counts."""

import pytest
import torch

from bench.conftest import DEVICE
from weightkit import use_backend
from weightkit.nn import MemoryLinear

D_IN, D_OUT, TAU = 1024, 1024, 8
TOKENS = [1, 16, 256, 4096, 16384]
BACKENDS = ["nn.Linear", "reference", "cpu"] if DEVICE == "cpu" else ["nn.Linear", "reference", "cuda", "triton"]


@pytest.fixture(scope="module")
def layers():
    torch.manual_seed(0)
    lin = torch.nn.Linear(D_IN, D_OUT).to(DEVICE)
    return lin, MemoryLinear.from_linear(lin, tau=TAU)


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward(measure, layers, backend, tokens):
    lin, mem = layers
    if backend == "reference" and tokens > 256:
        pytest.skip("the reference materialises tokens x K x d_out rows; too large past 256 tokens")
    x = torch.randn(tokens, D_IN, device=DEVICE)
    k = D_IN // TAU
    if backend == "nn.Linear":
        fn = lambda: lin(x)  # noqa: E731
        moved = (D_IN * D_OUT + tokens * (D_IN + D_OUT)) * 4
        extra = dict(weight_bytes=D_IN * D_OUT * 4)
    else:
        def fn():
            with use_backend(backend), torch.no_grad():
                return mem(x)
        moved = (tokens * k * D_OUT + tokens * (D_IN + D_OUT)) * 4
        extra = dict(table_bytes=mem.table_bytes())
    with torch.no_grad():
        measure(fn, bytes=moved, rounds=3 if tokens >= 4096 else None, op="memory_linear_forward", backend=backend,
                shape=[tokens, D_IN, D_OUT], **extra)
