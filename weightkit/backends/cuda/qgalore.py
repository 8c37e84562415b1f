"""cuda backend of weightkit/ops/qgalore.py: the write-back composed of this backend's INT4 dequantization and fused
INT8 update, a block of rows at a time, N on bf16 tensor cores (weightkit.backends._blocked.sr_lowrank_update_composed:
'bf16' as bf16 products, the float32 precisions as six products of three-part bf16 splits; never TF32)."""

from __future__ import annotations

from .._blocked import sr_lowrank_update_of
from .int4 import dequantize_int4
from .int8 import int8_sr_update_

int8_sr_lowrank_update_ = sr_lowrank_update_of(dequantize_int4, int8_sr_update_, __name__, True)
