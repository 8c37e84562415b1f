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
    (lambda: int4_matmul(torch.tensor(1.0), *quantize_int4(torch.randn(4, 4), 8), 8, (4, 4)), ValueError,
     r"x must have at least 1 dimension, got shape \(\)"),
    (lambda: int4_matmul(torch.randn(2, 4), *quantize_int4(torch.randn(4, 4), 8), 8, (16,)), ValueError,
     r"shape must be \(rows, cols\)"),
    (lambda: int4_matmul(torch.randn(2, 4).bfloat16(), *quantize_int4(torch.randn(4, 4), 8), 8, (4, 4),
                         out_dtype=torch.float16), ValueError, "out_dtype must be None, x's dtype"),
    (lambda: int4_matmul(torch.randn(2, 4), *quantize_int4(torch.randn(4, 4), 8), 8, (4, 4),
                         out_dtype=torch.bfloat16), ValueError, "out_dtype must be None"),
    (lambda: int4_matmul(torch.randn(2, 4).half(), *quantize_int4(torch.randn(4, 4), 8), 8, (4, 4),
                         out_dtype=torch.int8), ValueError, "got torch.int8"),
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
def test_split2_fp16_is_exact_at_every_magnitude(device):
    """backends/_blocked.split2_fp16_: hi + lo == x exactly in bf16 parts for float16 values of every exponent and
    sign, the largest (65504, where rounding to 8 bits would overflow float16) and subnormals included; hi holds 8
    significant bits at most, |lo| < 2^-7 |x| (normal x; a subnormal's below 2^-21); any strides."""
    from weightkit.backends._blocked import split2_fp16_

    bits = torch.arange(0, 0x7C00, dtype=torch.int32)  # every finite non-negative float16
    pos = bits.to(torch.int16).view(torch.float16)
    x = torch.cat([pos, -pos]).to(device).reshape(2, -1).T  # a transposed view (column-major)
    hi, lo = split2_fp16_(x)
    assert hi.dtype == lo.dtype == torch.bfloat16
    assert torch.equal(hi.double() + lo.double(), x.double())
    assert torch.isfinite(hi).all() and float(hi.double().abs().max()) <= 65504
    normal = x.double().abs() >= 2.0 ** -14
    assert (lo.double().abs() < 2.0 ** -7 * x.double().abs()).logical_or(lo == 0)[normal].all()
    assert (lo.double().abs() < 2.0 ** -21)[~normal].all()  # subnormals: below 8 units of 2^-24
    assert torch.equal(hi.float().to(torch.float16).view(torch.int16) & 7, torch.zeros_like(x, dtype=torch.int16))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("x_left", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_split_products_by_level(device, x_left, dtype, monkeypatch):
    """backends/_blocked.split3_mm_float32 of a split x (float16: two bf16 parts, float32: three): the parts, stacked
    once in one bf16 buffer along the product's inner dimension, sum to x exactly (stacked_parts; float32 values
    from 2^-90 to 2^90, where every part is a normal number, any strides); the products go by level, one GEMM a
    level of bf16 operands over a prefix of the stack (inner sizes 3K, 2K, K; float16: 2K, 2K, K), a block of x at a
    time (three blocks here); the result within 1.5x the float32 product's error against float64."""
    from weightkit.backends import _blocked

    print("seed 21")
    g = torch.Generator().manual_seed(21)
    wide = torch.randn(4096, generator=g, dtype=torch.float64) * torch.exp2(torch.randint(-90, 90, (4096,),
                                                                                       generator=g)).double()
    parts = _blocked.stacked_parts(wide.float().reshape(64, 64).T.to(device), 0)
    assert parts.dtype == torch.bfloat16 and parts.shape == (192, 64)
    assert torch.equal(parts.double().reshape(3, 64, 64).sum(0), wide.float().double().reshape(64, 64).T.to(device))

    t, k, r = 48, 40, 8  # x: t x k (x @ W, W: k x r) or k x t (W @ x, W: r x k)
    x = (torch.randn((t, k) if x_left else (k, t), generator=g) / 3).to(dtype).to(device)
    w = torch.randn((k, r) if x_left else (r, k), generator=g).to(device)
    count, dim = (2 if dtype == torch.float16 else 3), (1 if x_left else 0)
    stack = _blocked.stacked_parts(x, dim).double()
    assert torch.equal(sum(stack.chunk(count, dim)), x.double())  # exact parts of this x too
    ref = x.double().cpu() @ w.double().cpu() if x_left else w.double().cpu() @ x.double().cpu()
    rel = lambda y: float((y.double().cpu() - ref).norm() / ref.norm())  # noqa: E731
    calls = []
    real = _blocked.mm_float32
    monkeypatch.setattr(_blocked, "mm_float32", lambda a, b, tc: calls.append(
        (a.dtype, b.dtype, a.shape[1])) or real(a, b, tc))
    monkeypatch.setattr(_blocked, "FLOAT32_BLOCK", k * 16)  # 16 of x's t rows (columns) a block
    y = _blocked.split3_mm_float32(x, _blocked.split3_bf16(w), x_left, device == "cuda" and
                                   _blocked.float32_mm_of_bf16(torch.device(device)))
    inner = [2 * k, 2 * k, k] if dtype == torch.float16 else [3 * k, 2 * k, k]
    assert calls == [(torch.bfloat16, torch.bfloat16, n) for n in inner] * 3, calls
    fp32 = rel(x.float() @ w if x_left else w @ x.float())
    print(f"relative error: split {rel(y):.3g}, float32 {fp32:.3g}")
    assert y.dtype == torch.float32 and rel(y) <= 1.5 * fp32, (rel(y), fp32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_split3_dequant_matmul_is_the_float32_product_without_a_float32_x(device, transpose, dtype, monkeypatch):
    """backends/_blocked.split3_dequant_matmul (the cuda backend's float32 product of a 16-bit x, without TF32): W's
    float32 values (not bf16-exact) in three bf16 parts, three exact products (a float16 x in two bf16 parts too,
    split a block of rows at a time: five): within 1.5x the float32 product's error against float64, ~10^3 times
    better than W rounded to bf16; blocks of output features (a small block budget: several whole blocks and a
    partial one) give the same values, as do several blocks of x's rows. On a GPU no float32 tensor of x's size is
    made (torch.mm's float32 output of bf16 operands); on the CPU mm_float32 upcasts the operands instead."""
    from tests.optim.test_parts import LargestFloat32
    from weightkit.backend import allow_tf32
    from weightkit.backends import _blocked
    from weightkit.backends._blocked import float32_mm_of_bf16, split3_dequant_matmul

    if not float32_mm_of_bf16(torch.device(device)):
        pytest.skip("this torch's CUDA mm has no float32 output for bf16 operands (the cuda backend then converts x)")
    seed = 5 + transpose
    print(f"seed {seed}")
    g = torch.Generator().manual_seed(seed)
    rows, cols, tokens = (96, 400, 300) if not transpose else (400, 96, 300)  # x the largest operand
    w = (torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g)).to(device)
    x = torch.randn(tokens, rows if transpose else cols, generator=g).to(dtype).to(device)

    def dequant(dst, r0, nr, c0, nc):
        dst.copy_(w[r0:r0 + nr, c0:c0 + nc])

    w64, x64 = w.double().cpu(), x.double().cpu()
    ref = x64 @ (w64 if transpose else w64.T)
    rel = lambda t: float((t.double().cpu() - ref).norm() / ref.norm())  # noqa: E731
    with allow_tf32(False):  # the strict float32 product
        fp32 = rel(x.float() @ (w if transpose else w.T))
    rounded = rel(x.float() @ (w if transpose else w.T).bfloat16().float())
    with LargestFloat32() as probe:
        y = split3_dequant_matmul(x, rows, cols, transpose, dequant, x.is_cuda)
    assert y.dtype == torch.float32 and tuple(y.shape) == tuple(ref.shape)
    if x.is_cuda:
        assert probe.largest < x.numel(), (probe.largest, x.numel())
    print(f"relative error: split {rel(y):.3g}, float32 {fp32:.3g}, W rounded to bf16 {rounded:.3g}")
    assert rel(y) <= 1.5 * fp32 and rel(y) * 100 < rounded, (rel(y), fp32, rounded)
    k = rows if transpose else cols
    blocks = split3_dequant_matmul(x, rows, cols, transpose, dequant, x.is_cuda, block_bytes=128 * k * 4)  # 128
    torch.testing.assert_close(blocks, y, rtol=1e-6, atol=1e-6)
    assert split3_dequant_matmul(x[:0], rows, cols, transpose, dequant, x.is_cuda).shape == (0, ref.shape[1])
    monkeypatch.setattr(_blocked, "FLOAT32_BLOCK", 70 * k)  # x's rows by 70 (fp16: split a block at a time)
    torch.testing.assert_close(split3_dequant_matmul(x, rows, cols, transpose, dequant, x.is_cuda), y, rtol=1e-6,
                               atol=1e-6)
    if dtype == torch.float16:  # x's parts by weightkit::bf16_parts (the cuda backend passes its kernel): same bits
        from weightkit.ops import galore as galore_ops

        by_blocks = split3_dequant_matmul(x, rows, cols, transpose, dequant, x.is_cuda)
        for name in usable_backends(galore_ops._PARTS, device):
            with use_backend(name):
                got = split3_dequant_matmul(x, rows, cols, transpose, dequant, x.is_cuda, stack=galore_ops.bf16_parts)
            assert torch.equal(got, by_blocks), name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group", [64, 48, 8])
def test_int4_matmul_float32_out_of_a_16bit_x(device, dtype, group, monkeypatch):
    """``out_dtype=float32`` for a 16-bit x (GaLore's projections of a bf16 gradient): on every backend, transposed or
    not, x of any strides and rank, a float32 result within the contract of a float32 x (W never rounded to x's
    dtype), where x's dtype's result is ~10^3 times worse; so is it with x converted to float32 by blocks of rows
    (_blocked.FLOAT32_BLOCK lowered: several blocks and a partial one). The triton backend's untransposed
    product multiplies x's 16-bit values by W's integers (every product exact: closer to float64 than the float32
    product) wherever its K steps lie inside groups (64; 48: steps of 16); elsewhere (groups of 8, transposed) x
    meets W's float32 values in three bf16 parts (an fp16 x in two bf16 parts: five products), no float32 copy of x
    either way; so does the cuda backend's without TF32 (cuBLAS bf16 products). The gradient is x's dtype: the
    float32 product's, rounded once."""
    from weightkit.backends import _blocked

    seed = 21 + group
    print(f"seed {seed}")
    g = torch.Generator().manual_seed(seed)
    rows, cols, tokens = 48, 240, 40
    q, s, z = quantize_int4(torch.randn(rows, cols, generator=g).to(device), group)
    w = dequantize_int4(q, s, z, group, (rows, cols)).double().cpu()
    x = torch.randn(tokens, cols, generator=g).to(dtype).to(device)
    xt = torch.randn(tokens, rows, generator=g).to(dtype).to(device)  # for x @ W
    rel = lambda t, ref: float((t.double().cpu() - ref).norm() / ref.norm())  # noqa: E731
    ref, ref_t = x.double().cpu() @ w.T, xt.double().cpu() @ w
    fp32 = rel(x.float() @ w.float().T.to(device), ref)
    fp32_t = rel(xt.float() @ w.float().to(device), ref_t)
    for name in usable_backends(int4._MM, device):
        with use_backend(name):
            y = int4_matmul(x, q, s, z, group, (rows, cols), out_dtype=torch.float32)
            y16 = int4_matmul(x, q, s, z, group, (rows, cols))
            y_t = int4_matmul(xt, q, s, z, group, (rows, cols), transpose=True, out_dtype=torch.float32)
            y_col = int4_matmul(x.T.contiguous().T, q, s, z, group, (rows, cols), out_dtype=torch.float32)
            y_3d = int4_matmul(x.reshape(4, 10, cols), q, s, z, group, (rows, cols), out_dtype=torch.float32)
            # 3 rows: the GEMV (float32 products of x's values wherever Triton runs; no conversion of x)
            y_few = int4_matmul(x[:3], q, s, z, group, (rows, cols), out_dtype=torch.float32)
            y_t_few = int4_matmul(xt[:3], q, s, z, group, (rows, cols), transpose=True, out_dtype=torch.float32)
            monkeypatch.setattr(_blocked, "FLOAT32_BLOCK", 7 * cols)  # blocks of 7 rows of x (or of xt's 240)
            y_blocks = int4_matmul(x, q, s, z, group, (rows, cols), out_dtype=torch.float32)
            y_t_blocks = int4_matmul(xt, q, s, z, group, (rows, cols), transpose=True, out_dtype=torch.float32)
            monkeypatch.undo()
            xg = x.clone().requires_grad_()
            gy = torch.randn(tokens, rows, generator=g).to(device)
            int4_matmul(xg, q, s, z, group, (rows, cols), out_dtype=torch.float32).backward(gy)
        label = f"{name} {dtype} g{group}"
        assert_quantized_matmul_contract(y, x.float(), w.to(device), False, label)
        assert_quantized_matmul_contract(y_t, xt.float(), w.to(device), True, label + " transposed")
        assert rel(y16, ref) > 100 * rel(y, ref), (label, rel(y16, ref), rel(y, ref))
        assert torch.equal(y_3d.reshape(tokens, rows), y), label
        assert_quantized_matmul_contract(y_few, x[:3].float(), w.to(device), False, label + " 3 rows")
        assert_quantized_matmul_contract(y_t_few, xt[:3].float(), w.to(device), True, label + " 3 rows transposed")
        # (another layout of x may take another cuBLAS kernel: its own sums; Triton's tiles read any strides alike)
        assert_quantized_matmul_contract(y_col, x.float(), w.to(device), False, label + " column-major x")
        if name == "triton":
            assert torch.equal(y_col, y), label
        assert_quantized_matmul_contract(y_blocks, x.float(), w.to(device), False, label + " by blocks")
        assert_quantized_matmul_contract(y_t_blocks, xt.float(), w.to(device), True, label + " transposed, blocks")
        assert rel(y_t, ref_t) < 1e-5, label
        assert xg.grad.dtype == dtype
        torch.testing.assert_close(xg.grad, (gy.double().cpu() @ w).to(dtype).to(device), rtol=2 ** -7, atol=1e-5)
        if name == "triton" and group != 8:  # exact products
            assert rel(y, ref) <= fp32, (label, rel(y, ref), fp32)
        if name == "triton":  # W's float32 values in three bf16 parts (SPLIT3; an fp16 x in two)
            assert rel(y_t, ref_t) <= 1.5 * fp32_t, (label, rel(y_t, ref_t), fp32_t)
            if group == 8:
                assert rel(y, ref) <= 1.5 * fp32, (label, rel(y, ref), fp32)
        strict = not (device == "cuda" and torch.backends.cuda.matmul.allow_tf32)
        if name == "cuda" and strict:
            # W's float32 values in three bf16 parts, three cuBLAS products (_blocked.split3_dequant_matmul; an
            # fp16 x in two bf16 parts too: five; the GEMV takes none of these: cols is no multiple of 32)
            assert rel(y_t, ref_t) <= 1.5 * fp32_t, (label, rel(y_t, ref_t), fp32_t)
            assert rel(y, ref) <= 1.5 * fp32, (label, rel(y, ref), fp32)


def test_int4_matmul_regime_names_tf32_where_a_float32_product_runs():
    """auto measures per regime: a float32 result of a 16-bit x (whose cuda path multiplies in float32, TF32 where
    torch allows it) is a regime of its own per TF32 setting, as a float32 x is; a 16-bit result is not."""
    from weightkit.backend import allow_tf32

    q, s, z = quantize_int4(torch.randn(16, 64), 32)
    args = (q, s, z, 32, (16, 64), False)
    regimes = {}
    for on in (False, True):
        with allow_tf32(on):
            for x in (torch.randn(4, 64), torch.randn(4, 64).bfloat16()):
                for out in (None, torch.float32):
                    regimes[on, x.dtype, out] = int4._MM.regime(x, *args, out)
    for dtype, out in ((torch.float32, None), (torch.bfloat16, torch.float32)):
        assert regimes[False, dtype, out] != regimes[True, dtype, out], (dtype, out)
    assert regimes[False, torch.bfloat16, None] == regimes[True, torch.bfloat16, None]
