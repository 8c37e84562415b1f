"""weightkit INT4 ops (quantize/pack, dequantize/unpack, dequant-matmul) and the fused INT8 stochastic-rounding
update: every backend == the reference (bit for bit where the spec says so), fp64 error bounds, autograd,
torch.compile, bad input (opcheck: test_opcheck.py)."""

import pytest
import torch

import weightkit

from tests.conftest import DEVICES, assert_quantized_matmul_contract, usable_backends
from weightkit import use_backend
from weightkit.ops import int4, int8
from weightkit.ops.int4 import dequantize_int4, int4_matmul, quantize_int4, unpack_int4
from weightkit.ops.int8 import absmax_scale, dequantize_int8, int8_sr_update_, stochastic_round_int8



def basis(rows, cols, device="cpu", dtype=torch.float32):
    """An orthonormal basis like GaLore's projectors, plus some constant and all-positive groups."""
    q, _ = torch.linalg.qr(torch.randn(max(rows, cols), min(rows, cols), dtype=torch.float64))
    x = (q if rows >= cols else q.T).to(torch.float32).contiguous()
    x.view(-1)[:8] = 0.25  # a constant group start (the range must still hold 0)
    return x.to(device=device, dtype=dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,group", [((64, 16), 64), ((40, 6), 8), ((6, 50), 10), ((33, 34), 2)])
def test_quantize_backends_bit_identical_and_error_bound(device, dtype, shape, group):
    x = basis(*shape, device=device, dtype=dtype)
    backends = usable_backends(int4._QUANT, device)
    assert len(backends) >= 2, backends
    with use_backend("reference"):
        ref = quantize_int4(x, group)
        back = dequantize_int4(*ref, group, shape)
    for name in backends:
        with use_backend(name):
            got = quantize_int4(x, group)
            deq = dequantize_int4(*got, group, shape)
        for a, b, what in zip(got, ref, ("packed", "scale", "zero")):
            assert a.dtype == b.dtype and torch.equal(a, b), f"{name}: {what} differs"
        assert torch.equal(deq, back), name
    err = (back.double() - x.double()).abs().reshape(-1, group)
    assert bool((err <= ref[1].double()[:, None] + 1e-12).all())  # at most one quantization step
    assert float(err.max()) <= float(x.float().abs().max()) / 15 * 2 + 1e-6


def test_constant_and_zero_groups_round_trip():
    x = torch.tensor([0.5] * 8 + [0.0] * 8 + [-2.0] * 8 + [1e-30] * 8)
    packed, scale, zero = quantize_int4(x, 8)
    back = dequantize_int4(packed, scale, zero, 8, x.shape)
    torch.testing.assert_close(back, x, rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,cols,group,tokens", [(48, 16, 64, 5), (20, 40, 8, 33), (7, 10, 2, 1)])
@pytest.mark.parametrize("transpose", [False, True])
def test_matmul_backends_match_float64(device, dtype, rows, cols, group, tokens, transpose):
    w = basis(rows, cols, device)
    packed, scale, zero = quantize_int4(w, group)
    w64 = dequantize_int4(packed, scale, zero, group, (rows, cols)).double()
    x = torch.randn(tokens, rows if transpose else cols, device=device).to(dtype)
    backends = usable_backends(int4._MM, device)
    assert len(backends) >= 2, backends
    for name in backends:
        with use_backend(name):
            y = int4_matmul(x, packed, scale, zero, group, (rows, cols), transpose)
        assert_quantized_matmul_contract(y, x, w64, transpose, name)


@pytest.mark.parametrize("side", ["left", "right"])
def test_matmul_projects_with_transposed_views(side):
    """GaLore's projections with an INT4 basis: R = P^T G through a transposed view (no copy), R = G P^T."""
    m, n, r = 40, 24, 6
    g = torch.randn(m, n)
    p = basis(m, r) if side == "left" else basis(r, n)
    packed, scale, zero = quantize_int4(p, 4)
    pd = dequantize_int4(packed, scale, zero, 4, p.shape)
    for name in usable_backends(int4._MM, "cpu"):
        with use_backend(name):
            if side == "left":
                low = int4_matmul(g.T, packed, scale, zero, 4, p.shape, transpose=True).T
                torch.testing.assert_close(low, pd.T @ g, rtol=1e-5, atol=1e-5)
            else:
                low = int4_matmul(g, packed, scale, zero, 4, p.shape)
                torch.testing.assert_close(low, g @ pd.T, rtol=1e-5, atol=1e-5)


def test_matmul_autograd_and_gradcheck():
    w = basis(12, 8)
    packed, scale, zero = quantize_int4(w, 4)
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: int4.int4_matmul_reference(t, packed, scale, zero, 4, (12, 8), False),
                                    (x,))
    for name in usable_backends(int4._MM, "cpu"):
        with use_backend(name):
            xf = torch.randn(5, 12, requires_grad=True)
            y = int4_matmul(xf, packed, scale, zero, 4, (12, 8), transpose=True)
            y.backward(torch.ones_like(y))
            torch.testing.assert_close(xf.grad, torch.ones(5, 8) @ dequantize_int4(packed, scale, zero, 4, (12, 8)).T)


def test_torch_compile():
    w = basis(16, 8)
    packed, scale, zero = quantize_int4(w, 8)

    @torch.compile(backend="eager", fullgraph=True)
    def f(x):
        return int4_matmul(x, packed, scale, zero, 8, (16, 8)) * 2

    x = torch.randn(4, 8)
    torch.testing.assert_close(f(x), int4_matmul(x, packed, scale, zero, 8, (16, 8)) * 2)


@pytest.mark.parametrize("call,err,match", [
    (lambda: quantize_int4(torch.randn(4, 6), 3), ValueError, "group_size=3 must be even"),
    (lambda: quantize_int4(torch.randn(4, 6), 16), ValueError, "divide x.numel"),
    (lambda: quantize_int4(torch.full((4, 8), float("inf")), 8), ValueError, "x contains"),
    (lambda: quantize_int4(torch.ones(4, 8, dtype=torch.int32), 8), TypeError, "x must have dtype"),
    (lambda: dequantize_int4(torch.zeros(8, dtype=torch.uint8), torch.ones(2), torch.zeros(2, dtype=torch.uint8), 8,
                             (4, 5)), ValueError, "packed holds 16 values"),
    (lambda: dequantize_int4(torch.zeros(8, dtype=torch.uint8), torch.ones(3), torch.zeros(2, dtype=torch.uint8), 8,
                             (4, 4)), ValueError, "one value per group"),
    (lambda: int4_matmul(torch.randn(2, 5), *quantize_int4(torch.randn(4, 4), 8), 8, (4, 4)), ValueError,
     "expected 4"),
    (lambda: int4_matmul(torch.randn(2, 4), *quantize_int4(torch.randn(4, 4), 8), 8, (16,)), ValueError,
     r"shape must be \(rows, cols\)"),
])
def test_bad_input(call, err, match):
    with pytest.raises(err, match=match), weightkit.debug_checks():  # data checks (NaN) are opt-in
        call()


def test_unpack_low_nibble_first():
    assert unpack_int4(torch.tensor([0x21, 0xF0], dtype=torch.uint8)).tolist() == [1, 2, 0, 15]


# -- fused INT8 stochastic-rounding update -------------------------------------------------------------------

def int8_weight(shape, group, device="cpu"):
    w = torch.randn(shape, device=device)
    scale = absmax_scale(w, group)
    return stochastic_round_int8(w, scale, group, seed=3), scale


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("delta_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,group,decay", [((16, 64), 64, 1.0), ((9, 40), 8, 0.999), ((3, 100), 300, 0.9)])
def test_sr_update_backends_bit_identical_to_unfused(device, delta_dtype, shape, group, decay):
    q0, s0 = int8_weight(shape, group, device)
    delta = (torch.randn(shape, device=device) * 0.05).to(delta_dtype)
    seed, offset = 12345, 77
    w = (dequantize_int8(q0, s0, group) + delta.float()) * decay  # the unfused sequence
    s_ref = absmax_scale(w, group)
    q_ref = stochastic_round_int8(w, s_ref, group, seed, offset)
    backends = usable_backends(int8._SR_UPDATE, device)
    assert len(backends) >= 2, backends
    for name in backends:
        q, s = q0.clone(), s0.clone()
        with use_backend(name):
            int8_sr_update_(q, s, delta, group, decay=decay, seed=seed, offset=offset)
        assert torch.equal(s, s_ref.reshape(s.shape)), name
        assert torch.equal(q, q_ref), name


def test_sr_update_is_unbiased():
    group, n = 32, 256
    q0, s0 = int8_weight((8, n), group)
    delta = torch.randn(8, n) * 0.01
    target = (dequantize_int8(q0, s0, group) + delta).double()
    acc = torch.zeros_like(target)
    trials = 400
    for t in range(trials):
        q, s = q0.clone(), s0.clone()
        int8_sr_update_(q, s, delta, group, seed=t)
        acc += dequantize_int8(q, s, group).double()
    mean = acc / trials
    step = s0.repeat_interleave(group).reshape(8, n).double() * 1.05
    # per element the rounding error has variance <= step^2 / 4: the mean of 400 trials is within 5 sigma
    assert bool(((mean - target).abs() <= 5 * step / 2 / trials**0.5 + 1e-7).all())
    assert abs(float((mean - target).mean())) < float(step.mean()) * 0.01


def test_sr_update_bad_input():
    q, s = int8_weight((4, 16), 8)
    with pytest.raises(ValueError, match="delta has shape"):
        int8_sr_update_(q, s, torch.randn(4, 8), 8)
    with pytest.raises(ValueError, match="one value per group"):
        int8_sr_update_(q, s[:3], torch.randn(4, 16), 8)
    with pytest.raises(ValueError, match="delta contains"):
        int8_sr_update_(q, s, torch.full((4, 16), float("nan")), 8)
    with pytest.raises(ValueError, match="must be contiguous"):
        int8_sr_update_(q.t(), s, torch.randn(16, 4), 8)
    with pytest.raises(TypeError, match="w_q must have dtype"):
        int8_sr_update_(q.float(), s, torch.randn(4, 16), 8)
    with pytest.raises(ValueError, match="seed must be"):
        int8_sr_update_(q, s, torch.randn(4, 16), 8, seed=-1)
    q_before, s_before = q.clone(), s.clone()
    with pytest.raises(ValueError):
        int8_sr_update_(q, s, torch.full((4, 16), float("inf")), 8)
    assert torch.equal(q, q_before) and torch.equal(s, s_before)  # nothing written on bad input


@pytest.mark.parametrize("transpose", [False, True])
def test_matmul_spanning_several_dequantized_blocks(transpose):
    """The cpu backend dequantizes ~4M values at a time: a tall, narrow matrix takes several blocks."""
    rows, cols, group = (1 << 21) + 6, 2, 4
    w = torch.randn(rows, cols)
    packed, scale, zero = quantize_int4(w, group)
    wd = dequantize_int4(packed, scale, zero, group, (rows, cols)).double()
    x = torch.randn(9, rows if transpose else cols)
    want = x.double() @ (wd if transpose else wd.T)
    for name in usable_backends(int4._MM, "cpu"):
        if name == "triton":
            continue  # the interpreter is too slow for this size; Triton has no blocks anyway
        with use_backend(name):
            y = int4_matmul(x, packed, scale, zero, group, (rows, cols), transpose)
        # transpose sums 2M fp32 terms per output: allow for their rounding (the reference needs it too)
        tol = dict(rtol=2e-3, atol=0.1) if transpose else dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y.double(), want, **tol, msg=lambda s: f"{name}: {s}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int4_matmul_exact_float32(device, dtype):
    """The 16-bit projection G P^T with a float32 result (int4.int4_matmul_exact_float32): every product exact (x's
    16-bit values times W's integers, the group scales applied in float32 after each K-step's dot), so its error
    against float64 is below the float32 matmul's of the dequantized W (no rounding of x or W), where int4_matmul's
    16-bit output is ~10^3-10^4 times worse; a non-contiguous x (a transposed view) reads the same; groups of 48
    (steps of 16) too. None where it does not apply: a float32 x, groups no K step lies inside (8), another backend
    asked for (on the CPU, anything but triton: the interpreter)."""
    from weightkit.ops.int4 import int4_matmul_exact_float32

    if "triton" not in usable_backends(int4._MM, device):
        pytest.skip(f"Triton cannot run on {device} here (no GPU, or no TRITON_INTERPRET for CPU tensors)")
    print("seed 21")
    g = torch.Generator().manual_seed(21)
    rows, cols, group = 48, 256, 64
    q, s, z = quantize_int4(torch.randn(rows, cols, generator=g).to(device), group)
    w = dequantize_int4(q, s, z, group, (rows, cols)).double().cpu()
    x = torch.randn(40, cols, generator=g).to(dtype).to(device)
    ref = x.double().cpu() @ w.T
    rel = lambda t: float((t.double().cpu() - ref).norm() / ref.norm())  # noqa: E731
    with use_backend("triton"):
        y = int4_matmul_exact_float32(x, q, s, z, group, (rows, cols))
        y16 = int4_matmul(x, q, s, z, group, (rows, cols))
        xt = x.T.contiguous().T  # column-major: the same values, other strides
        assert torch.equal(int4_matmul_exact_float32(xt, q, s, z, group, (rows, cols)), y)
        assert int4_matmul_exact_float32(x.float(), q, s, z, group, (rows, cols)) is None
        # groups of 8: no K step of 16 lies inside one (kernels._shared.mm_k_step), the weight would be rounded
        q8, s8, z8 = quantize_int4(torch.randn(rows, 240, generator=g).to(device), 8)
        assert int4_matmul_exact_float32(torch.randn(40, 240).to(dtype).to(device), q8, s8, z8, 8, (rows, 240)) is None
        # groups of 48 (not a power of two): steps of 16, exact too
        q48, s48, z48 = quantize_int4(torch.randn(rows, 240, generator=g).to(device), 48)
        x48 = torch.randn(40, 240, generator=g).to(dtype).to(device)
        w48 = dequantize_int4(q48, s48, z48, 48, (rows, 240)).double().cpu()
        ref48 = x48.double().cpu() @ w48.T
        y48 = int4_matmul_exact_float32(x48, q48, s48, z48, 48, (rows, 240))
        err48 = float((y48.double().cpu() - ref48).norm() / ref48.norm())
        fp32_48 = float(((x48.float() @ w48.float().T.to(device)).double().cpu() - ref48).norm() / ref48.norm())
        assert err48 <= fp32_48, (err48, fp32_48)
    fp32 = rel(x.float() @ w.float().T.to(device))
    assert y.dtype == torch.float32 and y.shape == (40, rows)
    assert rel(y) <= fp32 and rel(y16) > 100 * rel(y), (rel(y), fp32, rel(y16))
    with use_backend("reference"):
        assert int4_matmul_exact_float32(x, q, s, z, group, (rows, cols)) is None
    if device == "cpu":
        assert int4_matmul_exact_float32(x, q, s, z, group, (rows, cols)) is None  # auto on the CPU: not Triton
