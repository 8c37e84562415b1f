"""Memory-efficient optimizers: GaLore (low-rank gradient projection) and Q-GaLore."""

from .galore import GaLoreAdamW, GaLoreAdamW8bit, LayerwiseGaLore  # noqa: E402
from .projector import GaLoreProjector  # noqa: E402
from .qgalore import QGaLoreAdamW8bit  # noqa: E402

__all__ = ["GaLoreAdamW", "GaLoreAdamW8bit", "LayerwiseGaLore", "GaLoreProjector", "QGaLoreAdamW8bit"]

from .groups import param_groups  # noqa: E402

__all__ += ["param_groups"]

from .distributed import (ShardedGaLoreAdamW, ShardedGaLoreAdamW8bit, all_reduce_float_grads,  # noqa: E402
                          broadcast_projectors, check_replicas_agree, ddp_layerwise_comm_hook)

__all__ += ["ShardedGaLoreAdamW", "ShardedGaLoreAdamW8bit", "all_reduce_float_grads", "broadcast_projectors",
            "check_replicas_agree", "ddp_layerwise_comm_hook"]
