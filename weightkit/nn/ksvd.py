"""K-SVD dictionary learning with batched OMP: the factorization behind DictLinear (CoSpaDi, arXiv 2509.22075).

Y (d x m) ~ D S with D (d x k) of unit-norm atoms and S (k x m) with exactly s nonzeros per column, by K-SVD:

1. sparse coding: batched orthogonal matching pursuit (:func:`omp`), vectorised over the columns, exactly s
   distinct atoms per column (one atom per step, least squares on the support);
2. atom updates: for each atom j in turn, the residual of the columns that use it (with j's contribution put back)
   is approximated by a rank-1 term u v^T with power iterations started from the current atom; u replaces the
   atom, v its coefficients (never worse than before: the power iteration only raises ||E_j^T u||);
3. re-coding with the new dictionary, each column keeping its previous code when OMP's is worse,

so the error is non-increasing from one iteration to the next. :func:`dictionary_size` turns a byte budget into
(k, s). Only torch and weightkit.ops are imported: DictLinear.from_linear (data-free, on W^T) and
weightkit.compress.dictionary (calibration-whitened) both learn with this module.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor

from ..ops.dictionary import bitmask_code_bytes

__all__ = ["check_ratio", "dictionary_size", "omp", "learn_dictionary", "scatter_codes"]


def check_ratio(ratio: float) -> None:
    """``ratio``, the fraction of a dense weight's bytes a factorization removes, must lie in (0, 1)."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio (fraction of the weight's bytes removed) must be in (0, 1), got {ratio!r}")


def dictionary_size(d_in: int, d_out: int, ratio: float, k_over_s: float = 2.0, value_bytes: int = 4
                    ) -> Tuple[int, int]:
    """(k, s): the largest s, with k = round(k_over_s s) atoms, whose bytes fit in (1 - ratio) of the dense bytes.

    The bytes are DictLinear's exactly: the dictionary (d_in k values) and S in the bitmask format (s values, ceil(k/32)
    int32 mask words and as many prefix offsets per column; weightkit.ops.dictionary.bitmask_code_bytes). For a shared
    dictionary ``d_out`` is the total width of the layers sharing it (their budgets add up)."""
    check_ratio(ratio)
    if isinstance(k_over_s, bool) or not isinstance(k_over_s, (int, float)) or not k_over_s >= 1.0:
        raise ValueError(f"k_over_s must be a number >= 1, got {k_over_s!r}")
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


def omp(D: Tensor, Y: Tensor, s: int, eps: float = 1e-12) -> Tuple[Tensor, Tensor]:
    """Batched orthogonal matching pursuit: (indices (m, s) int64, coefficients (m, s)) with exactly s distinct
    atoms per column of Y (d x m); D has unit-norm columns.

    The support's span is orthonormalised as it grows: q_t = D c_t, with the coefficient vectors c_t (columns of an
    (m, s, s) upper-triangular C) from Gram-Schmidt in atom coordinates through G = D^T D. The correlations with
    the residual update as D^T r -= (G c_t)(q_t^T y), so no step touches a d x m residual, and the least-squares
    coefficients come out once at the end as C (q^T y). An atom already in the span of the support (rank-deficient
    D) is still taken, with a zero coefficient, so every column keeps exactly s indices."""
    k, m = D.shape[1], Y.shape[1]
    if not 1 <= s <= k:
        raise ValueError(f"need 1 <= s <= k, got s={s}, k={k}")
    dtype, dev = Y.dtype, Y.device
    G = D.T @ D
    B = D.T @ Y
    corr = B.clone()
    idx = torch.zeros(m, s, dtype=torch.int64, device=dev)
    C = torch.zeros(m, s, s, dtype=dtype, device=dev)
    alpha = torch.zeros(m, s, dtype=dtype, device=dev)
    chosen = torch.zeros(k, m, dtype=torch.bool, device=dev)
    cols = torch.arange(m, device=dev)
    V = torch.zeros(k, m, dtype=dtype, device=dev)
    for t in range(s):
        pick = corr.abs().masked_fill_(chosen, -1.0).argmax(0)
        idx[:, t] = pick
        chosen[pick, cols] = True
        c = torch.zeros(m, t + 1, dtype=dtype, device=dev)
        c[:, t] = 1.0
        nrm2 = torch.ones(m, dtype=dtype, device=dev)
        if t:
            g = G[idx[:, :t], pick[:, None]]  # (m, t): <d_S, d_new>
            Ct = C[:, :t, :t]
            proj = (Ct.transpose(1, 2) @ g.unsqueeze(-1)).squeeze(-1)  # q_i^T d_new
            c[:, :t] = -(Ct @ proj.unsqueeze(-1)).squeeze(-1)
            nrm2 = 1.0 - (proj * proj).sum(-1)
        ok = nrm2 > eps
        c = torch.where(ok[:, None], c / nrm2.clamp_min(eps).sqrt()[:, None], torch.zeros_like(c))
        C[:, : t + 1, t] = c
        a = (c * B.T.gather(1, idx[:, : t + 1])).sum(-1)  # q_t^T y
        alpha[:, t] = a
        if t + 1 < s:
            V.zero_().scatter_(0, idx[:, : t + 1].T, c.T)
            corr -= (G @ V) * a
    return idx, (C @ alpha.unsqueeze(-1)).squeeze(-1)


