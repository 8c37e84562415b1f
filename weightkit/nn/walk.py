"""The one walk over a model's nn.Linear layers, and the report of what replaced them.

``weightkit.swap`` (a layer class per linear, data-free) and ``weightkit.compress`` (factorizations learned on
calibration inputs) both pick their layers with :func:`linear_layers`, put the new module in place with
:func:`replace_module`, count bytes with :func:`module_bytes` and return a :class:`ModelReport`: one skip rule, one
report format. Method names are canonical across both (:func:`canonical_method`): ``"int8"``, ``"memoryformer"``,
``"dictionary"`` (and ``"svd"`` for compress); the old spellings ``"memory"`` and ``"dict"`` still work for now
with a DeprecationWarning naming the new one.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable, Collection, Dict, List, Optional, Tuple

from torch import nn

# Output heads are kept dense by default: a layer is skipped when any part of its qualified name is one of these
# (``lm_head``, ``cls.predictions.lm_head.dense``, BERT's ``pooler.dense``). The one default of every model-wide
# choice: ``swap`` and ``compress`` leave these layers alone, ``weightkit.optim.param_groups`` and the transformers
# integration's ``"all-linear"`` train them dense instead of with GaLore.
DEFAULT_SKIP = ("lm_head", "pooler")

# old method spelling -> canonical name (swap took "memory" and "dict" before the names were unified)
RENAMED_METHODS: Dict[str, str] = {"memory": "memoryformer", "dict": "dictionary"}

FilterFn = Callable[[str, nn.Linear], bool]


def skipped_by_default(name: str) -> bool:
    """True when ``name`` (a qualified module name) is one that the default rule keeps dense (see DEFAULT_SKIP)."""
    return any(part in DEFAULT_SKIP for part in name.split("."))


def layer_filter(filter_fn: Optional[FilterFn]) -> FilterFn:
    """``filter_fn``, checked to be callable, or the rule of :data:`DEFAULT_SKIP` for None."""
    if filter_fn is None:
        return lambda name, _module: not skipped_by_default(name)
    if not callable(filter_fn):
        raise TypeError(f"filter_fn must be a callable filter_fn(name, module) -> bool, got {type(filter_fn).__name__}")
    return filter_fn


def linear_layers(model: nn.Module, filter_fn: Optional[FilterFn] = None,
                  skipped: Optional[List[Tuple[str, str]]] = None) -> List[Tuple[str, nn.Linear]]:
    """``(qualified name, layer)`` of every ``nn.Linear`` of ``model`` (exactly that class: subclasses and
    weightkit layers are left alone) that ``filter_fn(name, layer)`` accepts, in ``named_modules`` order.

    ``filter_fn`` defaults to the rule of :data:`DEFAULT_SKIP`. The names of the layers it rejects are appended to
    ``skipped`` as ``(name, "filtered out")`` when a list is given."""
    filter_fn = layer_filter(filter_fn)
    chosen = []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear:
            continue
        if filter_fn(name, module):
            chosen.append((name, module))
        elif skipped is not None:
            skipped.append((name, "filtered out"))
    return chosen


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where ``model.get_submodule(name)`` is."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def stored_tensors(t) -> list:
    """The plain tensors that hold ``t``'s data: itself, or those a wrapper subclass holds (Int8Linear's weight
    presents float32 but stores int8 values and float32 group scales, and has no storage of its own)."""
    if hasattr(t, "__tensor_flatten__"):
        return [x for name in t.__tensor_flatten__()[0] for x in stored_tensors(getattr(t, name))]
    return [t]


def module_bytes(module: nn.Module) -> int:
    """Bytes of a module's distinct parameters and buffers as stored (a tensor shared between two places counts
    once; a wrapper subclass counts the tensors it holds)."""
    seen, total = set(), 0
    for t in (x for p in list(module.parameters()) + list(module.buffers()) for x in stored_tensors(p)):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def canonical_method(method: str, methods: Collection[str], caller: str) -> str:
    """``method`` if it is one of ``methods``; an old spelling (RENAMED_METHODS) maps to its new name with a
    DeprecationWarning; anything else raises ValueError naming the choices."""
    if isinstance(method, str) and method in RENAMED_METHODS and RENAMED_METHODS[method] in methods:
        new = RENAMED_METHODS[method]
        warnings.warn(f"{caller}: method={method!r} is now called {new!r}; the old name will be removed",
                      DeprecationWarning, stacklevel=3)
        return new
    if not isinstance(method, str) or method not in methods:
        raise ValueError(f"method={method!r} is not a {caller} method; choose one of {', '.join(sorted(methods))}")
    return method


@dataclass
class LayerChange:
    """One replaced nn.Linear: its qualified name, weight shape (out, in) and bytes before and after."""

    name: str
    shape: Tuple[int, int]
    bytes_before: int
    bytes_after: int

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def out_features(self) -> int:
        return self.shape[0]

    def details(self) -> str:
        """What the method adds to the layer's line in the report (none here)."""
        return ""


@dataclass
class ModelReport:
    """What a model-wide replacement did: the replaced layers and the skipped ones, with the reason."""

    method: str
    layers: List[LayerChange] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)  # (name, why)

    @property
    def bytes_before(self) -> int:
        return sum(r.bytes_before for r in self.layers)

    @property
    def bytes_after(self) -> int:
        return sum(r.bytes_after for r in self.layers)

    def title(self) -> str:
        return f"{self.method}: replaced {len(self.layers)} nn.Linear, skipped {len(self.skipped)}"

    def __str__(self) -> str:
        lines = [self.title()]
        for r in self.layers:
            details = r.details()
            lines.append(f"  {r.name:<40} {r.in_features:>6} -> {r.out_features:<6} {r.bytes_before / 1e6:8.3f} MB -> "
                         f"{r.bytes_after / 1e6:8.3f} MB" + (f"  {details}" if details else ""))
        for name, why in self.skipped:
            lines.append(f"  {name:<40} skipped: {why}")
        if self.layers:
            lines.append(f"  total {self.bytes_before / 1e6:.3f} MB -> {self.bytes_after / 1e6:.3f} MB "
                         f"({self.bytes_after / max(self.bytes_before, 1):.1%})")
        return "\n".join(lines)
