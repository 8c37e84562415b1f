"""Calibration-guided dictionary compression (CoSpaDi, arXiv 2509.22075).

Each weight's whitened transpose Y = L^T W^T (d_in x d_out; see weightkit.compress.common) is factored as
Y ~ D' S, D' (d_in x k) with unit-norm atoms and S (k x d_out) with exactly s nonzeros per column, by K-SVD:

1. sparse coding: batched orthogonal matching pursuit, vectorised over the columns, exactly s distinct atoms per
   column (one atom per step, least squares on the support);
2. atom updates: for each atom j in turn, the residual of the columns that use it (with j's contribution put back)
   is approximated by a rank-1 term u v^T with power iterations started from the current atom; u replaces the
   atom, v its coefficients (never worse than before: the power iteration only raises ||E_j^T u||);
3. re-coding with the new dictionary, each column keeping its previous code when OMP's is worse.

So the functional error is non-increasing from one iteration to the next (``LayerReport.history``). Finally
D = L^{-T} D' and the layer becomes a :class:`weightkit.nn.DictLinear`.

Byte accounting (b bytes per value, ib per index: 1 when k <= 256, 2 up to 32768): a dictionary layer stores
d_in k b + s d_out (b + ib) bytes; s is the largest with k = round(k_over_s s) that fits in (1 - ratio) d_in d_out b.
With ``shared=True`` the layers that read the same input (same parent module, equal calibration Gram matrix, e.g.
Q/K/V of an attention block) share one dictionary, stored once; the budget is then the group's total, so their s
is larger. The SVD baseline (weightkit.compress.svd) gets (1 - ratio) d_in d_out b per layer as well.

Note: ``weightkit.compress.dictionary`` (the package attribute) is the function :func:`dictionary`; import the
helpers from this module by name (``from weightkit.compress.dictionary import omp``).
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..ops.dictionary import index_dtype_for
from .common import (CompressionReport, LayerReport, check_ratio, collect_gram, compress, linear_names,  # noqa: F401
                     module_bytes, set_module, whitening_factor)
from .svd import svd, svd_rank  # noqa: F401  (kept importable from here)

__all__ = ["dictionary", "dictionary_size", "omp", "learn_dictionary", "scatter_codes"]


def dictionary_size(d_in: int, d_out: int, ratio: float, k_over_s: float = 2.0, value_bytes: int = 4
                    ) -> Tuple[int, int]:
    """(k, s): the largest s, with k = round(k_over_s s) atoms, whose bytes fit in (1 - ratio) of the dense bytes.

    For a shared dictionary ``d_out`` is the total width of the layers sharing it (their budgets add up)."""
    check_ratio(ratio)
    if isinstance(k_over_s, bool) or not isinstance(k_over_s, (int, float)) or not k_over_s >= 1.0:
        raise ValueError(f"k_over_s must be a number >= 1, got {k_over_s!r}")
    budget = (1.0 - ratio) * d_in * d_out * value_bytes
    s = 0
    for candidate in range(1, d_in + 1):
        k = int(round(k_over_s * candidate))
        index_bytes = torch.empty(0, dtype=index_dtype_for(k)).element_size()
        if d_in * k * value_bytes + candidate * d_out * (value_bytes + index_bytes) > budget:
            break
        s = candidate
    if s == 0:
        raise ValueError(f"ratio={ratio} leaves no room for a dictionary of a {d_in}x{d_out} weight")
    return int(round(k_over_s * s)), s


# ---------------------------------------------------------------------------------------------------------
# Sparse coding and dictionary learning (float64, on Y's device)


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
            for _ in range(power_iters):
                w = Ej @ v
                n = w.norm()
                if float(n) <= 1e-300:
                    break
                u = w / n
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


# ---------------------------------------------------------------------------------------------------------
# Model-level API


def _groups(names: Sequence[str], grams: Dict[str, Tensor], shared: bool) -> List[List[str]]:
    groups: List[List[str]] = []
    for n in names:
        parent = n.rpartition(".")[0]
        for g in groups if shared else ():
            if g[0].rpartition(".")[0] == parent and torch.equal(grams[g[0]], grams[n]):
                g.append(n)
                break
        else:
            groups.append([n])
    return groups


def dictionary(model: nn.Module, calib_batches: Iterable, ratio: float = 0.3,
               filter_fn: Optional[Callable[[str, nn.Module], bool]] = None, k_over_s: float = 2.0, iters: int = 3,
               power_iters: int = 2, shared: bool = False, seed: int = 0, progress: bool = True) -> CompressionReport:
    """Replace ``model``'s selected nn.Linear layers (default: all but ``lm_head``/``pooler``) in place by
    :class:`weightkit.nn.DictLinear` factors learned on the calibration inputs; see the module docstring.

    Args:
        calib_batches: iterable of model inputs (tensors, or dicts passed as keyword arguments).
        ratio: fraction of each weight's bytes removed (index bytes included), in (0, 1).
        filter_fn: ``(name, module) -> bool`` selecting the layers.
        k_over_s: atoms per nonzero (CoSpaDi uses 2).
        iters, power_iters: K-SVD iterations and power iterations per atom update.
        shared: one dictionary per group of layers reading the same input (e.g. Q/K/V).
    Returns a :class:`CompressionReport` with each layer's functional error, its per-iteration history and bytes.
    """
    from tqdm import tqdm

    from ..nn.dictionary import DictLinear

    check_ratio(ratio)
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be an int >= 0, got {iters!r}")
    names = linear_names(model, filter_fn)
    grams = collect_gram(model, calib_batches, names)
    groups = _groups(names, grams, shared)
    report = CompressionReport("dictionary", ratio)
    bar = tqdm(total=len(groups) * max(iters, 1), desc="dictionary compression", disable=not progress)
    for members in groups:
        linears = [model.get_submodule(n) for n in members]
        L = whitening_factor(grams[members[0]])
        Ys = [L.T @ lin.weight.detach().to(torch.float64).T for lin in linears]
        d_in, widths = Ys[0].shape[0], [Y.shape[1] for Y in Ys]
        dtype = linears[0].weight.dtype
        k, s = dictionary_size(d_in, sum(widths), ratio, k_over_s, dtype.itemsize)
        Ycat = torch.cat(Ys, 1)
        Dw, idx, coef, errors = learn_dictionary(Ycat, k, s, iters=iters, power_iters=power_iters, seed=seed,
                                            progress=bar.update if iters else None)
        if not iters:
            bar.update()
        D = torch.linalg.solve_triangular(L.T, Dw, upper=True)  # L^{-T} D'
        shared_d = nn.Parameter(D.to(dtype))
        params = {"k": k, "s": s} | ({"shared_by": len(members)} if len(members) > 1 else {})
        start = 0
        for i, (name, lin, Y, w) in enumerate(zip(members, linears, Ys, widths)):
            sl = slice(start, start + w)
            start += w
            new = DictLinear.from_factors(shared_d, coef[sl].T.contiguous().to(dtype), idx[sl].T.contiguous(), lin.bias)
            err = float((Y - Dw @ scatter_codes(idx[sl], coef[sl], k)).norm() / Y.norm().clamp_min(1e-300))
            after = module_bytes(new) - (shared_d.numel() * shared_d.element_size() if i else 0)
            report.layers.append(LayerReport(name, tuple(lin.weight.shape), "dictionary", dict(params), err,
                                             module_bytes(lin), after, list(errors)))  # a group's history
            set_module(model, name, new)
    bar.close()
    return report

