"""weightkit's INT8 ops: stochastic_round_int8 (every backend == reference bit for bit, unbiasedness) and int8_matmul
(dequantize inside the matmul: backends == float64, autograd), with their errors."""

import math

import pytest
import torch

from tests.conftest import DEVICES, assert_quantized_matmul_contract, usable_backends
from weightkit import debug_checks, use_backend
from weightkit.ops import int8, rng
from weightkit.ops.int8 import absmax_scale, dequantize_int8, int8_matmul, stochastic_round_int8

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def test_philox_known_answers():
    """Random123's published Philox4x32-10 test vectors."""
    t = lambda v: torch.tensor([v], dtype=torch.int64)  # noqa: E731
    cases = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for ctr, key, expected in cases:
        out = rng.philox4x32_block(*(t(c) for c in ctr), *key)
        assert tuple(int(o) for o in out) == expected


def test_uniform_range_and_moments():
    u = rng.uniform(200_000, seed=7, offset=3)
    assert u.dtype == torch.float32 and float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 5 * math.sqrt(1 / 12 / u.numel())
    # a stream split in two pieces equals the whole stream
    whole = rng.uniform(1000, seed=7, offset=5)
    assert torch.equal(torch.cat([rng.uniform(333, 7, 5), rng.uniform(667, 7, 338)]), whole)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,group_size", [((7, 96), 32), ((3, 5, 64), 64), ((1000,), 8), ((33, 128), 128)])
def test_sr_backends_match_reference(device, dtype, shape, group_size):
    x = (torch.randn(shape, device=device) * 3).to(dtype)
    scale = absmax_scale(x, group_size)
    seed, offset = int(torch.randint(0, 2**62, ())), int(torch.randint(0, 2**40, ()))
    with use_backend("reference"):
        expected = stochastic_round_int8(x, scale, group_size, seed, offset)
    backends = usable_backends(int8._SR, device)
    assert "reference" in backends and len(backends) >= 2, f"only {backends} can run on {device}"
    for name in backends:
        with use_backend(name):
            got = stochastic_round_int8(x, scale, group_size, seed, offset)
        assert got.dtype == torch.int8 and got.shape == x.shape
        torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=f"backend {name} differs from reference")


@pytest.mark.parametrize("device", DEVICES)
def test_sr_non_contiguous_input(device):
    base = torch.randn(64, 48, device=device)
    x = base.t()  # 48 x 64, not contiguous
    scale = absmax_scale(x.contiguous(), 16)
    for name in usable_backends(int8._SR, device):
        with use_backend(name):
            got = stochastic_round_int8(x, scale, 16, seed=3)
        with use_backend("reference"):
            expected = stochastic_round_int8(x.contiguous(), scale, 16, seed=3)
        assert torch.equal(got, expected), name


@pytest.mark.parametrize("device", DEVICES)
def test_unbiased_and_variance_bound(device):
    """E[q * s] = x, and Var[q * s] = s^2 * f (1 - f) <= s^2 / 4 with f = frac(x / s)."""
    n_draws, group = 4000, 16
    x = torch.randn(4, group, device=device) * 2
    scale = absmax_scale(x, group)
    for name in usable_backends(int8._SR, device):
        if name == "triton" and device == "cpu":
            n = 400  # the interpreter is slow; the bound below scales with 1/sqrt(n)
        else:
            n = n_draws
        with use_backend(name):
            draws = torch.stack([stochastic_round_int8(x, scale, group, seed=11, offset=i * x.numel()) for i in range(n)])
        deq = draws.double() * scale.double().repeat_interleave(group).reshape(x.shape)
        frac = torch.frac(x.double() / scale.double().repeat_interleave(group).reshape(x.shape))
        frac = torch.where(frac < 0, frac + 1, frac)
        s = scale.double().repeat_interleave(group).reshape(x.shape)
        # Bernstein's inequality per element (|q - E q| <= 1 step): the bound fails with probability < 1e-9
        log_term = math.log(2 / 1e-9)
        var_steps = frac * (1 - frac)
        bound = (log_term / 3 + torch.sqrt((log_term / 3) ** 2 + 2 * n * var_steps * log_term)) / n
        dev = ((deq.mean(0) - x.double()) / s).abs()
        assert bool((dev <= bound).all()), f"{name}: biased (max deviation {float(dev.max()):.4f} steps)"
        assert bool((deq.var(0) <= s**2 / 4 * 1.5 + 1e-12).all()), f"{name}: variance above s^2/4"
        # one step, up to fp32 rounding: the scale and x * (1 / scale) are fp32, so a value at its group's absmax can
        # sit 127 * 2^-23 steps off the grid (seed 463604037: x / s = -127.0000004 in float64, one draw of -126)
        assert bool(((deq - x.double()).abs() <= s * (1 + 127 * 2.0**-22)).all()), f"{name}: error above one step"


