"""DictLinear vs nn.Linear of the same shape: forward time across token counts at 20% and 50% compression (the
factors are random with the sizes the compressor would choose for the bitmask format; timing does not depend on their
values). DictLinear runs weightkit::dict_bitmask_matmul: the reference or the cpu kernels on CPU, the reference,
Triton or the cuda backend (S decoded to dense + cuBLAS) on a GPU."""

import pytest
import torch

from bench.conftest import DEVICE
from weightkit import use_backend
from weightkit.nn.ksvd import dictionary_size
from weightkit.nn import DictLinear

CASES = [(1024, 0.2), (1024, 0.5), (4096, 0.2), (4096, 0.5)]
TOKENS = [1, 16, 256, 4096]
BACKENDS = ["nn.Linear", "reference", "cpu"] if DEVICE == "cpu" else ["nn.Linear", "reference", "triton", "cuda"]


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{int(c[1] * 100)}pct")
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward(measure, backend, case, tokens):
    d, ratio = case
    if d >= 4096 and tokens >= 4096:
        pytest.skip("4096 x 4096 at 4096 tokens takes too long on a 2-core CPU")
    torch.manual_seed(0)
    x = torch.randn(tokens, d, device=DEVICE)
    k, s = dictionary_size(d, d, ratio)
    if backend == "nn.Linear":
        layer = torch.nn.Linear(d, d, bias=False).to(DEVICE)
        fn = lambda: layer(x)  # noqa: E731
        stored = d * d * 4
    else:
        layer = DictLinear(d, d, k, s, bias=False, device=DEVICE)

        def fn():
            with use_backend(backend):
                return layer(x)

        stored = layer.stored_bytes()
    with torch.no_grad():
        measure(fn, bytes=stored + tokens * 2 * d * 4, rounds=3 if d >= 4096 else None, op="dict_linear_forward",
                backend=backend, shape=[tokens, d, d, ratio], k=k, s=s, stored_bytes=stored)
