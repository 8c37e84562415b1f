"""The Triton stochastic-rounding kernels take one Philox evaluation per 4 stream positions (a tile aligned to a
multiple of 4): every alignment of the offset, tails, several programs, and the tiled vs per-group int8_sr_update_
paths must give the reference's bits."""

import pytest
import torch

from tests.conftest import DEVICES, usable_backends
from weightkit import use_backend
from weightkit.ops import int8


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("offset", [0, 1, 2, 3, 4, 5, 2**31, 2**31 + 2, 2**33 + 3])
@pytest.mark.parametrize("n,group", [(7, 7), (1030, 2), (4 * 1024 + 3, 1)])
def test_sr_every_offset_alignment(device, offset, n, group):
    x = torch.randn(n, device=device) * 3
    scale = int8.absmax_scale(x, group)
    with use_backend("reference"):
        want = int8.stochastic_round_int8(x, scale, group, seed=11, offset=offset)
    for name in usable_backends(int8._SR, device):
        with use_backend(name):
            got = int8.stochastic_round_int8(x, scale, group, seed=11, offset=offset)
        assert torch.equal(got, want), (name, offset)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("groups,group,offset", [(37, 128, 0), (37, 128, 4 * 999), (37, 128, 2**31), (37, 128, 2), (5, 12, 0),
                                                 (300, 4, 8), (3, 256, 0)])
def test_sr_update_tiled_and_general_paths(device, groups, group, offset):
    w = torch.randn(groups * group, device=device)
    scale0 = int8.absmax_scale(w, group)
    q0 = int8.stochastic_round_int8(w, scale0, group, seed=1)
    delta = torch.randn(groups * group, device=device) * 0.05
    with use_backend("reference"):
        q_ref, s_ref = q0.clone(), scale0.clone()
        int8.int8_sr_update_(q_ref, s_ref, delta, group, decay=0.99, seed=5, offset=offset)
    for name in usable_backends(int8._SR_UPDATE, device):
        q, s = q0.clone(), scale0.clone()
        with use_backend(name):
            int8.int8_sr_update_(q, s, delta, group, decay=0.99, seed=5, offset=offset)
        assert torch.equal(s, s_ref), name
        assert torch.equal(q, q_ref), name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("groups,group,offset", [(37, 128, 0), (5, 12, 3)])  # the tiled and the per-group kernel
def test_sr_update_device_flag(device, groups, group, offset):
    """found_inf (the optimizers' device-side skip): set, nothing is written (a NaN delta included, without the data
    check raising); clear, the update is the call's without a flag, bit for bit; on every backend."""
    print("seed 0")
    torch.manual_seed(0)
    w = torch.randn(groups * group, device=device)
    scale0 = int8.absmax_scale(w, group)
    q0 = int8.stochastic_round_int8(w, scale0, group, seed=1)
    delta = torch.randn(groups * group, device=device) * 0.05
    bad = delta.clone()
    bad[groups * group // 2] = float("nan")
    with use_backend("reference"):
        q_ref, s_ref = q0.clone(), scale0.clone()
        int8.int8_sr_update_(q_ref, s_ref, delta, group, decay=0.99, seed=5, offset=offset)
    clear, found = torch.zeros(1, device=device), torch.full((1,), 3.0, device=device)  # any nonzero value is set
    for name in usable_backends(int8._SR_UPDATE, device):
        with use_backend(name):
            q, s = q0.clone(), scale0.clone()
            int8.int8_sr_update_(q, s, delta, group, decay=0.99, seed=5, offset=offset, found_inf=clear)
            assert torch.equal(q, q_ref) and torch.equal(s, s_ref), name
            for d in (delta, bad):
                q, s = q0.clone(), scale0.clone()
                int8.int8_sr_update_(q, s, d, group, decay=0.99, seed=5, offset=offset, found_inf=found)
                assert torch.equal(q, q0) and torch.equal(s, scale0), name
    with pytest.raises(ValueError, match="found_inf must hold one value"):
        int8.int8_sr_update_(q0.clone(), scale0.clone(), delta, group, found_inf=torch.zeros(2, device=device))
    with pytest.raises(TypeError, match="found_inf must have dtype"):
        int8.int8_sr_update_(q0.clone(), scale0.clone(), delta, group, found_inf=torch.zeros(1, device=device).half())
