"""Data-reading checks (NaN/Inf inputs, scale signs, index ranges) are debug checks: off by default, since on a GPU
each costs a host-device sync per call; on with weightkit.debug_checks / set_debug_checks / WEIGHTKIT_DEBUG_CHECKS."""

import pytest
import torch

import weightkit
from tests.conftest import DEVICES
from weightkit.ops._checks import debug_checks_enabled, exact_div
from weightkit.ops.int8 import int8_matmul


def _nan_call(device):
    x = torch.randn(2, 32, device=device)
    x[1, 3] = float("nan")
    w_q = torch.randint(-127, 128, (16, 32), dtype=torch.int8, device=device)
    return int8_matmul(x, w_q, torch.rand(64, device=device) + 0.1, 8)


@pytest.mark.parametrize("device", DEVICES)
def test_data_checks_off_by_default_on_when_asked(device, weightkit_env):
    weightkit_env("WEIGHTKIT_DEBUG_CHECKS", None)
    weightkit_env("WEIGHTKIT_CHECK_FINITE", None)
    assert not debug_checks_enabled()
    y = _nan_call(device)  # no check: the NaN propagates to its row only
    assert torch.isnan(y[1]).all() and torch.isfinite(y[0]).all()
    with weightkit.debug_checks():
        assert debug_checks_enabled()
        with pytest.raises(ValueError, match="x contains 1 non-finite"):
            _nan_call(device)
        with weightkit.debug_checks(False):
            _nan_call(device)
    assert not debug_checks_enabled()
    weightkit_env("WEIGHTKIT_DEBUG_CHECKS", "1")
    with pytest.raises(ValueError, match="non-finite"):
        _nan_call(device)
    weightkit.set_debug_checks(False)
    try:
        _nan_call(device)
    finally:
        weightkit.set_debug_checks(None)
    assert debug_checks_enabled()  # back to the environment


@pytest.mark.parametrize("device", DEVICES)
def test_exact_div_is_the_correctly_rounded_division(device):
    t = torch.randn(4096, device=device) * 100
    for d in (3.0, 15, 127, 7.25):  # exact in fp32, so the divisor itself is not rounded
        want = (t.double().cpu() / d).float()  # division in float64 then one rounding == the fp32 IEEE quotient
        assert torch.equal(exact_div(t, d).cpu(), want)
