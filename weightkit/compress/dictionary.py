"""Calibration-guided dictionary compression (CoSpaDi, arXiv 2509.22075).

Each weight's whitened transpose Y = L^T W^T (d_in x d_out; see weightkit.compress.common) is factored as
Y ~ D' S, D' (d_in x k) with unit-norm atoms and S (k x d_out) with exactly s nonzeros per column, by K-SVD with
batched OMP (weightkit.nn.ksvd, the maths DictLinear.from_linear also learns with), so the functional error is
non-increasing from one iteration to the next (``LayerReport.history``). Finally D = L^{-T} D' and the layer
becomes a :class:`weightkit.nn.DictLinear`.

Byte accounting (b bytes per value; weightkit.nn.ksvd.dictionary_size): a dictionary layer stores d_in k b and S in
the bitmask format, d_out (s b + ceil(k/32) (4 + ob)) bytes (ob: 1 or 2 bytes per word offset); s is the largest with
k = round(k_over_s s) that fits in (1 - ratio) d_in d_out b.
With ``shared=True`` the layers that read the same input (same parent module, equal calibration Gram matrix, e.g.
Q/K/V of an attention block) share one dictionary, stored once; the budget is then the group's total, so their s
is larger. The SVD baseline (weightkit.compress.svd) gets (1 - ratio) d_in d_out b per layer as well.

Precision and devices: Gram matrices, whitening and D = L^{-T} D' are float64; OMP and K-SVD run in ``dtype``
(float32; float64 is the reference) on ``device``. On CUDA the matmul that only selects OMP's atoms is bf16
(``selection_precision="auto"``; measured on all-MiniLM-L6-v2 with the CPU's emulation of bf16 products: the same
embedding cosine as float32, see bench/test_bench_compress.py), and float32 matmuls use TF32 only when
torch.backends.cuda.matmul.allow_tf32 or ``tf32=True`` allows it. With ``progress=True`` a second bar follows the
layer being learned (OMP steps and atom updates).

Note: ``weightkit.compress.dictionary`` (the package attribute) is the function :func:`dictionary`.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..nn.dictionary import DictLinear
from ..nn.ksvd import (DEFAULT_GROWTH, SELECTION_PRECISIONS, check_growth, check_int, check_k_over_s, check_ratio,
                       dictionary_size, ksvd_work, learn_dictionary, scatter_codes)
from ..nn.walk import FilterFn, module_bytes, replace_module
from .common import (CompressionReport, LayerReport, Progress, ProgressFn, chosen_layers, collect_gram, whitening_factor,
                     work_device)

__all__ = ["dictionary"]


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
               filter_fn: Optional[FilterFn] = None, k_over_s: float = 2.0, iters: int = 3,
               power_iters: int = 2, shared: bool = False, seed: int = 0, progress: Union[bool, ProgressFn] = True,
               device=None, dtype: torch.dtype = torch.float32, growth: float = DEFAULT_GROWTH,
               selection_precision: str = "auto", tf32: Optional[bool] = None) -> CompressionReport:
    """Replace ``model``'s selected nn.Linear layers (default: all but ``lm_head``/``pooler``) in place by
    :class:`weightkit.nn.DictLinear` factors learned on the calibration inputs; see the module docstring.

    Args:
        calib_batches: iterable of model inputs (tensors, or dicts passed as keyword arguments).
        ratio: fraction of each weight's bytes removed (index bytes included), in (0, 1).
        filter_fn: ``(name, module) -> bool`` selecting the layers.
        k_over_s: atoms per nonzero (CoSpaDi uses 2).
        iters, power_iters: K-SVD iterations and power iterations per atom update.
        shared: one dictionary per group of layers reading the same input (e.g. Q/K/V).
        progress: tqdm bars (True: one for the run, one per layer (group) following its OMP steps), nothing
            (False), or ``progress(done, total, layer_name)`` called after each K-SVD iteration of each layer (group).
        device: where whitening, OMP and K-SVD run (e.g. ``"cuda"`` for a model kept on the CPU); default: each
            layer's own device. The calibration forward runs where the model is; the new layers are put where
            the replaced ones were.
        dtype: the precision of OMP and K-SVD (float32; float64 for a reference run). The whitening is float64.
        growth, selection_precision: OMP's atoms per step and the precision of its atom-selection matmul
            (weightkit.nn.ksvd.omp; ``"auto"``: bf16 on CUDA, fp32 on the CPU).
        tf32: True allows TF32 in the float32 matmuls on CUDA for this call, False forbids it, None keeps
            torch.backends.cuda.matmul.allow_tf32.
    Returns a :class:`CompressionReport` with each layer's functional error, its per-iteration history and bytes.
    """
    check_ratio(ratio)  # the arguments before the calibration forward, which may take long
    check_k_over_s(k_over_s)
    check_int("iters", iters, 0)
    check_int("power_iters", power_iters, 0)
    check_growth(growth)
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype (the precision of OMP and K-SVD) must be torch.float32 or torch.float64, got {dtype}")
    if selection_precision not in SELECTION_PRECISIONS:
        raise ValueError(f"selection_precision must be one of {', '.join(SELECTION_PRECISIONS)}, "
                         f"got {selection_precision!r}")
    work = work_device(device)
    report = CompressionReport("dictionary", ratio=ratio)
    names = chosen_layers(model, filter_fn, report)
    grams = collect_gram(model, calib_batches, names)
    groups = _groups(names, grams, shared)
    steps = Progress(progress, len(groups) * max(iters, 1), "dictionary compression")
    for members in groups:
        linears = [model.get_submodule(n) for n in members]
        home, weight_dtype = linears[0].weight.device, linears[0].weight.dtype
        dev = work or home
        L = whitening_factor(grams[members[0]].to(dev))
        Ys = [L.T @ lin.weight.detach().to(dev, torch.float64).T for lin in linears]
        d_in, widths = Ys[0].shape[0], [Y.shape[1] for Y in Ys]
        k, s = dictionary_size(d_in, sum(widths), ratio, k_over_s, weight_dtype.itemsize)
        Ycat = torch.cat(Ys, 1)
        bar = steps.layer_bar(members[0], ksvd_work(Ycat.shape[1], s, iters, growth))
        try:
            Dw, idx, coef, errors = learn_dictionary(
                Ycat, k, s, iters=iters, power_iters=power_iters, seed=seed, dtype=dtype, growth=growth,
                selection_precision=selection_precision, tf32=tf32, tick=bar.update if bar is not None else None,
                progress=(lambda: steps.step(members[0])) if iters else None)
        finally:
            if bar is not None:
                bar.close()
        if not iters:
            steps.step(members[0])
        Dw, idx, coef = Dw.to(torch.float64), idx, coef.to(torch.float64)
        D = torch.linalg.solve_triangular(L.T, Dw, upper=True)  # L^{-T} D'
        shared_d = nn.Parameter(D.to(home, weight_dtype))
        params = {"k": k, "s": s} | ({"shared_by": len(members)} if len(members) > 1 else {})
        start = 0
        for i, (name, lin, Y, w) in enumerate(zip(members, linears, Ys, widths)):
            sl = slice(start, start + w)
            start += w
            new = DictLinear.from_factors(shared_d, coef[sl].T.to(home, weight_dtype).contiguous(),
                                          idx[sl].T.to(home).contiguous(), lin.bias)
            err = float((Y - Dw @ scatter_codes(idx[sl], coef[sl], k)).norm() / Y.norm().clamp_min(1e-300))
            after = module_bytes(new) - (shared_d.numel() * shared_d.element_size() if i else 0)
            report.layers.append(LayerReport(name, tuple(lin.weight.shape), module_bytes(lin), after, "dictionary",
                                             dict(params), err, list(errors)))  # a group's history
            replace_module(model, name, new)
    steps.close()
    return report
