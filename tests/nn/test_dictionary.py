"""DictLinear: exact compression accounting, forward == dense (D S)^T, training, from_linear, on every device (CPU
and, when present, CUDA)."""

import pytest
import torch
from torch import nn

from tests.conftest import DEVICES
from weightkit.nn.ksvd import dictionary_size
from weightkit.nn import DictLinear


@pytest.mark.parametrize("device", DEVICES)
def test_forward_equals_dense_weight_and_bytes_are_exact(device):
    torch.manual_seed(0)
    layer = DictLinear(48, 40, k=24, s=6, device=device)
    assert {t.device.type for t in (layer.dictionary, layer.values, layer.indices, layer.bias)} == {device}
    x = torch.randn(5, 3, 48, device=device)
    # (x D) S against x (D S): another summation order, a GPU's matmuls other again
    tol = 1e-5 if device == "cpu" else 5e-5
    torch.testing.assert_close(layer(x), x @ layer.dense_weight().T + layer.bias, rtol=tol, atol=tol)
    assert layer.indices.dtype == torch.uint8
    expected = 48 * 24 * 4 + 6 * 40 * 4 + 6 * 40 * 1 + 40 * 4
    assert layer.stored_bytes() == expected
    assert layer.compression_ratio() == pytest.approx(1 - expected / ((48 * 40 + 40) * 4))


@pytest.mark.parametrize("device", DEVICES)
def test_trains_dictionary_and_values_indices_frozen(device):
    torch.manual_seed(0)
    layer = DictLinear(32, 16, k=16, s=4, device=device)
    target = nn.Linear(32, 16, device=device)
    idx0 = layer.indices.clone()
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    x = torch.randn(256, 32, device=device)
    losses = []
    for _ in range(100):
        loss = ((layer(x) - target(x).detach()) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0] and torch.equal(layer.indices, idx0)
    assert layer.dictionary.grad.device.type == layer.values.grad.device.type == device


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_from_linear_meets_the_budget(ratio, device):
    torch.manual_seed(0)
    lin = nn.Linear(64, 48).to(device)
    layer = DictLinear.from_linear(lin, ratio=ratio, iters=2)
    assert {t.device.type for t in (layer.dictionary, layer.values, layer.indices, layer.bias)} == {device}
    dense_weight_bytes = 64 * 48 * 4
    weight_bytes = layer.stored_bytes() - 48 * 4
    assert weight_bytes <= (1 - ratio) * dense_weight_bytes
    assert layer.k == 2 * layer.s and (layer.indices.long() < layer.k).all()
    rel = (layer.dense_weight() - lin.weight.detach()).norm() / lin.weight.detach().norm()
    assert float(rel) < 0.9


@pytest.mark.parametrize("device", DEVICES)
def test_dictionary_size_and_errors(device):
    k, s = dictionary_size(384, 384, 0.2)
    assert k == 2 * s and 384 * k * 4 + s * 384 * 5 <= 0.8 * 384 * 384 * 4
    with pytest.raises(ValueError, match="ratio"):
        dictionary_size(8, 8, 1.5)
    with pytest.raises(ValueError, match="s=5 nonzeros per column cannot exceed k=4"):
        DictLinear(8, 8, k=4, s=5, device=device)
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        DictLinear(8, 8, k=0, s=1, device=device)


@pytest.mark.parametrize("device", DEVICES)
def test_state_dict_refuses_indices_outside_the_dictionary(device):
    layer = DictLinear(32, 24, k=16, s=4, device=device)
    other = DictLinear(32, 24, k=16, s=4, device=device)
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other.indices, layer.indices)
    cpu_copy = DictLinear(32, 24, k=16, s=4, device=device)
    cpu_copy.load_state_dict({k: v.cpu() for k, v in layer.state_dict().items()})  # map_location='cpu' checkpoint
    assert cpu_copy.indices.device.type == device and torch.equal(cpu_copy.indices, layer.indices)
    before = other.indices.clone()
    wide = dict(layer.state_dict(), indices=layer.indices.long() + 250)  # would wrap around in a uint8 buffer
    with pytest.raises(ValueError, match=r"indices hold values in \[250, .*outside the k=16 atoms"):
        other.load_state_dict(wide)
    with pytest.raises(ValueError, match="indices must be an integer tensor"):
        other.load_state_dict(dict(layer.state_dict(), indices=layer.indices.float()))
    assert torch.equal(other.indices, before)
