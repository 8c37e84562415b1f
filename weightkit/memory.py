"""Where a training step's peak memory goes: weights, optimizer state, gradients, activations and the rest.

:func:`peak_breakdown` splits a measured peak (``torch.cuda.max_memory_allocated``, or the CPU's peak RSS) into

* ``weights`` -- the model's parameters and buffers (int8 weights and their scales for Int8Linear layers), measured;
* ``optimizer_state`` -- every tensor in the optimizer state (bases, moments, ...), measured;
* ``gradients`` -- the gradients alive at once: every trainable parameter's (float32 for Int8Linear weights, the
  parameter's dtype otherwise) for a step after backward; the largest single one for layer-wise stepping, which
  updates and frees each gradient inside backward;
* ``activations`` -- the tensors autograd saves for backward in one forward pass, measured by
  ``torch.autograd.graph.saved_tensors_hooks`` on one batch (distinct storages, parameters excluded). With
  activation checkpointing the blocks keep only their inputs (non-reentrant checkpointing saves them through the
  same hooks, so the measurement sees them), and backward recomputes one block at a time: that block's saved
  tensors are added;
* ``transient`` -- the measured peak minus the four above: workspaces, temporaries of the optimizer step (SVDs at
  a refresh, projected gradients), allocator slack. Negative when the parts' peaks do not coincide.
"""

from __future__ import annotations

from typing import Dict, Iterable, Optional

import torch
from torch import nn

from .nn.walk import stored_tensors

PARTS = ("weights", "optimizer_state", "gradients", "activations", "transient")


def tensor_bytes(obj, seen=None) -> int:
    """Bytes of every distinct tensor storage reachable from ``obj`` (tensors, dicts, lists, tuples)."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor) and hasattr(obj, "__tensor_flatten__"):
        return sum(tensor_bytes(t, seen) for t in stored_tensors(obj))
    if isinstance(obj, torch.Tensor):
        key = (obj.device, obj.untyped_storage().data_ptr())
        if key in seen:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in obj)
    return 0


def gradient_bytes(model: nn.Module, layerwise: bool) -> int:
    """The gradients alive at once (see the module docstring)."""
    sizes = []
    for p in model.parameters():
        if p.dtype == torch.int8:  # an int8 parameter (former Int8Linear weights): its gradient is float32
            sizes.append(p.numel() * 4)
        elif p.requires_grad:  # Int8Linear's weight presents a float dtype: its .grad has that dtype
            sizes.append(p.numel() * p.element_size())
    if not sizes:
        return 0
    return max(sizes) if layerwise else sum(sizes)


def saved_tensor_bytes(fn, exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn()`` runs (``exclude``: tensors not to
    count, e.g. the parameters). Returns the bytes; the saved tensors are dropped with ``fn``'s result."""
    skip = {x.untyped_storage().data_ptr() for t in exclude for x in stored_tensors(t)}
    seen: Dict[int, int] = {}

    def pack(t):
        for x in stored_tensors(t):
            ptr = x.untyped_storage().data_ptr()
            if ptr not in skip:
                seen[ptr] = x.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def activation_bytes(model: nn.Module, tokens: torch.Tensor, targets: torch.Tensor, autocast=None) -> int:
    """Activation memory of one forward of ``model`` (a weightkit.models.llama.TinyLlama) on a batch (see the
    module docstring); ``autocast``: a context manager factory for the forward (the training's autocast)."""
    import contextlib

    ctx = autocast or contextlib.nullcontext
    params = list(model.parameters())
    with torch.enable_grad():
        with ctx():
            outside = saved_tensor_bytes(lambda: model(tokens, targets), exclude=params)
        if not getattr(model, "gradient_checkpointing", False):
            return outside
        # checkpointed blocks: their inputs are in ``outside``; one block's saved tensors exist during its recompute
        model.gradient_checkpointing = False
        try:
            with ctx():
                x = model.embed_tokens(tokens)
                cos, sin = _rotary_for(model, tokens.shape[1], x.device)
                one_block = saved_tensor_bytes(lambda: model.layers[0](x.detach().requires_grad_(), cos, sin),
                                               exclude=params)
        finally:
            model.gradient_checkpointing = True
    return outside + one_block


def _rotary_for(model, seq_len, device):
    from .models.llama import _rotary

    return _rotary(seq_len, model.cfg.dim // model.cfg.n_heads, device)


def peak_breakdown(peak_bytes: int, model: nn.Module, optimizer_state, layerwise: bool,
                   activations: int) -> Dict[str, int]:
    """{part: bytes} for ``PARTS`` and 'peak' (see the module docstring); ``optimizer_state``: the optimizer's
    ``state`` (or a list of them), ``activations``: :func:`activation_bytes`."""
    out = {"weights": tensor_bytes(list(model.parameters()) + list(model.buffers())),
           "optimizer_state": tensor_bytes(optimizer_state),
           "gradients": gradient_bytes(model, layerwise),
           "activations": int(activations)}
    out["transient"] = int(peak_bytes) - sum(out.values())
    out["peak"] = int(peak_bytes)
    return out


def format_breakdown(parts: Dict[str, int], kind: Optional[str] = None) -> str:
    """One line per part, MiB and share of the peak, then the measured peak."""
    peak = max(parts["peak"], 1)
    lines = [f"  {name:<16}{parts[name] / 2**20:>10.1f} MiB {100 * parts[name] / peak:>6.1f}%" for name in PARTS]
    lines.append(f"  {'measured peak':<16}{parts['peak'] / 2**20:>10.1f} MiB" + (f" ({kind})" if kind else ""))
    return "\n".join(lines)
