"""weightkit.kernels.memoryformer (the triton backend of memory_lookup): forward and both backward modes against a float64
reference over n / K / tau / d_out / dtype, forced configs (SPLIT 1 and > 1, inline and precomputed hash, token,
table and column blocks of several sizes), bitwise repeatable and config-independent deterministic table gradient,
and the autotuning config spaces (pruned sets non-empty and within the partial buffer). Runs under
TRITON_INTERPRET=1 on the CPU, compiled on a GPU."""

import pytest
import torch

from tests.conftest import DEVICES
from weightkit.ops import memoryformer
from weightkit.ops.memoryformer import memory_lookup_reference

TRITON_DEVICES = [d for d in DEVICES if memoryformer._FWD.why_not("triton", torch.device(d)) is None]
if not TRITON_DEVICES:
    pytest.skip("triton backend unavailable: " + memoryformer._FWD.why_not("triton", torch.device(DEVICES[-1])),
                allow_module_level=True)

import triton  # noqa: E402

from weightkit.kernels import memoryformer as km  # noqa: E402

TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
       torch.float16: dict(rtol=2e-3, atol=2e-3)}
T = 1.3


def inputs(n, K, tau, d_out, dtype, device, table_dtype=None):
    x = torch.randn(n, K * tau, device=device).to(dtype)
    x[0, :tau] = 0.0  # an all-zero chunk: bucket 0, sign(0) = 0
    tables = (torch.randn(K, 2**tau, d_out, device=device) * 0.1).to(table_dtype or dtype)
    return x, tables


def ref64(x, tables, g):
    x64 = x.double().requires_grad_(True)
    t64 = tables.double().requires_grad_(True)
    y = memory_lookup_reference(x64, t64, T)
    gx, gt = torch.autograd.grad(y, (x64, t64), g.double())
    return y.detach(), gx, gt


def close(a, b, dtype, what):
    torch.testing.assert_close(a.double(), b, **TOL[dtype], msg=lambda s: f"{what}: {s}")


# every value of n, K, tau, d_out and dtype at least twice, and one mixed case (bf16 x, fp32 tables)
CASES = [(1, 9, 8, 130, torch.float32), (5, 3, 4, 7, torch.bfloat16), (33, 9, 1, 64, torch.float16),
         (33, 3, 8, 130, torch.bfloat16), (5, 1, 8, 64, torch.float32), (1, 3, 1, 7, torch.float16),
         (33, 1, 4, 130, torch.float32)]


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("n,K,tau,d_out,dtype", CASES)
def test_forward_backward_match_float64(device, n, K, tau, d_out, dtype):
    x, tables = inputs(n, K, tau, d_out, dtype, device)
    g = torch.randn(n, d_out, device=device).to(dtype)
    y64, gx64, gt64 = ref64(x, tables, g)
    y = km.memory_lookup_forward_triton(x, tables, T)
    assert y.dtype == dtype and y.shape == (n, d_out)
    close(y, y64, dtype, "forward")
    for det, segments in ((False, False), (False, True), (True, False)):  # atomics, tuned segments, deterministic
        gx, gt = km.memory_lookup_backward_triton(g, x, tables, T, det, segments)
        assert gx.dtype == dtype and gt.dtype == tables.dtype
        close(gx, gx64, dtype, f"grad_x deterministic={det} segments={segments}")
        close(gt, gt64, dtype, f"grad_tables deterministic={det} segments={segments}")
    gx2, gt2 = km.memory_lookup_backward_triton(g, x, tables, T, True)
    assert torch.equal(gx, gx2) and torch.equal(gt, gt2)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_mixed_dtypes(device):
    """bf16 activations with fp32 tables: fp32 accumulation, output and grad_x in x's dtype, grad_tables fp32."""
    x, tables = inputs(6, 3, 4, 40, torch.bfloat16, device, table_dtype=torch.float32)
    g = torch.randn(6, 40, device=device).to(torch.bfloat16)
    y64, gx64, gt64 = ref64(x, tables, g)
    y = km.memory_lookup_forward_triton(x, tables, T)
    assert y.dtype == torch.bfloat16
    close(y, y64, torch.bfloat16, "forward")
    for det in (False, True):
        gx, gt = km.memory_lookup_backward_triton(g, x, tables, T, det)
        assert gx.dtype == torch.bfloat16 and gt.dtype == torch.float32
        close(gx, gx64, torch.bfloat16, "grad_x")
        torch.testing.assert_close(gt.double(), gt64, rtol=1e-4, atol=1e-4)


def cfg(num_warps=4, num_stages=1, **kw):
    return triton.Config(dict(kw, STAGES=num_stages), num_warps=num_warps, num_stages=num_stages)


