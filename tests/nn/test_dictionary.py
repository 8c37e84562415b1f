"""DictLinear: exact compression accounting of the bitmask format, forward == dense (D S)^T, training, from_linear,
state_dict (and the former ELL layout converted on load), on every device (CPU and, when present, CUDA)."""

import os

import pytest
import torch
from torch import nn

import weightkit
from tests.conftest import DEVICES
from weightkit.nn.ksvd import dictionary_size
from weightkit.ops.dictionary import bitmask_to_dense, index_dtype_for
from weightkit.nn import DictLinear


@pytest.mark.parametrize("device", DEVICES)
def test_forward_equals_dense_weight_and_bytes_are_exact(device):
    torch.manual_seed(0)
    layer = DictLinear(48, 40, k=24, s=6, device=device)
    tensors = (layer.dictionary, layer.values, layer.bitmask, layer.word_offsets, layer.bias)
    assert {t.device.type for t in tensors} == {device}
    x = torch.randn(5, 3, 48, device=device)
    # (x D) S against x (D S): another summation order, a GPU's matmuls other again
    tol = 1e-5 if device == "cpu" else 5e-5
    torch.testing.assert_close(layer(x), x @ layer.dense_weight().T + layer.bias, rtol=tol, atol=tol)
    assert layer.bitmask.dtype == torch.int32 and layer.bitmask.shape == (1, 40)
    assert layer.word_offsets.dtype == torch.uint8 and layer.word_offsets.shape == (1, 40)
    # dictionary, values, one int32 mask word and one uint8 offset per column, bias
    expected = 48 * 24 * 4 + 6 * 40 * 4 + 40 * 4 + 40 * 1 + 40 * 4
    assert layer.stored_bytes() == expected
    assert layer.compression_ratio() == pytest.approx(1 - expected / ((48 * 40 + 40) * 4))


@pytest.mark.parametrize("device", DEVICES)
def test_trains_dictionary_and_values_bitmask_frozen(device):
    torch.manual_seed(0)
    layer = DictLinear(32, 16, k=16, s=4, device=device)
    target = nn.Linear(32, 16, device=device)
    mask0 = layer.bitmask.clone()
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    x = torch.randn(256, 32, device=device)
    losses = []
    for _ in range(100):
        loss = ((layer(x) - target(x).detach()) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0] and torch.equal(layer.bitmask, mask0)
    assert layer.dictionary.grad.device.type == layer.values.grad.device.type == device


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_from_linear_meets_the_budget(ratio, device):
    torch.manual_seed(0)
    lin = nn.Linear(64, 48).to(device)
    layer = DictLinear.from_linear(lin, ratio=ratio, iters=2)
    assert {t.device.type for t in (layer.dictionary, layer.values, layer.bitmask, layer.bias)} == {device}
    dense_weight_bytes = 64 * 48 * 4
    weight_bytes = layer.stored_bytes() - 48 * 4
    assert weight_bytes <= (1 - ratio) * dense_weight_bytes
    assert layer.k == 2 * layer.s and (layer.indices < layer.k).all()
    rel = (layer.dense_weight() - lin.weight.detach()).norm() / lin.weight.detach().norm()
    assert float(rel) < 0.9


