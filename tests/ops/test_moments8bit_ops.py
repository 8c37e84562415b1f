"""weightkit::blockwise8bit_adam_ (weightkit.ops.moments8bit): the one-pass 8-bit Adam moment update, against its
reference (bit for bit, every backend) and against bitsandbytes' own blockwise quantize / dequantize (the format)."""

import pytest
import torch

from tests.conftest import usable_backends
from weightkit import use_backend
from weightkit.ops import moments8bit
from weightkit.ops.moments8bit import blockwise8bit_adam_, dequantize_reference, quantize_reference

bnbf = pytest.importorskip("bitsandbytes.functional")


def _codes():
    return bnbf.create_dynamic_map(signed=True), bnbf.create_dynamic_map(signed=False)


def _state(shape, seed, zero_block=False):
    gen = torch.Generator().manual_seed(seed)
    cs, cu = _codes()
    m = torch.randn(shape, generator=gen) * 0.1
    v = torch.rand(shape, generator=gen) * 0.01
    if zero_block:  # a block never touched (as after init): absmax 0
        m.view(-1)[:256] = 0
        v.view(-1)[:256] = 0
    qm, sm = bnbf.quantize_blockwise(m, code=cs, blocksize=256)
    qv, sv = bnbf.quantize_blockwise(v, code=cu, blocksize=256)
    return [qm, sm.absmax, qv, sv.absmax], cs, cu


def _step(backend, low, state, cs, cu, **kw):
    state = [t.clone() for t in state]
    with use_backend(backend):
        direction = blockwise8bit_adam_(low, *state, cs, cu, **kw)
    return direction, state


@pytest.mark.parametrize("shape", [(37, 29), (16, 64), (5, 3)])  # partial last block, whole blocks, one short block
def test_backends_bit_identical(shape):
    print("seed 0")
    state, cs, cu = _state(shape, 0, zero_block=shape[0] * shape[1] > 256)
    low = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    want = _step("reference", low, state, cs, cu, beta1=0.9, beta2=0.999, eps=1e-6)
    backends = [b for b in usable_backends(moments8bit._ADAM8, "cpu") if b != "reference"]
    assert "cpu" in backends, backends
    for backend in backends:
        got = _step(backend, low, state, cs, cu, beta1=0.9, beta2=0.999, eps=1e-6)
        assert torch.equal(got[0], want[0]), backend
        for a, b in zip(got[1], want[1]):
            assert torch.equal(a, b), backend


@pytest.mark.parametrize("seed", [3, 4])
def test_backends_stay_bit_identical_over_steps(seed):
    """Twelve steps of each backend from the same state, other hyperparameters, gradients over many scales (so that
    values land near midpoints and on both sides of the absmax floor), several blocks and threads: the codes,
    absmaxes and directions stay the reference's bit for bit."""
    print(f"seed {seed}")
    gen = torch.Generator().manual_seed(seed)
    state, cs, cu = _state((130, 53), seed)  # 27 blocks: the cpu kernel splits them over threads
    hyper = dict(beta1=0.8, beta2=0.95, eps=1e-8)
    runs = {b: [t.clone() for t in state] for b in usable_backends(moments8bit._ADAM8, "cpu")}
    for step in range(12):
        low = torch.randn(130, 53, generator=gen) * torch.logspace(-6, 2, 53)[None, :]
        if step == 5:
            low[:10] = 0  # whole blocks of zero gradient: their moments decay toward the absmax floor
        out = {}
        for backend, st in runs.items():
            with use_backend(backend):
                out[backend] = blockwise8bit_adam_(low, *st, cs, cu, **hyper)
        for backend, st in runs.items():
            assert torch.equal(out[backend], out["reference"]), (backend, step)
            assert all(torch.equal(a, b) for a, b in zip(st, runs["reference"])), (backend, step)


def test_state_is_bitsandbytes_format():
    """bitsandbytes decodes the written state bit for bit, and its own quantizer gives the same absmax. Codes: ours
    is the nearest code value everywhere; bitsandbytes' native CPU quantizer (a table-driven binary search) agrees
    on the signed map but for values within a few ulps of a midpoint (one step apart), and is farther from the
    value for ~10% of the unsigned map's tiny values (below ~1e-5 of the block's absmax, e.g. 2.7e-8 -> code 7 =
    1.6e-5 instead of code 0 = 0.0): never nearer than ours."""
    cs, cu = _codes()
    gen = torch.Generator().manual_seed(2)
    for signed, x, code in ((True, torch.randn(20480, generator=gen), cs),
                            (False, torch.rand(20480, generator=gen) ** 4, cu)):
        q, absmax = quantize_reference(x, code)
        decoded = bnbf.dequantize_blockwise(q, absmax=absmax, code=code, blocksize=256)
        assert torch.equal(decoded, dequantize_reference(q, absmax, code))
        qb, sb = bnbf.quantize_blockwise(x, code=code, blocksize=256)
        assert torch.equal(sb.absmax, absmax)
        if signed:
            diff = (q.int() - qb.int()).abs()
            assert diff.max() <= 1 and (diff > 0).float().mean() < 0.005
        normed = x.reshape(-1, 256) / absmax.unsqueeze(1)
        err = (code[q.long()].reshape(-1, 256) - normed).abs()
        err_bnb = (code[qb.long()].reshape(-1, 256) - normed).abs()
        assert bool((err <= err_bnb).all())


