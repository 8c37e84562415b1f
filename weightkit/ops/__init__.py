"""weightkit ops: one module per hot path; each op is torch.ops.weightkit.<name>, defined once with
weightkit.ops._registry.define (schema, checks, backends, fake, autograd), with a reference and backends.
Importing this package defines every weightkit:: op."""

from . import dictionary, galore, int4, int8, memoryformer, moments8bit, qgalore, rng
from .dictionary import dict_bitmask_matmul
from .galore import galore_adam_update_
from .int8 import absmax_scale, stochastic_round_int8
from .memoryformer import memory_lookup

__all__ = ["dictionary", "galore", "int4", "int8", "memoryformer", "moments8bit", "qgalore", "rng",
           "stochastic_round_int8", "absmax_scale", "galore_adam_update_", "memory_lookup", "dict_bitmask_matmul"]