FWD_CONFIGS = [cfg(BLOCK_T=1, BLOCK_K=1, BLOCK_N=16, SPLIT=1),
               cfg(BLOCK_T=4, BLOCK_K=2, BLOCK_N=64, SPLIT=4),  # K=3: 2 of the 4 splits are empty
               cfg(BLOCK_T=16, BLOCK_K=4, BLOCK_N=32, SPLIT=2, num_warps=2),
               cfg(BLOCK_T=2, BLOCK_K=8, BLOCK_N=128, SPLIT=1, num_stages=3)]


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("pre", [False, True])
@pytest.mark.parametrize("n,K,tau,d_out,dtype", [(5, 3, 4, 130, torch.float32), (33, 9, 8, 7, torch.bfloat16)])
def test_forward_forced_configs(device, pre, n, K, tau, d_out, dtype):
    """The forward kernel launched with explicit configs: SPLIT 1 (direct store) and > 1 (partials + reduce),
    hash inline and precomputed; all agree with float64."""
    x, tables = inputs(n, K, tau, d_out, dtype, device)
    y64 = memory_lookup_reference(x.double(), tables.double(), T)
    for config in FWD_CONFIGS:
        y = torch.full((n, d_out), float("nan"), dtype=dtype, device=device)
        used = km._launch_forward(x, tables, T, y, config, pre=pre)
        assert used is config
        close(y, y64, dtype, f"forward {config}")


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_hash_kernel(device):
    x, _ = inputs(7, 5, 6, 3, torch.float32, device)
    keys, ps = km.memory_hash_triton(x, 5, 6, T)
    z = x.reshape(7, 5, 6).double()
    h = ((z > 0).long() << torch.arange(6, device=device)).sum(-1)
    assert keys.dtype == torch.int32
    assert torch.equal(keys.long(), h + 64 * torch.arange(5, device=device))
    torch.testing.assert_close(ps.double(), torch.sigmoid(2 * z.abs() / T).prod(-1), rtol=1e-6, atol=0)


BWD_CONFIGS = [cfg(BLOCK_T=1, BLOCK_K=1, BLOCK_N=16), cfg(BLOCK_T=8, BLOCK_K=4, BLOCK_N=64, num_warps=2),
               cfg(BLOCK_T=16, BLOCK_K=2, BLOCK_N=128, num_warps=8, num_stages=3)]
