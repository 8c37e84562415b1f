"""weightkit.nn.ksvd, the K-SVD maths behind DictLinear.from_linear and weightkit.compress.dictionary: OMP is least
squares on exactly s atoms, learning never increases the error; on every device (CPU and, when present, CUDA)."""

import pytest
import torch

from tests.conftest import DEVICES
from weightkit.nn.ksvd import learn_dictionary, omp, scatter_codes


@pytest.mark.parametrize("device", DEVICES)
def test_omp_is_least_squares_on_exactly_s_distinct_atoms(device):
    torch.manual_seed(0)
    D = torch.randn(32, 48, dtype=torch.float64, device=device)
    D /= D.norm(dim=0)
    Y = torch.randn(32, 20, dtype=torch.float64, device=device)
    idx, coef = omp(D, Y, 6)
    assert idx.device == coef.device == Y.device
    for c in range(20):
        assert len(set(idx[c].tolist())) == 6
        ls = torch.linalg.lstsq(D[:, idx[c]], Y[:, c : c + 1]).solution.squeeze(1)
        torch.testing.assert_close(coef[c], ls, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("device", DEVICES)
def test_learning_error_never_increases(device):
    f64 = dict(dtype=torch.float64, device=device)
    Y = torch.randn(40, 8, **f64) @ torch.randn(8, 60, **f64) + 0.3 * torch.randn(40, 60, **f64)
    D, idx, coef, errors = learn_dictionary(Y, 24, 4, iters=6)
    assert D.device == idx.device == coef.device == Y.device
    assert len(errors) == 7 and all(b <= a + 1e-12 for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < errors[0]
    assert (idx[:, 1:] > idx[:, :-1]).all()  # s distinct atoms per column, ascending
    torch.testing.assert_close(errors[-1], float((Y - D @ scatter_codes(idx, coef, 24)).norm() / Y.norm()))
