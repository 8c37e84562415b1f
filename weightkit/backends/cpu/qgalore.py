"""cpu backend of weightkit/ops/qgalore.py: the write-back composed of this backend's INT4 dequantization and fused
INT8 update, a block of rows at a time (weightkit.backends._blocked.sr_lowrank_update_composed)."""

from __future__ import annotations

from .._blocked import sr_lowrank_update_of
from .int4 import dequantize_int4
from .int8 import int8_sr_update_

int8_sr_lowrank_update_ = sr_lowrank_update_of(dequantize_int4, int8_sr_update_, __name__, False)