SEG_CONFIGS = [cfg(ROWS=1, BLOCK_N=32), cfg(ROWS=4, BLOCK_N=64), cfg(ROWS=16, BLOCK_N=256, num_warps=8, num_stages=2),
               cfg(ROWS=2, BLOCK_N=16, num_stages=3)]


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("n,K,tau,d_out,dtype", [(33, 3, 4, 130, torch.float32), (5, 9, 6, 64, torch.float16)])
def test_backward_forced_configs(device, n, K, tau, d_out, dtype):
    """Backward kernel (atomics and key-storing modes) with explicit configs; the segment kernel with several
    configs gives the same bits (its per-element summation order does not depend on the config)."""
    x, tables = inputs(n, K, tau, d_out, dtype, device)
    x[: n // 2, : 2 * tau] = 0.0  # hot bucket 0 in tables 0 and 1: long runs
    g = torch.randn(n, d_out, device=device).to(dtype)
    _, gx64, gt64 = ref64(x, tables, g)
    want_keys, want_p = km.memory_hash_triton(x, K, tau, T)
    for config in BWD_CONFIGS:
        gx = torch.full((n, K * tau), float("nan"), dtype=dtype, device=device)
        gt = torch.zeros(tables.shape, dtype=torch.float32, device=device)
        keys = torch.full((n, K), -1, dtype=torch.int32, device=device)
        ps = torch.full((n, K), float("nan"), device=device)
        km._launch_backward(g, x, tables, T, gx, gt, keys, ps, True, True, config)
        close(gx, gx64, dtype, f"grad_x {config}")
        close(gt, gt64, dtype, f"grad_tables (atomics) {config}")
        assert torch.equal(keys, want_keys)
        torch.testing.assert_close(ps, want_p, rtol=1e-6, atol=0)
    outs = []
    for config in SEG_CONFIGS:
        gt = torch.full(tables.shape, float("nan"), dtype=dtype, device=device)  # every row must be written
        km._launch_segments(want_keys, want_p, g, gt, config)
        close(gt, gt64, dtype, f"grad_tables (segments) {config}")
        outs.append(gt)
    assert all(torch.equal(outs[0], o) for o in outs[1:])


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_deterministic_bitwise_repeatable_hot_buckets(device):
    x, tables = inputs(70, 2, 2, 33, torch.float32, device)  # 70 tokens in 4 buckets per table
    x[:40] = 0.0
    g = torch.randn(70, 33, device=device)
    _, gx64, gt64 = ref64(x, tables, g)
    runs = [km.memory_lookup_backward_triton(g, x, tables, T, True) for _ in range(3)]
    for gx, gt in runs:
        torch.testing.assert_close(gx.double(), gx64, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(gt.double(), gt64, rtol=1e-4, atol=1e-4)
        assert torch.equal(gx, runs[0][0]) and torch.equal(gt, runs[0][1])
    # row (table 0, bucket 0): its tokens' p * g summed one after the other in token order, in fp32
    z0, acc = x[:, :2], torch.zeros(33, device=device)
    for i in range(70):
        if (z0[i] <= 0).all():
            acc = acc + torch.sigmoid(2 * z0[i].abs() / T).prod() * g[i]
    torch.testing.assert_close(runs[0][1][0, 0], acc, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("n,K,tau,hot", [(1, 1, 1, False), (1, 5, 8, False), (37, 3, 4, False), (100, 4, 8, True),
                                         (130, 2, 10, False), (200, 2, 2, True), (9, 3, 11, False), (0, 2, 3, False)])
def test_sort_pairs_is_a_stable_sort(device, n, K, tau, hot):
    """The segment pass's counting sort (one program per table; torch.sort above RANK_MAX_BUCKETS buckets) gives
    what a stable sort of the flat keys and a search of each key's first run entry give: the same order (ties in
    token order) and run starts, as int32 (n K < 2^31). Hot: most tokens in 2 buckets, many ties per block."""
    gen = torch.Generator().manual_seed(n * 1000 + K * 10 + tau)
    print(f"seed {n * 1000 + K * 10 + tau}")
    buckets = 1 << tau
    h = torch.randint(0, 2 if hot else buckets, (n, K), generator=gen)
    keys = (torch.arange(K) * buckets + h).to(km._key_dtype(K, tau)).to(device)
    starts, order = km.sort_pairs(keys, buckets)
    sorted_keys, expect = torch.sort(keys.reshape(-1), stable=True)
    expect_starts = torch.searchsorted(sorted_keys, torch.arange(K * buckets + 1, device=device, dtype=keys.dtype))
    assert starts.dtype == torch.int32 and starts.shape == (K * buckets + 1,) and order.shape == (n * K,)
    assert order.dtype == (torch.int32 if buckets <= km.RANK_MAX_BUCKETS else torch.int64)
    assert torch.equal(order.long(), expect) and torch.equal(starts.long(), expect_starts)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_empty_and_degenerate_shapes(device):
    x, tables = inputs(1, 2, 3, 5, torch.float32, device)
    y = km.memory_lookup_forward_triton(x[:0], tables, T)
    assert y.shape == (0, 5)
    gx, gt = km.memory_lookup_backward_triton(torch.zeros(0, 5, device=device), x[:0], tables, T, True)
    assert gx.shape == (0, 6) and torch.equal(gt, torch.zeros_like(tables))
    gx, gt = km.memory_lookup_backward_triton(torch.zeros(0, 5, device=device), x[:0], tables, T, False)
    assert torch.equal(gt, torch.zeros_like(tables))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="autotuning times configs on a GPU")
def test_autotuned_paths_on_gpu():
    """Tables of >= _TUNE_MIN_TABLE elements take the autotuners (several candidates each): the grid callables, the
    split reduce after the tuned launch, reset_to_zero of the atomics target between timed runs (else the table
    gradient would hold every timed run's sum) and the segment tuner."""
    n, K, tau, d_out = 16, 16, 8, 1024
    x, tables = inputs(n, K, tau, d_out, torch.bfloat16, "cuda")
    assert tables.numel() >= km._TUNE_MIN_TABLE
    g = torch.randn(n, d_out, device="cuda").to(torch.bfloat16)
    y64, gx64, gt64 = ref64(x, tables, g)
    for _ in range(2):  # tuning call, then a cached one
        close(km.memory_lookup_forward_triton(x, tables, T), y64, torch.bfloat16, "forward")
        for det in (False, True):
            gx, gt = km.memory_lookup_backward_triton(g, x, tables, T, det)
            close(gx, gx64, torch.bfloat16, f"grad_x deterministic={det}")
            close(gt, gt64, torch.bfloat16, f"grad_tables deterministic={det}")
    for tuner in (km.memory_forward_autotuned, km.memory_backward_autotuned, km.memory_segment_autotuned):
        assert tuner.cache, tuner.base_fn.__name__


def test_module_level_autotuners():
    """bench/gpu_report.py prints the .cache of every triton Autotuner found at module level."""
    if not TRITON_DEVICES:
        pytest.skip("triton unavailable")
    tuners = [v for v in vars(km).values() if isinstance(v, triton.runtime.Autotuner)]
    assert {t.base_fn.__name__ for t in tuners} == {"_memory_forward_kernel", "_memory_backward_kernel",
                                                  "_segment_rows_kernel"}


SHAPES = [(nb, K, d) for nb in (1, 2, 16, 64, 1024, 8192) for K, d in ((512, 4096), (256, 1024), (9, 130), (1, 7))]


@pytest.mark.parametrize("nb,K,d_out", SHAPES)
def test_pruned_config_spaces(nb, K, d_out):
    """The GPU config spaces (not the interpreter's single configs): every key keeps a few configs, all within the
    pruning rules and the partial buffer the launcher allocates; the shape rules stay inside the same limits."""
    if not TRITON_DEVICES:
        pytest.skip("triton unavailable")
    sms = 132
    fwd = km._fwd_prune_for(km._fwd_space(), nb, K, d_out, sms)
    bwd = km._bwd_prune_for(km._bwd_space(), nb, K, d_out, sms)
    seg = km._seg_prune_for(km._seg_space(), d_out)
    assert 1 <= len(fwd) <= 32 and 1 <= len(bwd) <= 32 and 1 <= len(seg) <= 16
    cap = max(c.kwargs["SPLIT"] for c in fwd)
    assert cap == 1 or cap * nb * d_out * 4 <= km._PARTIAL_BYTES
    for c in fwd + [km._fwd_default(nb, K, d_out, sms)]:
        kw = c.kwargs
        assert kw["BLOCK_T"] <= max(1, nb) and kw["SPLIT"] <= 64 and 1 <= c.num_stages <= 4
        assert kw["SPLIT"] <= triton.cdiv(K, kw["BLOCK_K"])  # no split without tables
        assert kw["BLOCK_T"] * kw["BLOCK_K"] * kw["BLOCK_N"] <= 8192
    if nb == 1 and (K, d_out) == (512, 4096):  # decode fills the SMs: >= 2 programs per SM
        assert all(triton.cdiv(d_out, c.kwargs["BLOCK_N"]) * c.kwargs["SPLIT"] >= 2 * sms for c in fwd)
    if nb <= 16 and K >= 8:  # decode: >= 8 independent row gathers per program step
        assert all(c.kwargs["BLOCK_T"] * c.kwargs["BLOCK_K"] >= 8 for c in fwd + [km._fwd_default(nb, K, d_out, sms)])
    for c in bwd + [km._bwd_default(nb, K, d_out)]:
        assert c.kwargs["BLOCK_T"] * c.kwargs["BLOCK_K"] * c.kwargs["BLOCK_N"] <= 8192


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_forward_splits_reduce_in_the_launch_in_split_order(device):
    """SPLIT > 1: the tile's last split to arrive sums the fp32 partials in split order 0, 1, 2 inside the launch
    (one kernel: nothing left for a second pass), bit for bit the ordered sum of each split's tables alone, and
    leaves every arrival counter at 0 for the next launch (and a CUDA graph's replays)."""
    from weightkit.kernels._shared import SCRATCH

    n, K, tau, d_out = 5, 9, 4, 70
    x, tables = inputs(n, K, tau, d_out, torch.float32, device)
    split = cfg(BLOCK_T=4, BLOCK_K=1, BLOCK_N=32, SPLIT=3)  # 3 tables per split; 2 x 3 output tiles
    alone = cfg(BLOCK_T=4, BLOCK_K=1, BLOCK_N=32, SPLIT=1)
    launches = []
    kernel = km._FWD.kernel
    y = torch.full((n, d_out), float("nan"), device=device)
    try:
        km._FWD.kernel = _Counting(kernel, launches)
        km._launch_forward(x, tables, T, y, split, pre=False)
    finally:
        km._FWD.kernel = kernel
    assert len(launches) == 1  # the reduction is in the split launch
    parts = []
    for s in range(3):  # each split's tables alone, in one launch without a split: its fp32 partial
        part = torch.empty(n, d_out, device=device)
        km._launch_forward(x[:, 3 * s * tau:3 * (s + 1) * tau].contiguous(), tables[3 * s:3 * (s + 1)], T, part,
                           alone, pre=False)
        parts.append(part)
    assert torch.equal(y, (parts[0] + parts[1]) + parts[2])
    counters = [c for (dev, _), (_, c) in SCRATCH.buffers.items() if dev == torch.device(device)]
    assert counters and all(int(c.count_nonzero()) == 0 for c in counters)
    y64 = memory_lookup_reference(x.double(), tables.double(), T)
    close(y, y64, torch.float32, "forward, 3 splits")


class _Counting:
    """A kernel stand-in that counts launches (kernel[grid](...)) and forwards them."""

    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(grid)
            return self.kernel[grid](*args, **kwargs)
        return launch
