"""weightkit::galore_adam_update_: every backend == the float64 reference, compile, bad input (opcheck:
test_opcheck.py)."""

import pytest
import torch

from tests.conftest import DEVICES, usable_backends
from weightkit import use_backend
from weightkit.ops import galore as galore_ops
from weightkit.ops.galore import galore_adam_update_

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
       torch.float16: dict(rtol=1e-3, atol=1e-3)}
HYPER = dict(beta1=0.9, beta2=0.999, eps=1e-6, step_size=3e-2, scale=0.25, decay=0.99)


def make(m, n, r, left, dtype=torch.float32, device="cpu"):
    w = torch.randn(m, n, device=device).to(dtype)
    low_shape = (r, n) if left else (m, r)
    ortho = torch.linalg.qr(torch.randn(m if left else n, r, device=device))[0]
    ortho = ortho if left else ortho.T.contiguous()
    low = torch.randn(low_shape, device=device)
    ea = torch.randn(low_shape, device=device) * 0.1
    eas = torch.rand(low_shape, device=device) * 0.1
    return w, low, ea, eas, ortho


def run(backend, args):
    w, low, ea, eas, ortho, left = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    with use_backend(backend):
        galore_adam_update_(w, low, ea, eas, ortho, left, **HYPER)
    return w, ea, eas


def reference64(args):
    w, low, ea, eas, ortho, left = args
    d = lambda t: t.detach().double().clone()  # noqa: E731
    w, low, ea, eas, ortho = map(d, (w, low, ea, eas, ortho))
    ea = ea * HYPER["beta1"] + (1 - HYPER["beta1"]) * low
    eas = eas * HYPER["beta2"] + (1 - HYPER["beta2"]) * low * low
    u = ea / (eas.sqrt() + HYPER["eps"])
    full = ortho @ u if left else u @ ortho
    return (w - HYPER["step_size"] * HYPER["scale"] * full) * HYPER["decay"], ea, eas


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,n,r,left", [(48, 40, 8, True), (37, 53, 5, False), (64, 33, 16, False), (20, 70, 4, True)])
def test_backends_match_float64_reference(device, dtype, m, n, r, left):
    args = (*make(m, n, r, left, dtype, device), left)
    w64, ea64, eas64 = reference64(args)
    backends = usable_backends(galore_ops._GALORE, device)
    assert len(backends) >= 2, backends
    for name in backends:
        w, ea, eas = run(name, args)
        assert w.dtype == dtype
        torch.testing.assert_close(w.double(), w64, **TOL[dtype], msg=lambda s: f"{name}: {s}")
        torch.testing.assert_close(ea.double(), ea64, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(eas.double(), eas64, rtol=1e-5, atol=1e-6)


def test_non_contiguous_state_is_updated_in_place():
    w, low, ea, eas, ortho = make(32, 24, 4, True)
    w_t = w.T.contiguous().T  # same values, column-major
    expected = run("reference", (w, low, ea, eas, ortho, True))[0]
    for name in usable_backends(galore_ops._GALORE, "cpu"):
        target = w_t.clone().T.contiguous().T
        with use_backend(name):
            galore_adam_update_(target, low.clone(), ea.clone(), eas.clone(), ortho, True, **HYPER)
        assert not target.is_contiguous()
        torch.testing.assert_close(target, expected, rtol=1e-5, atol=1e-5)


def test_torch_compile():
    w, low, ea, eas, ortho = make(16, 12, 4, True)
    w2, ea2, eas2 = w.clone(), ea.clone(), eas.clone()

    def step(w, low, ea, eas, ortho):
        galore_adam_update_(w, low * 2, ea, eas, ortho, True, **HYPER)

    torch._dynamo.reset()
    torch.compile(step, fullgraph=True)(w, low, ea, eas, ortho)
    step(w2, low, ea2, eas2, ortho)
    torch.testing.assert_close(w, w2)
    torch.testing.assert_close(ea, ea2)


@pytest.mark.parametrize("change,err,match", [
    (lambda a: a.update(low=torch.randn(5, 12), exp_avg=torch.zeros(5, 12), exp_avg_sq=torch.zeros(5, 12)), ValueError,
     "shapes do not fit a left"),
    (lambda a: a.update(low=torch.randn(5, 12)), ValueError, "must match low_grad"),
    (lambda a: a.update(ortho=torch.randn(16, 4, dtype=torch.float64)), TypeError, "ortho must have dtype"),
    (lambda a: a.update(exp_avg=torch.zeros(3, 12)), ValueError, "exp_avg"),
    (lambda a: a.update(weight=torch.randn(16)), ValueError, "weight must be 2-D"),
    (lambda a: a.update(weight=torch.randn(16, 12).to(torch.int32)), TypeError, "weight must have dtype"),
])
def test_bad_input(change, err, match):
    w, low, ea, eas, ortho = make(16, 12, 4, True)
    args = dict(weight=w, low=low, exp_avg=ea, exp_avg_sq=eas, ortho=ortho)
    change(args)
    with pytest.raises(err, match=match):
        galore_adam_update_(args["weight"], args["low"], args["exp_avg"], args["exp_avg_sq"], args["ortho"], True, **HYPER)
