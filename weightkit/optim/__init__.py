"""Memory-efficient optimizers: GaLore (low-rank gradient projection) and Q-GaLore."""

__all__ = []

from .groups import param_groups  # noqa: E402

__all__ += ["param_groups"]
