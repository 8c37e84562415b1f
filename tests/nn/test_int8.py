"""Int8Linear: close to the nn.Linear it came from, gradients (input and float weight grad), state round trip,
on every device (CPU and, when present, CUDA)."""

import pytest
import torch
from torch import nn

from tests.conftest import DEVICES
from weightkit.nn import Int8Linear
from weightkit.nn.int8 import Int8Weight


def tol(dtype, device):
    """Tolerances against float32 references: CPU as they always were; a GPU sums in other orders (a few times
    looser for float32, bfloat16 is dominated by its own rounding)."""
    if dtype == torch.float32:
        return dict(rtol=1e-4, atol=1e-4) if device == "cpu" else dict(rtol=4e-4, atol=4e-4)
    return dict(rtol=3e-2, atol=3e-2)


def linear(in_features, out_features, device, bias=True):
    """nn.Linear drawn on the CPU (the same weights on every device for a seed), then moved."""
    return nn.Linear(in_features, out_features, bias=bias).to(device)


@pytest.mark.parametrize("device", DEVICES)
def test_from_linear_close_to_linear_and_weight_is_int8(device):
    torch.manual_seed(0)
    lin = linear(64, 48, device)
    q = Int8Linear.from_linear(lin, group_size=32)
    assert q.weight.dtype == torch.int8 and not q.weight.requires_grad
    assert q.weight.device.type == q.scale.device.type == q.bias.device.type == device
    assert not any(p.dtype.is_floating_point and p.shape == lin.weight.shape for p in q.parameters())
    x = torch.randn(5, 64, device=device)
    with torch.no_grad():
        err = (q(x) - lin(x)).norm() / lin(x).norm()
    assert float(err) < 0.01
    torch.testing.assert_close(q.dequantized_weight(), lin.weight.detach(), atol=float(q.scale.max()) / 2 + 1e-7, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients(dtype, device):
    torch.manual_seed(1)
    layer = Int8Linear.from_linear(nn.Linear(32, 16), group_size=16).to(device=device, dtype=dtype)
    x = torch.randn(4, 3, 32, dtype=dtype).to(device).requires_grad_()
    g = torch.randn(4, 3, 16, dtype=dtype).to(device)
    y = layer(x)
    assert y.device.type == device
    y.backward(g)
    w = layer.dequantized_weight()
    t = tol(dtype, device)
    torch.testing.assert_close(x.grad.float(), (g.float() @ w), **t)
    expected_wg = g.float().reshape(-1, 16).T @ x.detach().float().reshape(-1, 32)
    assert layer.weight.float_grad.dtype == torch.float32 and layer.weight.float_grad.device == layer.weight.device
    torch.testing.assert_close(layer.weight.float_grad, expected_wg, **t)
    torch.testing.assert_close(layer.bias.grad.float(), g.float().sum((0, 1)), **t)
    layer(x).backward(g)  # accumulates like .grad does
    torch.testing.assert_close(layer.weight.float_grad, 2 * expected_wg, **t)


@pytest.mark.parametrize("device", DEVICES)
def test_weight_grad_tracked_when_nothing_else_needs_a_gradient(device):
    """Only the int8 weight trains (frozen bias, input without grad): backward still runs and fills float_grad."""
    torch.manual_seed(2)
    layer = Int8Linear.from_linear(linear(32, 8, device), group_size=16)
    layer.bias.requires_grad_(False)
    x = torch.randn(6, 32, device=device)
    y = layer(x)
    assert y.requires_grad
    y.pow(2).sum().backward()
    expected = (2 * y.detach()).T @ x
    torch.testing.assert_close(layer.weight.float_grad, expected, **tol(torch.float32, device))
    assert layer.bias.grad is None


@pytest.mark.parametrize("device", DEVICES)
def test_to_device_and_dtype_keeps_int8_weight_and_float32_scale(device):
    layer = Int8Linear.from_linear(nn.Linear(64, 16), group_size=32)
    w, scale = layer.weight.clone(), layer.scale.clone()
    moved = layer.to(device=device, dtype=torch.bfloat16)
    assert moved is layer and layer.weight.dtype == torch.int8 and layer.scale.dtype == torch.float32
    assert layer.weight.device.type == layer.scale.device.type == layer.bias.device.type == device
    assert layer.bias.dtype == torch.bfloat16
    # the Int8Weight survives the move with its attributes: scale is the moved buffer (Q-GaLore writes both)
    assert isinstance(layer.weight, Int8Weight) and layer.weight.scale is layer.scale and layer.weight.group_size == 32
    assert torch.equal(layer.weight.cpu(), w) and torch.equal(layer.scale.cpu(), scale)
    x = torch.randn(3, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
    layer(x).float().sum().backward()
    assert x.grad.device.type == device and layer.weight.float_grad.device.type == device
    accumulated = layer.weight.float_grad.clone()
    layer.to("cpu").to(device=device, dtype=torch.bfloat16)  # an accumulated weight gradient moves with the layer
    assert layer.weight.float_grad.dtype == torch.float32 and layer.weight.float_grad.device.type == device
    layer(x).float().sum().backward()  # and keeps accumulating there
    torch.testing.assert_close(layer.weight.float_grad, 2 * accumulated, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_inference_keeps_no_weight_grad(device):
    layer = Int8Linear.from_linear(linear(32, 16, device), group_size=16)
    with torch.no_grad():
        layer(torch.randn(2, 32, device=device))
    assert getattr(layer.weight, "float_grad", None) is None


@pytest.mark.parametrize("device", DEVICES)
def test_state_dict_round_trip_is_exact(device):
    a = Int8Linear.from_linear(linear(64, 32, device), group_size=32)
    b = Int8Linear(64, 32, group_size=32, device=device)
    assert b.weight.device.type == b.scale.device.type == device
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.weight, b.weight) and torch.equal(a.scale, b.scale) and torch.equal(a.bias, b.bias)
    x = torch.randn(3, 64, device=device)
    assert torch.equal(a(x), b(x))
    c = Int8Linear(64, 32, group_size=32, device=device)
    c.load_state_dict({k: v.cpu() for k, v in a.state_dict().items()})  # a checkpoint read with map_location='cpu'
    assert c.weight.device.type == c.scale.device.type == device and torch.equal(a(x), c(x))


@pytest.mark.parametrize("device", DEVICES)
def test_bad_arguments(device):
    with pytest.raises(ValueError, match="group_size=24 must divide in_features=64"):
        Int8Linear(64, 8, group_size=24, device=device)
    with pytest.raises(ValueError, match="group_size must be an int >= 1"):
        Int8Linear(64, 8, group_size=0, device=device)
    with pytest.raises(ValueError, match="x has 63 features"):
        Int8Linear(64, 8, group_size=32, device=device)(torch.randn(2, 63, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_state_dict_round_trip_and_bad_entries_refused(device):
    layer = Int8Linear.from_linear(linear(64, 16, device), group_size=32)
    other = Int8Linear(64, 16, group_size=32, device=device)
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other.weight, layer.weight) and torch.equal(other.scale, layer.scale)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    bad_weight = dict(layer.state_dict(), weight=layer.weight.float() * 0.5)
    with pytest.raises(ValueError, match="weight must be int8"):
        other.load_state_dict(bad_weight)
    bad_scale = dict(layer.state_dict(), scale=torch.ones(16, device=device))  # another group size
    with pytest.raises(ValueError, match="scale must hold 32 positive finite"):
        other.load_state_dict(bad_scale)
    with pytest.raises(ValueError, match="scale must hold"):
        other.load_state_dict(dict(layer.state_dict(), scale=torch.full((32,), float("nan"), device=device)))
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in before.items())  # nothing was loaded


# -- Int8Weight: the int8 training protocol as a type -------------------------------------------------------------------
def bound(layer):
    w = layer.weight
    return (isinstance(w, Int8Weight) and w.scale is layer.scale and w.group_size == layer.group_size
            and w.int8_owner() is layer)


@pytest.mark.parametrize("device", DEVICES)
def test_weight_is_an_int8_weight_carrying_scale_group_size_and_float_grad(device):
    layer = Int8Linear.from_linear(linear(64, 16, device), group_size=32)
    assert bound(layer) and isinstance(layer.weight, nn.Parameter) and layer.weight.float_grad is None
    assert [n for n, _ in layer.named_parameters()] == ["weight", "bias"]
    layer(torch.randn(2, 64, device=device)).sum().backward()
    assert layer.weight.float_grad.shape == (16, 64)
    with pytest.raises(TypeError, match="Int8Weight holds int8 data"):
        Int8Weight(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="cannot require grad"):
        Int8Weight(torch.zeros(4, 4, dtype=torch.int8), requires_grad=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("assign", [False, True])
def test_state_dict_holds_plain_tensors_and_loading_keeps_the_type(assign, device):
    a = Int8Linear.from_linear(linear(64, 16, device), group_size=32)
    sd = a.state_dict()
    assert type(sd["weight"]) is torch.Tensor and sd["weight"].dtype == torch.int8  # the format of before
    b = Int8Linear(64, 16, group_size=32, device=device)
    b.load_state_dict({k: v.clone() for k, v in sd.items()}, assign=assign)
    assert bound(b) and torch.equal(b.weight, a.weight) and torch.equal(b.scale, a.scale)
    x = torch.randn(3, 64, device=device)
    assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("device", DEVICES)
def test_deepcopy_and_pickle_keep_the_type_and_one_scale_tensor(device, tmp_path):
    import copy

    a = Int8Linear.from_linear(linear(64, 16, device), group_size=32)
    a(torch.randn(2, 64, device=device)).sum().backward()
    b = copy.deepcopy(a)
    assert bound(b) and b.scale is not a.scale and b.weight.float_grad is not a.weight.float_grad
    assert torch.equal(b.weight.float_grad, a.weight.float_grad) and torch.equal(b.weight, a.weight)
    b.scale.mul_(2)  # the copy's weight and buffer are one tensor, apart from the original's
    assert b.weight.scale is b.scale and not torch.equal(a.scale, b.scale)
    torch.save(a, tmp_path / "layer.pt")
    c = torch.load(tmp_path / "layer.pt", weights_only=False)
    assert bound(c) and torch.equal(c.weight, a.weight) and torch.equal(c.weight.float_grad, a.weight.float_grad)


def test_deepcopied_model_trains_apart_from_the_original():
    """QGaLoreAdamW8bit writes the copy's weight and scales, never the original's (the scale travels with the
    weight)."""
    pytest.importorskip("bitsandbytes")  # QGaLoreAdamW8bit / GaLoreAdamW8bit build their 8-bit moments with it
    import copy

    from weightkit.optim import QGaLoreAdamW8bit, param_groups

    torch.manual_seed(0)
    model = nn.Sequential(Int8Linear.from_linear(nn.Linear(32, 16), group_size=16))
    twin = copy.deepcopy(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = QGaLoreAdamW8bit(param_groups(twin, rank=4, update_proj_gap=5), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        twin(torch.randn(8, 32)).pow(2).mean().backward()
        opt.step()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not torch.equal(twin[0].weight, model[0].weight) and not torch.equal(twin[0].scale, model[0].scale)


def test_inference_compiles():
    """torch.compile of the layer (inference) traces through the Int8Weight parameter."""
    torch.manual_seed(0)
    layer = Int8Linear.from_linear(nn.Linear(64, 32), group_size=32)
    x = torch.randn(4, 64)
    with torch.no_grad():
        assert torch.equal(torch.compile(layer)(x), layer(x))


def test_float_grad_hook_runs_after_each_backward_and_can_be_removed():
    torch.manual_seed(0)
    layer = Int8Linear.from_linear(torch.nn.Linear(32, 8), group_size=16)
    seen = []
    handle = layer.weight.register_float_grad_hook(lambda w: seen.append(w.float_grad.clone()))
    x = torch.randn(4, 32)
    layer(x).sum().backward()
    assert len(seen) == 1 and torch.equal(seen[0], layer.weight.float_grad)
    layer(x).sum().backward()  # accumulates: the hook sees the running sum
    assert len(seen) == 2 and torch.allclose(seen[1], 2 * seen[0])
    handle.remove()
    layer(x).sum().backward()
    assert len(seen) == 2
    with pytest.raises(TypeError, match="hook must be callable"):
        layer.weight.register_float_grad_hook(3)