def test_seed_reproduces_and_differs():
    x = torch.randn(256, 64)
    scale = absmax_scale(x, 64)
    a = stochastic_round_int8(x, scale, 64, seed=5)
    assert torch.equal(a, stochastic_round_int8(x, scale, 64, seed=5))
    assert not torch.equal(a, stochastic_round_int8(x, scale, 64, seed=6))
    assert not torch.equal(a, stochastic_round_int8(x, scale, 64, seed=5, offset=1))


def test_saturates_at_int8_range():
    x = torch.tensor([1e6, -1e6, 0.0, 0.5] * 8)
    q = stochastic_round_int8(x, torch.ones(4), 8, seed=0)
    assert q.tolist()[:3] == [127, -128, 0]


def test_sr_torch_compile():
    x = torch.randn(16, 64)
    scale = absmax_scale(x, 32)

    def fn(x, scale):
        return stochastic_round_int8(x * 2, scale * 2, 32, seed=9).to(torch.float32).sum()

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    assert float(compiled(x, scale)) == float(fn(x, scale))


@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        (dict(x=torch.ones(4, 8, dtype=torch.int32)), TypeError, "x must have dtype"),
        (dict(x=torch.ones(4, 8, dtype=torch.float64)), TypeError, "x must have dtype"),
        (dict(group_size=3), ValueError, "group_size=3 must divide"),
        (dict(group_size=0), ValueError, "group_size must be an int >= 1"),
        (dict(scale=torch.ones(3)), ValueError, "scale must hold one value per group"),
        (dict(scale=torch.ones(4, dtype=torch.float16)), TypeError, "scale must have dtype"),
        (dict(scale=-torch.ones(4)), ValueError, "scale must be positive"),
        (dict(x=torch.full((4, 8), float("nan"))), ValueError, "x contains 32 non-finite"),
        (dict(seed=-1), ValueError, "seed must be an int"),
        (dict(offset=2**63), ValueError, "offset must be an int"),
        (dict(x=torch.ones(0, 8)), ValueError, "x is empty"),
    ],
)
def test_sr_bad_input(kwargs, err, match):
    args = dict(x=torch.randn(4, 8), scale=torch.ones(4), group_size=8, seed=0, offset=0)
    args.update(kwargs)
    with pytest.raises(err, match=match), debug_checks():  # data checks (NaN, ranges) are opt-in
        stochastic_round_int8(**args)


