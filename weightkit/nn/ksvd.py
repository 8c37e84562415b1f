"""K-SVD dictionary learning with batched OMP: the factorization behind DictLinear (CoSpaDi, arXiv 2509.22075).

Y (d x m) ~ D S with D (d x k) of unit-norm atoms and S (k x m) with exactly s nonzeros per column, by K-SVD:

1. sparse coding: batched orthogonal matching pursuit (:func:`omp`): all columns (of a memory-sized chunk) advance
   together with no per-column loop and no host sync; G = D^T D and B = D^T Y are computed once, each step picks the
   atoms most correlated with every column's residual, extends an orthonormal basis of the support in atom
   coordinates (a Cholesky step of the new atoms against it) and recomputes the correlations with one matmul. The
   first atoms come one per step (textbook OMP); after that a step adds ``growth`` (1/32) of the support at once,
   so s = 1483 takes ~160 steps instead of 1483 (the measured quality cost: DEFAULT_GROWTH's comment).
   Exactly s distinct atoms per column, least squares on the support;
2. atom updates: for each atom j in turn, the residual of the columns that use it (with j's contribution put back)
   is approximated by a rank-1 term u v^T with power iterations started from the current atom; u replaces the
   atom, v its coefficients (never worse than before: the power iteration only raises ||E_j^T u||); one host sync
   per iteration (the users of every atom), none per atom;
3. re-coding with the new dictionary, each column keeping its previous code when OMP's is worse,

so the error is non-increasing from one iteration to the next. The work is float32 (float64 for float64 input, the
reference); the correlation matmul that only selects atoms may run in bf16 (``selection_precision``), and the
float32 matmuls in TF32 when torch.backends.cuda.matmul.allow_tf32 (or ``tf32=True``) allows it. The same code runs
on the CPU and on CUDA. :func:`dictionary_size` turns a byte budget into (k, s). Only torch and weightkit.ops are
imported: DictLinear.from_linear (data-free, on W^T) and weightkit.compress.dictionary (calibration-whitened) both
learn with this module.
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor

from ..backend import allow_tf32
from ..ops.dictionary import bitmask_code_bytes

__all__ = ["check_growth", "check_int", "check_k_over_s", "check_ratio", "dictionary_size", "omp", "omp_schedule",
           "learn_dictionary", "scatter_codes", "ksvd_work"]


def check_ratio(ratio: float) -> None:
    """``ratio``, the fraction of a dense weight's bytes a factorization removes, must lie in (0, 1)."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio (fraction of the weight's bytes removed) must be in (0, 1), got {ratio!r}")


def check_k_over_s(k_over_s: float) -> None:
    """``k_over_s``, the atoms a nonzero of S (k = round(k_over_s s)), must be a finite number >= 1."""
    if isinstance(k_over_s, bool) or not isinstance(k_over_s, (int, float)) or not 1.0 <= k_over_s < math.inf:
        raise ValueError(f"k_over_s must be a finite number >= 1, got {k_over_s!r}")


def check_growth(growth: float) -> None:
    """``growth``, OMP's atoms per step as a fraction of the atoms still to pick (omp_schedule), must be in [0, 1]."""
    if isinstance(growth, bool) or not isinstance(growth, (int, float)) or not 0 <= growth <= 1:
        raise ValueError(f"growth must be a number in [0, 1], got {growth!r}")


def dictionary_size(d_in: int, d_out: int, ratio: float, k_over_s: float = 2.0, value_bytes: int = 4
                    ) -> Tuple[int, int]:
    """(k, s): the largest s, with k = round(k_over_s s) atoms, whose bytes fit in (1 - ratio) of the dense bytes.

    The bytes are DictLinear's exactly: the dictionary (d_in k values) and S in the bitmask format (s values, ceil(k/32)
    int32 mask words and as many prefix offsets per column; weightkit.ops.dictionary.bitmask_code_bytes). For a shared
    dictionary ``d_out`` is the total width of the layers sharing it (their budgets add up)."""
    check_ratio(ratio)
    check_k_over_s(k_over_s)
    budget = (1.0 - ratio) * d_in * d_out * value_bytes
    s = 0
    for candidate in range(1, d_in + 1):
        k = int(round(k_over_s * candidate))
        if d_in * k * value_bytes + bitmask_code_bytes(k, candidate, d_out, value_bytes) > budget:
            break
        s = candidate
    if s == 0:
        raise ValueError(f"ratio={ratio} leaves no room for a dictionary of a {d_in}x{d_out} weight")
    return int(round(k_over_s * s)), s