def _relative_error(Y: Tensor, D: Tensor, idx: Tensor, coef: Tensor, norm_y: float) -> float:
    return float((Y - D @ scatter_codes(idx, coef, D.shape[1])).norm()) / norm_y


def learn_dictionary(Y: Tensor, k: int, s: int, iters: int = 3, power_iters: int = 2, seed: int = 0,
                     D: Optional[Tensor] = None, progress: Optional[Callable[[], None]] = None,
                     threads: Optional[int] = None) -> Tuple[Tensor, Tensor, Tensor, List[float]]:
    """K-SVD on Y (d x m): (D (d x k), idx (m, s), coef (m, s), errors), indices ascending within each column.

    ``errors`` holds the relative error ||Y - D S|| / ||Y|| after the first coding and after each of ``iters``
    iterations (non-increasing). D starts from Y's leading left singular vectors, then random unit directions.

    Most operations here are small (one atom's users at a time) and intra-op threads cost more than they save on
    them (25x slower with 2 threads on a busy 2-core machine), so ``threads`` defaults to one per 2^20 entries of
    Y, capped by torch's setting; it is restored afterwards."""
    if threads is None:
        threads = min(torch.get_num_threads(), max(1, Y.numel() >> 20))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _learn(Y, k, s, iters, power_iters, seed, D, progress)
    finally:
        torch.set_num_threads(before)


def _learn(Y, k, s, iters, power_iters, seed, D, progress):
    Y = Y.to(torch.float64)
    d, m = Y.shape
    if not 1 <= s <= k:
        raise ValueError(f"need 1 <= s <= k, got s={s}, k={k}")
    if D is None:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        u = torch.linalg.svd(Y, full_matrices=False)[0][:, : min(k, d, m)]
        extra = torch.randn(d, k - u.shape[1], generator=gen, dtype=torch.float64).to(Y.device)
        D = torch.cat([u, extra], 1)
    D = D.to(torch.float64).clone()
    D /= D.norm(dim=0, keepdim=True).clamp_min(1e-300)
    norm_y = float(Y.norm()) or 1.0
    idx, coef = omp(D, Y, s)
    errors = [_relative_error(Y, D, idx, coef, norm_y)]
    cols = torch.arange(m, device=Y.device).repeat_interleave(s)
    for _ in range(iters):
        S = scatter_codes(idx, coef, k)
        E = Y - D @ S
        flat = idx.reshape(-1)
        users_of = torch.split(cols[flat.argsort(stable=True)], torch.bincount(flat, minlength=k).tolist())
        unused = []
        for j in range(k):
            users = users_of[j]
            if users.numel() == 0:
                unused.append(j)
                continue
            Ej = E[:, users] + torch.outer(D[:, j], S[j, users])
            u = D[:, j]
            v = Ej.T @ u
            for _ in range(power_iters):  # a zero residual keeps u (and so v): no host sync to test for it
                w = Ej @ v
                n = w.norm()
                u = torch.where(n > 1e-300, w / n.clamp_min(1e-300), u)
                v = Ej.T @ u
            D[:, j] = u
            S[j, users] = v
            E[:, users] = Ej - torch.outer(u, v)
        if unused:  # an unused atom changes nothing; point it at a badly represented column for the next coding
            worst = E.norm(dim=0).argsort(descending=True)[: len(unused)]
            fresh = E[:, worst] / E[:, worst].norm(dim=0, keepdim=True).clamp_min(1e-300)
            D[:, unused[: fresh.shape[1]]] = fresh
        coef = S.gather(0, idx.T).T
        old_err = E.norm(dim=0)
        new_idx, new_coef = omp(D, Y, s)
        new_err = (Y - D @ scatter_codes(new_idx, new_coef, k)).norm(dim=0)
        better = new_err < old_err
        idx = torch.where(better[:, None], new_idx, idx)
        coef = torch.where(better[:, None], new_coef, coef)
        errors.append(_relative_error(Y, D, idx, coef, norm_y))
        if progress is not None:
            progress()
    order = idx.argsort(1)
    return D, idx.gather(1, order), coef.gather(1, order), errors