def test_absmax_scale():
    x = torch.tensor([[1.0, -4.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    s = absmax_scale(x, 4)
    assert s[0] == pytest.approx(4.0 / 127) and s[1] > 0


def weight(out_f, in_f, group, device="cpu"):
    w = torch.randn(out_f, in_f, device=device)
    scale = absmax_scale(w, group)
    q = torch.randint(-127, 128, (out_f, in_f), dtype=torch.int8, device=device)
    return q, scale


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens,out_f,in_f,group", [(1, 40, 64, 32), (7, 33, 96, 16), (50, 130, 128, 128), (3, 200, 48, 48)])
@pytest.mark.parametrize("transpose", [False, True])
def test_matmul_backends_match_float64(device, dtype, tokens, out_f, in_f, group, transpose):
    q, scale = weight(out_f, in_f, group, device)
    x = torch.randn(tokens, out_f if transpose else in_f, device=device).to(dtype)
    w64 = dequantize_int8(q, scale, group).double()
    backends = usable_backends(int8._INT8_MM, device)
    assert len(backends) >= 2, backends
    for name in backends:
        with use_backend(name):
            y = int8_matmul(x, q, scale, group, transpose)
        assert_quantized_matmul_contract(y, x, w64, transpose, name)


def test_leading_dims_and_non_contiguous_input():
    q, scale = weight(24, 32, 16)
    base = torch.randn(32, 2, 5)
    x = base.permute(1, 2, 0)  # (2, 5, 32), not contiguous
    expected = x.contiguous() @ dequantize_int8(q, scale, 16).T
    for name in usable_backends(int8._INT8_MM, "cpu"):
        with use_backend(name):
            torch.testing.assert_close(int8_matmul(x, q, scale, 16), expected, rtol=1e-5, atol=1e-5)


def test_gradcheck_reference_and_op_backward():
    q, scale = weight(6, 8, 4)
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: int8.int8_matmul_reference(t, q, scale, 4, False), (x,))
    xf = torch.randn(5, 8, requires_grad=True)
    g = torch.randn(5, 6)
    for name in usable_backends(int8._INT8_MM, "cpu"):
        with use_backend(name):
            (grad,) = torch.autograd.grad(int8_matmul(xf, q, scale, 4), xf, g)
        torch.testing.assert_close(grad, g @ dequantize_int8(q, scale, 4), rtol=1e-5, atol=1e-5)


def test_matmul_torch_compile():
    q, scale = weight(16, 32, 8)
    x = torch.randn(4, 32)
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: int8_matmul(t * 2, q, scale, 8), fullgraph=True)
    torch.testing.assert_close(compiled(x), int8_matmul(x * 2, q, scale, 8))


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(x=torch.randn(2, 31)), ValueError, "x has 31 features"),
    (dict(x=torch.tensor(1.0)), ValueError, r"x must have at least 1 dimension, got shape \(\)"),
    (dict(w_q=torch.zeros(16, 32)), TypeError, "w_q must have dtype"),
    (dict(group_size=5), ValueError, "group_size=5 must divide in_features=32"),
    (dict(scale=torch.ones(3)), ValueError, "scale must hold 64 values"),
    (dict(x=torch.full((2, 32), float("inf"))), ValueError, "x contains 64 non-finite"),
])
def test_matmul_bad_input(kwargs, err, match):
    args = dict(x=torch.randn(2, 32), w_q=torch.zeros(16, 32, dtype=torch.int8), scale=torch.ones(64), group_size=8)
    args.update(kwargs)
    with pytest.raises(err, match=match), debug_checks():  # data checks (NaN, ranges) are opt-in
        int8_matmul(**args)




@pytest.mark.parametrize("transpose", [False, True])
def test_many_tokens_over_several_dequantized_blocks(transpose):
    """More than 8 tokens take the dequantize-then-BLAS path, ~4M weights per block on cpu: use several blocks."""
    out_f, in_f, group = 140_000, 64, 16  # 9M weights: three blocks
    q, scale = weight(out_f, in_f, group)
    x = torch.randn(12, out_f if transpose else in_f)
    w64 = dequantize_int8(q, scale, group).double()
    want = x.double() @ (w64 if transpose else w64.T)
    for name in usable_backends(int8._INT8_MM, "cpu"):
        if name == "triton":
            continue  # the interpreter is too slow for this size
        with use_backend(name):
            y = int8_matmul(x, q, scale, group, transpose)
        torch.testing.assert_close(y.double(), want, rtol=1e-4, atol=1e-3, msg=lambda s: f"{name}: {s}")


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_bytes", [1 << 30, 300 * 64 * 4])
def test_dequant_matmul_blocks_of_output_features(transpose, dtype, block_bytes):
    """The cuda backend's dequantize-to-x's-dtype + BLAS path (backends/_blocked.dequant_matmul) on the CPU, with
    torch's dequantization standing in for the CUDA kernel: one block, or blocks of 128-aligned output features with a
    partial last one (transpose: columns of W); every output feature is dequantized exactly once, in x's dtype."""
    from weightkit.backends._blocked import dequant_matmul

    out_f, in_f, group = 600, 64, 16
    q, scale = weight(out_f, in_f, group)
    w = dequantize_int8(q, scale, group)
    calls = []

    def dequant(dst, r0, nr, c0, nc):
        assert dst.dtype == dtype and dst.is_contiguous() and dst.shape == (nr, nc)
        calls.append((r0, nr, c0, nc))
        dst.copy_(w[r0:r0 + nr, c0:c0 + nc])

    x = torch.randn(7, out_f if transpose else in_f).to(dtype)
    y = dequant_matmul(x, out_f, in_f, transpose, dequant, block_bytes)
    assert_quantized_matmul_contract(y, x, w.double(), transpose, f"{dtype} t={transpose}")
    n_out = in_f if transpose else out_f
    spans = [(c0, nc) if transpose else (r0, nr) for r0, nr, c0, nc in calls]
    assert [s for s, _ in spans] == list(range(0, n_out, spans[0][1])) and sum(n for _, n in spans) == n_out
    if len(spans) > 1:
        assert all(n % 128 == 0 for _, n in spans[:-1])
    else:
        assert spans == [(0, n_out)]
    assert all((r0, nr) == (0, out_f) for r0, nr, _, _ in calls) if transpose else all(
        (c0, nc) == (0, in_f) for _, _, c0, nc in calls)


