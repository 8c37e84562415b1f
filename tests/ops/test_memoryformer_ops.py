"""weightkit::memory_lookup_forward/backward: every backend == reference (fwd, bwd), gradcheck, determinism."""

import pytest
import torch

from weightkit import debug_checks

from tests.conftest import DEVICES, usable_backends
from weightkit import use_backend
from weightkit.ops import memoryformer
from weightkit.ops.memoryformer import memory_lookup, memory_lookup_grads, memory_lookup_reference

TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
       torch.float16: dict(rtol=2e-3, atol=2e-3)}


def inputs(n, K, tau, d_out, dtype=torch.float32, device="cpu"):
    x = torch.randn(n, K * tau, device=device).to(dtype)
    tables = (torch.randn(K, 2**tau, d_out, device=device) * 0.1).to(dtype)
    return x, tables


def ref64(x, tables, t, grad=None):
    x64 = x.double().requires_grad_(True)
    t64 = tables.double().requires_grad_(True)
    y = memory_lookup_reference(x64, t64, t)
    if grad is None:
        return y
    return torch.autograd.grad(y, (x64, t64), grad.double())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,K,tau,d_out", [(1, 4, 8, 24), (13, 3, 4, 70), (40, 2, 6, 33)])
def test_forward_backward_match_reference(device, dtype, n, K, tau, d_out):
    x, tables = inputs(n, K, tau, d_out, dtype, device)
    g = torch.randn(n, d_out, device=device).to(dtype)
    y64 = ref64(x, tables, 1.5)
    gx64, gt64 = ref64(x, tables, 1.5, g)
    fwd, bwd = usable_backends(memoryformer._FWD, device), usable_backends(memoryformer._BWD, device)
    assert len(fwd) >= 2 and len(bwd) >= 2, (fwd, bwd)
    for name in fwd:
        with use_backend(name):
            y = memory_lookup(x, tables, 1.5)
            gx, gt = memory_lookup_grads(g, x, tables, 1.5)
            gx_d, gt_d = memory_lookup_grads(g, x, tables, 1.5, deterministic=True)
        assert y.dtype == dtype
        torch.testing.assert_close(y.double(), y64, **TOL[dtype], msg=lambda s: f"{name} fwd: {s}")
        for a, b in ((gx, gx64), (gt, gt64), (gx_d, gx64), (gt_d, gt64)):
            torch.testing.assert_close(a.double(), b, **TOL[dtype], msg=lambda s: f"{name} bwd: {s}")


