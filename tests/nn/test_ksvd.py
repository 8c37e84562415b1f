"""weightkit.nn.ksvd, the K-SVD maths behind DictLinear.from_linear and weightkit.compress.dictionary: OMP is least
squares on exactly s atoms, learning never increases the error; on every device (CPU and, when present, CUDA)."""

import pytest
import torch

from tests.conftest import DEVICES
from weightkit.nn.ksvd import _round_to, learn_dictionary, omp, omp_schedule, scatter_codes


@pytest.mark.parametrize("device", DEVICES)
def test_omp_is_least_squares_on_exactly_s_distinct_atoms(device):
    torch.manual_seed(0)
    D = torch.randn(32, 48, dtype=torch.float64, device=device)
    D /= D.norm(dim=0)
    Y = torch.randn(32, 20, dtype=torch.float64, device=device)
    idx, coef = omp(D, Y, 6)
    assert idx.device == coef.device == Y.device
    for c in range(20):
        assert len(set(idx[c].tolist())) == 6
        ls = torch.linalg.lstsq(D[:, idx[c]], Y[:, c : c + 1]).solution.squeeze(1)
        torch.testing.assert_close(coef[c], ls, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("device", DEVICES)
def test_learning_error_never_increases(device):
    f64 = dict(dtype=torch.float64, device=device)
    Y = torch.randn(40, 8, **f64) @ torch.randn(8, 60, **f64) + 0.3 * torch.randn(40, 60, **f64)
    D, idx, coef, errors = learn_dictionary(Y, 24, 4, iters=6)
    assert D.device == idx.device == coef.device == Y.device
    assert len(errors) == 7 and all(b <= a + 1e-12 for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < errors[0]
    assert (idx[:, 1:] > idx[:, :-1]).all()  # s distinct atoms per column, ascending
    torch.testing.assert_close(errors[-1], float((Y - D @ scatter_codes(idx, coef, 24)).norm() / Y.norm()))


def reference_omp(D, y, s):
    """Textbook OMP for one column (the spec of the batched one): pick the atom most correlated with the residual,
    least squares on the support, repeat."""
    support, residual = [], y.clone()
    for _ in range(s):
        score = (D.T @ residual).abs()
        score[support] = -1.0
        support.append(int(score.argmax()))
        coef = torch.linalg.lstsq(D[:, support], y[:, None]).solution[:, 0]
        residual = y - D[:, support] @ coef
    return support, coef


def unit_atoms(d, k, gen, dtype=torch.float64, device="cpu"):
    D = torch.randn(d, k, generator=gen, dtype=torch.float64).to(device, dtype)
    return D / D.norm(dim=0)


@pytest.mark.parametrize("device", DEVICES)
def test_batched_omp_equals_per_column_reference(device):
    """growth=0 (one atom per step) is textbook OMP: the same atoms in the same order and the same coefficients as
    the per-column reference in float64, on random data; float32 agrees to its rounding."""
    seed = 11
    print("seed", seed)
    gen = torch.Generator().manual_seed(seed)
    D = unit_atoms(40, 96, gen, device=device)
    Y = torch.randn(40, 33, generator=gen, dtype=torch.float64).to(device)
    idx, coef = omp(D, Y, 9, growth=0)
    idx32, coef32 = omp(D.float(), Y.float(), 9, growth=0)
    assert coef32.dtype == torch.float32
    for c in range(Y.shape[1]):
        support, ref = reference_omp(D.cpu(), Y[:, c].cpu(), 9)
        assert idx[c].tolist() == support
        torch.testing.assert_close(coef[c].cpu(), ref, rtol=1e-9, atol=1e-10)
        if idx32[c].tolist() == support:  # float32 may break a near tie the other way
            torch.testing.assert_close(coef32[c].double().cpu(), ref, rtol=2e-4, atol=2e-5)
    assert (idx32 == idx).all(1).float().mean() > 0.8


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("growth", [0.0, 0.125, 0.5])
def test_omp_recovers_a_planted_sparse_code(growth, device):
    """Y = D X with X exactly s-sparse over an incoherent dictionary: OMP finds every column's support and its
    coefficients (float64), also when it adds several atoms per step."""
    seed = 5
    print("seed", seed)
    gen = torch.Generator().manual_seed(seed)
    d, k, s, m = 256, 384, 12, 64
    D = unit_atoms(d, k, gen, device=device)
    support = torch.stack([torch.randperm(k, generator=gen)[:s] for _ in range(m)])  # (m, s)
    values = (1 + torch.rand(m, s, generator=gen, dtype=torch.float64)) * torch.sign(torch.randn(m, s, generator=gen))
    X = scatter_codes(support.to(device), values.to(device), k)
    idx, coef = omp(D, D @ X, s, growth=growth)
    assert torch.equal(idx.sort(1).values.cpu(), support.sort(1).values)
    torch.testing.assert_close(scatter_codes(idx, coef, k), X, rtol=1e-9, atol=1e-9)


def test_omp_schedule():
    assert omp_schedule(5, 0) == [1] * 5
    for s in (1, 7, 100, 1560):
        for growth in (0, 0.125, 0.5, 1.0):
            steps = omp_schedule(s, growth)
            assert sum(steps) == s and all(n >= 1 for n in steps)
    assert len(omp_schedule(1560, 0.125)) < 80  # geometric growth: far fewer steps than atoms


@pytest.mark.parametrize("device", DEVICES)
def test_omp_column_chunks_give_the_same_codes(device):
    gen = torch.Generator().manual_seed(2)
    D = unit_atoms(24, 40, gen, device=device)
    Y = torch.randn(24, 50, generator=gen, dtype=torch.float64).to(device)
    whole = omp(D, Y, 7)
    chunked = omp(D, Y, 7, memory_budget=1)  # one column at a time
    assert torch.equal(whole[0], chunked[0])
    torch.testing.assert_close(whole[1], chunked[1], rtol=1e-12, atol=1e-12)


def test_rounding_emulation_matches_bf16_and_tf32():
    """The CPU emulation of bf16 / TF32 products (weightkit.nn.ksvd._round_to) rounds like the hardware formats."""
    x = torch.randn(10000) * torch.logspace(-20, 20, 10000)
    assert torch.equal(_round_to(x, "bf16"), x.to(torch.bfloat16).float())
    tf32 = _round_to(x, "tf32")
    assert (tf32.view(torch.int32) & ((1 << 13) - 1) == 0).all()
    assert ((tf32 - x).abs() <= x.abs() * 2.0**-11).all()


@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16", "auto"])
def test_selection_precision_keeps_the_coefficients_least_squares(precision):
    """The selection matmul's precision only chooses atoms: the coefficients stay least squares on the support."""
    gen = torch.Generator().manual_seed(3)
    D = unit_atoms(32, 64, gen, dtype=torch.float32)
    Y = torch.randn(32, 16, generator=gen)
    idx, coef = omp(D, Y, 8, selection_precision=precision)
    for c in range(16):
        ls = torch.linalg.lstsq(D[:, idx[c]].double(), Y[:, c : c + 1].double()).solution.squeeze(1)
        torch.testing.assert_close(coef[c].double(), ls, rtol=1e-4, atol=1e-4)


def test_bad_input_names_the_argument():
    D = torch.nn.functional.normalize(torch.randn(8, 12), dim=0)
    Y = torch.randn(8, 5)
    with pytest.raises(ValueError, match=r"s must be an int with 1 <= s <= 8 .*k=12.*d=8.* got 9"):
        omp(D, Y, 9)  # more nonzeros than rows
    with pytest.raises(ValueError, match=r"s must be an int with 1 <= s <= 12.*got 13"):
        learn_dictionary(torch.randn(20, 6), 12, 13)  # more nonzeros than atoms
    with pytest.raises(ValueError, match="s must be an int"):
        omp(D, Y, 0)
    with pytest.raises(ValueError, match="k must be an int"):
        learn_dictionary(Y, 0, 1)
    with pytest.raises(ValueError, match="same d"):
        omp(D, torch.randn(7, 5), 2)
    with pytest.raises(ValueError, match="growth must be"):
        omp(D, Y, 2, growth=2)
    with pytest.raises(ValueError, match="selection_precision must be one of"):
        omp(D, Y, 2, selection_precision="fp8")
    with pytest.raises(ValueError, match="Y must be a floating-point"):
        omp(D, Y.long(), 2)
    bad = Y.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(ValueError, match="Y has non-finite entries"):
        learn_dictionary(bad, 6, 2)
    with pytest.raises(ValueError, match="D must be 8 x 6"):
        learn_dictionary(Y, 6, 2, D=torch.randn(8, 5))
    with pytest.raises(ValueError, match="iters must be"):
        learn_dictionary(Y, 6, 2, iters=-1)
    with pytest.raises(ValueError, match="dtype must be"):
        learn_dictionary(Y, 6, 2, dtype=torch.float16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_ksvd_has_no_host_sync_per_atom():
    """The atom updates run without a host sync per atom (nor OMP per column): the syncs of one K-SVD run do not
    grow with the number of atoms."""
    from tests.test_sync import count_syncs

    def syncs(k):
        gen = torch.Generator().manual_seed(0)
        Y = torch.randn(64, 200, generator=gen).cuda()
        learn_dictionary(Y, k, 4, iters=1, memory_budget=1 << 30)  # warm-up (cuBLAS, cuSOLVER handles)
        return count_syncs(lambda: learn_dictionary(Y, k, 4, iters=1, memory_budget=1 << 30))

    few, many = syncs(16), syncs(64)
    assert len(many) == len(few) < 16, (few, many)


def test_progress_ticks_add_up_to_the_work():
    from weightkit.nn.ksvd import ksvd_work

    done = []
    Y = torch.randn(16, 30, generator=torch.Generator().manual_seed(4))
    learn_dictionary(Y, 12, 5, iters=2, tick=done.append)
    assert sum(done) == ksvd_work(30, 5, 2) and all(n > 0 for n in done)


@pytest.mark.parametrize("transpose", [False, True])
def test_triangular_products_skip_only_zeros(transpose):
    from weightkit.nn.ksvd import TRIANGULAR_SPLIT, _triu_mm

    gen = torch.Generator().manual_seed(6)
    for t in (TRIANGULAR_SPLIT - 1, TRIANGULAR_SPLIT, 2 * TRIANGULAR_SPLIT + 37):
        C = torch.randn(3, t, t, generator=gen, dtype=torch.float64).triu()
        A = torch.randn(3, t, 5, generator=gen, dtype=torch.float64)
        torch.testing.assert_close(_triu_mm(C, A, transpose), (C.mT if transpose else C) @ A, rtol=1e-12, atol=1e-12)


def test_omp_with_long_supports_matches_the_reference(monkeypatch):
    """Supports past the triangular split (weightkit.nn.ksvd.TRIANGULAR_SPLIT, lowered here to keep the reference
    cheap): still least squares, and growth=0 still textbook OMP."""
    import weightkit.nn.ksvd as ksvd

    monkeypatch.setattr(ksvd, "TRIANGULAR_SPLIT", 8)
    gen = torch.Generator().manual_seed(8)
    s = 40  # two levels of splits
    D = unit_atoms(s + 30, 2 * s, gen)
    Y = torch.randn(s + 30, 3, generator=gen, dtype=torch.float64)
    idx, coef = omp(D, Y, s, growth=0)
    for c in range(3):
        support, ref = reference_omp(D, Y[:, c], s)
        assert idx[c].tolist() == support
        torch.testing.assert_close(coef[c], ref, rtol=1e-7, atol=1e-8)
    idx, coef = omp(D, Y, s)
    for c in range(3):
        ls = torch.linalg.lstsq(D[:, idx[c]], Y[:, c : c + 1]).solution.squeeze(1)
        torch.testing.assert_close(coef[c], ls, rtol=1e-7, atol=1e-8)