class _FakeCudaDequant:
    """The C semantics of wk_cuda_dequantize_int8 / wk_cuda_dequantize_int4 (csrc/weightkit.h), in torch on CPU
    pointers: lets the cuda backend's host code (argument order, blocks, dtypes) run without a GPU."""

    CODES = {0: torch.float32, 1: torch.float16, 2: torch.bfloat16}

    @staticmethod
    def _at(ptr, n, dtype):
        import ctypes

        size = torch.empty(0, dtype=dtype).element_size()
        return torch.frombuffer((ctypes.c_char * (n * size)).from_address(ptr), dtype=dtype, count=n)

    def __init__(self, numel):
        self.numel, self.calls = numel, []

    def dequantize_int8(self, q, scale, out, code, in_f, group, r0, rows, c0, cols, device, stream):
        self.calls.append(("int8", r0, rows, c0, cols))
        w = (self._at(q, self.numel, torch.int8).float().view(-1, group)
             * self._at(scale, self.numel // group, torch.float32).view(-1, 1)).view(-1, in_f)
        self._at(out, rows * cols, self.CODES[code]).copy_(w[r0:r0 + rows, c0:c0 + cols].reshape(-1))
        return 0

    def dequantize_int4(self, packed, scale, zero, out, code, n_cols, group, r0, rows, c0, cols, device, stream):
        from weightkit.ops.int4 import dequantize_int4_reference

        self.calls.append(("int4", r0, rows, c0, cols))
        w = dequantize_int4_reference(self._at(packed, self.numel // 2, torch.uint8),
                                      self._at(scale, self.numel // group, torch.float32),
                                      self._at(zero, self.numel // group, torch.uint8), group).view(-1, n_cols)
        self._at(out, rows * cols, self.CODES[code]).copy_(w[r0:r0 + rows, c0:c0 + cols].reshape(-1))
        return 0


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_backend_host_code_on_cpu_pointers(fmt, transpose, dtype, monkeypatch):
    """weightkit/backends/cuda/int8.py and int4.py's int8_matmul / int4_matmul with the CUDA library replaced by the
    C functions' semantics on CPU memory (a GPU runs the real kernels: tests/ops cases on cuda): the arguments reach
    the right parameters, blocks of 128 output features cover the output once, 3-D x keeps its leading dims."""
    from weightkit import native
    from weightkit.backends import _blocked
    from weightkit.backends.cuda import int4 as cuda_int4, int8 as cuda_int8
    from weightkit.ops.int4 import dequantize_int4, quantize_int4

    rows, cols, group = 300, 256, 32
    fake = _FakeCudaDequant(rows * cols)
    monkeypatch.setattr(native, "CUDA", fake)
    monkeypatch.setattr(_blocked, "DEQUANT_BLOCK_BYTES", 128 * 128 * torch.empty(0, dtype=dtype).element_size())
    for mod in (cuda_int8, cuda_int4):
        monkeypatch.setattr(mod, "stream", lambda t: (0, 0))
    x = torch.randn(2, 5, rows if transpose else cols).to(dtype)  # 10 tokens: int8's dequantize path (GEMV: <= 8)
    if fmt == "int8":
        q, scale = weight(rows, cols, group)
        w64 = dequantize_int8(q, scale, group).double()
        y = cuda_int8.int8_matmul(x, q, scale, group, transpose)
    else:
        packed, scale, zero = quantize_int4(torch.randn(rows, cols), group)
        w64 = dequantize_int4(packed, scale, zero, group, (rows, cols)).double()
        y = cuda_int4.int4_matmul(x, packed, scale, zero, group, (rows, cols), transpose)
    assert y.shape == (2, 5, cols if transpose else rows)
    assert_quantized_matmul_contract(y.reshape(10, -1), x.reshape(10, -1), w64, transpose, f"{fmt} t={transpose}")
    n_out = cols if transpose else rows
    spans = [(c0, nc) if transpose else (r0, nr) for _, r0, nr, c0, nc in fake.calls]
    assert len(spans) > 1 and [s for s, _ in spans] == list(range(0, n_out, 128))
    assert sum(n for _, n in spans) == n_out