def scatter_codes(idx: Tensor, coef: Tensor, k: int) -> Tensor:
    """Dense S (k x m) from per-column supports idx (m, s) and coefficients (m, s)."""
    S = torch.zeros(k, idx.shape[0], dtype=coef.dtype, device=coef.device)
    S.scatter_(0, idx.T, coef.T)
    return S


# Atoms added per OMP step: max(1, floor(growth * atoms so far)), so the first atoms come one at a time (exact OMP)
# and a column's support grows geometrically after 1/growth of them: ~1/growth + log(s)/log(1 + growth) steps instead
# of s. 0 is exact OMP (one atom per step). Measured (CPU, float32, iters=1, bench/test_bench_compress.py's
# layer_case): functional error of a 256 -> 688 layer, 128 calibration tokens, 30%: growth 0: 0.0249, 1/32: 0.0253,
# 1/16: 0.0266, 1/8: 0.0289 (all-MiniLM-L6-v2, ratio 0.2, the test's setup: cosine 0.8866, 0.8870, 0.8867 for 0,
# 1/16, 1/8; the former float64 code 0.8863); 1/32 keeps
# the error within 2% of exact OMP and needs ~160 steps instead of 1483 for the 4096 -> 11008 layer.
DEFAULT_GROWTH = 1 / 32
SELECTION_PRECISIONS = ("fp32", "tf32", "bf16", "auto")


def omp_schedule(s: int, growth: float = DEFAULT_GROWTH) -> List[int]:
    """The atoms added at each OMP step (they sum to s): 1 while the support is small, then ``growth`` of it."""
    steps, t = [], 0
    while t < s:
        n = min(s - t, max(1, int(growth * t)))
        steps.append(n)
        t += n
    return steps


