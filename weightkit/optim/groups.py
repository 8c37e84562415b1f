"""``param_groups``: split a model's parameters into GaLore groups (2-D attention/MLP weights) and the rest."""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

from torch import nn

from ..nn.int8 import Int8Weight
from ..nn.walk import layer_filter


def param_groups(
    model: nn.Module,
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    proj_type: str = "std",
    filter_fn: Optional[Callable[[str, nn.Module], bool]] = None,
    **group_opts,
) -> List[Dict]:
    """Parameter groups for GaLoreAdamW / QGaLoreAdamW8bit.

    The GaLore group holds the 2-D weights of linear layers (nn.Linear and weightkit's Int8Linear) inside the
    transformer blocks — attention and MLP projections — chosen by ``filter_fn(name, module)`` (default: every such
    layer except the output heads, by the rule ``swap`` and ``compress`` use: ``weightkit.nn.walk.DEFAULT_SKIP``).
    Embeddings, norms, biases and the heads go to a plain AdamW group. Extra keyword arguments (e.g.
    ``weight_decay``) are set on both groups. Every trainable parameter appears exactly once.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    filter_fn = layer_filter(filter_fn)
    low_rank, seen = [], set()
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        int8 = isinstance(weight, Int8Weight)  # Int8Linear's weight: an ordinary parameter with a float .grad
        if not (isinstance(module, nn.Linear) or int8) or not isinstance(weight, nn.Parameter) or weight.dim() != 2:
            continue
        if not weight.requires_grad:
            continue
        if filter_fn(name, module):
            low_rank.append(weight)
            seen.add(id(weight))
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in seen]
    groups = []
    if low_rank:
        groups.append({"params": low_rank, "rank": rank, "update_proj_gap": update_proj_gap, "scale": scale,
                       "proj_type": proj_type, **group_opts})
    if rest:
        groups.append({"params": rest, **group_opts})
    return groups
