"""weightkit::int8_sr_lowrank_update_ (weightkit.ops.qgalore): every backend against the reference.

Bit for bit where the low-rank product N = P U is exact (dyadic inputs: every backend then rounds nothing before
the update, so the update, the scales and the stochastic rounding must agree exactly), within float32
accumulation error otherwise (the module docstring's contract: codes off by at most one, in few elements)."""

import pytest
import torch

from tests.conftest import DEVICES, usable_backends
from weightkit import use_backend
from weightkit.ops import qgalore
from weightkit.ops.int4 import dequantize_int4, quantize_int4
from weightkit.ops.int8 import absmax_scale, dequantize_int8, int8_sr_update_, stochastic_round_int8
from weightkit.ops.qgalore import int8_sr_lowrank_update_


def _weight(m, n, gs, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=g)
    scale = absmax_scale(w, gs)
    return stochastic_round_int8(w, scale, gs, seed=seed), scale


def _dyadic_basis(shape, pg, gen):
    """Values k / 16 (k in -8..7) with -8 and 7 in every group: quantize_int4 gives scale 1/16, zero 8, exactly."""
    k = torch.randint(-8, 8, shape, generator=gen).reshape(-1, pg)
    k[:, 0], k[:, 1] = -8, 7
    return (k.to(torch.float32) / 16).reshape(shape)


def _case(left, m=48, n=96, r=20, gs=32, pg=8, seed=0, exact=False):
    gen = torch.Generator().manual_seed(seed)
    basis_shape = (m, r) if left else (r, n)
    low_shape = (r, n) if left else (m, r)
    if exact:
        basis = _dyadic_basis(basis_shape, pg, gen)
        update = torch.randint(-4, 5, low_shape, generator=gen).to(torch.float32) / 8
    else:
        basis = torch.randn(basis_shape, generator=gen) / m ** 0.5
        update = torch.randn(low_shape, generator=gen)
    return _weight(m, n, gs, seed + 1), quantize_int4(basis, pg), update, gs, pg


def assert_within_accumulation_error(got, want, label=""):
    """The module docstring's contract for a product N that rounds differently: codes off by at most one, in at most
    1% of the elements; scales within 1e-5."""
    q, s = (t.cpu() for t in got)
    diff = (q.int() - want[0].int()).abs()
    assert diff.max() <= 1, (label, int(diff.max()))
    assert (diff > 0).float().mean() <= 0.01, (label, float((diff > 0).float().mean()))
    torch.testing.assert_close(s, want[1], rtol=1e-5, atol=0)


def _run(backend, case, left, precision, seed=7, offset=0, alpha=0.03125, decay=0.75, device="cpu"):
    """The op on ``device`` with ``backend`` forced; the updated (w_q, scale) on the CPU."""
    (q0, s0), (bq, bs, bz), update, gs, pg = case
    q, s, bq, bs, bz, update = (t.to(device) for t in (q0.clone(), s0.clone(), bq, bs, bz, update))
    with use_backend(backend):
        int8_sr_lowrank_update_(q, s, bq, bs, bz, update, gs, pg, left, alpha=alpha, decay=decay,
                                precision=precision, seed=seed, offset=offset)
    return q.cpu(), s.cpu()