def test_one_pass_equals_bitsandbytes_three_passes():
    """Dequantize (bitsandbytes) -> update -> quantize: the same moments, up to the quantizer's midpoint ties."""
    state, cs, cu = _state((48, 40), 3)
    low = torch.randn(48, 40, generator=torch.Generator().manual_seed(4))
    direction, (qm, am, qv, av) = _step("reference", low, state, cs, cu, beta1=0.8, beta2=0.95, eps=1e-6)
    m = bnbf.dequantize_blockwise(state[0], absmax=state[1], code=cs, blocksize=256) * 0.8 + low * (1 - 0.8)
    v = bnbf.dequantize_blockwise(state[2], absmax=state[3], code=cu, blocksize=256) * 0.95 + low * low * (1 - 0.95)
    torch.testing.assert_close(direction, m / (v.sqrt() + 1e-6), rtol=1e-6, atol=0)
    for x, q, a, code in ((m, qm, am, cs), (v, qv, av, cu)):
        qb, sb = bnbf.quantize_blockwise(x, code=code, blocksize=256)
        assert torch.equal(a, sb.absmax)
        want, _ = quantize_reference(x, code)
        assert torch.equal(q, want)  # one pass = dequantize, update, quantize


def test_device_flag_keeps_the_moments():
    """found_inf set: the moments keep their bytes and the direction is 0 (a NaN gradient included); clear: the
    update without a flag, bit for bit; every backend."""
    print("seed 0")
    state, cs, cu = _state((37, 29), 0)
    low = torch.randn(37, 29, generator=torch.Generator().manual_seed(1))
    bad = low.clone()
    bad[3, 4] = float("nan")
    want = _step("reference", low, state, cs, cu)
    for backend in usable_backends(moments8bit._ADAM8, "cpu"):
        got = _step(backend, low, state, cs, cu, found_inf=torch.zeros(1))
        assert torch.equal(got[0], want[0]) and all(torch.equal(a, b) for a, b in zip(got[1], want[1])), backend
        for g in (low, bad):
            direction, after = _step(backend, g, state, cs, cu, found_inf=torch.ones(1))
            assert torch.equal(direction, torch.zeros_like(low)), backend
            assert all(torch.equal(a, b) for a, b in zip(after, state)), backend


def test_code_table_written_in_place_is_read_anew():
    """The Triton path caches each code table's midpoints; a table changed in place must not reuse them."""
    if "triton" not in usable_backends(moments8bit._ADAM8, "cpu"):
        pytest.skip("Triton needs TRITON_INTERPRET=1 on the CPU")
    state, cs, cu = _state((16, 64), 3)
    low = torch.randn(16, 64, generator=torch.Generator().manual_seed(4))
    _step("triton", low, state, cs, cu)  # caches cs's midpoints
    cs.copy_(torch.linspace(-1, 1, 256))  # another signed table, same tensor
    want = _step("reference", low, state, cs, cu)
    got = _step("triton", low, state, cs, cu)
    assert torch.equal(got[0], want[0]) and all(torch.equal(a, b) for a, b in zip(got[1], want[1]))


@pytest.mark.parametrize("change, match", [
    (lambda a: a.__setitem__(0, a[0].double()), "low must have dtype"),
    (lambda a: a.__setitem__(1, a[1][:-1]), "exp_avg_q must be contiguous"),
    (lambda a: a.__setitem__(4, a[4][:-1]), "exp_avg_sq_absmax must be contiguous"),
    (lambda a: a.__setitem__(5, a[5][:-1]), "code_signed must be a 256-entry"),
    (lambda a: a.__setitem__(7, 1.5), "beta1 must be in"),
])
def test_bad_input_names_the_argument(change, match):
    state, cs, cu = _state((8, 40), 5)
    args = [torch.randn(8, 40), *state, cs, cu, 0.9, 0.999, 1e-6]
    change(args)
    with pytest.raises((ValueError, TypeError), match=match):
        blockwise8bit_adam_(*args[:7], beta1=args[7], beta2=args[8], eps=args[9])


def test_non_finite_values_give_the_references_codes():
    """Without a device flag (debug checks off) a NaN or infinity in the gradient reaches the moments: every backend
    writes what the reference writes (amax NaN for the block, torch.bucketize's code 255 for a NaN)."""
    state, cs, cu = _state((3, 200), 5)
    low = torch.randn(3, 200, generator=torch.Generator().manual_seed(6))
    low[1, 5], low[2, 7] = float("nan"), float("inf")
    want = _step("reference", low, state, cs, cu)
    assert want[1][0].view(-1)[205] == 255 and want[1][1].isnan().any()  # the case is what it means to be
    for backend in usable_backends(moments8bit._ADAM8, "cpu"):
        got = _step(backend, low, state, cs, cu)
        for a, b in zip((got[0], *got[1]), (want[0], *want[1])):
            assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num()), backend
