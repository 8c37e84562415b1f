"""Int8Linear: close to the nn.Linear it came from, gradients (input, and the weight's ordinary .grad), state round
trip, checkpoints of earlier versions, the Int8Weight type, on every device (CPU and, when present, CUDA). Training
with torch's machinery (clipping, GradScaler, DDP, FSDP2, hooks, compile, torch optimizers): test_int8_training.py."""

import os
import warnings

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
    # stored as int8 with float32 group scales, presented as the float dtype it came from, trainable
    assert q.weight.qdata.dtype == torch.int8 and q.weight.dtype == lin.weight.dtype and q.weight.requires_grad
    assert q.weight.device.type == q.scale.device.type == q.bias.device.type == device
    stored = q.weight.qdata.numel() * q.weight.qdata.element_size() + q.scale.numel() * q.scale.element_size()
    assert stored < lin.weight.numel() * lin.weight.element_size() / 3
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
    grad = layer.weight.grad  # an ordinary gradient, of the dtype the weight presents
    assert type(grad) is torch.Tensor and grad.dtype == dtype and grad.device == layer.weight.device
    torch.testing.assert_close(grad.float(), expected_wg, **t)
    torch.testing.assert_close(layer.bias.grad.float(), g.float().sum((0, 1)), **t)
    layer(x).backward(g)  # autograd accumulates it
    torch.testing.assert_close(layer.weight.grad.float(), 2 * expected_wg, **t)


@pytest.mark.parametrize("device", DEVICES)
def test_weight_grad_tracked_when_nothing_else_needs_a_gradient(device):
    """Only the int8 weight trains (frozen bias, input without grad): backward still runs and fills its .grad."""
    torch.manual_seed(2)
    layer = Int8Linear.from_linear(linear(32, 8, device), group_size=16)
    layer.bias.requires_grad_(False)
    x = torch.randn(6, 32, device=device)
    y = layer(x)
    assert y.requires_grad
    y.pow(2).sum().backward()
    expected = (2 * y.detach()).T @ x
    torch.testing.assert_close(layer.weight.grad, expected, **tol(torch.float32, device))
    assert layer.bias.grad is None


