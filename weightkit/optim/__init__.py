"""Memory-efficient optimizers: the GaLore step (low-rank gradient projection) built from parts, and its presets
GaLoreAdamW, GaLoreAdamW8bit, QGaLoreAdamW8bit and the sharded ones (see weightkit.optim.galore)."""

from .distributed import (ShardedGaLoreAdamW, ShardedGaLoreAdamW8bit, all_reduce_float_grads, broadcast_projectors,
                          check_replicas_agree, ddp_layerwise_comm_hook)
from .galore import GaLoreAdamW, GaLoreAdamW8bit, GaLoreParts
from .groups import param_groups
from .layerwise import LayerwiseGaLore
from .projector import GaLoreProjector
from .qgalore import QGaLoreAdamW8bit

__all__ = ["GaLoreAdamW", "GaLoreAdamW8bit", "GaLoreParts", "LayerwiseGaLore", "GaLoreProjector", "QGaLoreAdamW8bit",
           "param_groups", "ShardedGaLoreAdamW", "ShardedGaLoreAdamW8bit", "all_reduce_float_grads",
           "broadcast_projectors", "check_replicas_agree", "ddp_layerwise_comm_hook"]
