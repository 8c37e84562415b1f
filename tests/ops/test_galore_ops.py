"""weightkit::galore_adam_update_, lowrank_update_ (its write-back alone) and bf16_parts: every backend == the
float64 reference, compile, bad input (opcheck: test_opcheck.py)."""

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


# -- issue #25: device-side predication, 16-bit bases, no full-size float32 temporaries --------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("left", [True, False])
def test_found_inf_leaves_everything_unchanged_and_step_size_tensor_replaces_the_float(device, left):
    for dtype in (torch.float32, torch.bfloat16):
        w, low, ea, eas, ortho = make(40, 56, 6, left, dtype, device)
        low[1, 2] = float("nan")
        for name in usable_backends(galore_ops._GALORE, device):
            args = [t.clone() for t in (w, low, ea, eas)]
            with use_backend(name):
                galore_adam_update_(*args, ortho, left, **HYPER, found_inf=torch.ones(1, device=device),
                                    step_size_t=torch.full((1,), 5.0, device=device))
            for got, want in zip(args, (w, low, ea, eas)):
                assert torch.equal(got, want) or (got.isnan() == want.isnan()).all(), name
    w, low, ea, eas, ortho = make(40, 56, 6, left, torch.float32, device)
    w64, ea64, eas64 = reference64((w, low, ea, eas, ortho, left))
    hyper = dict(HYPER, step_size=123.0)  # replaced by the tensor
    for name in usable_backends(galore_ops._GALORE, device):
        args = [t.clone() for t in (w, low, ea, eas)]
        with use_backend(name):
            galore_adam_update_(*args, ortho, left, **hyper, found_inf=torch.zeros(1, device=device),
                                step_size_t=torch.full((1,), HYPER["step_size"], device=device))
        torch.testing.assert_close(args[0].double(), w64, **TOL[torch.float32], msg=lambda s: f"{name}: {s}")
        torch.testing.assert_close(args[2].double(), ea64, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("left", [True, False])
def test_sixteen_bit_basis_matches_float64(device, wdtype, left):
    """A bf16 basis: U rounded to bf16, products with fp32 accumulation; vs the float64 update with the same bf16
    basis (exact in float64) at bf16 tolerance."""
    w, low, ea, eas, ortho = make(48, 40, 8, left, wdtype, device)
    ortho16 = ortho.to(torch.bfloat16)
    w64, _, _ = reference64((w, low, ea, eas, ortho16.float(), left))
    for name in usable_backends(galore_ops._GALORE, device):
        got, _, _ = run(name, (w, low, ea, eas, ortho16, left))
        assert got.dtype == wdtype
        torch.testing.assert_close(got.double(), w64, **TOL[torch.bfloat16], msg=lambda s: f"{name}: {s}")


class RecordFullSizeFloat32(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every op output that is a float32 tensor of ``numel`` elements (an m x n temporary)."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.seen = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.numel() >= self.numel:
                self.seen.append(str(func))
        return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("left", [True, False])
@pytest.mark.parametrize("predicated", [False, True])
def test_sixteen_bit_weights_make_no_full_size_float32_temporary(dtype, left, predicated, monkeypatch):
    """bf16/fp16 weights (and any predicated update) are written a block of rows at a time: no float32 tensor of
    m x n elements is made by the cpu backend (blocks of 1/4 of the rows here) nor by the Triton one (tile by
    tile), and the result is the float64 reference within the dtype's tolerance."""
    m, n, r = 64, 48, 8
    from weightkit.backends import _blocked

    monkeypatch.setattr(_blocked, "BLOCK_ELEMENTS", (m // 4) * n)  # the cpu/cuda backends' blocked write-back
    w, low, ea, eas, ortho = make(m, n, r, left, dtype)
    w64, _, _ = reference64((w, low, ea, eas, ortho, left))
    found = torch.zeros(1) if predicated else None
    hyper = tuple(HYPER[k] for k in ("beta1", "beta2", "eps", "step_size", "scale", "decay"))

    def call(name, args):
        # the backend's implementation itself: a dispatch mode sees the op's inner ops only below the op's
        # dispatcher entry (at the op it would see one call)
        galore_ops._GALORE.impls[name](*args, ortho, left, *hyper, found, None)

    for name in [b for b in usable_backends(galore_ops._GALORE, "cpu") if b != "reference"]:
        args = [t.clone() for t in (w, low, ea, eas)]
        with RecordFullSizeFloat32(m * n) as rec:
            call(name, args)
        assert rec.seen == [], (name, rec.seen)
        torch.testing.assert_close(args[0].double(), w64, **TOL[dtype], msg=lambda s: f"{name}: {s}")
    with RecordFullSizeFloat32(m * n) as rec:  # the probe sees the reference's m x n temporaries
        call("reference", [t.clone() for t in (w, low, ea, eas)])
    assert rec.seen


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("left", [True, False])
def test_write_back_without_tf32_by_six_bf16_products(device, left, monkeypatch):
    """The cuda backend's blocked write-back N = P U | U P where TF32 is not allowed: P and U in three bf16 parts
    each, six products on bf16 tensor cores with float32 results, as one GEMM over the six pairs side by side
    (_blocked.apply_update_blocked; run on the CPU too when asked for tensor cores, as the cuda backend does on
    cudasim): within 2x the strict float32 product's error against float64, >100x better than P and U rounded to
    bf16, one bf16 GEMM of inner size 6r a block of rows (four blocks here); without tensor cores the float32
    product, as before. A float32 weight takes it too (low_rank_update), where without tensor cores addmm_ runs."""
    from weightkit.backend import allow_tf32
    from weightkit.backends import _blocked

    if not _blocked.float32_mm_of_bf16(torch.device(device)):
        pytest.skip("this torch's CUDA mm has no float32 output for bf16 operands (the float32 product then runs)")
    m, n, r = 64, 80, 16
    monkeypatch.setattr(_blocked, "BLOCK_ELEMENTS", (m // 4) * n)
    seed = 11 + left
    print(f"seed {seed}")
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, r, generator=g) / 4  # P (left) or U (right): the row-blocked operand
    b = torch.randn(r, n, generator=g) / 4
    ortho, update = ((a, b) if left else (b, a))
    ortho, update = ortho.to(device), update.to(device)
    n64 = a.double() @ b.double()
    rel = lambda t: float((t.double().cpu() - n64).norm() / n64.norm())  # noqa: E731
    calls = []
    real = _blocked.mm_float32
    # (on the CPU torch.mm has no float32 output for bf16 operands: the upcast product, as cudasim's plugin gives)
    monkeypatch.setattr(_blocked, "mm_float32", lambda x, y, tc: calls.append((x.dtype, x.shape[1]))
                        or real(x, y, tc and x.is_cuda))
    with allow_tf32(False):
        for tensor_cores in (True, False):
            weight = torch.zeros(m, n, device=device)  # W <- W - 1 * N: -N in float32
            calls.clear()
            _blocked.apply_update_blocked(weight, ortho, update, left, 1.0, 1.0, None, tensor_cores)
            if tensor_cores:
                split = -weight
                assert calls == [(torch.bfloat16, 6 * r)] * 4, calls
            else:
                fp32 = rel(-weight)
                assert calls == [(torch.float32, r)] * 4, calls
            calls.clear()
            via_update = torch.zeros(m, n, device=device)
            _blocked.low_rank_update(via_update, update, ortho, left, 1.0, 1.0, 1.0, None, None, tensor_cores)
            assert calls == ([(torch.bfloat16, 6 * r)] * 4 if tensor_cores else []), calls  # else addmm_
            if tensor_cores:
                assert torch.equal(via_update, weight)
    rounded = rel(a.bfloat16().double() @ b.bfloat16().double())
    assert rel(split) <= 2 * fp32 + 1e-9 and rel(split) * 100 < rounded, (rel(split), fp32, rounded)
    assert torch.equal(ortho, (a if left else b).to(device)) and torch.equal(update, (b if left else a).to(device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("left", [True, False])
def test_triton_write_back_without_tf32_by_six_bf16_products(device, left):
    """The Triton write-back of a float32 basis where TF32 is not allowed runs 'bf16x6' (kernels/_shared.dot6: P and
    U split in three bf16 parts in registers, six tensor-core products): within 2x the strict-fp32 ('ieee') kernel's
    error against float64, >100x better than P and U rounded to bf16, and a different sum from ieee's (it ran)."""
    if "triton" not in usable_backends(galore_ops._GALORE, device):
        pytest.skip("no triton backend here")
    from weightkit.kernels.galore import galore_adam_update_triton

    m, n, r = 96, 80, 24
    seed = 5 + left
    print(f"seed {seed}")
    g = torch.Generator().manual_seed(seed)
    ortho = torch.linalg.qr(torch.randn(m if left else n, r, generator=g, dtype=torch.float64))[0].float()
    ortho = ortho if left else ortho.T.contiguous()
    low = torch.randn((r, n) if left else (m, r), generator=g)
    hyper = dict(beta1=0.5, beta2=0.75, eps=1e-6, step_size=1.0, scale=1.0, decay=1.0)
    # U as the kernel forms it (M = V = 0 before): float32 m / (sqrt(v) + eps); W = 0 - 1 * N is the product
    m1, v1 = low * 0.5, low * low * 0.25
    u = m1 / (v1.sqrt() + 1e-6)
    n64 = ortho.double() @ u.double() if left else u.double() @ ortho.double()
    rel = lambda t: float((t.double().cpu() - n64).norm() / n64.norm())  # noqa: E731
    out = {}
    for precision in ("ieee", "bf16x6", None):
        w = torch.zeros(m, n, device=device)
        galore_adam_update_triton(w, low.to(device), torch.zeros_like(low, device=device),
                                  torch.zeros_like(low, device=device), ortho.to(device), left, **hyper,
                                  precision=precision)
        out[precision] = -w
    assert torch.equal(out[None], out["bf16x6"])  # the default without TF32
    rounded = rel(ortho.bfloat16().double() @ u.bfloat16().double() if left
                  else u.bfloat16().double() @ ortho.bfloat16().double())
    split, fp32 = rel(out["bf16x6"]), rel(out["ieee"])
    print(f"relative error: bf16x6 {split:.3g}, ieee {fp32:.3g}, bf16-rounded {rounded:.3g}")
    assert split <= 2 * fp32 + 1e-9 and split * 100 < rounded, (split, fp32, rounded)
    assert not torch.equal(out["bf16x6"], out["ieee"])
    with pytest.raises(ValueError, match="precision"):
        galore_adam_update_triton(w, low.to(device), torch.zeros_like(low, device=device),
                                  torch.zeros_like(low, device=device), ortho.to(device), left, **hyper,
                                  precision="bf16")


def test_tf32_only_where_allowed():
    assert galore_ops.matmul_precision(torch.device("cpu")) == "ieee"
    allowed = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert galore_ops.matmul_precision(torch.device("cuda")) == "ieee"
        torch.backends.cuda.matmul.allow_tf32 = True
        assert galore_ops.matmul_precision(torch.device("cuda")) == "tf32"
        assert galore_ops.matmul_precision(torch.device("cpu")) == "ieee"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allowed


# -- bf16_parts ------------------------------------------------------------------------------------------------------

try:  # a kernel of the Triton splits' rounding (kernels/_shared.round_bf16, split3_bf16), compiled or interpreted
    import triton
    import triton.language as tl

    from weightkit.kernels._shared import round_bf16, split3_bf16

    @triton.jit
    def _rounding_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        mask = i < n
        x = tl.load(x_ptr + i, mask=mask, other=0.0)
        hi, mid, lo = split3_bf16(x)
        tl.store(out_ptr + i, round_bf16(x), mask=mask)
        tl.store(out_ptr + n + i, hi, mask=mask)
        tl.store(out_ptr + 2 * n + i, mid, mask=mask)
        tl.store(out_ptr + 3 * n + i, lo, mask=mask)
except ImportError:  # (no Triton: the test below skips)
    _rounding_kernel = None


@pytest.mark.parametrize("device", DEVICES)
def test_triton_round_bf16_is_torchs_and_keeps_nan(device):
    """kernels/_shared.round_bf16 (compiled: the conversion instruction; interpreted: by bits) rounds float32 to bf16
    as torch does, ties to even and overflow to inf included, and keeps every NaN a NaN (the bit trick alone carried
    a low NaN payload, e.g. CUDA's canonical NaN 0x7FFFFFFF, into the sign: -0.0); split3_bf16's parts likewise."""
    if _rounding_kernel is None or galore_ops._PARTS.why_not("triton", torch.device(device)) is not None:
        pytest.skip("Triton cannot run here (no GPU, or no TRITON_INTERPRET for CPU tensors)")
    print("seed 31")
    g = torch.Generator().manual_seed(31)
    x = (torch.randn(200, generator=g, dtype=torch.float64) * torch.exp2(
        torch.randint(-100, 100, (200,), generator=g).double())).float()
    ties = torch.tensor([1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8, -(2.0 + 2.0 ** -7), 3.4028234663852886e38])
    nans = torch.tensor([0x7FFFFFFF, -1, 0x7F800001, 0x7FC00000, 0x7F808000], dtype=torch.int32).view(torch.float32)
    x = torch.cat([x, ties, nans, torch.tensor([float("inf"), -float("inf"), 0.0, -0.0])]).to(device)
    out = torch.empty(4 * x.numel(), device=device)
    _rounding_kernel[(1,)](x, out, x.numel(), BLOCK=256)
    rounded, hi, mid, lo = out.view(4, -1)
    want = x.to(torch.bfloat16).float()
    for got in (rounded, hi):
        assert torch.equal(got.isnan(), x.isnan())
        assert torch.equal(got[~x.isnan()].view(torch.int32), want[~x.isnan()].view(torch.int32))
    rest = x - hi
    finite = x.isfinite() & (hi.isfinite())
    assert torch.equal(mid[finite], rest.to(torch.bfloat16).float()[finite])
    assert torch.equal((hi.double() + mid.double() + lo.double())[finite], x.double()[finite])


def _wide_values(dtype, shape, generator):
    """Random values over most of ``dtype``'s exponent range, with the edge cases in the first row: NaN, +-inf, +-0,
    the largest finite value (a float32 whose hi part rounds to inf), subnormals, values halfway between bf16 ones."""
    if dtype == torch.float32:
        x = torch.randn(shape, generator=generator, dtype=torch.float64) * torch.exp2(
            torch.randint(-126, 126, shape, generator=generator).double())
        edge = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 3.4028234663852886e38, 1e-40, -2.5e-44,
                1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8, 1.0 + 2.0 ** -8 + 2.0 ** -20]
    else:
        x = torch.randn(shape, generator=generator, dtype=torch.float64) * torch.exp2(
            torch.randint(-14, 15, shape, generator=generator).double())
        edge = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 65504.0, 6e-8, -3e-5, 1.0 + 2.0 ** -10]
    x = x.to(dtype)
    x[0, :len(edge)] = torch.tensor(edge, dtype=torch.float64).to(dtype)
    return x


def _same_bits(a, b):
    """Bit for bit, NaNs equal wherever they are (their payloads may differ between backends)."""
    nan = a.isnan()
    return torch.equal(nan, b.isnan()) and torch.equal(a.view(torch.int16)[~nan], b.view(torch.int16)[~nan])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("dim", [0, 1])
def test_bf16_parts_are_exact_and_every_backend_gives_the_references_bits(device, dtype, dim):
    """weightkit::bf16_parts: the parts of every finite value sum to it exactly (float64; a float32 from 2^-100 up),
    each part is the nearest bf16 of what the larger ones left (a float32's), a NaN's hi is NaN and an infinity's hi
    that infinity; every usable backend gives the reference's bits, stacked along ``dim``, for contiguous,
    transposed and strided x."""
    print("seed 29")
    g = torch.Generator().manual_seed(29)
    x = _wide_values(dtype, (37, 300), g).to(device)
    count = 3 if dtype == torch.float32 else 2
    backends = usable_backends(galore_ops._PARTS, device)
    assert "reference" in backends and (device == "cpu" or len(backends) >= 2), backends
    for name, view in (("contiguous", x), ("transposed", x.T.contiguous().T), ("strided", x[:, 1::2]),
                       ("rows", x.T[:100])):
        with use_backend("reference"):
            ref = galore_ops.bf16_parts(view, dim)
        rows, cols = view.shape
        assert ref.dtype == torch.bfloat16 and ref.is_contiguous()
        assert ref.shape == ((count * rows, cols) if dim == 0 else (rows, count * cols))
        parts = ref.chunk(count, dim)
        # exact where every part is a bf16 value: a float32 down to 2^-100 (smaller ones' low parts would be below
        # bf16's subnormals) and not among the largest (their hi rounds to inf)
        finite = view.isfinite() & (view.double().abs() < 3.3e38) & ((view.double().abs() >= 2.0 ** -100) |
                                                                     (view == 0) | (count == 2))
        total = sum(p.double() for p in parts)
        assert torch.equal(total[finite], view.double()[finite]), name
        if dtype == torch.float32:  # each part the nearest bf16 of the remainder
            rest = view.double()
            for p in parts:
                assert torch.equal(p.double()[finite], rest.float().to(torch.bfloat16).double()[finite]), name
                rest = rest - p.double()
        assert torch.equal(parts[0].isnan(), view.isnan()), name
        assert torch.equal(parts[0][view.isinf()].double(), view[view.isinf()].double()), name
        tiny = (view.double().abs() < 2.0 ** -100) & (view != 0) & (count == 3)
        for backend_name in backends:
            with use_backend(backend_name):
                got = galore_ops.bf16_parts(view, dim)
            assert got.shape == ref.shape and got.dtype == torch.bfloat16, (backend_name, name)
            # bit for bit but where a float32's parts fall below bf16's subnormals (a device's or the interpreter's
            # treatment of subnormals may differ there): those within 2^-120 of x, far below any product's error
            mask = torch.cat([~tiny] * count, dim)
            assert _same_bits(got[mask], ref[mask]), f"{backend_name} {name}: {(got != ref).nonzero()[:5].tolist()}"
            small = view.double()[tiny] - sum(p.double() for p in got.chunk(count, dim))[tiny]
            assert (small.numel() > 0) == (count == 3), (backend_name, name)  # (the edge row holds tiny float32s)
            assert small.abs().max().item() <= 2.0 ** -120 if count == 3 else True, (backend_name, name)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_parts_of_an_empty_x(device):
    for name in usable_backends(galore_ops._PARTS, device):
        with use_backend(name):
            assert galore_ops.bf16_parts(torch.empty(0, 5, device=device), 0).shape == (0, 5)
            assert galore_ops.bf16_parts(torch.empty(4, 0, device=device, dtype=torch.float16), 1).shape == (4, 0)


@pytest.mark.parametrize("x,dim,err,match", [
    (torch.randn(2, 3, 4), 0, ValueError, "x must be 2-D"),
    (torch.randn(4, 4).bfloat16(), 0, TypeError, "x must have dtype"),
    (torch.randn(4, 4).double(), 1, TypeError, "x must have dtype"),
    (torch.randn(4, 4), 2, ValueError, "dim must be 0 or 1"),
    ([[1.0]], 0, RuntimeError, "argument 'x'"),
])
def test_bf16_parts_bad_input(x, dim, err, match):
    with pytest.raises(err, match=match):
        galore_ops.bf16_parts(x, dim)


# -- lowrank_update_: the write-back of a direction computed elsewhere (GaLoreAdamW8bit's one-pass 8-bit moments) ----
def lowrank_reference64(w, update, ortho, left, coef=HYPER["step_size"] * HYPER["scale"], decay=HYPER["decay"]):
    full = ortho.double() @ update.double() if left else update.double() @ ortho.double()
    return (w.double() - coef * full) * decay


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("basis", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,n,r,left", [(48, 40, 8, True), (37, 53, 5, False), (20, 70, 4, True)])
def test_lowrank_update_backends_match_float64_reference(device, dtype, basis, m, n, r, left):
    """Every backend == the float64 maths within the weight's dtype tolerance (a bf16 basis: its products round U to
    bf16 on a GPU, bf16's tolerance); U is read, never written."""
    w, _, update, _, ortho = make(m, n, r, left, dtype, device)
    ortho = ortho.to(basis)
    want = lowrank_reference64(w, update, ortho, left)
    tol = TOL[torch.bfloat16 if basis == torch.bfloat16 else dtype]
    backends = usable_backends(galore_ops._UPDATE, device)
    assert len(backends) >= 2, backends
    kept = update.clone()
    for name in backends:
        got = w.clone()
        with use_backend(name):
            galore_ops.lowrank_update_(got, update, ortho, left, step_size=HYPER["step_size"], scale=HYPER["scale"],
                                       decay=HYPER["decay"])
        assert got.dtype == dtype and torch.equal(update, kept), name
        torch.testing.assert_close(got.double(), want, **tol, msg=lambda s: f"{name}: {s}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("left", [True, False])
def test_lowrank_update_found_inf_and_step_size_tensor(device, left):
    """A set flag leaves W unchanged whatever U holds (NaN included) and U is not modified; a clear one writes the
    update with ``step_size_t`` in place of the float step size."""
    for dtype in (torch.float32, torch.bfloat16):
        w, _, update, _, ortho = make(40, 56, 6, left, dtype, device)
        update[1, 2] = float("nan")
        for name in usable_backends(galore_ops._UPDATE, device):
            got, u = w.clone(), update.clone()
            with use_backend(name):
                galore_ops.lowrank_update_(got, u, ortho, left, step_size=HYPER["step_size"], scale=HYPER["scale"],
                                           decay=HYPER["decay"], found_inf=torch.ones(1, device=device),
                                           step_size_t=torch.full((1,), 5.0, device=device))
            assert torch.equal(got, w), name
            assert torch.equal(u.isnan(), update.isnan()) and torch.equal(u.nan_to_num(), update.nan_to_num()), name
    w, _, update, _, ortho = make(40, 56, 6, left, torch.float32, device)
    want = lowrank_reference64(w, update, ortho, left)
    for name in usable_backends(galore_ops._UPDATE, device):
        got, u = w.clone(), update.clone()
        with use_backend(name):
            galore_ops.lowrank_update_(got, u, ortho, left, step_size=123.0, scale=HYPER["scale"],
                                       decay=HYPER["decay"], found_inf=torch.zeros(1, device=device),
                                       step_size_t=torch.full((1,), HYPER["step_size"], device=device))
        assert torch.equal(u, update), name
        torch.testing.assert_close(got.double(), want, **TOL[torch.float32], msg=lambda s: f"{name}: {s}")


def test_lowrank_update_non_contiguous_weight_and_compile():
    w, _, update, _, ortho = make(32, 24, 4, True)
    want = lowrank_reference64(w, update, ortho, True)
    for name in usable_backends(galore_ops._UPDATE, "cpu"):
        target = w.T.contiguous().T
        with use_backend(name):
            galore_ops.lowrank_update_(target, update, ortho, True, step_size=HYPER["step_size"],
                                       scale=HYPER["scale"], decay=HYPER["decay"])
        assert not target.is_contiguous()
        torch.testing.assert_close(target.double(), want, **TOL[torch.float32], msg=lambda s: f"{name}: {s}")

    def step(w, update, ortho):
        galore_ops.lowrank_update_(w, update * 2, ortho, True, step_size=HYPER["step_size"], scale=HYPER["scale"],
                                   decay=HYPER["decay"])

    w2 = w.clone()
    torch._dynamo.reset()
    torch.compile(step, fullgraph=True)(w, update, ortho)
    step(w2, update, ortho)
    torch.testing.assert_close(w, w2)


@pytest.mark.parametrize("change,err,match", [
    (lambda a: a.update(update=torch.randn(5, 12)), ValueError, "shapes do not fit a left"),
    (lambda a: a.update(update=torch.randn(4, 12).double()), TypeError, "update must have dtype"),
    (lambda a: a.update(update=torch.randn(4, 12).bfloat16()), TypeError, "update must have dtype"),
    (lambda a: a.update(ortho=torch.randn(16, 4, dtype=torch.float64)), TypeError, "ortho must have dtype"),
    (lambda a: a.update(weight=torch.randn(16)), ValueError, "weight must be 2-D"),
    (lambda a: a.update(weight=torch.randn(16, 12).to(torch.int32)), TypeError, "weight must have dtype"),
    (lambda a: a.update(found_inf=torch.zeros(2)), ValueError, "found_inf must hold one value"),
    (lambda a: a.update(step_size_t=torch.zeros(1, dtype=torch.float64)), TypeError, "step_size_t must have dtype"),
])
def test_lowrank_update_bad_input(change, err, match):
    w, _, update, _, ortho = make(16, 12, 4, True)
    args = dict(weight=w, update=update, ortho=ortho, found_inf=None, step_size_t=None)
    change(args)
    with pytest.raises(err, match=match):
        galore_ops.lowrank_update_(args["weight"], args["update"], args["ortho"], True, step_size=1e-2,
                                   found_inf=args["found_inf"], step_size_t=args["step_size_t"])
