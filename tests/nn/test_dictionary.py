"""DictLinear: exact compression accounting, forward == dense (D S)^T, training, from_linear."""

import pytest
import torch
from torch import nn

from weightkit.compress.dictionary import dictionary_size
from weightkit.nn import DictLinear


def test_forward_equals_dense_weight_and_bytes_are_exact():
    torch.manual_seed(0)
    layer = DictLinear(48, 40, k=24, s=6)
    x = torch.randn(5, 3, 48)
    torch.testing.assert_close(layer(x), x @ layer.dense_weight().T + layer.bias, rtol=1e-5, atol=1e-5)
    assert layer.indices.dtype == torch.uint8
    expected = 48 * 24 * 4 + 6 * 40 * 4 + 6 * 40 * 1 + 40 * 4
    assert layer.stored_bytes() == expected
    assert layer.compression_ratio() == pytest.approx(1 - expected / ((48 * 40 + 40) * 4))


def test_trains_dictionary_and_values_indices_frozen():
    torch.manual_seed(0)
    layer = DictLinear(32, 16, k=16, s=4)
    target = nn.Linear(32, 16)
    idx0 = layer.indices.clone()
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    x = torch.randn(256, 32)
    losses = []
    for _ in range(100):
        loss = ((layer(x) - target(x).detach()) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0] and torch.equal(layer.indices, idx0)


@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_from_linear_meets_the_budget(ratio):
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    layer = DictLinear.from_linear(lin, ratio=ratio, iters=2)
    dense_weight_bytes = 64 * 48 * 4
    weight_bytes = layer.stored_bytes() - 48 * 4
    assert weight_bytes <= (1 - ratio) * dense_weight_bytes
    assert layer.k == 2 * layer.s and (layer.indices.long() < layer.k).all()
    rel = (layer.dense_weight() - lin.weight).norm() / lin.weight.norm()
    assert float(rel) < 0.9


def test_dictionary_size_and_errors():
    k, s = dictionary_size(384, 384, 0.2)
    assert k == 2 * s and 384 * k * 4 + s * 384 * 5 <= 0.8 * 384 * 384 * 4
    with pytest.raises(ValueError, match="ratio"):
        dictionary_size(8, 8, 1.5)
    with pytest.raises(ValueError, match="s=5 nonzeros per column cannot exceed k=4"):
        DictLinear(8, 8, k=4, s=5)
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        DictLinear(8, 8, k=0, s=1)


def test_state_dict_refuses_indices_outside_the_dictionary():
    layer = DictLinear(32, 24, k=16, s=4)
    other = DictLinear(32, 24, k=16, s=4)
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other.indices, layer.indices)
    before = other.indices.clone()
    wide = dict(layer.state_dict(), indices=layer.indices.long() + 250)  # would wrap around in a uint8 buffer
    with pytest.raises(ValueError, match=r"indices hold values in \[250, .*outside the k=16 atoms"):
        other.load_state_dict(wide)
    with pytest.raises(ValueError, match="indices must be an integer tensor"):
        other.load_state_dict(dict(layer.state_dict(), indices=layer.indices.float()))
    assert torch.equal(other.indices, before)