def check_int(name: str, value, low: int, high: Optional[int] = None, what: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"{low} <= {name}" + (f" <= {high}" if high is not None else "")
        raise ValueError(f"{name} must be an int with {bound}{what}, got {value!r}")
    return value


def _compute_dtype(t: Tensor, name: str) -> torch.dtype:
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _round_to(x: Tensor, precision: str) -> Tensor:
    """x (float32) with its mantissa rounded to bf16's 8 or TF32's 11 bits (round to nearest even), still float32:
    what a bf16 / TF32 tensor-core product sees (products exact, float32 accumulation)."""
    drop = 16 if precision == "bf16" else 13
    bits = x.contiguous().view(torch.int32)
    half, mask = 1 << (drop - 1), ~((1 << drop) - 1)
    rounded = (bits + (half - 1) + ((bits >> drop) & 1)) & mask
    return rounded.view(torch.float32)


class _Selection:
    """corr = B - X G for the atom selection, in the chosen precision. On CUDA bf16 is a bf16 matmul and tf32 an fp32
    matmul with TF32 allowed; on the CPU both are emulated (inputs rounded, fp32 products), so their effect on the
    quality can be measured without a GPU."""

    def __init__(self, G: Tensor, precision: str):
        if precision not in SELECTION_PRECISIONS:
            raise ValueError(f"selection_precision must be one of {', '.join(SELECTION_PRECISIONS)}, got {precision!r}")
        if precision == "auto":  # bf16 where it is fast (tensor cores); measured: bench/test_bench_compress.py
            precision = "bf16" if G.is_cuda else "fp32"
        if G.dtype != torch.float32:
            precision = "fp32"  # a float64 run is the reference: no rounding
        self.precision, self.cuda = precision, G.is_cuda
        if precision == "fp32":
            self.G = G
        elif self.cuda:
            self.G = G.to(torch.bfloat16) if precision == "bf16" else G
        else:
            self.G = _round_to(G, precision)

    def corr(self, B: Tensor, X: Tensor) -> Tensor:
        if self.precision == "fp32":
            return torch.addmm(B, X, self.G, alpha=-1)
        if not self.cuda:
            return torch.addmm(B, _round_to(X, self.precision), self.G, alpha=-1)
        if self.precision == "bf16":
            return B - (X.to(torch.bfloat16) @ self.G).float()
        with allow_tf32(True):
            return torch.addmm(B, X, self.G, alpha=-1)


# Below this size a triangular block is multiplied as a dense one (one batched matmul); above, its zero quarter is
# skipped by splitting it in halves (3/4 of the work, 5/8 after two splits, ...).
TRIANGULAR_SPLIT = 256


def _triu_mm(C: Tensor, A: Tensor, transpose: bool) -> Tensor:
    """C @ A (or C^T @ A) for a batch of upper-triangular C (c, t, t) and A (c, t, n), without the zero blocks."""
    t = C.shape[1]
    if t < TRIANGULAR_SPLIT:
        return (C.mT if transpose else C) @ A
    h = t // 2
    C11, C12, C22 = C[:, :h, :h], C[:, :h, h:], C[:, h:, h:]
    A1, A2 = A[:, :h], A[:, h:]
    if transpose:  # [C11^T A1; C12^T A1 + C22^T A2]
        return torch.cat([_triu_mm(C11, A1, True), torch.baddbmm(_triu_mm(C22, A2, True), C12.mT, A1)], 1)
    return torch.cat([torch.baddbmm(_triu_mm(C11, A1, False), C12, A2), _triu_mm(C22, A2, False)], 1)


def _chunk_columns(m: int, k: int, s: int, itemsize: int, device: torch.device, budget: Optional[int]) -> int:
    """Columns coded at once: the per-column state (C: s x s, corr/B/X: k each, a few s-vectors, and the step's
    t x n temporaries, up to about s^2 in all) within ``budget`` bytes (default: 1/4 of the free GPU memory, at most
    16 GiB; 512 MiB on the CPU)."""
    if budget is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            budget = min(free // 4, 16 << 30)
        else:
            budget = 512 << 20
    per_column = (2 * s * s + 4 * k + 6 * s) * itemsize + 8 * s
    return max(1, min(m, budget // per_column))


def omp(D: Tensor, Y: Tensor, s: int, eps: Optional[float] = None, *, growth: float = DEFAULT_GROWTH,
        selection_precision: str = "fp32", memory_budget: Optional[int] = None,
        tick: Optional[Callable[[int], None]] = None, G: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Batched orthogonal matching pursuit: (indices (m, s) int64, coefficients (m, s)) with exactly s distinct
    atoms per column of Y (d x m), least squares on each column's support; D has unit-norm columns.

    All columns advance together (column chunks bound the memory, see ``memory_budget``); a step picks for every
    column the atoms with the largest |correlation| with its residual and extends an orthonormal basis of the
    support's span in atom coordinates (Q = D_I C, C upper triangular): for the new atoms J, P = C^T G_IJ,
    the Cholesky factor R of G_JJ - P^T P (+ ``eps`` on the diagonal: an atom already in the span gets a near-zero
    direction, so every column still takes exactly s indices) gives the new block [-C P; I] R^{-T} of C, and the
    new coordinates z_J = R^{-1}(B_J - P^T z) of y. The least-squares coefficients accumulate as x += C_J z_J, and
    the correlations are recomputed as B - G x (one matmul per step, no d x m residual): G = D^T D and B = D^T Y
    are computed once. ``growth`` sets the atoms per step (:func:`omp_schedule`; 0: one per step, textbook OMP).

    ``selection_precision`` is the precision of the correlation matmul, which only chooses atoms (the coefficients
    are always computed in the working precision): fp32, tf32, bf16 or auto (bf16 on CUDA, fp32 on the CPU). The
    working precision is float64 for float64 inputs, float32 otherwise. ``tick(columns)`` is called after each step
    of each chunk with the number of columns it advanced. No host sync except the chunk loop's own."""
    if D.dim() != 2 or Y.dim() != 2 or D.shape[0] != Y.shape[0]:
        raise ValueError(f"need D (d x k) and Y (d x m) with the same d, got D {tuple(D.shape)} and Y {tuple(Y.shape)}")
    if D.device != Y.device:
        raise ValueError(f"D is on {D.device} and Y on {Y.device}; they must be on one device")
    (d, k), m = D.shape, Y.shape[1]
    check_int("s", s, 1, min(k, d), f" (the atoms k={k} and the rows d={d} of Y bound the nonzeros per column)")
    check_growth(growth)
    dtype = torch.promote_types(_compute_dtype(D, "D"), _compute_dtype(Y, "Y"))
    D, Y, dev = D.to(dtype), Y.to(dtype), Y.device
    if eps is None:  # above the rounding of G_JJ - P^T P (about s ulps), far below a useful atom's residual
        eps = 4.0 * s * torch.finfo(dtype).eps
    if G is None:
        G = D.T @ D
    select = _Selection(G, selection_precision)
    schedule = omp_schedule(s, growth)
    chunk = _chunk_columns(m, k, s, torch.finfo(dtype).bits // 8, dev, memory_budget)
    idx_all = torch.empty(m, s, dtype=torch.int64, device=dev)
    coef_all = torch.empty(m, s, dtype=dtype, device=dev)
    eye_cache = {}
    for start in range(0, m, chunk):
        cols = slice(start, min(m, start + chunk))
        B = Y[:, cols].T @ D  # (c, k): column c's correlations with every atom
        c = B.shape[0]
        idx, x = idx_all[cols], coef_all[cols]  # views: written in place
        x.zero_()
        C = torch.zeros(c, s, s, dtype=dtype, device=dev)
        z = torch.zeros(c, s, dtype=dtype, device=dev)
        X = torch.zeros(c, k, dtype=dtype, device=dev)
        corr, t = B, 0
        for n in schedule:
            score = corr.abs()
            if t:
                score.scatter_(1, idx[:, :t], -1.0)  # chosen atoms are never picked again
            J = score.topk(n, dim=1).indices if n > 1 else score.argmax(1, keepdim=True)
            idx[:, t : t + n] = J
            G_JJ = G[J.unsqueeze(2), J.unsqueeze(1)]  # (c, n, n)
            rhs = B.gather(1, J)  # (c, n): d_J^T y
            if t:
                Ct = C[:, :t, :t]
                P = _triu_mm(Ct, G[idx[:, :t].unsqueeze(2), J.unsqueeze(1)], True)  # (c, t, n): q_i^T d_J
                M = torch.baddbmm(G_JJ, P.mT, P, alpha=-1)
                rhs = rhs - (P.mT @ z[:, :t, None]).squeeze(-1)
            else:
                M = G_JJ
            if n not in eye_cache:
                eye_cache[n] = torch.eye(n, dtype=dtype, device=dev)
            M = M + eps * eye_cache[n]
            if n == 1:  # a 1 x 1 Cholesky factor is a square root (no per-matrix LAPACK call on the CPU)
                Rinv_T = M.rsqrt()
            else:
                R, _ = torch.linalg.cholesky_ex(M)  # positive definite by the shift (info ignored: no sync)
                Rinv_T = torch.linalg.solve_triangular(R.mT, eye_cache[n].expand(c, n, n), upper=True)  # R^{-T}
            zJ = (Rinv_T.mT @ rhs.unsqueeze(-1)).squeeze(-1)  # R^{-1} rhs
            C[:, t : t + n, t : t + n] = Rinv_T
            if t:
                C[:, :t, t : t + n] = -_triu_mm(Ct, P, False) @ Rinv_T
            z[:, t : t + n] = zJ
            x[:, : t + n] += (C[:, : t + n, t : t + n] @ zJ.unsqueeze(-1)).squeeze(-1)
            t += n
            if t < s:
                X.zero_().scatter_(1, idx[:, :t], x[:, :t])
                corr = select.corr(B, X)
            if tick is not None:
                tick(c)
        del C
    return idx_all, coef_all


def _relative_error(Y: Tensor, D: Tensor, idx: Tensor, coef: Tensor, norm_y: float) -> float:
    return float((Y - D @ scatter_codes(idx, coef, D.shape[1])).norm()) / norm_y


def ksvd_work(m: int, s: int, iters: int, growth: float = DEFAULT_GROWTH) -> int:
    """The units ``learn_dictionary``'s ``tick`` counts: columns x OMP steps for each of the iters + 1 codings, and
    m for each round of atom updates."""
    return (iters + 1) * m * len(omp_schedule(s, growth)) + iters * m


def learn_dictionary(Y: Tensor, k: int, s: int, iters: int = 3, power_iters: int = 2, seed: int = 0,
                     D: Optional[Tensor] = None, progress: Optional[Callable[[], None]] = None,
                     threads: Optional[int] = None, *, dtype: Optional[torch.dtype] = None,
                     growth: float = DEFAULT_GROWTH, selection_precision: str = "fp32", tf32: Optional[bool] = None,
                     memory_budget: Optional[int] = None, tick: Optional[Callable[[int], None]] = None
                     ) -> Tuple[Tensor, Tensor, Tensor, List[float]]:
    """K-SVD on Y (d x m): (D (d x k), idx (m, s), coef (m, s), errors), indices ascending within each column.

    ``errors`` holds the relative error ||Y - D S|| / ||Y|| after the first coding and after each of ``iters``
    iterations (non-increasing). D starts from Y's leading left singular vectors, then random unit directions.

    The work runs in ``dtype`` (default: float64 for a float64 Y, float32 otherwise) on Y's device. ``growth``,
    ``selection_precision`` and ``memory_budget``: see :func:`omp`. ``tf32``: True lets the float32 matmuls use
    TF32 on CUDA for this call, False forbids it, None (default) keeps torch.backends.cuda.matmul.allow_tf32.
    ``progress()`` is called after each iteration, ``tick(units)`` as the work advances (:func:`ksvd_work` units
    in all; for a progress bar).

    Most operations of the CPU's atom updates are small (one atom's users at a time) and intra-op threads cost more
    than they save on them (25x slower with 2 threads on a busy 2-core machine), so ``threads`` defaults to one per
    2^20 entries of Y, capped by torch's setting; it is restored afterwards."""
    if Y.dim() != 2:
        raise ValueError(f"Y must be a matrix (d x m), got shape {tuple(Y.shape)}")
    d, m = Y.shape
    check_int("k", k, 1, what=" (atoms in the dictionary)")
    check_int("s", s, 1, min(k, d), f" (nonzeros per column: at most the atoms k={k} and the rows d={d} of Y)")
    check_int("iters", iters, 0)
    check_int("power_iters", power_iters, 0)
    work = dtype or _compute_dtype(Y, "Y")
    if work not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    if not bool(torch.isfinite(Y).all()):
        raise ValueError("Y has non-finite entries (NaN or Inf); check the weight and the calibration data")
    if selection_precision not in SELECTION_PRECISIONS:
        raise ValueError(f"selection_precision must be one of {', '.join(SELECTION_PRECISIONS)}, "
                         f"got {selection_precision!r}")
    check_growth(growth)
    if D is not None and (D.dim() != 2 or tuple(D.shape) != (d, k)):
        raise ValueError(f"D must be {d} x {k} (rows of Y x atoms), got {tuple(D.shape)}")
    if threads is None:
        threads = min(torch.get_num_threads(), max(1, Y.numel() >> 20))
    before, tf32_before = torch.get_num_threads(), torch.backends.cuda.matmul.allow_tf32
    torch.set_num_threads(threads)
    if tf32 is not None:
        torch.backends.cuda.matmul.allow_tf32 = bool(tf32)
    try:
        opts = dict(growth=growth, selection_precision=selection_precision, memory_budget=memory_budget, tick=tick)
        return _learn(Y.to(work), k, s, iters, power_iters, seed, D, progress, opts)
    finally:
        torch.set_num_threads(before)
        torch.backends.cuda.matmul.allow_tf32 = tf32_before


def _initial_dictionary(Y: Tensor, k: int, seed: int) -> Tensor:
    """Y's leading left singular vectors (eigenvectors of Y Y^T: cheaper than an SVD when d < m), then random unit
    directions (from a CPU generator: the same on every device)."""
    d, m = Y.shape
    r = min(k, d, m)
    u = None
    if d <= m:
        scaled = Y / Y.abs().amax().clamp_min(torch.finfo(Y.dtype).tiny)  # no overflow in Y Y^T
        try:
            u = torch.linalg.eigh(scaled @ scaled.T)[1].flip(1)[:, :r]
        except torch.linalg.LinAlgError:  # eigh did not converge: the SVD's algorithm is more robust
            pass
    if u is None:
        u = torch.linalg.svd(Y, full_matrices=False)[0][:, :r]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    extra = torch.randn(d, k - r, generator=gen, dtype=torch.float64).to(Y.device, Y.dtype)
    return torch.cat([u, extra], 1)


def _learn(Y, k, s, iters, power_iters, seed, D, progress, opts):
    d, m = Y.shape
    tick = opts["tick"]
    D = _initial_dictionary(Y, k, seed) if D is None else D.to(Y.device, Y.dtype).clone()
    D /= D.norm(dim=0, keepdim=True).clamp_min(torch.finfo(Y.dtype).tiny)
    norm_y = float(Y.norm()) or 1.0
    idx, coef = omp(D, Y, s, **opts)
    errors = [_relative_error(Y, D, idx, coef, norm_y)]
    Yt = Y.T.contiguous()  # (m, d): a column's residual is a contiguous row
    cols = torch.arange(m, device=Y.device).repeat_interleave(s)
    tiny = torch.finfo(Y.dtype).tiny
    for _ in range(iters):
        S = scatter_codes(idx, coef, k)  # (k, m)
        Et = Yt - S.T @ D.T  # (m, d) residual, transposed
        flat = idx.reshape(-1)
        counts_t = torch.bincount(flat, minlength=k)
        counts = counts_t.tolist()  # one host sync per iteration, none per atom
        users_of = torch.split(cols[flat.argsort(stable=True)], counts)
        for j in range(k):
            if tick is not None:  # the atom updates count m units in the progress
                tick(m * (j + 1) // k - m * j // k)
            users = users_of[j]
            if counts[j] == 0:
                continue
            s_j = S[j, users]
            Ej = torch.addr(Et[users], s_j, D[:, j])  # (users, d): the residual with atom j put back
            u = D[:, j]
            v = Ej @ u
            for _ in range(power_iters):  # a zero residual keeps u (and so v): no host sync to test for it
                w = Ej.T @ v
                n = w.norm()
                u = torch.where(n > tiny, w / n.clamp_min(tiny), u)
                v = Ej @ u
            D[:, j] = u
            S[j, users] = v
            Et[users] = torch.addr(Ej, v, u, alpha=-1)
        if 0 in counts:  # an unused atom changes nothing; point it at a badly represented column for the next coding
            norms = Et.norm(dim=1)
            unused = counts_t == 0
            rank = unused.cumsum(0) - 1  # the i-th unused atom takes the i-th worst column (on the device: no sync)
            unused &= rank < m
            worst = norms.argsort(descending=True)[rank.clamp(0, m - 1)]  # (k,)
            fresh = Et[worst].T / norms[worst].clamp_min(tiny)
            D = torch.where(unused, fresh, D)
        coef = S.gather(0, idx.T).T
        old_err = Et.norm(dim=1)
        new_idx, new_coef = omp(D, Y, s, **opts)
        new_err = (Yt - scatter_codes(new_idx, new_coef, k).T @ D.T).norm(dim=1)
        better = new_err < old_err
        idx = torch.where(better[:, None], new_idx, idx)
        coef = torch.where(better[:, None], new_coef, coef)
        errors.append(_relative_error(Y, D, idx, coef, norm_y))
        if progress is not None:
            progress()
    order = idx.argsort(1)
    return D, idx.gather(1, order), coef.gather(1, order), errors
