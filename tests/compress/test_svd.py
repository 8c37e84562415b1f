"""Data-aware truncated SVD baseline: byte budget, functional error, optimality vs plain SVD, errors, on every device
(CPU and, when present, CUDA)."""

import copy

import pytest
import torch
from torch import nn

from tests.conftest import DEVICES
from weightkit import compress
from weightkit.compress.common import whitening_factor
from weightkit.compress.svd import svd_rank


def correlated_inputs(n, d, device="cpu"):
    """Drawn on the CPU (the same inputs on every device for a seed), then moved."""
    scales = torch.logspace(0, -2, d)  # strongly anisotropic activations: whitening matters
    return ((torch.randn(n, d) * scales) @ torch.linalg.qr(torch.randn(d, d))[0]).to(device)


@pytest.mark.parametrize("d_in,d_out,ratio", [(384, 384, 0.5), (384, 1536, 0.2), (100, 30, 0.4)])
def test_rank_fits_the_budget_and_is_the_largest(d_in, d_out, ratio):
    r = svd_rank(d_in, d_out, ratio)
    assert r * (d_in + d_out) <= (1 - ratio) * d_in * d_out < (r + 1) * (d_in + d_out)


@pytest.mark.parametrize("device", DEVICES)
def test_functional_error_is_measured_and_beats_data_free_svd(device):
    lin = nn.Linear(48, 40).to(device)
    model = nn.Sequential(lin)
    x = correlated_inputs(1024, 48, device)
    m = copy.deepcopy(model)
    report = compress.svd(m, [x], ratio=0.5, filter_fn=lambda n, mod: True, progress=False)
    (layer,) = report.layers
    r = layer.params["rank"]
    assert isinstance(m[0], nn.Sequential) and m[0][0].weight.shape == (r, 48) and m[0][1].weight.shape == (40, r)
    assert {p.device for p in m.parameters()} == {x.device}
    with torch.no_grad():
        ref = model(x)
        direct = float((m(x) - ref).norm() / (ref - lin.bias).norm())
        U, S, Vh = torch.linalg.svd(lin.weight.double(), full_matrices=False)  # data-free truncation
        w_free = (U[:, :r] * S[:r]) @ Vh[:r]
        free = float((x.double() @ (w_free - lin.weight.double()).T).norm() / (ref - lin.bias).norm())
    assert layer.functional_error == pytest.approx(direct, rel=1e-3, abs=1e-5)
    assert direct < 0.8 * free, (direct, free)
    assert layer.bytes_after == r * (48 + 40) * 4 + 40 * 4 <= 0.5 * 48 * 40 * 4 + 40 * 4
    torch.testing.assert_close(m[0][1].bias, lin.bias)


@pytest.mark.parametrize("device", DEVICES)
def test_error_grows_with_the_ratio(device):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)).to(device)
    x = correlated_inputs(512, 64, device)
    errors = []
    for ratio in (0.2, 0.5, 0.8):
        report = compress.svd(copy.deepcopy(model), [x], ratio=ratio, filter_fn=lambda n, m: True, progress=False)
        errors.append(sum(r.functional_error for r in report.layers))
    assert errors[0] < errors[1] < errors[2], errors


@pytest.mark.parametrize("device", DEVICES)
def test_whitening_factor_of_singular_and_bad_grams(device):
    x = torch.randn(3, 10, dtype=torch.float64, device=device)
    L = whitening_factor(x.T @ x)  # rank 3 < 10: needs the diagonal shift
    assert (torch.diagonal(L) > 0).all()
    torch.testing.assert_close(L @ L.T, x.T @ x, atol=1e-4 * float((x.T @ x).diagonal().mean()), rtol=0)
    with pytest.raises(ValueError, match="non-finite"):
        whitening_factor(torch.full((4, 4), float("nan"), dtype=torch.float64, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_bad_arguments(device):
    model = nn.Sequential(nn.Linear(8, 8)).to(device)
    x = torch.randn(4, 8, device=device)
    for ratio in (0.0, 1.0, -0.1, True):
        with pytest.raises(ValueError, match="ratio"):
            compress.svd(copy.deepcopy(model), [x], ratio=ratio, filter_fn=lambda n, m: True)
    with pytest.raises(ValueError, match="no room for a rank-1"):
        svd_rank(2, 2, 0.9)
    with pytest.raises(TypeError, match="unknown option"):
        compress.compress(model, [x], method="svd", rank=3, filter_fn=lambda n, m: True)
