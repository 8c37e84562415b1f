"""What the post-training compressors share: calibration Gram matrices, whitening, the report, the layer walk.

For a linear layer y = x W^T with calibration inputs X, the functional error ||X W^T - X W'^T||_F equals
||L^T (W^T - W'^T)||_F for the Cholesky factor L of X^T X (C = L L^T). Every method therefore factors the whitened
matrix Y = L^T W^T (d_in x d_out) and maps its factors back with L^{-T}. When X^T X is singular (fewer calibration
tokens than features, dead features) the diagonal is shifted by 1e-6 of its mean, doubling until Cholesky succeeds.

Byte accounting: ``ratio`` is the fraction of each dense weight's bytes removed, so a compressed weight must fit
in (1 - ratio) d_in d_out b bytes (b bytes per value, the weight's dtype). Biases are kept as they are and counted
on both sides of the report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor, nn

DEFAULT_SKIP = ("lm_head", "pooler")


def check_ratio(ratio: float) -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio (fraction of the weight's bytes removed) must be in (0, 1), got {ratio!r}")


def whitening_factor(xtx: Tensor) -> Tensor:
    """Lower Cholesky factor L of X^T X (float64), with the diagonal shifted until it is positive definite."""
    xtx = xtx.to(torch.float64)
    if not bool(torch.isfinite(xtx).all()):
        raise ValueError("X^T X has non-finite entries; are the calibration activations finite?")
    d = xtx.shape[0]
    shift = 1e-6 * float(torch.diagonal(xtx).abs().mean().clamp_min(1e-12))
    eye = torch.eye(d, dtype=xtx.dtype, device=xtx.device)
    for _ in range(60):
        L, info = torch.linalg.cholesky_ex(xtx + shift * eye)
        if int(info) == 0:
            return L
        shift *= 2
    raise ValueError("X^T X could not be made positive definite by shifting its diagonal")


def collect_gram(model: nn.Module, calib_batches: Iterable, names: List[str]) -> Dict[str, Tensor]:
    """X^T X (float64) of the inputs of each named layer over the calibration batches (dicts are passed as kwargs)."""
    grams: Dict[str, Tensor] = {}

    def make_hook(name):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
            grams[name] = grams.get(name, 0) + x.T @ x

        return hook

    hooks = [model.get_submodule(n).register_forward_pre_hook(make_hook(n)) for n in names]
    try:
        with torch.no_grad():
            for batch in calib_batches:
                model(**batch) if isinstance(batch, dict) else model(batch)
    finally:
        for h in hooks:
            h.remove()
    missing = [n for n in names if n not in grams]
    if missing:
        raise ValueError(f"calibration batches never reached layers {missing[:4]} (empty calib_batches?)")
    return grams


@dataclass
class LayerReport:
    name: str
    shape: Tuple[int, int]  # nn.Linear weight shape (out, in)
    method: str
    params: Dict[str, int]
    functional_error: float  # ||X W^T - X W'^T|| / ||X W^T|| on the calibration inputs
    bytes_before: int
    bytes_after: int  # a shared dictionary is counted once, with the first layer that uses it
    history: List[float] = field(default_factory=list)  # functional error after each learning iteration


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
        lines = [f"{self.method} compression, {self.ratio:.0%} of the weights' bytes removed: {len(self.layers)} "
                 f"layers, {self.bytes_before / 1e6:.3f} MB -> {self.bytes_after / 1e6:.3f} MB"]
        for r in self.layers:
            lines.append(f"  {r.name:<45} {str(r.shape):<12} {r.params} err {r.functional_error:.4f} "
                         f"{r.bytes_before / 1e3:.0f} kB -> {r.bytes_after / 1e3:.0f} kB")
        return "\n".join(lines)


def module_bytes(module: nn.Module) -> int:
    """Bytes of a module's distinct parameters and buffers."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def linear_names(model: nn.Module, filter_fn: Optional[Callable[[str, nn.Module], bool]]) -> List[str]:
    if filter_fn is None:
        def filter_fn(name, _module):
            return not any(part in DEFAULT_SKIP for part in name.split("."))
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and filter_fn(n, m)]
    if not names:
        raise ValueError("no nn.Linear layer matched filter_fn")
    return names


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def compress(model: nn.Module, calib_batches: Iterable, ratio: float = 0.3, method: str = "dictionary",
             filter_fn: Optional[Callable[[str, nn.Module], bool]] = None, progress: bool = True,
             **opts) -> CompressionReport:
    """Compress ``model``'s nn.Linear layers in place with ``method`` 'dictionary' or 'svd' at the same byte
    budget. Dictionary-only options (``k_over_s``, ``iters``, ``power_iters``, ``shared``, ``seed``) are ignored by
    'svd', so one call signature runs both."""
    from .dictionary import dictionary
    from .svd import svd

    if method == "dictionary":
        return dictionary(model, calib_batches, ratio, filter_fn, progress=progress, **opts)
    if method == "svd":
        unknown = set(opts) - {"k_over_s", "iters", "power_iters", "shared", "seed"}
        if unknown:
            raise TypeError(f"unknown option(s) {sorted(unknown)} for method='svd'")
        return svd(model, calib_batches, ratio, filter_fn, progress=progress)
    raise ValueError(f"method={method!r}; choose 'dictionary' or 'svd'")
