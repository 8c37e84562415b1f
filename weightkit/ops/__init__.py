"""weightkit ops: one module per hot path; each op is torch.ops.weightkit.<name>, defined once with
weightkit.ops._registry.define (schema, checks, backends, fake, autograd), with a reference and backends."""

from . import dictionary, galore, int8, memoryformer, rng  # noqa: F401  (defines the weightkit:: ops)
from .dictionary import dict_sparse_gather
from .galore import galore_adam_update_
from .memoryformer import memory_lookup
from .int8 import absmax_scale, stochastic_round_int8

__all__ = ["stochastic_round_int8", "absmax_scale", "galore_adam_update_", "memory_lookup", "dict_sparse_gather"]
