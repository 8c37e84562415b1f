"""Memory-efficient optimizers: GaLore (low-rank gradient projection) and Q-GaLore."""

from .galore import GaLoreAdamW, GaLoreAdamW8bit, LayerwiseGaLore  # noqa: E402
from .projector import GaLoreProjector  # noqa: E402
from .qgalore import QGaLoreAdamW8bit  # noqa: E402

__all__ = ["GaLoreAdamW", "GaLoreAdamW8bit", "LayerwiseGaLore", "GaLoreProjector", "QGaLoreAdamW8bit"]

from .groups import param_groups  # noqa: E402

__all__ += ["param_groups"]