def _backends(device):
    """The backends to compare with the reference on ``device``: every other usable one."""
    return [b for b in usable_backends(qgalore._LOWRANK, device) if b != "reference"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("offset", [0, 3])
@pytest.mark.parametrize("precision", ["fp32", "tf32x3", "bf16x3", "bf16"])
@pytest.mark.parametrize("left", [True, False])
def test_backends_bit_identical_when_the_product_is_exact(left, precision, offset, device):
    print("seed 0")
    case = _case(left, exact=True)
    want = _run("reference", case, left, precision, offset=offset, device=device)
    for backend in _backends(device):
        got = _run(backend, case, left, precision, offset=offset, device=device)
        assert torch.equal(got[0], want[0]), backend
        assert torch.equal(got[1], want[1]), backend
    assert not torch.equal(want[0], case[0][0])  # the update moved the weight


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("left, n, r, pg, tiled", [
    (True, 96, 20, 8, False),     # rank not a multiple of the group: each basis value gathered from its flat index
    (True, 128, 32, 8, True),     # packed-byte tiles, several groups in a tile row
    (True, 128, 32, 32, True),    # a tile row inside one group (interpreter tiles: BLOCK_R 16)
    (True, 128, 24, 8, True),     # the last rank tile cut by the mask
    (False, 96, 20, 64, False),   # n not a multiple of the group
    (False, 96, 20, 8, True),     # the last column tile cut by the mask
    (False, 256, 16, 256, True),  # one group wider than the tile (BLOCK_N 128)
])
def test_both_basis_paths_bit_identical(left, n, r, pg, tiled, device):
    """The Triton kernel reads the INT4 basis as packed-byte tiles with one (scale, zero) load per group when its
    rows are whole power-of-two groups (kernels.qgalore.basis_aligned), else value by value: both give the spec's
    bits (exact products)."""
    from weightkit.kernels.qgalore import basis_aligned

    print("seed 4")
    assert basis_aligned(r if left else n, pg) == tiled
    case = _case(left, m=48, n=n, r=r, gs=32, pg=pg, seed=4, exact=True)
    want = _run("reference", case, left, "fp32", device=device)
    for backend in _backends(device):
        got = _run(backend, case, left, "fp32", device=device)
        assert torch.equal(got[0], want[0]), backend
        assert torch.equal(got[1], want[1]), backend
    assert not torch.equal(want[0], case[0][0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", ["fp32", "tf32x3", "bf16x3", "bf16"])
@pytest.mark.parametrize("left", [True, False])
def test_backends_match_within_accumulation_error(left, precision, device):
    print("seed 3")
    case = _case(left, m=64, n=128, r=40, gs=64, seed=3)
    want = _run("reference", case, left, precision, alpha=0.05, decay=0.99, device=device)
    for backend in _backends(device):
        assert_within_accumulation_error(_run(backend, case, left, precision, alpha=0.05, decay=0.99, device=device),
                                         want, backend)


@pytest.mark.parametrize("left", [True, False])
def test_reference_is_int8_sr_update_of_the_projected_back_delta(left):
    """The spec: the same bits as the unfused sequence (dequantized basis, float32 product, int8_sr_update_)."""
    case = _case(left, seed=5)
    (q0, s0), (bq, bs, bz), update, gs, pg = case
    want_q, want_s = q0.clone(), s0.clone()
    shape = (q0.shape[0], update.shape[0]) if left else (update.shape[1], q0.shape[1])
    basis = dequantize_int4(bq, bs, bz, pg, shape)
    delta = (basis @ update if left else update @ basis).mul_(-0.05)
    with use_backend("reference"):
        int8_sr_update_(want_q, want_s, delta, gs, decay=0.99, seed=7, offset=64)
    got = _run("reference", case, left, "fp32", offset=64, alpha=0.05, decay=0.99)
    assert torch.equal(got[0], want_q) and torch.equal(got[1], want_s)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_unbiased_over_seeds(backend):
    """E[w_q' * scale'] = (w_q * scale - alpha P U) * decay: the mean over 400 seeds is within 4 standard errors."""
    case = _case(True, m=16, n=64, r=8, gs=32, seed=11)
    (q0, s0), (bq, bs, bz), update, gs, pg = case
    basis = dequantize_int4(bq, bs, bz, pg, (16, 8))
    target = (dequantize_int8(q0, s0, gs) - 0.5 * (basis @ update)) * 0.9
    samples = torch.stack([dequantize_int8(*_run(backend, case, True, "fp32", seed=s, alpha=0.5, decay=0.9), gs)
                           for s in range(400)])
    step = absmax_scale(target, gs).repeat_interleave(gs).reshape(target.shape)  # the scale every seed gets
    frac = torch.frac(target / step).abs()
    stderr = step * (frac * (1 - frac) / 400).sqrt()  # of a mean of 400 Bernoulli steps
    err = (samples.mean(0) - target).abs()
    assert bool((err <= 5 * stderr + 2 * step / 400).all())


def test_noncontiguous_update_is_read_as_its_values():
    case = _case(True)
    (q0, s0), basis, update, gs, pg = case
    transposed = update.T.contiguous().T  # same values, column-major
    want = _run("cpu", case, True, "fp32")
    got = _run("cpu", ((q0, s0), basis, transposed, gs, pg), True, "fp32")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("left", [True, False])
def test_device_flag_and_step_size(left):
    """found_inf set: nothing is written (a NaN update included); clear: the call's update without it. step_size_t:
    the factor of P U is alpha * step_size_t, the same bits as that product given as alpha. Every backend, where the
    product is exact (so all of them agree bit for bit)."""
    print("seed 0")
    case = _case(left, exact=True)
    (q0, s0), (bq, bs, bz), update, gs, pg = case
    bad = update.clone()
    bad[0, 1] = float("nan")
    for backend in usable_backends(qgalore._LOWRANK, "cpu"):
        want = _run(backend, case, left, "fp32", alpha=0.03125)
        for flag, step_t, alpha in ((0.0, None, 0.03125), (None, 0.0625, 0.5), (0.0, 0.0625, 0.5)):
            q, s = q0.clone(), s0.clone()
            with use_backend(backend):
                int8_sr_lowrank_update_(q, s, bq, bs, bz, update, gs, pg, left, alpha=alpha, decay=0.75, seed=7,
                                        found_inf=None if flag is None else torch.tensor([flag]),
                                        step_size_t=None if step_t is None else torch.tensor(step_t))
            assert torch.equal(q, want[0]) and torch.equal(s, want[1]), (backend, flag, step_t)
        for u in (update, bad):
            q, s = q0.clone(), s0.clone()
            with use_backend(backend):
                int8_sr_lowrank_update_(q, s, bq, bs, bz, u, gs, pg, left, alpha=0.5, decay=0.75, seed=7,
                                        found_inf=torch.tensor([1.0]), step_size_t=torch.tensor([0.0625]))
            assert torch.equal(q, q0) and torch.equal(s, s0), backend


@pytest.mark.parametrize("precision", ["fp32", "tf32x3", "bf16x3", "bf16"])
@pytest.mark.parametrize("left", [True, False])
def test_composed_product_on_bf16_tensor_cores(left, precision, monkeypatch):
    """The cpu / cuda write-back's N (backends/_blocked.sr_lowrank_update_composed), with the cuda backend's tensor
    cores (run on the CPU here, as cudasim runs them): 'bf16' as one bf16 GEMM of inner size r a block of rows, the
    float32 precisions as one bf16 GEMM over the six pairs of three-part splits (inner 6r): within 2x the strict
    float32 product's error against float64 and >100x better than bf16 operands; without tensor cores (the cpu
    backend) the float32 product, as before. The delta handed to the native update is -alpha N, a block of rows
    at a time (four blocks here)."""
    from weightkit.backends import _blocked
    from weightkit.backends.cpu.int4 import dequantize_int4 as cpu_dequantize

    print("seed 13")
    m, n, r, gs, pg = 64, 96, 24, 32, 8
    case = _case(left, m=m, n=n, r=r, gs=gs, pg=pg, seed=13)
    (q0, s0), (bq, bs, bz), update, _, _ = case
    shape = (m, r) if left else (r, n)
    p64 = dequantize_int4(bq, bs, bz, pg, shape).double()
    if precision == "bf16":
        p64, u64 = p64.float().bfloat16().double(), update.bfloat16().double()
    else:
        u64 = update.double()
    n64 = p64 @ u64 if left else u64 @ p64
    rel = lambda t: float((t.double() - n64).norm() / n64.norm())  # noqa: E731
    monkeypatch.setattr(_blocked, "ROWS_ELEMENTS", (m // 4) * n)
    calls, deltas = [], []
    real = _blocked.mm_float32
    monkeypatch.setattr(_blocked, "mm_float32", lambda a, b, tc: calls.append((a.dtype, a.shape[1], tc))
                        or real(a, b, tc and a.is_cuda))

    def sr_update(w_q, scale, delta, *rest):
        deltas.append(delta.clone())

    alpha = 0.25
    errs = {}
    for tensor_cores in (True, False):
        calls.clear()
        deltas.clear()
        _blocked.sr_lowrank_update_composed(q0.clone(), s0.clone(), bq, bs, bz, update, gs, pg, left, alpha, 1.0,
                                            precision, 7, 0, dequantize=cpu_dequantize, sr_update=sr_update,
                                            tensor_cores=tensor_cores)
        if tensor_cores:
            inner = r if precision == "bf16" else 6 * r
            assert calls == [(torch.bfloat16, inner, True)] * 4, calls
        else:
            assert calls == [(torch.float32, r, False)] * 4, calls
        assert [d.shape for d in deltas] == [(m // 4, n)] * 4
        errs[tensor_cores] = rel(torch.cat(deltas) / -alpha)
    print(precision, errs)
    if precision == "bf16":  # the same exact products of bf16 values, float32 sums in another order
        assert errs[True] <= 1e-6 and errs[False] <= 1e-6, errs
        return
    rounded = (p64.float().bfloat16().double() @ update.bfloat16().double() if left
               else update.bfloat16().double() @ p64.float().bfloat16().double())
    assert errs[True] <= 2 * errs[False] + 1e-9 and errs[True] * 100 < rel(rounded), (errs, rel(rounded))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["fp32", "bf16x3", "bf16"])
def test_precision_is_the_arguments_whatever_the_tf32_setting(precision):
    """``torch.backends.cuda.matmul.allow_tf32`` changes no backend's result: the reference's and the cuda
    backend's products run without TF32 (and Triton's dots take the precision argument only)."""
    from weightkit.backend import allow_tf32

    print("seed 14")
    case = _case(True, m=256, n=512, r=128, gs=128, pg=64, seed=14)
    for backend in usable_backends(qgalore._LOWRANK, "cuda"):
        runs = []
        for tf32 in (False, True):
            with allow_tf32(tf32):
                runs.append(_run(backend, case, True, precision, alpha=0.05, decay=0.99, device="cuda"))
                assert torch.backends.cuda.matmul.allow_tf32 == tf32  # the user's setting, put back by the op
        assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1]), backend


@pytest.mark.parametrize("change, match", [
    (dict(w_q=lambda a: a.float()), "w_q must have dtype"),
    (dict(scale=lambda a: a[:-1]), "scale must hold"),
    (dict(update=lambda a: a[:, :-1]), "update must be r x n"),
    (dict(ortho_q=lambda a: a[:-1]), "ortho_q holds"),
    (dict(ortho_scale=lambda a: a[:-1]), "ortho_scale"),
    (dict(group_size=lambda a: 40), "group_size=40 must divide"),
    (dict(proj_group_size=lambda a: 7), "proj_group_size=7"),
    (dict(update=lambda a: a.clone().fill_(float("nan"))), "update"),
    (dict(precision=lambda a: "tf32"), "precision must be one of"),
    (dict(alpha=lambda a: float("inf")), "alpha must be finite"),
    (dict(found_inf=lambda a: torch.zeros(2)), "found_inf must hold one value"),
    (dict(step_size_t=lambda a: torch.ones(1, dtype=torch.float64)), "step_size_t must have dtype"),
])
def test_bad_input_names_the_argument(change, match):
    (q, s), (bq, bs, bz), update, gs, pg = _case(True)
    args = dict(w_q=q, scale=s, ortho_q=bq, ortho_scale=bs, ortho_zero=bz, update=update, group_size=gs,
                proj_group_size=pg, left=True, alpha=0.1, precision="fp32", found_inf=None, step_size_t=None)
    for key, fn in change.items():
        args[key] = fn(args[key])
    with pytest.raises((ValueError, TypeError), match=match):
        int8_sr_lowrank_update_(**args)


@pytest.mark.parametrize("left, n, r, pg", [
    (True, 96, 32, 16),    # a rank step (interpreter: 16) of one group
    (True, 128, 64, 32),   # two rank steps a group
    (True, 96, 128, 64),
    (False, 96, 20, 16),   # right: a batched [8, 16, BLOCK_M] product (BLOCK_N 128; 96 columns)
    (False, 128, 24, 64),  # two groups in a tile row (a product per group)
    (False, 128, 24, 32),  # four groups in a tile row
    (False, 256, 16, 256), # a tile inside one group (BLOCK_N 128 < 256)
])
def test_bf16x3_split_product(left, n, r, pg):
    """'bf16x3' (kernels.qgalore._lowrank_tile's SPLIT3: the exact integers q - z times U split in three bf16 parts,
    the scales applied in float32 outside the products): the spec's bits where N is exact (dyadic basis with
    power-of-two scales), float32 accumulation error otherwise; and its N itself within float32 accumulation error
    of the float64 product."""
    from weightkit.kernels.qgalore import basis_aligned, lowrank_product_triton, split3_applies

    print("seed 8")
    assert split3_applies(left, basis_aligned(r if left else n, pg), pg)  # the case runs SPLIT3, not a fallback
    exact = _case(left, m=48, n=n, r=r, gs=32, pg=pg, seed=8, exact=True)
    want = _run("reference", exact, left, "fp32")
    got = _run("triton", exact, left, "bf16x3")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert not torch.equal(want[0], exact[0][0])
    case = _case(left, m=48, n=n, r=r, gs=32, pg=pg, seed=9)
    want = _run("reference", case, left, "fp32", alpha=0.05, decay=0.99)
    assert_within_accumulation_error(_run("triton", case, left, "bf16x3", alpha=0.05, decay=0.99), want)
    (_, _), (bq, bs, bz), update, _, _ = case
    shape = (48, r) if left else (r, n)
    p = dequantize_int4(bq, bs, bz, pg, shape).double()
    ref = p @ update.double() if left else update.double() @ p
    errs = {}
    for precision in ("fp32", "bf16x3", "bf16"):
        prod = lowrank_product_triton(bq, bs, bz, update, pg, 48, n, left, precision, group_size=32)
        errs[precision] = float((prod.double() - ref).norm() / ref.norm())
    print(errs)
    # the contract (tests/optim/test_qgalore_precision.py): within 2x the float32 product's error; bf16 operands
    # (~2^-9 a value) miss it by orders of magnitude, which is what the split removes
    assert errs["fp32"] <= 5e-7 and errs["bf16x3"] <= 2 * errs["fp32"], errs
    assert errs["bf16"] > 100 * errs["fp32"], errs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("left", [True, False])
@pytest.mark.parametrize("precision", ["fp32", "tf32x3", "bf16x3", "bf16"])
def test_compiled_write_back_on_cuda(left, precision):
    """The compiled Triton write-back on a GPU against the reference (the interpreter cannot run tensor-core paths):
    codes within one in <= 1% of the elements, scales within 1e-5; and its product N, for the precisions of the
    contract (all but 'bf16'), within 2x the float32 product's error against float64 (strict float32, as
    galore-torch's step; tests/optim/test_qgalore_precision.py). A 4096-wide weight of group 128 and a rank-256 basis
    of group 64: the tiles (and, right, the two groups a tile row) of the optimizer's shapes."""
    from weightkit.backend import allow_tf32
    from weightkit.kernels.qgalore import lowrank_product_triton

    print("seed 12")
    m, n, r = (512, 1024, 256) if left else (1024, 512, 256)
    (q0, s0), (bq, bs, bz), update, gs, pg = _case(left, m=m, n=n, r=r, gs=128, pg=64, seed=12)
    dev = [t.cuda() for t in (q0, s0, bq, bs, bz, update)]
    got = [dev[0].clone(), dev[1].clone()]
    with use_backend("triton"):
        int8_sr_lowrank_update_(*got, *dev[2:], gs, pg, left, alpha=0.05, decay=0.99, precision=precision, seed=5,
                                offset=0)
    want = [q0.clone(), s0.clone()]
    with use_backend("reference"):
        int8_sr_lowrank_update_(*want, bq, bs, bz, update, gs, pg, left, alpha=0.05, decay=0.99,
                                precision="bf16" if precision == "bf16" else "fp32", seed=5, offset=0)
    assert_within_accumulation_error(got, want, precision)
    if precision == "bf16":
        return
    p = dequantize_int4(bq, bs, bz, pg, (m, r) if left else (r, n)).double()
    ref = p @ update.double() if left else update.double() @ p
    rel = lambda x: float((x.double().cpu() - ref).norm() / ref.norm())  # noqa: E731
    with allow_tf32(False):
        p32, u32 = p.float().cuda(), dev[5]
        fp32 = rel(p32 @ u32 if left else u32 @ p32)
    err = rel(lowrank_product_triton(*dev[2:5], dev[5], pg, m, n, left, precision, gs))
    print(precision, "error", err, "float32 matmul", fp32)
    assert err <= 2 * fp32, (err, fp32)