def test_autograd_through_op_and_gradcheck_reference():
    x, tables = inputs(5, 2, 4, 6, torch.float64)
    x.requires_grad_(True)
    tables.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: memory_lookup_reference(a, b, 0.7), (x, tables))
    xf, tf = inputs(9, 3, 4, 10)
    xf.requires_grad_(True)
    tf.requires_grad_(True)
    g = torch.randn(9, 10)
    gx64, gt64 = ref64(xf.detach(), tf.detach(), 1.0, g)
    for name in usable_backends(memoryformer._FWD, "cpu"):
        with use_backend(name):
            gx, gt = torch.autograd.grad(memory_lookup(xf, tf), (xf, tf), g)
        torch.testing.assert_close(gx.double(), gx64, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(gt.double(), gt64, rtol=1e-4, atol=1e-5)


def test_hot_bucket_and_zero_tie_rule():
    """All-zero chunks: bucket 0 (zero counts as negative), p = sigmoid(0)^tau, input gradient 0 (sign(0) = 0)."""
    x = torch.zeros(64, 16)
    x[::2, :8] = torch.randn(32, 8)
    tables = torch.randn(2, 256, 12)
    g = torch.randn(64, 12)
    for name in usable_backends(memoryformer._FWD, "cpu"):
        with use_backend(name):
            y = memory_lookup(x, tables)
            gx, gt = memory_lookup_grads(g, x, tables, deterministic=True)
        torch.testing.assert_close(y[1], (0.5**8) * (tables[0, 0] + tables[1, 0]), rtol=1e-5, atol=1e-6)
        assert torch.equal(gx[1::2], torch.zeros_like(gx[1::2]))
        # every odd token lands in bucket 0 of both tables: 32 contributions to one row
        torch.testing.assert_close(gt[1, 0], (0.5**8) * g.sum(0), rtol=1e-4, atol=1e-5)


def test_deterministic_table_gradient_is_bit_identical():
    x, tables = inputs(300, 4, 4, 40)
    x[:150, :4] = 0.0  # many tokens in one bucket: where summation order matters
    g = torch.randn(300, 40)
    for name in usable_backends(memoryformer._BWD, "cpu"):
        with use_backend(name):
            runs = [memory_lookup_grads(g, x, tables, deterministic=True)[1] for _ in range(3)]
        assert all(torch.equal(runs[0], r) for r in runs[1:]), name


def test_torch_compile():
    x, tables = inputs(6, 2, 4, 8)
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, b: memory_lookup(a * 2, b), fullgraph=True)
    torch.testing.assert_close(compiled(x, tables), memory_lookup(x * 2, tables))


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(x=torch.randn(3, 15)), ValueError, "x has 15 features, tables expect"),
    (dict(x=torch.tensor(1.0)), ValueError, r"x must have at least 1 dimension, got shape \(\)"),
    (dict(tables=torch.randn(2, 100, 8)), ValueError, "2\\^tau rows"),
    (dict(tables=torch.randn(256, 8)), ValueError, "tables must be 3-D"),
    (dict(t=0.0), ValueError, "t \\(temperature\\) must be > 0"),
    (dict(x=torch.full((3, 16), float("nan"))), ValueError, "x contains 48 non-finite"),
    (dict(x=torch.randn(3, 16).to(torch.int64)), TypeError, "x must have dtype"),
])
def test_bad_input(kwargs, err, match):
    args = dict(x=torch.randn(3, 16), tables=torch.randn(2, 256, 8), t=1.0)
    args.update(kwargs)
    with pytest.raises(err, match=match), debug_checks():  # data checks (NaN, ranges) are opt-in
        memory_lookup(**args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,K,tau,d_out", [(200, 3, 2, 37), (257, 2, 1, 600), (1, 1, 2, 5)])
def test_deterministic_hot_buckets_match_reference_and_repeat_bitwise(device, n, K, tau, d_out):
    """Many tokens in few buckets (2^tau per table): long runs after the sort, several column tiles (d_out 600)."""
    x, tables = inputs(n, K, tau, d_out, device=device)
    x[: n // 3] = 0.0  # a third of the tokens in bucket 0 of every table, the rest spread over 2^tau buckets
    g = torch.randn(n, d_out, device=device)
    gx64, gt64 = ref64(x, tables, 0.8, g)
    for name in usable_backends(memoryformer._BWD, device):
        with use_backend(name):
            runs = [memory_lookup_grads(g, x, tables, 0.8, deterministic=True) for _ in range(2)]
        gx, gt = runs[0]
        torch.testing.assert_close(gx.double(), gx64, rtol=1e-4, atol=1e-5, msg=lambda s: f"{name} grad_x: {s}")
        torch.testing.assert_close(gt.double(), gt64, rtol=1e-4, atol=1e-4, msg=lambda s: f"{name} grad_t: {s}")
        assert torch.equal(runs[0][1], runs[1][1]) and torch.equal(runs[0][0], runs[1][0]), name


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_backward_under_use_deterministic_algorithms(device):
    """Autograd through memory_lookup with torch.use_deterministic_algorithms(True) takes the deterministic path."""
    x, tables = inputs(120, 2, 3, 20, device=device)
    x[:60, :3] = 0.0
    g = torch.randn(120, 20, device=device)
    gx64, gt64 = ref64(x, tables, 1.0, g)
    was_on = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for name in usable_backends(memoryformer._FWD, device):
            grads = []
            for _ in range(2):
                xr, tr = x.clone().requires_grad_(True), tables.clone().requires_grad_(True)
                with use_backend(name):
                    grads.append(torch.autograd.grad(memory_lookup(xr, tr), (xr, tr), g))
            (gx, gt), (gx2, gt2) = grads
            torch.testing.assert_close(gx.double(), gx64, rtol=1e-4, atol=1e-5, msg=lambda s: f"{name} grad_x: {s}")
            torch.testing.assert_close(gt.double(), gt64, rtol=1e-4, atol=1e-4, msg=lambda s: f"{name} grad_t: {s}")
            assert torch.equal(gt, gt2) and torch.equal(gx, gx2), name
    finally:
        torch.use_deterministic_algorithms(was_on, warn_only=warn_only)


@pytest.mark.parametrize("device", DEVICES)
def test_table_grad_modes_match_reference(device):
    """Outside deterministic mode the GPU backends write the table gradient by sorted segments or by atomics
    (table_grad_mode); both give the reference's gradients (hot bucket: long runs), and segments repeat bitwise."""
    x, tables = inputs(90, 3, 4, 50, device=device)
    x[:30] = 0.0
    g = torch.randn(90, 50, device=device)
    gx64, gt64 = ref64(x, tables, 0.9, g)
    previous = memoryformer.table_grad_mode()
    try:
        for mode in memoryformer.TABLE_GRAD_MODES:
            assert memoryformer.set_table_grad_mode(mode) in memoryformer.TABLE_GRAD_MODES
            assert memoryformer.table_grad_mode() == mode
            for name in usable_backends(memoryformer._BWD, device):
                with use_backend(name):
                    runs = [memory_lookup_grads(g, x, tables, 0.9) for _ in range(2)]
                for gx, gt in runs:
                    torch.testing.assert_close(gx.double(), gx64, rtol=1e-4, atol=1e-5, msg=lambda s: f"{name}: {s}")
                    torch.testing.assert_close(gt.double(), gt64, rtol=1e-4, atol=1e-4, msg=lambda s: f"{name}: {s}")
                if mode == "segments":
                    assert torch.equal(runs[0][1], runs[1][1]), name
    finally:
        memoryformer.set_table_grad_mode(previous)
    with pytest.raises(ValueError, match="mode must be one of"):
        memoryformer.set_table_grad_mode("sorted")


@pytest.mark.parametrize("n,K,d_out,elem", [(1, 512, 4096, 2), (1, 512, 4096, 4), (16, 512, 4096, 2),
                                            (1024, 512, 4096, 2), (3, 9, 130, 4), (1, 4, 8, 2)])
def test_cuda_forward_plan(n, K, d_out, elem):
    """The CUDA forward's launch rule (pure Python, checked without a GPU): one decode token fills the GPU with
    table splits (>= 2 blocks per SM where the tables allow), every split keeps >= 8 tables (one per warp),
    partials stay within the cap, and many tokens need no split."""
    from weightkit.backends.cuda.memoryformer import _MAX_SPLIT, _PARTIAL_BYTES, forward_plan

    sms = 132
    tb, splits, tiles = forward_plan(n, K, d_out, elem, sms)
    tile = 32 * 16 // elem
    assert tb in (1, 2, 4) and (tb == 1) == (n == 1) and tiles == -(-n // tb) * -(-d_out // tile)
    assert 1 <= splits <= _MAX_SPLIT and splits & (splits - 1) == 0
    assert splits == 1 or (-(-K // splits) >= 8 and splits * n * d_out * 4 <= _PARTIAL_BYTES)
    if K >= 8 * 64 and n * d_out * 4 * 64 <= _PARTIAL_BYTES:
        assert tiles * splits >= 2 * sms
    if (n, K, d_out) == (1, 512, 4096):
        assert splits == (32 if elem == 2 else 16)
    if n == 1024:
        assert splits == 1


@pytest.mark.skipif(not torch.cuda.is_available() or "cuda" not in usable_backends(memoryformer._BWD, "cuda"),
                    reason="the cuda backend's counting sort runs on a GPU (its logic: test_cuda_index_emulation.py)")
@pytest.mark.parametrize("n,K,tau,hot", [(1, 1, 1, False), (37, 3, 4, False), (1000, 512, 8, False),
                                         (300, 4, 8, True), (70, 2, 10, False), (9, 3, 11, False), (0, 2, 3, False)])
def test_cuda_sort_pairs_is_a_stable_sort(n, K, tau, hot):
    """The cuda backend's segment sort (wk_cuda_memory_rank_keys up to 1024 buckets, torch.sort above) gives the
    order and run starts of a stable sort of the flat keys and a search of each key's first entry."""
    from weightkit.backends.cuda.memoryformer import _sort_pairs
    from weightkit.backends.cuda import stream

    buckets = 1 << tau
    gen = torch.Generator().manual_seed(n + K + tau)
    print(f"seed {n + K + tau}")
    h = torch.randint(0, 2 if hot else buckets, (n, K), generator=gen)
    keys = (torch.arange(K) * buckets + h).cuda()
    starts, order = _sort_pairs(keys, buckets, *stream(keys))
    sorted_keys, expect = torch.sort(keys.reshape(-1), stable=True)
    assert torch.equal(order, expect)
    assert torch.equal(starts, torch.searchsorted(sorted_keys, torch.arange(K * buckets + 1, device="cuda")))


@pytest.mark.skipif(not torch.cuda.is_available() or "cuda" not in usable_backends(memoryformer._FWD, "cuda"),
                    reason="the cuda backend's launch checks run on a GPU")
def test_cuda_forward_refuses_more_column_tiles_than_grid_y():
    """d_out past 65535 column tiles (128 columns of fp32 tables each) is an error, not an unwritten y: the check's
    flag used to be overwritten by the dtype dispatch's result, and the call returned success without a launch."""
    from weightkit.backends.cuda.memoryformer import memory_lookup_forward

    x = torch.ones(1, 1, device="cuda")
    tables = torch.zeros(1, 2, 65536 * 128, device="cuda")
    with pytest.raises(RuntimeError, match="memory_lookup_forward"):
        memory_lookup_forward(x, tables, 1.0)
