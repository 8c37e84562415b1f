"""GaLoreProjector: galore-torch's projection and refresh rule, randomized SVD vs exact, checkpoints, bad input, on
every device (CPU and, when present, CUDA)."""

import copy
import math

import pytest
import torch

from tests.conftest import DEVICES
from weightkit.optim import GaLoreProjector
from weightkit.optim import projector as projector_mod
from weightkit.optim.projector import (basis_seed, cholesky_qr, compute_basis, project, projection_basis_dtype,
                                       projection_side, randomized_svd, resolve_orthonormalize, resolve_small_svd,
                                       subspace_overlap)


def tol(device):
    """float32 against float32 computed otherwise: CPU as it always was, a few times looser on a GPU."""
    return dict(rtol=1e-4, atol=1e-4) if device == "cpu" else dict(rtol=4e-4, atol=4e-4)


def grads(shape, steps, seed=0, device="cpu"):
    """Drawn on the CPU (the same gradients on every device for a seed), then moved."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(device) for _ in range(steps)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right", "full"])
@pytest.mark.parametrize("shape", [(48, 32), (24, 40)])
def test_matches_galore_torch_projector(proj_type, shape, device):
    galore_projector = pytest.importorskip("galore_torch.galore_projector")
    ours = GaLoreProjector(rank=6, update_proj_gap=3, scale=0.5, proj_type=proj_type)
    ref = galore_projector.GaLoreProjector(rank=6, update_proj_gap=3, scale=0.5, proj_type=proj_type)
    for step, g in enumerate(grads(shape, 7, device=device)):  # refreshes at steps 0, 3, 6
        low = ours.project(g, step)
        low_ref = ref.project(g, step)
        assert low.device == g.device
        torch.testing.assert_close(low, low_ref, **tol(device))
        update = torch.randn(low.shape, device=device)
        torch.testing.assert_close(ours.project_back(update), ref.project_back(update), **tol(device))


@pytest.mark.parametrize("device", DEVICES)
def test_refresh_schedule_and_side(device):
    proj = GaLoreProjector(rank=4, update_proj_gap=3)
    seen = []
    for step, g in enumerate(grads((32, 24), 7, device=device)):
        proj.project(g, step)
        seen.append(proj.state["ortho"].clone())
    assert [not torch.equal(seen[i], seen[i - 1]) for i in range(1, 7)] == [False, False, True, False, False, True]
    assert proj.state["ortho"].shape == (4, 24)  # 'std' on a tall gradient projects from the right
    assert proj.state["ortho"].device.type == device
    assert projection_side((10, 5), "std") == "right" and projection_side((5, 10), "std") == "left"
    assert projection_side((10, 5), "reverse_std") == "left" and projection_side((5, 10), "reverse_std") == "right"


@pytest.mark.parametrize("device", DEVICES)
def test_project_back_is_identity_on_the_subspace(device):
    proj = GaLoreProjector(rank=5, scale=1.0, proj_type="left")
    g = grads((30, 20), 1, device=device)[0]
    low = proj.project(g, 0)
    # P P^T G is the rank-5 truncation of G, and projecting it again gives back the same low-rank gradient
    back = proj.project_back(low)
    u, s, vh = torch.linalg.svd(g)
    torch.testing.assert_close(back, u[:, :5] @ torch.diag(s[:5]) @ vh[:5], **tol(device))
    torch.testing.assert_close(proj.project(back, 1), low, **tol(device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_randomized_svd_finds_the_exact_subspace(side, device):
    g = torch.Generator().manual_seed(0)
    # a gradient-like matrix: rank-24 signal with a decaying spectrum plus noise
    signal = torch.randn(300, 24, generator=g) @ torch.diag(torch.logspace(1, 0, 24)) @ torch.randn(24, 200, generator=g)
    matrix = (signal + 0.05 * torch.randn(300, 200, generator=g)).to(device)
    exact, _ = compute_basis(matrix, 16, side, "exact")
    approx, _ = compute_basis(matrix, 16, side, "randomized", seed=3)
    assert exact.device == approx.device == matrix.device
    assert subspace_overlap(exact, exact, side) == pytest.approx(1.0, abs=1e-5 if device == "cpu" else 1e-3)  # cuSOLVER bases: ~1e-4 from orthonormal (H200)
    assert subspace_overlap(approx, exact, side) > 0.999
    # orthonormal
    gram = approx.T @ approx if side == "left" else approx @ approx.T
    torch.testing.assert_close(gram, torch.eye(16, device=device), rtol=0, atol=1e-4)
    # no power iterations on a flat spectrum: a worse subspace, so the power iterations do something
    flat = torch.randn(300, 200, generator=g).to(device)
    u_exact = torch.linalg.svd(flat)[0][:, :16]
    u0, _ = randomized_svd(flat, 16, oversample=4, power_iters=0, generator=torch.Generator().manual_seed(1))
    u2, _ = randomized_svd(flat, 16, oversample=4, power_iters=3, generator=torch.Generator().manual_seed(1))
    assert subspace_overlap(u2, u_exact, "left") > subspace_overlap(u0, u_exact, "left") + 0.05
    # a generator on the matrix's device works too (the test matrix is then drawn there)
    u3, _ = randomized_svd(flat, 16, oversample=4, power_iters=3, generator=torch.Generator(device).manual_seed(1))
    assert u3.device == flat.device and subspace_overlap(u3, u_exact, "left") > subspace_overlap(u0, u_exact, "left")


@pytest.mark.parametrize("device", DEVICES)
def test_randomized_svd_is_seeded(device):
    g = grads((64, 48), 1, device=device)[0]
    a, _ = compute_basis(g, 8, "left", "randomized", seed=basis_seed(0, 1, 0))
    b, _ = compute_basis(g, 8, "left", "randomized", seed=basis_seed(0, 1, 0))
    c, _ = compute_basis(g, 8, "left", "randomized", seed=basis_seed(0, 2, 0), power_iters=0, oversample=0)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len({basis_seed(0, k, s) for k in range(5) for s in range(5)}) == 25


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("proj_type", ["std", "full"])
@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_state_dict_round_trip(proj_type, svd, device):
    cfg = dict(rank=4, update_proj_gap=3, scale=0.25, proj_type=proj_type, svd=svd, seed=7)
    gs = grads((20, 28), 8, device=device)
    a = GaLoreProjector(**cfg)
    for step in range(4):
        a.project(gs[step], step)
    b = GaLoreProjector(**cfg)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    c = GaLoreProjector(**cfg)  # from a checkpoint read with map_location='cpu': the basis follows the gradients
    c.load_state_dict({k: v.cpu() for k, v in a.state_dict().items()})
    for step in range(4, 8):  # crosses the refresh at step 6
        low_a, low_b, low_c = a.project(gs[step], step), b.project(gs[step], step), c.project(gs[step], step)
        assert torch.equal(low_a, low_b) and torch.equal(low_a, low_c)
        assert torch.equal(a.project_back(low_a), b.project_back(low_b))
        assert torch.equal(a.project_back(low_a), c.project_back(low_c))
    assert c.state["ortho"].device == gs[0].device
    with pytest.raises(ValueError, match=r"saved ortho has shape"):
        GaLoreProjector(**dict(cfg, rank=3)).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match=r"unknown projector state key\(s\) \['P'\]"):
        b.load_state_dict({"P": torch.ones(2)})


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_storage(device):
    g = grads((64, 40), 1, device=device)[0]
    fp32 = GaLoreProjector(rank=8, proj_type="left")
    bf16 = GaLoreProjector(rank=8, proj_type="left", proj_dtype="bfloat16")
    low32, low16 = fp32.project(g, 0), bf16.project(g, 0)
    assert bf16.state["ortho"].dtype == torch.bfloat16 and low16.dtype == torch.float32
    assert bf16.state["ortho"].nbytes * 2 == fp32.state["ortho"].nbytes
    torch.testing.assert_close(low16, low32, rtol=2e-2, atol=2e-2 * float(low32.abs().max()))


@pytest.mark.parametrize("kwargs,match", [
    (dict(rank=0), "rank must be an int >= 1"),
    (dict(rank=2.0), "rank must be an int >= 1"),
    (dict(update_proj_gap=0), "update_proj_gap must be an int >= 1"),
    (dict(proj_type="diagonal"), "proj_type='diagonal'"),
    (dict(svd="qr"), "svd='qr'"),
    (dict(proj_dtype="int8"), "proj_dtype='int8'"),
    (dict(scale=float("nan")), "scale must be a finite number"),
    (dict(power_iters=-1), "power_iters must be an int >= 0"),
])
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GaLoreProjector(**dict(dict(rank=4), **kwargs))


@pytest.mark.parametrize("device", DEVICES)
def test_bad_gradients(device):
    proj = GaLoreProjector(rank=9)
    with pytest.raises(ValueError, match=r"rank=9 is larger than min\(m, n\)=8"):
        proj.project(torch.randn(16, 8, device=device), 0)
    with pytest.raises(ValueError, match="GaLore projects 2-D gradients"):
        proj.project(torch.randn(16, device=device), 0)
    with pytest.raises(RuntimeError, match="call project\\(\\) first"):
        GaLoreProjector(rank=2).project_back(torch.randn(2, 3, device=device))


# -- issue #25: Cholesky-QR range finder, 16-bit range finder and projections ----------------------------------------
def _spectrum_matrix(m, n, seed, decay=-6.0, rank=None):
    """A float64 m x n matrix with singular values 10^0 ... 10^decay (or exactly ``rank`` nonzero ones)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    s = torch.logspace(0, decay, min(m, n), dtype=torch.float64)
    if rank is not None:
        s[rank:] = 0
    return (u[:, :min(m, n)] * s) @ v[:, :min(m, n)].T, s


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("orthonormalize", ["householder", "cholqr"])
@pytest.mark.parametrize("range_dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("small_svd", ["svd", "gram"])
@pytest.mark.parametrize("shape,rank", [((96, 160), 12), ((200, 72), 16)])
def test_randomized_basis_against_exact_svd(seed, orthonormalize, range_dtype, small_svd, shape, rank):
    """Captured energy ||P^T A||^2 / sum of the top-r sigma^2 and the largest principal angle between the randomized
    and the exact (float64) rank-r subspaces, for a spectrum falling over 6 decades (cond(Y) ~ 1e6: Cholesky-QR
    needs its shifted first pass; the 'gram' small problem squares it to ~1e12, within float64's reach);
    orthonormal bases."""
    print(f"seed={seed}")
    a, s = _spectrum_matrix(*shape, seed)
    for side in ("left", "right"):
        ortho, _ = compute_basis(a.float(), rank, side, "randomized", seed=seed, orthonormalize=orthonormalize,
                                 range_dtype=range_dtype, small_svd=small_svd)
        p = ortho.double() if side == "left" else ortho.double().T  # columns span the subspace
        captured = ((p.T @ a).norm() ** 2 if side == "left" else (a @ p).norm() ** 2) / (s[:rank] ** 2).sum()
        exact = torch.linalg.svd(a)[0][:, :rank] if side == "left" else torch.linalg.svd(a)[2][:rank].T
        cos_min = torch.linalg.svdvals(exact.T @ p).min()
        assert captured > 0.9999, (side, float(captured))
        assert cos_min > 0.99, (side, float(cos_min))
        torch.testing.assert_close(p.T @ p, torch.eye(rank, dtype=torch.float64), rtol=0, atol=2e-5)


def test_cholesky_qr_flags_rank_deficiency_and_the_basis_falls_back_to_householder(monkeypatch):
    """An exactly rank-deficient block is flagged; a gradient of rank 6 < k = 10 + 8 (in float64; rank 90 by its
    float32 rounding) gives an orthonormal basis with all of its energy, by Cholesky-QR or by the fallback; a
    Cholesky-QR result that is not orthonormal though no factorization failed is caught on the device too."""
    y = torch.zeros(200, 18)
    y[:, ::3] = torch.randn(200, 6, generator=torch.Generator().manual_seed(0))  # rank 6, twelve zero columns
    q, failed = cholesky_qr(y)
    assert bool(failed)
    a, s = _spectrum_matrix(120, 90, 3, decay=-1.0, rank=6)
    ortho, _ = compute_basis(a.float(), 10, "left", "randomized", orthonormalize="cholqr")
    torch.testing.assert_close(ortho.double().T @ ortho.double(), torch.eye(10, dtype=torch.float64), rtol=0,
                               atol=2e-5)
    captured = (ortho.double().T @ a).norm() ** 2 / (s[:6] ** 2).sum()
    assert captured > 0.9999
    q, failed = cholesky_qr(torch.randn(300, 30) @ torch.diag(torch.logspace(0, -5, 30)))
    assert not bool(failed)
    torch.testing.assert_close(q.T @ q, torch.eye(30), rtol=0, atol=1e-5)
    # the shifted pass alone (between power iterations): Y's columns (cond 1e5), conditioned, not orthonormal
    y = torch.randn(300, 30, generator=torch.Generator().manual_seed(1)) @ torch.diag(torch.logspace(0, -5, 30))
    q1, failed = cholesky_qr(y, passes=1)
    assert not bool(failed)
    sv = torch.linalg.svdvals(q1.double())
    assert sv[0] / sv[-1] < 100, sv
    span = torch.linalg.qr(y.double())[0]
    assert torch.linalg.svdvals(torch.linalg.qr(q1.double())[0].T @ span).min() > 0.9999
    calls = []
    real = projector_mod.cholesky_qr

    def skewed(y, passes=3):  # a factorization that "succeeded" but left the basis 5% off orthonormal
        q, bad = real(y, passes)
        calls.append(passes)
        return q * 1.05, bad

    def poisoned(y, passes=3):  # a factorization that reported success but left a NaN: no LinAlgError either
        q, bad = real(y, passes)
        return q.index_fill(0, torch.tensor([2]), float("nan")) if passes == 3 else q, bad

    monkeypatch.setattr(projector_mod, "cholesky_qr", poisoned)
    for small in ("svd", "gram"):
        got, _ = compute_basis(a.float(), 10, "left", "randomized", orthonormalize="cholqr", seed=4, small_svd=small)
        assert torch.isfinite(got).all()
    monkeypatch.setattr(projector_mod, "cholesky_qr", skewed)
    before = projector_mod.cholqr_fallbacks
    got, _ = compute_basis(a.float(), 10, "left", "randomized", orthonormalize="cholqr", seed=4)
    want, _ = compute_basis(a.float(), 10, "left", "randomized", orthonormalize="householder", seed=4)
    assert calls == [1, 1, 1, 1, 3]  # the shifted pass between the power iterations, all three for the last basis
    assert torch.equal(got, want) and projector_mod.cholqr_fallbacks == before + 1
    with pytest.raises(ValueError, match="orthonormalize='givens'"):
        compute_basis(a.float(), 4, "left", "randomized", orthonormalize="givens")


@pytest.mark.parametrize("device", DEVICES)
def test_gram_small_problem_finds_the_svds_subspace(device):
    """The 'gram' small problem (the k x k B B^T's eigenvectors in float64, GPU default) gives the subspace and the
    order of the 'svd' one (the CPU default) on every side: left, right (as the left basis of G^T), full (which
    takes 'svd' for its Vh); a rank-deficient gradient (rank 5 < r = 8) still gives an orthonormal basis with the
    whole energy; bad values name the argument."""
    a, s = _spectrum_matrix(90, 70, 4, decay=-3.0)
    a = a.float().to(device)
    for side in ("left", "right", "full"):
        want = compute_basis(a, 8, side, "randomized", seed=2, small_svd="svd")
        got = compute_basis(a, 8, side, "randomized", seed=2, small_svd="gram")
        for w, g in zip(want, got):
            if w is None:
                assert g is None
                continue
            assert g.shape == w.shape and g.dtype == torch.float32 and g.device == a.device and g.is_contiguous()
            which = "right" if (side == "right" or w.shape[0] == 8) else "left"
            assert subspace_overlap(g, w, which) > 0.9999, side
            # the same order: column (row) i of one spans the same direction as column (row) i of the other
            cols = (g.T @ w if which == "left" else g @ w.T).diagonal().abs()
            assert cols.min() > 0.999, (side, cols)
    low, s_low = _spectrum_matrix(80, 60, 5, decay=-1.0, rank=5)
    p, _ = compute_basis(low.float().to(device), 8, "left", "randomized", small_svd="gram")
    torch.testing.assert_close(p.T @ p, torch.eye(8, device=device), rtol=0, atol=2e-5)
    captured = (p.double().cpu().T @ low).norm() ** 2 / (s_low[:5] ** 2).sum()
    assert captured > 0.9999
    u, vh = randomized_svd(a, 8, generator=torch.Generator().manual_seed(0), small_svd="gram")
    assert u.shape == (90, 8) and vh is None
    assert resolve_small_svd("auto", torch.device("cpu")) == "svd"
    assert resolve_small_svd("auto", torch.device("cuda")) == "gram"
    with pytest.raises(ValueError, match="small_svd='qr'"):
        compute_basis(a, 4, "left", "randomized", small_svd="qr")
    with pytest.raises(ValueError, match="small_svd='auto'"):
        randomized_svd(a, 4, small_svd="auto")  # resolved by compute_basis, not here


@pytest.mark.parametrize("cond", [1e3, 1e4, 1e5])
def test_cholesky_qr_succeeds_at_a_refresh_size(cond):
    """At a refresh's size (m x k = 4096 x 520: 4096-row gradient, rank 512 + 8) the factorization succeeds for a
    range block whose singular values span up to 1e5 (a gradient's top-k spectrum may), so the refresh needs no
    Householder fallback; with Fukaya et al.'s worst-case shift (3.5 sigma_1^2 at this size) the second pass failed
    from cond 1e4 on. Orthonormal to float32's accuracy and spanning Y's columns."""
    m, k = 4096, 520
    g = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64))[0]
    y = ((u * torch.logspace(0, -math.log10(cond), k, dtype=torch.float64)) @ v.T).float()
    q, failed = cholesky_qr(y)
    assert not bool(failed)
    qd = q.double()
    torch.testing.assert_close(qd.T @ qd, torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-5)
    assert torch.linalg.svdvals(qd.T @ u).min() > 0.999


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_randomized_refresh_draws_its_test_matrix_on_the_gpu_cuda(monkeypatch):
    """On a GPU the Gaussian test matrix comes from a CUDA generator seeded per (seed, key, step): no CPU random
    numbers and no host-to-device copy per refresh; one seed gives one basis; neither global generator is used."""
    g = torch.randn(256, 192, device="cuda")
    states = torch.cuda.get_rng_state(), torch.get_rng_state()
    drawn = []
    real = torch.randn

    def spy(*args, **kwargs):
        gen = kwargs.get("generator")
        drawn.append(None if gen is None else gen.device.type)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "randn", spy)
    a = compute_basis(g, 16, "left", "randomized", seed=7)[0]
    b = compute_basis(g, 16, "left", "randomized", seed=7)[0]
    c = compute_basis(g, 16, "left", "randomized", seed=8)[0]
    monkeypatch.undo()
    assert drawn == ["cuda", "cuda", "cuda"]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.cuda.get_rng_state(), states[0]) and torch.equal(torch.get_rng_state(), states[1])
    exact = compute_basis(g, 16, "left", "exact")[0]
    assert subspace_overlap(a, exact, "left") > 0.5  # a random matrix's top subspace, roughly


