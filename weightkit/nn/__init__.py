"""Drop-in replacements for nn.Linear. Each provides ``from_linear(linear, **opts)``, used by weightkit.swap."""

__all__ = []
