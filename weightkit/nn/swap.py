"""``weightkit.swap``: replace the nn.Linear layers of a model in place, and say what was replaced."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

from torch import nn

# method name -> (module, class); each class provides ``from_linear(linear, **opts)``.
METHODS = {
    "int8": ("weightkit.nn.int8", "Int8Linear"),
    "memory": ("weightkit.nn.memoryformer", "MemoryLinear"),
    "dict": ("weightkit.nn.dictionary", "DictLinear"),
}

DEFAULT_SKIP = ("lm_head",)  # output heads are usually kept dense


def _tensor_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


@dataclass
class Replacement:
    name: str
    in_features: int
    out_features: int
    bytes_before: int
    bytes_after: int


@dataclass
class SwapReport:
    method: str
    replaced: List[Replacement] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)  # (name, why)

    @property
    def bytes_before(self) -> int:
        return sum(r.bytes_before for r in self.replaced)

    @property
    def bytes_after(self) -> int:
        return sum(r.bytes_after for r in self.replaced)

    def __str__(self) -> str:
        lines = [f"weightkit.swap(method={self.method!r}): replaced {len(self.replaced)} nn.Linear, skipped {len(self.skipped)}"]
        for r in self.replaced:
            lines.append(f"  {r.name:<40} {r.in_features:>6} -> {r.out_features:<6} {r.bytes_before / 1e6:8.3f} MB -> {r.bytes_after / 1e6:8.3f} MB")
        for name, why in self.skipped:
            lines.append(f"  {name:<40} skipped: {why}")
        if self.replaced:
            lines.append(f"  total {self.bytes_before / 1e6:.3f} MB -> {self.bytes_after / 1e6:.3f} MB "
                         f"({self.bytes_after / max(self.bytes_before, 1):.1%})")
        return "\n".join(lines)


def _resolve(method: str):
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not a swap method; choose one of {', '.join(sorted(METHODS))}")
    module_name, class_name = METHODS[method]
    return getattr(importlib.import_module(module_name), class_name)


def swap(model: nn.Module, method: str, filter_fn: Optional[Callable[[str, nn.Linear], bool]] = None, **opts) -> SwapReport:
    """Replace ``nn.Linear`` modules of ``model`` in place with weightkit layers.

    Args:
        model: any nn.Module (Hugging Face models included).
        method: ``'int8'`` (Int8Linear), ``'memory'`` (MemoryLinear) or ``'dict'`` (DictLinear, data-free).
        filter_fn: ``filter_fn(name, linear) -> bool`` picks the layers to replace; by default every nn.Linear
            except those whose name ends in one of ``DEFAULT_SKIP`` (the output head).
        **opts: passed to the class's ``from_linear`` (e.g. ``group_size=128``, ``tau=8``, ``ratio=0.3``).

    Returns a :class:`SwapReport` naming each replaced layer with its bytes before and after. A layer that the
    method cannot take (``from_linear`` raising ValueError, e.g. in_features not divisible by tau) is skipped and
    reported with the reason; nothing else is changed.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    cls = _resolve(method)
    if filter_fn is None:
        def filter_fn(name, _module):
            return not name.split(".")[-1] in DEFAULT_SKIP
    report = SwapReport(method)
    targets = [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear]
    for name, linear in targets:
        if not filter_fn(name, linear):
            report.skipped.append((name, "filtered out"))
            continue
        try:
            new = cls.from_linear(linear, **opts)
        except ValueError as exc:
            report.skipped.append((name, str(exc)))
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
        report.replaced.append(Replacement(name, linear.in_features, linear.out_features, _tensor_bytes(linear), _tensor_bytes(new)))
    return report