def test_auto_orthonormalization_keeps_householder_on_the_cpu():
    a = torch.randn(64, 48)
    auto = compute_basis(a, 8, "left", "randomized", seed=5)[0]
    householder = compute_basis(a, 8, "left", "randomized", seed=5, orthonormalize="householder")[0]
    svd = compute_basis(a, 8, "left", "randomized", seed=5, orthonormalize="householder", small_svd="svd")[0]
    assert torch.equal(auto, householder) and torch.equal(auto, svd)
    assert resolve_orthonormalize("auto", torch.device("cpu")) == "householder"
    assert resolve_orthonormalize("auto", torch.device("cuda")) == "cholqr"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("side", ["left", "right", "full"])
def test_sixteen_bit_projection_matches_float64(dtype, side):
    """A basis kept in proj_dtype and used as stored: the gradient rounded to it, products with fp32 accumulation;
    against the float64 product of the same 16-bit basis with the exact gradient, at 16-bit tolerance."""
    torch.manual_seed(0)
    g = torch.randn(48, 40)
    u, vh = compute_basis(g, 6, "full")
    ortho = (u if side != "right" else vh).to(dtype)
    right = vh.to(dtype) if side == "full" else None
    low = project(g, side, ortho, right)
    assert low.dtype == torch.float32
    d = ortho.double()
    want = {"left": lambda: d.T @ g.double(), "right": lambda: g.double() @ d.T,
            "full": lambda: d.T @ g.double() @ right.double().T}[side]()
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(low.double(), want, rtol=tol, atol=tol * want.abs().max().item())
    assert projection_basis_dtype(dtype, torch.device("cpu")) == torch.float32
    assert projection_basis_dtype(dtype, torch.device("cuda")) == dtype
    assert projection_basis_dtype(torch.float32, torch.device("cuda")) == torch.float32
