"""Drop-in replacements for nn.Linear. Each provides ``from_linear(linear, **opts)``, used by weightkit.swap."""

from .dictionary import DictLinear  # noqa: E402
from .int8 import Int8Linear  # noqa: E402
from .memoryformer import MemoryFFN, MemoryFormerBlock, MemoryLinear, MemoryQKV  # noqa: E402

__all__ = ["DictLinear", "Int8Linear", "MemoryLinear", "MemoryQKV", "MemoryFFN", "MemoryFormerBlock"]

from .swap import SwapReport, swap  # noqa: E402

__all__ += ["swap", "SwapReport"]
