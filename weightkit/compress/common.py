"""What the post-training compressors share: calibration Gram matrices, whitening, the layer choice and the report.

For a linear layer y = x W^T with calibration inputs X, the functional error ||X W^T - X W'^T||_F equals
||L^T (W^T - W'^T)||_F for the Cholesky factor L of X^T X (C = L L^T). Every method therefore factors the whitened
matrix Y = L^T W^T (d_in x d_out) and maps its factors back with L^{-T}. When X^T X is singular (fewer calibration
tokens than features, dead features) the diagonal is shifted by 1e-6 of its mean, doubling until Cholesky succeeds.

Byte accounting: ``ratio`` is the fraction of each dense weight's bytes removed, so a compressed weight must fit
in (1 - ratio) d_in d_out b bytes (b bytes per value, the weight's dtype). Biases are kept as they are and counted
on both sides of the report.

The layers are picked by weightkit.nn.walk.linear_layers, the walk weightkit.swap uses (same default skip rule:
output heads ``lm_head`` / ``pooler`` stay dense), and the report extends swap's (weightkit.nn.walk.ModelReport).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Union

import torch
from torch import Tensor, nn

from ..nn.walk import FilterFn, LayerChange, ModelReport, linear_layers


# progress=callable: called as progress(done, total, layer_name) after each step of the work
ProgressFn = Callable[[int, int, str], None]


def work_device(device) -> Optional[torch.device]:
    """The device the factorizations run on: None (each layer's own device) or a usable torch.device."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device={device!r} is not a torch device ({exc})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}: torch sees no CUDA device")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r}: the compressors run on 'cpu' or 'cuda'")
    return dev


class Progress:
    """Steps of a compression run, reported to a tqdm bar (``progress=True``), to a callable
    ``progress(done, total, layer_name)``, or nowhere (``False``)."""

    def __init__(self, progress: Union[bool, ProgressFn], total: int, desc: str):
        self.done, self.total, self.fn, self.bar = 0, total, None, None
        if isinstance(progress, bool):
            if progress:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=desc)
        elif callable(progress):
            self.fn = progress
        else:
            raise ValueError(f"progress must be a bool or a callable (done, total, layer_name), got {progress!r}")

    def layer_bar(self, name: str, total: int):
        """A second tqdm bar for one layer's inner work (``total`` units), below the run's; None without bars."""
        if self.bar is None:
            return None
        from tqdm import tqdm

        return tqdm(total=total, desc=f"  {name}", leave=False, unit="col-step", unit_scale=True)

    def step(self, name: str) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix_str(name, refresh=False)
            self.bar.update()
        if self.fn is not None:
            self.fn(self.done, self.total, name)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def whitening_factor(xtx: Tensor, name: str = "") -> Tensor:
    """Lower Cholesky factor L of X^T X (float64), with the diagonal shifted until it is positive definite."""
    xtx = xtx.to(torch.float64)
    if not bool(torch.isfinite(xtx).all()):
        where = f" of layer {name!r}" if name else ""
        raise ValueError(f"calib_batches: the calibration inputs{where} have non-finite values (X^T X has NaN or "
                         f"Inf entries); are the calibration activations finite?")
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
class LayerReport(LayerChange):
    """A compressed layer: the common fields (name, weight shape (out, in), bytes; a shared dictionary is counted
    once, with the first layer that uses it) and the method's own."""

    method: str
    params: Dict[str, int]
    functional_error: float  # ||X W^T - X W'^T|| / ||X W^T|| on the calibration inputs
    history: List[float] = field(default_factory=list)  # functional error after each learning iteration

    def details(self) -> str:
        return f"{self.params} err {self.functional_error:.4f}"


@dataclass
class CompressionReport(ModelReport):
    ratio: float = field(kw_only=True)  # the fraction of each weight's bytes removed

    def title(self) -> str:
        return (f"{self.method} compression, {self.ratio:.0%} of the weights' bytes removed: {len(self.layers)} "
                f"layers, {self.bytes_before / 1e6:.3f} MB -> {self.bytes_after / 1e6:.3f} MB")


def chosen_layers(model: nn.Module, filter_fn: Optional[FilterFn], report: CompressionReport) -> List[str]:
    """Names of the layers to compress (weightkit.nn.walk.linear_layers); the rejected ones go to the report."""
    names = [name for name, _ in linear_layers(model, filter_fn, report.skipped)]
    if not names:
        raise ValueError("no nn.Linear layer matched filter_fn")
    return names