@pytest.mark.parametrize("device", DEVICES)
def test_dictionary_size_and_errors(device):
    k, s = dictionary_size(384, 384, 0.2)
    words = (k + 31) // 32
    # the bitmask format's exact bytes: s fp32 values, `words` int32 mask words and uint8 offsets per column
    assert k == 2 * s and 384 * k * 4 + 384 * (s * 4 + words * 5) <= 0.8 * 384 * 384 * 4
    k1, s1 = k + 2, s + 1
    assert 384 * k1 * 4 + 384 * (s1 * 4 + (k1 + 31) // 32 * 5) > 0.8 * 384 * 384 * 4  # the largest that fits
    # the freed index bytes buy nonzeros: ELL (values + uint8 indices) would fit only 94 at this budget
    assert s > 94
    k, s = dictionary_size(4096, 4096, 0.3, value_bytes=2)  # bf16 at the size: int16 offsets
    assert 4096 * k * 2 + 4096 * (s * 2 + (k + 31) // 32 * 6) <= 0.7 * 4096 * 4096 * 2 and s > 819
    with pytest.raises(ValueError, match="ratio"):
        dictionary_size(8, 8, 1.5)
    with pytest.raises(ValueError, match="s=5 nonzeros per column cannot exceed k=4"):
        DictLinear(8, 8, k=4, s=5, device=device)
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        DictLinear(8, 8, k=0, s=1, device=device)


@pytest.mark.parametrize("device", DEVICES)
def test_state_dict_round_trip_and_refuses_bad_bitmasks(device):
    layer = DictLinear(32, 24, k=40, s=4, device=device)
    assert set(layer.state_dict()) == {"dictionary", "values", "bitmask", "bias"}  # word_offsets is derived
    other = DictLinear(32, 24, k=40, s=4, device=device)
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other.bitmask, layer.bitmask) and torch.equal(other.word_offsets, layer.word_offsets)
    x = torch.randn(3, 32, device=device)
    torch.testing.assert_close(other(x), layer(x))
    cpu_copy = DictLinear(32, 24, k=40, s=4, device=device)
    cpu_copy.load_state_dict({k: v.cpu() for k, v in layer.state_dict().items()})  # map_location='cpu' checkpoint
    assert cpu_copy.bitmask.device.type == cpu_copy.word_offsets.device.type == device
    assert torch.equal(cpu_copy.bitmask, layer.bitmask)
    before = other.bitmask.clone()
    extra = layer.bitmask.clone()
    extra[0] |= -(1 << 31)  # bit 31 of word 0: atom 31 < k, a fifth atom in the columns that lacked it
    wrong = {k: v for k, v in layer.state_dict().items()}
    assert not torch.equal(extra, layer.bitmask)
    with pytest.raises(ValueError, match=r"bitmask must set exactly s=4 bits per column"):
        other.load_state_dict(dict(wrong, bitmask=extra))
    high = layer.bitmask.clone()
    high[1] |= 1 << 9  # atom 41 >= k = 40
    with pytest.raises(ValueError, match="bits of atoms >= k=40"):
        other.load_state_dict(dict(wrong, bitmask=high))
    with pytest.raises(ValueError, match="bitmask must be an int32 tensor of shape"):
        other.load_state_dict(dict(wrong, bitmask=layer.bitmask.long()))
    assert torch.equal(other.bitmask, before)


def _former_layout_state_dict(layer_in, layer_out, k, s, device):
    """A state_dict as DictLinear wrote it before the bitmask format (commit 5813033): dictionary, values (s x out, in
    any atom order), indices (s x out, uint8 for k <= 256 else int16: the narrowest dtype), bias."""
    torch.manual_seed(1)
    indices = torch.rand(k, layer_out, device=device).argsort(0)[:s]  # not sorted: the old layer kept any order
    return {"dictionary": torch.randn(layer_in, k, device=device), "values": torch.randn(s, layer_out, device=device),
            "indices": indices.to(index_dtype_for(k)), "bias": torch.randn(layer_out, device=device)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k,s", [(16, 4), (300, 40)])  # uint8 and int16 indices
def test_former_ell_state_dict_loads_converted(device, k, s):
    old = _former_layout_state_dict(24, 20, k, s, device)
    layer = DictLinear(24, 20, k=k, s=s, device=device)
    layer.load_state_dict(old)
    S = torch.zeros(k, 20, device=device).scatter_(0, old["indices"].long(), old["values"])
    assert torch.equal(bitmask_to_dense(layer.bitmask, layer.values.detach(), k), S)
    assert torch.equal(layer.indices, old["indices"].long().sort(0).values)
    x = torch.randn(5, 24, device=device)
    torch.testing.assert_close(layer(x), x @ old["dictionary"] @ S + old["bias"], rtol=1e-5, atol=1e-5)
    assert set(layer.state_dict()) == {"dictionary", "values", "bitmask", "bias"}  # saved in the new format
    other = DictLinear(24, 20, k=k, s=s, device=device)
    before = other.bitmask.clone()
    wide = dict(old, indices=old["indices"].long() + 250)  # would wrap around in a uint8 buffer
    with pytest.raises(ValueError, match=rf"indices hold values in \[250, .*outside the k={k} atoms"):
        other.load_state_dict(wide)
    with pytest.raises(ValueError, match="indices .*must be an integer tensor"):
        other.load_state_dict(dict(old, indices=old["indices"].float()))
    repeated = old["indices"].clone()
    repeated[1] = repeated[0]
    with pytest.raises(ValueError, match="distinct atoms per column"):
        other.load_state_dict(dict(old, indices=repeated))
    assert torch.equal(other.bitmask, before)


FIXTURE = os.path.join(os.path.dirname(__file__), "data", "dictlinear_ell_5813033.pt")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["uint8", "int16"])
def test_state_dict_written_by_the_ell_layout_code_loads(device, case):
    """tests/nn/data/dictlinear_ell_5813033.pt was written by DictLinear at commit 5813033 (ELL layout): for k=16
    (uint8 indices) and k=300 (int16), ``torch.manual_seed(0); layer = DictLinear(12, 10, k, s)``, bias drawn
    normal, x = torch.randn(3, 12), and it holds layer.state_dict(), x and that layer's y = layer(x). Loaded into
    today's layer, the outputs are the old layer's."""
    saved = torch.load(FIXTURE, weights_only=True)[case]
    i, o, k, s = saved["shape"]
    assert "indices" in saved["state_dict"] and "bitmask" not in saved["state_dict"]
    layer = DictLinear(i, o, k=k, s=s, device=device)
    layer.load_state_dict(saved["state_dict"])
    torch.testing.assert_close(layer(saved["x"].to(device)).cpu(), saved["y"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.indices.cpu(), saved["state_dict"]["indices"].long().sort(0).values)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input_errors_name_the_input_not_internals(device):
    """A wrong width, dtype, device or a non-finite input (debug checks on) is named as the layer's input, with the
    layer's in_features: not torch's "mat1 and mat2 shapes cannot be multiplied" nor the op's internal z."""
    layer = DictLinear(48, 24, k=16, s=4).to(device)
    for shape in [(5, 40), (2, 3, 40)]:
        with pytest.raises(ValueError, match=r"DictLinear input has 40 features .*in_features=48"):
            layer(torch.randn(*shape, device=device))
    with pytest.raises(TypeError, match="DictLinear input must have dtype float32, float16 or bfloat16, got float64"):
        layer(torch.randn(5, 48, dtype=torch.float64, device=device))
    with pytest.raises(TypeError, match="got int64"):
        layer(torch.ones(5, 48, dtype=torch.int64, device=device))
    assert layer(torch.randn(0, 48, device=device)).shape == (0, 24)  # an empty batch, as nn.Linear's
    bad = torch.randn(5, 48, device=device)
    bad[2, 7] = float("nan")
    with weightkit.debug_checks(), pytest.raises(ValueError, match="DictLinear input contains non-finite"):
        layer(bad)
    if device == "cuda":
        with pytest.raises(ValueError, match="DictLinear input is on cpu but the layer's parameters are on cuda"):
            layer(torch.randn(5, 48))
