"""QGaLoreAdamW8bit (Q-GaLore, arXiv 2407.08296): the GaLore step with INT4 projection bases, INT8 weights written
back by stochastic rounding, 8-bit Adam moments, and the lazy layer-adaptive subspace refresh.

* Weights of ``weightkit.nn.Int8Linear`` layers (:class:`weightkit.nn.int8.Int8Weight` parameters) are trained
  through their ordinary ``.grad`` and written back by stochastic rounding with their ``scale``
  (weightkit.optim.weights.Int8SRWeight); float 2-D weights in GaLore groups follow GaLoreAdamW8bit, with the INT4
  basis.
* Projection bases are stored as INT4 (weightkit.optim.basis.Int4Basis, ``proj_group_size`` elements per group)
  and read packed: the projection runs ``int4_matmul`` and the int8 write-back ``int8_sr_lowrank_update_``
  (weightkit.ops.qgalore: (W - a P U) * decay and the stochastic rounding tile by tile, no m x n temporary);
  ``lowrank_precision``: 'fp32' (default; within the precision contract, tests/optim/test_qgalore_precision.py),
  'tf32x3' (tensor cores, near-fp32: for a GPU run to measure), 'bf16x3' (bf16 tensor cores on the basis' exact INT4
  integers and a three-part bf16 split of U: within the contract, half tf32x3's tensor-core work) or 'bf16' (~10^4
  over the contract's bound).
* 8-bit moments (bitsandbytes' blockwise format) are updated in one pass by ``blockwise8bit_adam_``
  (weightkit.optim.moments.FusedBlockwiseMoments8bit, as in GaLoreAdamW8bit), for int8 and float weights.
* Lazy refresh (weightkit.optim.refresh.LazyRefresh: ``cos_threshold``, ``gamma_proj``, ``queue_size``);
  ``refresh_counts()`` reports how many SVDs each layer ran.

Only 'std', 'reverse_std', 'left' and 'right' projections are supported (one-sided bases).
"""

from __future__ import annotations

from typing import Dict

from .basis import Int4Basis
from .galore import GaLoreAdamW8bit, GaLoreParts
from .refresh import LazyRefresh
from .weights import FloatWeight, Int8SRWeight


class QGaLoreAdamW8bit(GaLoreAdamW8bit):
    def __init__(self, params, lr: float = 1e-3, *args, cos_threshold: float = 0.4, gamma_proj: float = 2.0,
                 queue_size: int = 5, proj_group_size: int = 64, lowrank_precision: str = "fp32", **kwargs):
        parts = GaLoreParts(basis=Int4Basis(proj_group_size), weights=(Int8SRWeight(lowrank_precision), FloatWeight()),
                            refresh=LazyRefresh(cos_threshold, gamma_proj, queue_size))
        super().__init__(params, lr, *args, parts=parts, **kwargs)

    def refresh_counts(self) -> Dict[int, int]:
        """Number of projector refreshes (SVDs) per parameter, keyed by its index in the param groups."""
        return {self._keys[id(p)]: int(self.state[p].get("refresh_count", 0))
                for g in self.param_groups for p in g["params"] if "rank" in g and p.dim() == 2}
