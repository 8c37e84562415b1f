"""Drop-in replacements for nn.Linear. Each provides ``from_linear(linear, **opts)``, used by weightkit.swap."""

__all__ = []

from .swap import SwapReport, swap  # noqa: E402

__all__ += ["swap", "SwapReport"]