@pytest.mark.parametrize("device", DEVICES)
def test_to_device_and_dtype_keeps_int8_weight_and_float32_scale(device):
    layer = Int8Linear.from_linear(nn.Linear(64, 16), group_size=32)
    w, scale = layer.weight.clone(), layer.scale.clone()
    moved = layer.to(device=device, dtype=torch.bfloat16)
    # the storage stays int8 with float32 scales; only the presented dtype (and the gradient's) becomes bfloat16
    assert moved is layer and layer.weight.dtype == torch.bfloat16 and layer.weight.qdata.dtype == torch.int8
    assert layer.scale.dtype == torch.float32
    assert layer.weight.device.type == layer.scale.device.type == layer.bias.device.type == device
    assert layer.bias.dtype == torch.bfloat16
    # the Int8Weight survives the move with its attributes (Q-GaLore writes values and scales)
    assert isinstance(layer.weight, Int8Weight) and layer.weight.scale is layer.scale and layer.weight.group_size == 32
    assert torch.equal(layer.weight.qdata.cpu(), w.qdata) and torch.equal(layer.scale.cpu(), scale)
    x = torch.randn(3, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
    layer(x).float().sum().backward()
    assert x.grad.device.type == device and layer.weight.grad.device.type == device
    accumulated = layer.weight.grad.float().clone()
    layer.to("cpu").to(device=device, dtype=torch.bfloat16)  # an accumulated weight gradient moves with the layer
    assert layer.weight.grad.dtype == torch.bfloat16 and layer.weight.grad.device.type == device
    layer(x).float().sum().backward()  # and keeps accumulating there
    torch.testing.assert_close(layer.weight.grad.float(), 2 * accumulated, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_inference_keeps_no_weight_grad(device):
    layer = Int8Linear.from_linear(linear(32, 16, device), group_size=16)
    with torch.no_grad():
        layer(torch.randn(2, 32, device=device))
    assert layer.weight.grad is None


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


# -- Int8Weight: int8 values and scales presented as a float tensor ----------------------------------------------------
def bound(layer):
    w = layer.weight
    return (isinstance(w, Int8Weight) and w.scale is layer.scale and w.group_size == layer.group_size
            and w.qdata.dtype == torch.int8)


@pytest.mark.parametrize("device", DEVICES)
def test_weight_is_an_int8_weight_parameter_with_an_ordinary_grad(device):
    layer = Int8Linear.from_linear(linear(64, 16, device), group_size=32)
    assert bound(layer) and isinstance(layer.weight, nn.Parameter) and layer.weight.grad is None
    assert [n for n, _ in layer.named_parameters()] == ["weight", "bias"] and not list(layer.buffers())
    layer(torch.randn(2, 64, device=device)).sum().backward()
    assert type(layer.weight.grad) is torch.Tensor and layer.weight.grad.shape == (16, 64)
    # reading it reads the dequantized values (plain tensors come back)
    w = layer.dequantized_weight()
    assert torch.equal(layer.weight * 1, w) and torch.equal(layer.weight.dequantize(), w)
    torch.testing.assert_close(layer.weight.norm(), w.norm())
    with pytest.raises(TypeError, match="Int8Weight holds int8 data"):
        Int8Weight(torch.zeros(4, 4), torch.ones(1), 16)
    with pytest.raises(TypeError, match="needs its scale"):
        Int8Weight(torch.zeros(4, 4, dtype=torch.int8))
    with pytest.raises(TypeError, match="presents a float dtype"):
        Int8Weight(torch.zeros(4, 4, dtype=torch.int8), torch.ones(1), 16, dtype=torch.int32)


@pytest.mark.parametrize("device", DEVICES)
def test_track_weight_grad_false_freezes_the_weight(device):
    layer = Int8Linear.from_linear(linear(32, 8, device), group_size=16, track_weight_grad=False)
    assert not layer.weight.requires_grad and not layer.track_weight_grad
    x = torch.randn(2, 32, device=device, requires_grad=True)
    layer(x).sum().backward()
    assert layer.weight.grad is None and x.grad is not None
    layer.track_weight_grad = True
    assert layer.weight.requires_grad


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
    assert bound(b) and b.scale is not a.scale and b.weight.grad is not a.weight.grad
    assert torch.equal(b.weight.grad, a.weight.grad) and torch.equal(b.weight, a.weight)
    assert b.weight.requires_grad and isinstance(b.weight, nn.Parameter)
    b.scale.mul_(2)  # the copy's weight and buffer are one tensor, apart from the original's
    assert b.weight.scale is b.scale and not torch.equal(a.scale, b.scale)
    torch.save(a, tmp_path / "layer.pt")
    c = torch.load(tmp_path / "layer.pt", weights_only=False)
    assert bound(c) and torch.equal(c.weight, a.weight) and torch.equal(c.weight.grad, a.weight.grad)
    assert c.weight.requires_grad and isinstance(c.weight, nn.Parameter)
    assert torch.equal(c.weight.sr_state, a.weight.sr_state)  # the rounding stream continues where it was


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


def test_compile_cache_key_follows_the_layout_not_the_values():
    """Int8Weight._stable_hash_for_caching (torch.compile's AOTAutograd cache key; torch 2.13 warns for a wrapper
    subclass without one): equal for weights that differ only in values and rounding counter, different when the
    shape, presented dtype, group size, requires_grad or the held tensors' layout differ."""
    torch.manual_seed(0)
    a = Int8Linear.from_linear(nn.Linear(64, 32), group_size=32).weight
    b = Int8Linear.from_linear(nn.Linear(64, 32), group_size=32).weight
    b.sr_state[1] += 5
    assert not torch.equal(a.qdata, b.qdata)
    key = a._stable_hash_for_caching()
    assert isinstance(key, str) and key == b._stable_hash_for_caching()
    others = [Int8Linear.from_linear(nn.Linear(64, 32), group_size=16).weight,
              Int8Linear.from_linear(nn.Linear(64, 16), group_size=32).weight,
              Int8Weight(a.qdata, a.scale, 32, dtype=torch.bfloat16, sr_state=a.sr_state),
              Int8Weight(a.qdata, a.scale, 32, sr_state=a.sr_state, requires_grad=False),
              Int8Weight(a.qdata.t().contiguous().t(), a.scale, 32, sr_state=a.sr_state, requires_grad=True)]
    assert a.requires_grad and not others[3].requires_grad and others[4].qdata.stride() != a.qdata.stride()
    keys = [w._stable_hash_for_caching() for w in others]
    assert key not in keys and len(set(keys)) == len(keys)


def test_float_grad_api_is_deprecated_and_names_what_to_use():
    from weightkit.optim.distributed import all_reduce_float_grads

    torch.manual_seed(0)
    layer = Int8Linear.from_linear(torch.nn.Linear(32, 8), group_size=16)
    x = torch.randn(4, 32)
    layer(x).sum().backward()
    with pytest.warns(DeprecationWarning, match=r"read weight\.grad"):
        assert layer.weight.float_grad is layer.weight.grad
    with pytest.warns(DeprecationWarning, match="set weight.grad"):
        layer.weight.float_grad = None
    assert layer.weight.grad is None
    seen = []
    with pytest.warns(DeprecationWarning, match="register_post_accumulate_grad_hook"):
        handle = layer.weight.register_float_grad_hook(lambda w: seen.append(w.grad.clone()))
    layer(x).sum().backward()
    assert len(seen) == 1 and torch.equal(seen[0], layer.weight.grad)
    handle.remove()
    layer(x).sum().backward()
    assert len(seen) == 1
    with pytest.warns(DeprecationWarning, match="DistributedDataParallel all-reduces itself"):
        assert all_reduce_float_grads(layer) == 0


# -- checkpoints of earlier versions -----------------------------------------------------------------------------------
FIXTURE = os.path.join(os.path.dirname(__file__), "data", "int8linear_ef01f0a.pt")


@pytest.mark.parametrize("assign", [False, True])
def test_checkpoint_of_the_float_grad_version_loads_and_computes_the_same(assign):
    """tests/nn/data/int8linear_ef01f0a.pt was written by the Int8Linear of commit ef01f0a (int8 parameter, gradient
    in float_grad; tests/nn/data/make_int8linear_fixture.py): its state dict loads, and forward, input gradient and
    weight gradient (now .grad) are bit-identical on the reference backend."""
    from weightkit import use_backend

    saved = torch.load(FIXTURE, weights_only=True)
    cfg = saved["config"]
    assert list(saved["state_dict"]) == ["weight", "bias", "scale"]
    layer = Int8Linear(cfg["in_features"], cfg["out_features"], cfg["bias"], cfg["group_size"])
    layer.load_state_dict(saved["state_dict"], assign=assign)
    assert bound(layer) and layer.weight.requires_grad
    assert list(layer.state_dict()) == ["weight", "bias", "scale"]  # and saves the same format
    assert all(torch.equal(v, saved["state_dict"][k]) and type(v) is torch.Tensor
               for k, v in layer.state_dict().items())
    x = saved["x"].clone().requires_grad_()
    with use_backend("reference"):
        y = layer(x)
        y.backward(saved["grad_out"])
    assert torch.equal(y, saved["y"]) and torch.equal(x.grad, saved["grad_x"])
    assert torch.equal(layer.weight.grad, saved["grad_weight"])


def test_state_dict_needs_weight_and_scale_together():
    layer = Int8Linear(32, 8, group_size=16)
    sd = layer.state_dict()
    with pytest.raises(ValueError, match="load together"):
        layer.load_state_dict({"weight": sd["weight"], "bias": sd["bias"]}, strict=False)
    missing = layer.load_state_dict({"bias": sd["bias"]}, strict=False).missing_keys
    assert sorted(missing) == ["scale", "weight"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer.load_state_dict(sd)  # no warning on the normal path
