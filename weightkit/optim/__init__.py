"""Memory-efficient optimizers: GaLore (low-rank gradient projection) and Q-GaLore."""

__all__ = []
