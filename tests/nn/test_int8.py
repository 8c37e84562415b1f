"""Int8Linear: close to the nn.Linear it came from, gradients (input and float weight grad), state round trip."""

import pytest
import torch
from torch import nn

from weightkit.nn import Int8Linear


def test_from_linear_close_to_linear_and_weight_is_int8():
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    q = Int8Linear.from_linear(lin, group_size=32)
    assert q.weight.dtype == torch.int8 and not q.weight.requires_grad
    assert not any(p.dtype.is_floating_point and p.shape == lin.weight.shape for p in q.parameters())
    x = torch.randn(5, 64)
    err = (q(x) - lin(x)).norm() / lin(x).norm()
    assert float(err) < 0.01
    torch.testing.assert_close(q.dequantized_weight(), lin.weight.detach(), atol=float(q.scale.max()) / 2 + 1e-7, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients(dtype):
    torch.manual_seed(1)
    layer = Int8Linear.from_linear(nn.Linear(32, 16), group_size=16).to(dtype)
    x = torch.randn(4, 3, 32, dtype=dtype, requires_grad=True)
    g = torch.randn(4, 3, 16, dtype=dtype)
    y = layer(x)
    y.backward(g)
    w = layer.dequantized_weight()
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(x.grad.float(), (g.float() @ w), **tol)
    expected_wg = g.float().reshape(-1, 16).T @ x.detach().float().reshape(-1, 32)
    torch.testing.assert_close(layer.weight.float_grad, expected_wg, **tol)
    torch.testing.assert_close(layer.bias.grad.float(), g.float().sum((0, 1)), **tol)
    layer(x).backward(g)  # accumulates like .grad does
    torch.testing.assert_close(layer.weight.float_grad, 2 * expected_wg, **tol)


def test_inference_keeps_no_weight_grad():
    layer = Int8Linear.from_linear(nn.Linear(32, 16), group_size=16)
    with torch.no_grad():
        layer(torch.randn(2, 32))
    assert getattr(layer.weight, "float_grad", None) is None


def test_state_dict_round_trip_is_exact():
    a = Int8Linear.from_linear(nn.Linear(64, 32), group_size=32)
    b = Int8Linear(64, 32, group_size=32)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.weight, b.weight) and torch.equal(a.scale, b.scale) and torch.equal(a.bias, b.bias)
    x = torch.randn(3, 64)
    assert torch.equal(a(x), b(x))


def test_bad_arguments():
    with pytest.raises(ValueError, match="group_size=24 must divide in_features=64"):
        Int8Linear(64, 8, group_size=24)
    with pytest.raises(ValueError, match="group_size must be an int >= 1"):
        Int8Linear(64, 8, group_size=0)
    with pytest.raises(ValueError, match="x has 63 features"):
        Int8Linear(64, 8, group_size=32)(torch.randn(2, 63))


def test_state_dict_round_trip_and_bad_entries_refused():
    layer = Int8Linear.from_linear(nn.Linear(64, 16), group_size=32)
    other = Int8Linear(64, 16, group_size=32)
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other.weight, layer.weight) and torch.equal(other.scale, layer.scale)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    bad_weight = dict(layer.state_dict(), weight=layer.weight.float() * 0.5)
    with pytest.raises(ValueError, match="weight must be int8"):
        other.load_state_dict(bad_weight)
    bad_scale = dict(layer.state_dict(), scale=torch.ones(16))  # another group size
    with pytest.raises(ValueError, match="scale must hold 32 positive finite"):
        other.load_state_dict(bad_scale)
    with pytest.raises(ValueError, match="scale must hold"):
        other.load_state_dict(dict(layer.state_dict(), scale=torch.full((32,), float("nan"))))
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in before.items())  # nothing was loaded
