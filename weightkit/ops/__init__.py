"""weightkit ops: one module per hot path, each a torch.library custom op with a reference and backends."""

from . import quant, rng  # noqa: F401  (registers weightkit::stochastic_round_int8)
from .quant import absmax_scale, stochastic_round_int8

__all__ = ["stochastic_round_int8", "absmax_scale"]
