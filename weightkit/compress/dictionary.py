"""Calibration-guided dictionary compression (CoSpaDi, arXiv 2509.22075) and the truncated-SVD baseline.

For a linear layer y = x W^T with calibration inputs X, the functional error ||X W^T - X W'^T||_F equals
||L^T (W^T - W'^T)||_F for the Cholesky factor L of X^T X (C = L L^T; the diagonal is shifted by ``1e-6 tr(C)/d``
and doubled until C is positive definite). So both methods factor the whitened matrix Y = L^T W^T:

* dictionary: Y ~ D' S with D' (d_in x k), S (k x d_out) with exactly s nonzeros per column, learned by
  alternating batched OMP (exactly s atoms per column, least squares on the support; a column keeps its previous
  code when the new one is worse, so the error never increases) and K-SVD atom updates (rank-1 power iterations
  started from the current atom, also non-increasing); then D = L^{-T} D'.
* svd: Y ~ U_r S_r V_r^T, W'^T = (L^{-T} U_r S_r) V_r^T, stored as two linear layers.

Byte accounting (``ratio`` is the fraction of the dense weight's bytes removed; b = bytes per value, ib = bytes
per index): dictionary stores d_in k b + s d_out (b + ib) with k = k_over_s * s and s the largest that fits in
(1 - ratio) d_in d_out b; SVD stores r (d_in + d_out) b with the largest r that fits. Biases are kept as they are
and counted on both sides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..ops.dictionary import index_dtype_for

DEFAULT_SKIP = ("lm_head", "pooler")


# ---------------------------------------------------------------------------------------------------------
# Sizes


def dictionary_size(d_in: int, d_out: int, ratio: float, k_over_s: float = 2.0, value_bytes: int = 4) -> Tuple[int, int]:
    """(k, s): the largest s (and k = k_over_s s) whose stored bytes fit in (1 - ratio) of the dense bytes."""
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio (fraction of bytes removed) must be in (0, 1), got {ratio}")
    if not k_over_s >= 1.0:
        raise ValueError(f"k_over_s must be >= 1, got {k_over_s}")
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


def svd_rank(d_in: int, d_out: int, ratio: float) -> int:
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio (fraction of bytes removed) must be in (0, 1), got {ratio}")
    r = int((1.0 - ratio) * d_in * d_out // (d_in + d_out))
    if r < 1:
        raise ValueError(f"ratio={ratio} leaves no room for a rank-1 factorization of a {d_in}x{d_out} weight")
    return r


# ---------------------------------------------------------------------------------------------------------
# Sparse coding and dictionary learning (float64, on Y's device)


def omp(D: Tensor, Y: Tensor, s: int, steps: int = 8, eps: float = 1e-10) -> Tuple[Tensor, Tensor]:
    """Batched (generalized) orthogonal matching pursuit: (indices (m, s) int64, coefficients (m, s)) with exactly
    s distinct atoms per column of Y (d x m); D has unit-norm columns.

    Each of ``steps`` rounds adds the ceil(s / steps) atoms most correlated with every column's residual (steps=s
    is classic one-atom OMP), then solves least squares on the whole support through a batched Cholesky of the
    support's Gram matrix. Correlations come from D^T R = D^T Y - G S, so no round touches a d x m residual."""
    k, m = D.shape[1], Y.shape[1]
    gram = D.T @ D
    dty = D.T @ Y  # (k, m)
    per_step = -(-s // max(1, min(steps, s)))
    idx = torch.zeros(m, 0, dtype=torch.int64, device=Y.device)
    coef = torch.zeros(m, 0, dtype=Y.dtype, device=Y.device)
    chosen = torch.zeros(k, m, dtype=torch.bool, device=Y.device)
    cols = torch.arange(m, device=Y.device)
    while idx.shape[1] < s:
        take = min(per_step, s - idx.shape[1])
        corr = (dty - gram @ scatter_codes(idx, coef, k)).abs().masked_fill(chosen, -1.0)
        picks = corr.topk(take, dim=0).indices.T  # (m, take), distinct and not yet chosen
        chosen[picks.reshape(-1), cols.repeat_interleave(take)] = True
        idx = torch.cat([idx, picks], 1)
        g = gram[idx[:, :, None], idx[:, None, :]]  # (m, t, t)
        g.diagonal(dim1=1, dim2=2).add_(eps)
        chol = torch.linalg.cholesky(g)
        coef = torch.cholesky_solve(dty.T.gather(1, idx).unsqueeze(-1), chol).squeeze(-1)
    return idx, coef


def scatter_codes(idx: Tensor, coef: Tensor, k: int) -> Tensor:
    """Dense S (k x m) from per-column supports idx (m, s) and coefficients (m, s)."""
    S = torch.zeros(k, idx.shape[0], dtype=coef.dtype, device=coef.device)
    S.scatter_(0, idx.T, coef.T)
    return S


def learn_dictionary(Y: Tensor, k: int, s: int, iters: int = 4, power_iters: int = 2, seed: int = 0,
                     D: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor, List[float]]:
    """K-SVD on Y (d x m): (D (d x k), idx (m, s), coef (m, s), relative error after each iteration)."""
    Y = Y.to(torch.float64)
    d, m = Y.shape
    if not 1 <= s <= k:
        raise ValueError(f"need 1 <= s <= k, got s={s}, k={k}")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if D is None:  # start from the leading left singular vectors, then random directions
        u = torch.linalg.svd(Y, full_matrices=False)[0][:, : min(k, d, m)]
        extra = torch.randn(d, k - u.shape[1], generator=gen, dtype=torch.float64).to(Y.device)
        D = torch.cat([u, extra], 1)
    D = D.to(torch.float64) / D.norm(dim=0, keepdim=True).clamp_min(1e-12)
    norm_y = float(Y.norm()) or 1.0
    idx, coef = omp(D, Y, s)
    errors = []
    for _ in range(iters):
        S = scatter_codes(idx, coef, k)
        E = Y - D @ S
        for j in range(k):
            users = (idx == j).any(1).nonzero().squeeze(1)
            if users.numel() == 0:
                worst = E.norm(dim=0).argmax()
                D[:, j] = E[:, worst] / E[:, worst].norm().clamp_min(1e-12)
                continue
            Ej = E[:, users] + torch.outer(D[:, j], S[j, users])
            u = D[:, j]
            v = Ej.T @ u
            for _ in range(power_iters):
                u = Ej @ v
                u = u / u.norm().clamp_min(1e-12)
                v = Ej.T @ u
            D[:, j] = u
            S[j, users] = v
            E[:, users] = Ej - torch.outer(u, v)
        coef = S.gather(0, idx.T).T
        # re-code with the new dictionary; keep a column's code where OMP does worse (error never increases)
        new_idx, new_coef = omp(D, Y, s)
        old_err = (Y - D @ S).norm(dim=0)
        new_err = (Y - D @ scatter_codes(new_idx, new_coef, k)).norm(dim=0)
        better = new_err < old_err
        idx = torch.where(better[:, None], new_idx, idx)
        coef = torch.where(better[:, None], new_coef, coef)
        errors.append(float((Y - D @ scatter_codes(idx, coef, k)).norm()) / norm_y)
    return D, idx, coef, errors


# ---------------------------------------------------------------------------------------------------------
# Whitening


def whitening_factor(xtx: Tensor) -> Tensor:
    """Lower Cholesky factor L of X^T X (float64), with the diagonal shifted until it is positive definite."""
    d = xtx.shape[0]
    shift = 1e-6 * float(torch.diagonal(xtx).mean().clamp_min(1e-12))
    for _ in range(30):
        L, info = torch.linalg.cholesky_ex(xtx + shift * torch.eye(d, dtype=xtx.dtype, device=xtx.device))
        if int(info) == 0:
            return L
        shift *= 2
    raise ValueError("X^T X could not be made positive definite; are the calibration activations finite?")


# ---------------------------------------------------------------------------------------------------------
# Model-level API


@dataclass
class LayerReport:
    name: str
    shape: Tuple[int, int]
    method: str
    params: Dict[str, int]
    functional_error: float  # ||L^T (W^T - W'^T)|| / ||L^T W^T||
    bytes_before: int
    bytes_after: int


@dataclass
class CompressionReport:
    method: str
    ratio: float
    layers: List[LayerReport] = field(default_factory=list)

    @property
    def bytes_before(self) -> int:
        return sum(r.bytes_before for r in self.layers)

    @property
    def bytes_after(self) -> int:
        return sum(r.bytes_after for r in self.layers)

    def __str__(self) -> str:
        lines = [f"{self.method} compression, ratio {self.ratio:.0%} of bytes removed: {len(self.layers)} layers, "
                 f"{self.bytes_before / 1e6:.2f} MB -> {self.bytes_after / 1e6:.2f} MB"]
        for r in self.layers:
            lines.append(f"  {r.name:<45} {str(r.shape):<12} {r.params} err {r.functional_error:.4f} "
                         f"{r.bytes_before / 1e3:.0f} kB -> {r.bytes_after / 1e3:.0f} kB")
        return "\n".join(lines)


def _module_bytes(module: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def collect_gram(model: nn.Module, calib_batches: Iterable, names: List[str]) -> Dict[str, Tensor]:
    """X^T X (float64) of the inputs of each named linear layer over the calibration batches."""
    grams: Dict[str, Tensor] = {}
    hooks = []

    def make_hook(name):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
            grams[name] = grams.get(name, 0) + x.T @ x

        return hook

    for name in names:
        hooks.append(model.get_submodule(name).register_forward_pre_hook(make_hook(name)))
    try:
        with torch.no_grad():
            for batch in calib_batches:
                model(**batch) if isinstance(batch, dict) else model(batch)
    finally:
        for h in hooks:
            h.remove()
    missing = [n for n in names if n not in grams]
    if missing:
        raise ValueError(f"calibration batches never reached layers {missing[:4]}")
    return grams


def compress(model: nn.Module, calib_batches: Iterable, ratio: float = 0.3, method: str = "dictionary",
             filter_fn: Optional[Callable[[str, nn.Linear], bool]] = None, k_over_s: float = 2.0, iters: int = 3,
             shared: bool = False, progress: bool = True) -> CompressionReport:
    """Compress the nn.Linear layers of ``model`` in place; ``method`` is 'dictionary' or 'svd'.

    ``shared=True`` (dictionary only) learns one dictionary for the layers that read the same input (same parent
    module and same calibration Gram matrix, e.g. Q/K/V of an attention block): their whitened matrices are stacked
    side by side, the dictionary is stored once and each layer keeps its own sparse codes.
    """
    from tqdm import tqdm

    from ..nn.dictionary import DictLinear

    if method not in ("dictionary", "svd"):
        raise ValueError(f"method={method!r}; choose 'dictionary' or 'svd'")
    if filter_fn is None:
        def filter_fn(name, _module):
            return name.split(".")[-1] not in DEFAULT_SKIP and not any(p in DEFAULT_SKIP for p in name.split("."))
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and filter_fn(n, m)]
    if not names:
        raise ValueError("no nn.Linear layer matched filter_fn")
    grams = collect_gram(model, calib_batches, names)
    # layers that read the same input (same parent, equal Gram matrices: Q/K/V) share a dictionary when asked
    groups: Dict[Tuple[str, str], List[str]] = {}
    for n in names:
        parent = n.rpartition(".")[0]
        key = None
        if shared and method == "dictionary":
            key = next((k for k, ms in groups.items() if k[0] == parent and torch.equal(grams[ms[0]], grams[n])), None)
        groups.setdefault(key or (parent, n), []).append(n)
    report = CompressionReport(method, ratio)
    for members in tqdm(list(groups.values()), desc=f"{method} compression", disable=not progress):
        linears = [model.get_submodule(n) for n in members]
        L = whitening_factor(grams[members[0]])
        Ys = [L.T @ lin.weight.detach().to(torch.float64).T for lin in linears]  # whitened W^T, d_in x d_out
        d_in = Ys[0].shape[0]
        widths = [Y.shape[1] for Y in Ys]
        dtype = linears[0].weight.dtype
        if method == "svd":
            (lin,), (Y,) = linears, Ys
            r = svd_rank(d_in, Y.shape[1], ratio)
            U, S, Vh = torch.linalg.svd(Y, full_matrices=False)
            A = torch.linalg.solve_triangular(L.T, U[:, :r] * S[:r], upper=True)  # L^{-T} U_r S_r
            first = nn.Linear(d_in, r, bias=False)
            second = nn.Linear(r, Y.shape[1], bias=lin.bias is not None)
            with torch.no_grad():
                first.weight.copy_(A.T.to(dtype))
                second.weight.copy_(Vh[:r].T.to(dtype))
                if lin.bias is not None:
                    second.bias.copy_(lin.bias)
            new_modules = [nn.Sequential(first, second).to(lin.weight.device)]
            approx = [L.T @ (A @ Vh[:r])]
            params = {"rank": r}
        else:
            k, s = dictionary_size(d_in, max(widths), ratio, k_over_s, dtype.itemsize)
            Ycat = torch.cat(Ys, 1)
            Dw, idx, coef, errors = learn_dictionary(Ycat, k, s, iters=iters)
            D = torch.linalg.solve_triangular(L.T, Dw, upper=True)  # L^{-T} D'
            dictionary = nn.Parameter(D.to(dtype))
            new_modules, approx, start = [], [], 0
            for lin, w in zip(linears, widths):
                cols = slice(start, start + w)
                start += w
                values = coef[cols].T.contiguous()  # (s, d_out)
                indices = idx[cols].T.contiguous()
                new_modules.append(DictLinear.from_factors(dictionary, values.to(dtype), indices, lin.bias))
                approx.append(Dw @ scatter_codes(idx[cols], coef[cols], k))
            params = {"k": k, "s": s, "shared_by": len(linears)} if len(linears) > 1 else {"k": k, "s": s}
        for i, (name, lin, new, Y, A) in enumerate(zip(members, linears, new_modules, Ys, approx)):
            err = float((Y - A).norm() / Y.norm().clamp_min(1e-30))
            after = _module_bytes(new)
            if i > 0:  # a shared dictionary is counted with the first layer that uses it
                after -= new.dictionary.numel() * new.dictionary.element_size()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
            report.layers.append(LayerReport(name, tuple(lin.weight.shape), method, params, err, _module_bytes(lin), after))
    return report


def dictionary(model: nn.Module, calib_batches: Iterable, ratio: float = 0.3, filter_fn=None, **opts) -> CompressionReport:
    """CoSpaDi-style dictionary compression of ``model``'s linear layers in place (see :func:`compress`)."""
    return compress(model, calib_batches, ratio, "dictionary", filter_fn, **opts)


def svd(model: nn.Module, calib_batches: Iterable, ratio: float = 0.3, filter_fn=None, **opts) -> CompressionReport:
    """Data-aware truncated-SVD compression (SVD-LLM style) at the same byte budget, as a baseline."""
    return compress(model, calib_batches, ratio, "svd", filter_fn, **opts)
