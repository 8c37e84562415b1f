"""``weightkit.swap``: replace the nn.Linear layers of a model in place, and say what was replaced."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import List, Optional

from torch import nn

from .dictionary import DictLinear
from .int8 import Int8Linear
from .memoryformer import MemoryLinear
from .walk import FilterFn, LayerChange, ModelReport, canonical_method, linear_layers, module_bytes, replace_module

# method name -> layer class; each provides ``from_linear(linear, **opts)``
METHODS = {"int8": Int8Linear, "memoryformer": MemoryLinear, "dictionary": DictLinear}


@dataclass
class SwapReport(ModelReport):
    @property
    def replaced(self) -> List[LayerChange]:
        """The replaced layers (``layers``, under the name swap has always used)."""
        return self.layers

    def title(self) -> str:
        return (f"weightkit.swap(method={self.method!r}): replaced {len(self.layers)} nn.Linear, "
                f"skipped {len(self.skipped)}")


def swap(model: nn.Module, method: str, filter_fn: Optional[FilterFn] = None, **opts) -> SwapReport:
    """Replace ``nn.Linear`` modules of ``model`` in place with weightkit layers.

    Args:
        model: any nn.Module (Hugging Face models included).
        method: ``'int8'`` (Int8Linear), ``'memoryformer'`` (MemoryLinear) or ``'dictionary'`` (DictLinear,
            data-free K-SVD; ``weightkit.compress`` learns one on calibration inputs instead). The old names
            ``'memory'`` and ``'dict'`` still work with a DeprecationWarning.
        filter_fn: ``filter_fn(name, linear) -> bool`` picks the layers to replace; by default every nn.Linear
            except the output heads (a name part in ``weightkit.nn.walk.DEFAULT_SKIP``: ``lm_head``, ``pooler``).
        **opts: passed to the class's ``from_linear`` (e.g. ``group_size=128``, ``tau=8``, ``ratio=0.3``).

    Returns a :class:`SwapReport` naming each replaced layer with its bytes before and after. A layer that the
    method cannot take (``from_linear`` raising ValueError, e.g. in_features not divisible by tau) is skipped and
    reported with the reason; nothing else is changed. An option that no layer could take (an unknown name:
    TypeError; a value out of range, e.g. ``ratio=2``, ``group_size=0``: ValueError) raises before any layer is
    replaced.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    method = canonical_method(method, METHODS, "swap")
    cls = METHODS[method]
    known = [p for p in inspect.signature(cls.from_linear).parameters if p != "linear"]
    unknown = sorted(set(opts) - set(known))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown} for method={method!r}: {cls.__name__}.from_linear takes "
                        f"{', '.join(known)}")
    cls.check_options(**opts)
    report = SwapReport(method)
    for name, linear in linear_layers(model, filter_fn, report.skipped):
        try:
            new = cls.from_linear(linear, **opts)
        except ValueError as exc:
            report.skipped.append((name, str(exc)))
            continue
        replace_module(model, name, new)
        report.layers.append(LayerChange(name, tuple(linear.weight.shape), module_bytes(linear), module_bytes(new)))
    return report
