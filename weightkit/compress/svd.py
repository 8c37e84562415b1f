"""Data-aware truncated SVD (SVD-LLM style), the baseline for the dictionary compressor at the same bytes.

With Y = L^T W^T the whitened weight (weightkit.compress.common), the best rank-r functional approximation is the
truncated SVD Y ~ U_r S_r V_r^T, so W'^T = (L^{-T} U_r S_r) V_r^T: two linear layers d_in -> r -> d_out storing
r (d_in + d_out) values. r is the largest rank with r (d_in + d_out) b <= (1 - ratio) d_in d_out b.
"""

from __future__ import annotations

from typing import Iterable, Optional, Union

import torch
from torch import nn

from ..nn.ksvd import check_ratio
from ..nn.walk import FilterFn, module_bytes, replace_module
from .common import (CompressionReport, LayerReport, Progress, ProgressFn, chosen_layers, collect_gram, whitening_factor,
                     work_device)

__all__ = ["svd", "svd_rank"]


def svd_rank(d_in: int, d_out: int, ratio: float) -> int:
    """The largest rank whose two factors fit in (1 - ratio) of the dense weight's bytes."""
    check_ratio(ratio)
    r = int((1.0 - ratio) * d_in * d_out // (d_in + d_out))
    if r < 1:
        raise ValueError(f"ratio={ratio} leaves no room for a rank-1 factorization of a {d_in}x{d_out} weight")
    return r


def svd(model: nn.Module, calib_batches: Iterable, ratio: float = 0.3,
        filter_fn: Optional[FilterFn] = None, progress: Union[bool, ProgressFn] = True, device=None
        ) -> CompressionReport:
    """Replace each selected nn.Linear by ``nn.Sequential(Linear(d_in, r), Linear(r, d_out))`` in place; returns
    the per-layer functional error and bytes. ``progress`` and ``device`` (where the whitening and the SVD run) as
    in weightkit.compress.dictionary; the new layers are put where the replaced ones were."""
    check_ratio(ratio)
    work = work_device(device)
    report = CompressionReport("svd", ratio=ratio)
    names = chosen_layers(model, filter_fn, report)
    grams = collect_gram(model, calib_batches, names)
    steps = Progress(progress, len(names), "svd compression")
    for name in names:
        lin = model.get_submodule(name)
        dev = work or lin.weight.device
        L = whitening_factor(grams[name].to(dev))
        Y = L.T @ lin.weight.detach().to(dev, torch.float64).T  # d_in x d_out
        d_in, d_out = Y.shape
        r = svd_rank(d_in, d_out, ratio)
        U, S, Vh = torch.linalg.svd(Y, full_matrices=False)
        A = torch.linalg.solve_triangular(L.T, U[:, :r] * S[:r], upper=True)  # L^{-T} U_r S_r
        dtype, home = lin.weight.dtype, lin.weight.device
        first = nn.Linear(d_in, r, bias=False, device=home, dtype=dtype)
        second = nn.Linear(r, d_out, bias=lin.bias is not None, device=home, dtype=dtype)
        with torch.no_grad():
            first.weight.copy_(A.T)
            second.weight.copy_(Vh[:r].T)
            if lin.bias is not None:
                second.bias.copy_(lin.bias)
        new = nn.Sequential(first, second)
        err = float(S[r:].norm() / S.norm().clamp_min(1e-300))
        report.layers.append(LayerReport(name, tuple(lin.weight.shape), module_bytes(lin), module_bytes(new), "svd",
                                         {"rank": r}, err))
        replace_module(model, name, new)
        steps.step(name)
    steps.close()
    return report
