"""weightkit::dict_sparse_gather: every backend == float64 reference (fwd, bwd), index dtypes, gradcheck, errors."""

import pytest
import torch

from weightkit import debug_checks

from tests.conftest import DEVICES, usable_backends
from weightkit import use_backend
from weightkit.ops import dictionary as dict_ops
from weightkit.ops.dictionary import dict_sparse_gather, index_dtype_for

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
       torch.float16: dict(rtol=2e-3, atol=2e-3)}


def inputs(n, k, s, d_out, dtype=torch.float32, device="cpu", index_dtype=None):
    z = torch.randn(n, k, device=device).to(dtype)
    values = torch.randn(s, d_out, device=device).to(dtype)
    idx = torch.rand(k, d_out, device=device).argsort(0)[:s].to(index_dtype or index_dtype_for(k))
    return z, values, idx


def ref64(z, values, idx, grad=None):
    z64 = z.double().requires_grad_(True)
    v64 = values.double().requires_grad_(True)
    y = (z64[:, idx.long()] * v64).sum(1)
    if grad is None:
        return y
    return torch.autograd.grad(y, (z64, v64), grad.double())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k,s,d_out,index_dtype", [(1, 16, 8, 40, None), (37, 300, 5, 70, None), (9, 64, 32, 33, torch.int64)])
def test_backends_match_float64(device, dtype, n, k, s, d_out, index_dtype):
    z, values, idx = inputs(n, k, s, d_out, dtype, device, index_dtype)
    g = torch.randn(n, d_out, device=device).to(dtype)
    y64 = ref64(z, values, idx)
    gz64, gv64 = ref64(z, values, idx, g)
    fwd, bwd = usable_backends(dict_ops._FWD, device), usable_backends(dict_ops._BWD, device)
    assert len(fwd) >= 2 and len(bwd) >= 2, (fwd, bwd)
    for name in fwd:
        with use_backend(name):
            y = dict_sparse_gather(z, values, idx)
            zr, vr = z.clone().requires_grad_(True), values.clone().requires_grad_(True)
            gz, gv = torch.autograd.grad(dict_sparse_gather(zr, vr, idx), (zr, vr), g)
        assert y.dtype == dtype
        torch.testing.assert_close(y.double(), y64, **TOL[dtype], msg=lambda m: f"{name} fwd: {m}")
        torch.testing.assert_close(gz.double(), gz64, **TOL[dtype], msg=lambda m: f"{name} grad z: {m}")
        torch.testing.assert_close(gv.double(), gv64, **TOL[dtype], msg=lambda m: f"{name} grad values: {m}")


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    z_big, v_big, _ = inputs(40, 90, 12, 60, device=device)
    z = z_big[::2, ::3]  # (20, 30), strided
    idx = torch.rand(30, 40, device=device).argsort(0)[:12].to(torch.uint8)[::2]  # (6, 40), every other row
    values = v_big[:6, :40].T.contiguous().T  # (6, 40), column-major
    assert not z.is_contiguous() and not values.is_contiguous() and not idx.is_contiguous()
    g = torch.randn(40, 20, device=device).T  # (20, 40) non-contiguous gradient
    y64 = ref64(z, values, idx)
    gz64, gv64 = ref64(z, values, idx, g)
    for name in usable_backends(dict_ops._FWD, device):
        with use_backend(name):
            zr, vr = z.clone().requires_grad_(True), values.clone().requires_grad_(True)
            y = dict_sparse_gather(z, values, idx)
            gz, gv = torch.autograd.grad(dict_sparse_gather(zr, vr, idx), (zr, vr), g)
        torch.testing.assert_close(y.double(), y64, **TOL[torch.float32], msg=lambda m: f"{name} fwd: {m}")
        torch.testing.assert_close(gz.double(), gz64, **TOL[torch.float32], msg=lambda m: f"{name} grad z: {m}")
        torch.testing.assert_close(gv.double(), gv64, **TOL[torch.float32], msg=lambda m: f"{name} grad values: {m}")


def test_gradcheck_reference_and_index_dtypes():
    z, values, idx = inputs(4, 12, 3, 5, torch.float64)
    z.requires_grad_(True)
    values.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: dict_ops.dict_sparse_gather_reference(a, b, idx), (z, values))
    assert index_dtype_for(256) == torch.uint8 and index_dtype_for(257) == torch.int16
    assert index_dtype_for(40000) == torch.int32


def test_torch_compile():
    z, values, idx = inputs(6, 20, 4, 9)
    torch._dynamo.reset()
    compiled = torch.compile(lambda a: dict_sparse_gather(a * 2, values, idx), fullgraph=True)
    torch.testing.assert_close(compiled(z), dict_sparse_gather(z * 2, values, idx))


@pytest.mark.parametrize("change,err,match", [
    (lambda a: a.update(indices=torch.zeros(3, 7, dtype=torch.uint8)), ValueError, "must have the same shape"),
    (lambda a: a.update(indices=torch.full((4, 9), 20, dtype=torch.uint8)), ValueError, "indices must lie in \\[0, k=20\\)"),
    (lambda a: a.update(indices=torch.zeros(4, 9, dtype=torch.float32)), TypeError, "indices must have dtype"),
    (lambda a: a.update(z=torch.full((6, 20), float("nan"))), ValueError, "z contains 120 non-finite"),
    (lambda a: a.update(values=torch.randn(4, 9, dtype=torch.float64)), TypeError, "values must have dtype"),
    (lambda a: a.update(indices=torch.full((4, 9), -1, dtype=torch.int16)), ValueError, "indices must lie in"),
    (lambda a: a.update(z=torch.randn(0, 20)), ValueError, "z is empty"),
    (lambda a: a.update(z=torch.randn(6, 20, 2)), ValueError, "z must be 2-D"),
    (lambda a: a.update(values=torch.randn(4, 9, device="meta")), ValueError, "values is on meta"),
])
def test_bad_input(change, err, match):
    z, values, idx = inputs(6, 20, 4, 9)
    args = dict(z=z, values=values, indices=idx)
    change(args)
    with pytest.raises(err, match=match), debug_checks():  # data checks (NaN, ranges) are opt-in
        dict_sparse_gather(args["z"], args["values"], args["indices"])
