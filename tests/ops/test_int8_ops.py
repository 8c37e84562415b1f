"""weightkit::int8_matmul (dequantize inside the matmul) and INT4 packing: backends == reference, autograd, errors."""

import pytest
import torch

from weightkit import debug_checks

from tests.conftest import DEVICES, usable_backends
from weightkit import use_backend
from weightkit.ops import quant
from weightkit.ops.quant import absmax_scale, dequantize_int8, int8_matmul

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-4), torch.bfloat16: dict(rtol=2e-2, atol=5e-2),
       torch.float16: dict(rtol=2e-3, atol=1e-2)}


def weight(out_f, in_f, group, device="cpu"):
    w = torch.randn(out_f, in_f, device=device)
    scale = absmax_scale(w, group)
    q = torch.randint(-127, 128, (out_f, in_f), dtype=torch.int8, device=device)
    return q, scale


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens,out_f,in_f,group", [(1, 40, 64, 32), (7, 33, 96, 16), (50, 130, 128, 128), (3, 200, 48, 48)])
@pytest.mark.parametrize("transpose", [False, True])
def test_backends_match_float64(device, dtype, tokens, out_f, in_f, group, transpose):
    q, scale = weight(out_f, in_f, group, device)
    x = torch.randn(tokens, out_f if transpose else in_f, device=device).to(dtype)
    w64 = dequantize_int8(q, scale, group).double()
    expected = x.double() @ (w64 if transpose else w64.T)
    backends = usable_backends(quant._INT8_MM, device)
    assert len(backends) >= 2, backends
    for name in backends:
        with use_backend(name):
            y = int8_matmul(x, q, scale, group, transpose)
        assert y.dtype == dtype and y.shape == expected.shape
        torch.testing.assert_close(y.double(), expected, **TOL[dtype], msg=lambda s: f"{name}: {s}")


def test_leading_dims_and_non_contiguous_input():
    q, scale = weight(24, 32, 16)
    base = torch.randn(32, 2, 5)
    x = base.permute(1, 2, 0)  # (2, 5, 32), not contiguous
    expected = x.contiguous() @ dequantize_int8(q, scale, 16).T
    for name in usable_backends(quant._INT8_MM, "cpu"):
        with use_backend(name):
            torch.testing.assert_close(int8_matmul(x, q, scale, 16), expected, rtol=1e-5, atol=1e-5)


def test_gradcheck_reference_and_op_backward():
    q, scale = weight(6, 8, 4)
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: quant.int8_matmul_reference(t, q, scale, 4, False), (x,))
    xf = torch.randn(5, 8, requires_grad=True)
    g = torch.randn(5, 6)
    for name in usable_backends(quant._INT8_MM, "cpu"):
        with use_backend(name):
            (grad,) = torch.autograd.grad(int8_matmul(xf, q, scale, 4), xf, g)
        torch.testing.assert_close(grad, g @ dequantize_int8(q, scale, 4), rtol=1e-5, atol=1e-5)


def test_opcheck_and_compile():
    q, scale = weight(16, 32, 8)
    x = torch.randn(4, 32)
    torch.library.opcheck(torch.ops.weightkit.int8_matmul.default, (x, q, scale, 8, False))
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: int8_matmul(t * 2, q, scale, 8), fullgraph=True)
    torch.testing.assert_close(compiled(x), int8_matmul(x * 2, q, scale, 8))


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(x=torch.randn(2, 31)), ValueError, "x has 31 features"),
    (dict(w_q=torch.zeros(16, 32)), TypeError, "w_q must have dtype"),
    (dict(group_size=5), ValueError, "group_size=5 must divide in_features=32"),
    (dict(scale=torch.ones(3)), ValueError, "scale must hold 64 values"),
    (dict(x=torch.full((2, 32), float("inf"))), ValueError, "x contains 64 non-finite"),
])
def test_bad_input(kwargs, err, match):
    args = dict(x=torch.randn(2, 32), w_q=torch.zeros(16, 32, dtype=torch.int8), scale=torch.ones(64), group_size=8)
    args.update(kwargs)
    with pytest.raises(err, match=match), debug_checks():  # data checks (NaN, ranges) are opt-in
        int8_matmul(**args)




@pytest.mark.parametrize("transpose", [False, True])
def test_many_tokens_over_several_dequantized_blocks(transpose):
    """More than 8 tokens take the dequantize-then-BLAS path, ~4M weights per block on cpu: use several blocks."""
    out_f, in_f, group = 140_000, 64, 16  # 9M weights: three blocks
    q, scale = weight(out_f, in_f, group)
    x = torch.randn(12, out_f if transpose else in_f)
    w64 = dequantize_int8(q, scale, group).double()
    want = x.double() @ (w64 if transpose else w64.T)
    for name in usable_backends(quant._INT8_MM, "cpu"):
        if name == "triton":
            continue  # the interpreter is too slow for this size
        with use_backend(name):
            y = int8_matmul(x, q, scale, group, transpose)
        torch.testing.assert_close(y.double(), want, rtol=1e-4, atol=1e-3, msg=lambda s: f"{name}: {s}")
