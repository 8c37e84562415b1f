"""``weightkit.compress.compress``: one call signature for every compression method, picked by name."""

from __future__ import annotations

from typing import Iterable, Optional, Union

from torch import nn

from ..nn.walk import FilterFn, canonical_method
from .common import CompressionReport, ProgressFn
from .dictionary import dictionary
from .svd import svd

METHODS = {"dictionary": dictionary, "svd": svd}

# options only the dictionary method has; 'svd' ignores them, so one call runs both at the same budget
DICTIONARY_ONLY = frozenset({"k_over_s", "iters", "power_iters", "shared", "seed", "dtype", "growth",
                             "selection_precision", "tf32"})


def compress(model: nn.Module, calib_batches: Iterable, ratio: float = 0.3, method: str = "dictionary",
             filter_fn: Optional[FilterFn] = None, progress: Union[bool, ProgressFn] = True, device=None,
             **opts) -> CompressionReport:
    """Compress ``model``'s nn.Linear layers in place with ``method`` ``'dictionary'`` (weightkit.compress.dictionary)
    or ``'svd'`` (weightkit.compress.svd) at the same byte budget, ``ratio`` of each weight's bytes removed.
    Dictionary-only options (``k_over_s``, ``iters``, ``power_iters``, ``shared``, ``seed``, ``dtype``, ``growth``,
    ``selection_precision``, ``tf32``) are ignored by 'svd'; any other option raises TypeError. ``progress``
    (True: a tqdm bar; a callable: ``progress(done, total, layer_name)``) and ``device`` (where the factorizations
    run; default: each layer's device) apply to both."""
    method = canonical_method(method, METHODS, "compress")
    if method == "svd":
        unknown = set(opts) - DICTIONARY_ONLY
        if unknown:
            raise TypeError(f"unknown option(s) {sorted(unknown)} for method='svd'")
        return svd(model, calib_batches, ratio, filter_fn, progress=progress, device=device)
    return dictionary(model, calib_batches, ratio, filter_fn, progress=progress, device=device, **opts)
